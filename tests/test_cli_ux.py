"""A new user's first hour (issue 21): one process per run directory, Ctrl-C that says how to
resume, one line instead of a traceback, progress off a terminal, pasteable `fedforge
config`, a completed run resumed, and commands that start without torch. Real processes
where the behaviour is about processes (locks, signals, file size limits)."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedforge.cli import app
from fedforge.config import RunConfig, load_config
from fedforge.report.live import LiveState
from fedforge.report.rundir import prepare_out_dir
from fedforge.report.runlock import LOCK, RunDirInUse, hold, owner
from fedforge.report.stops import saved_round
from fedforge.runtime.checkpoint import CheckpointStore

# Small and fast: digits, a logistic model, a few clients.
TINY = [
    *("--set", "data.dataset='digits'", "--set", "model.name='logistic'"),
    *("--set", "partition.num_clients=8", "--set", "server.clients_per_round=4"),
    *("--set", "client.epochs=1", "--set", "client.batch_size=32"),
]
DEADLINE = 120  # seconds: generous, for a loaded machine


def cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedforge.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def error_lines(output: str) -> list[str]:
    """The lines a failed command printed, without the log records before them."""
    return [line for line in output.splitlines() if not re.match(r"^\d{4}-\d\d-\d\d ", line)]


def test_a_live_run_is_locked_ctrl_c_says_how_to_resume_and_the_dashboard_says_stopped(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    first = cli("run", *TINY, "--set", "server.rounds=20", "--out", str(out))
    wait_for(out / "checkpoint" / "round_000002.safetensors", first)
    first.send_signal(signal.SIGSTOP)  # paused, still alive: it cannot finish meanwhile
    # While it trains: its provenance already names the backend and device that run it.
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["backend"] == "vectorized" and provenance["device"] == "cpu"
    assert LiveState(out).state()["status"] == "running"

    runner = CliRunner()  # this test's process is a second process
    for args in (["--out", str(out), "--overwrite"], ["--out", str(out)]):
        refused = runner.invoke(app, ["run", *TINY, *args, "--quiet"])
        assert refused.exit_code == 2
        assert f"in use by the run in process {first.pid}" in refused.output
        assert "--overwrite" not in refused.output  # never suggests destroying a live run
        assert len(refused.output.strip().splitlines()) == 1
    resumed = runner.invoke(app, ["run", "--resume", str(out), "--quiet"])
    assert resumed.exit_code == 2 and f"process {first.pid}" in resumed.output
    assert (out / "config.toml").is_file() and first.poll() is None  # untouched, still training

    first.send_signal(signal.SIGINT)  # delivered when it continues
    first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=DEADLINE)
    assert first.returncode == 130
    saved = saved_round(out)
    assert saved is not None and saved >= 2
    lines = error_lines(stderr)
    # Off a terminal, progress is printed as lines: round 0 at once.
    assert lines[0].startswith("round 0/20: accuracy "), stderr
    assert lines[-1] == (
        f"interrupted after round {saved} (saved); continue with: fedforge run --resume {out}"
    )
    assert "Traceback" not in stderr
    state = LiveState(out).state()
    assert state["status"] == "stopped" and state["status_reason"] == "interrupted (Ctrl-C)"

    # The printed command continues the run to its end.
    command = lines[-1].split("continue with: fedforge ")[1].split()
    done = runner.invoke(app, [*command, "--quiet"])
    assert done.exit_code == 0, done.output
    assert json.loads((out / "history.json").read_text())[-1]["round"] == 20
    assert LiveState(out).state()["status"] == "finished"


def test_a_dead_owner_is_shown_killed_and_its_lock_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("seed = 1\n")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from fedforge.report.runlock import hold;"
            "hold(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    assert owner(run_dir)[0] == "alive" and owner(run_dir)[1]["pid"] == holder.pid
    assert LiveState(run_dir).state()["status"] == "running"
    with pytest.raises(RunDirInUse, match=f"process {holder.pid}"):
        hold(run_dir)
    with pytest.raises(RunDirInUse):
        prepare_out_dir(run_dir, overwrite=True)
    assert (run_dir / "config.toml").exists()

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    state = LiveState(run_dir).state()
    assert state["status"] == "killed" and str(holder.pid) in state["status_reason"]
    with hold(run_dir):  # a dead process's lock is taken over
        assert owner(run_dir)[0] == "alive"
        assert json.loads((run_dir / LOCK).read_text())["pid"] == os.getpid()
    assert owner(run_dir)[0] == "dead"


def test_a_run_directory_deleted_while_training_ends_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = cli("run", *TINY, "--set", "server.rounds=500", "--out", str(out), "--quiet")
    wait_for(out / "checkpoint" / "round_000001.safetensors", proc)
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    _, stderr = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 1
    assert error_lines(stderr) == [
        f"error: the run directory {out} was deleted while the run was training; the run "
        "stopped (start it again to get a new run directory)"
    ]


def test_a_file_size_limit_ends_with_one_line_and_the_run_resumes(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes writes past 40 kB fail with EFBIG: the first checkpoint (an MLP of
    15k parameters, 60 kB) cannot be written."""
    out = tmp_path / "run"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    args = [*TINY, "--set", "model.name='mlp'", "--set", "model.hidden=[200]"]
    proc = subprocess.run(
        [sys.executable, "-m", "fedforge.cli", "run", *args, "--set", "server.rounds=2",
         "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=DEADLINE, preexec_fn=limit, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"error: cannot write {out / 'checkpoint'}/")
    assert "File too large" in lines[0] and f"fedforge run --resume {out}" in lines[0]
    assert not list((out / "checkpoint").glob(".*.tmp"))  # no partial file left
    resumed = CliRunner().invoke(app, ["run", "--resume", str(out), "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "history.json").read_text())[-1]["round"] == 2


def test_a_full_disk_ends_with_one_line_and_keeps_the_saved_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC part way through the checkpoint of round 2 (rounds 0 and 1 are saved): the
    third file fedforge's writer opens takes 100 bytes, then the disk is full."""
    from fedforge.core import files

    opened = {"n": 0}

    class FullDisk:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, data: bytes) -> int:
            self.f.write(data[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def filling_open(path: Path, mode: str = "r") -> Any:
        opened["n"] += 1
        f = open(path, mode)  # noqa: SIM115
        return FullDisk(f) if opened["n"] == 3 else f

    monkeypatch.setattr(files, "open", filling_open, raising=False)
    out = tmp_path / "run"
    args = ["run", *TINY, "--set", "server.rounds=4", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert error_lines(result.output) == [
        f"error: cannot write {out / 'checkpoint' / '.round_000002.safetensors.tmp'}: No space "
        "left on device; the run stopped and its saved rounds are intact: free disk space (or "
        f"raise the file size limit), then continue with: fedforge run --resume {out}"
    ]
    assert not (out / "checkpoint" / ".round_000002.safetensors.tmp").exists()
    store = CheckpointStore(out / "checkpoint")  # what a resume reads: intact at round 1
    saved = store.load()
    store.close()
    assert saved is not None and saved.state.round == 1 and len(saved.history) == 2


def test_one_line_for_a_model_too_large_and_a_directory_as_the_configuration(
    tmp_path: Path,
) -> None:
    runner = CliRunner()
    out = tmp_path / "huge"
    huge = runner.invoke(app, ["run", "--set", "model.hidden=[100000, 100000]", "--out", str(out)])
    assert huge.exit_code == 2 and not out.exists()
    (line,) = huge.output.strip().splitlines()
    assert re.fullmatch(
        r"error: the model has 10,079,600,010 parameters \(40\.3 GB as float32\); training it "
        r"needs at least \d+ GB of memory, more than this machine's [\d.]+ GB: lower "
        r"model\.hidden",
        line,
    ), line
    folder = runner.invoke(app, ["run", str(tmp_path)])
    assert folder.exit_code == 2
    assert folder.output.strip().splitlines() == [
        f"error: {tmp_path} is a directory, not a configuration file (to continue the run in a "
        f"run directory: fedforge run --resume {tmp_path})"
    ]


def test_fedforge_config_prints_toml_that_runs_and_a_complete_run_says_how_to_extend_it(
    tmp_path: Path,
) -> None:
    runner = CliRunner()
    printed = runner.invoke(app, ["config"])
    assert printed.exit_code == 0
    text = printed.output
    raw = tomllib.loads(text)
    assert raw["server"]["rounds"] == 50 and raw["data"]["dataset"] == "mnist5k"
    assert "lr" not in raw["server"]  # unset by default: commented out
    assert re.search(r"^# lr = .*unset; float, optional \(> 0\)", text, re.M)
    assert re.search(r"^rounds = 50  # int \(>= 1\)", text, re.M)
    assert '"127.0.0.1:8443"' in text and "fedprox: proximal coefficient" in text
    path = tmp_path / "default.toml"
    path.write_text(text)
    assert load_config(path) == RunConfig()

    # `fedforge run` takes the printed file as it is (plus small overrides).
    out = tmp_path / "run"
    first = runner.invoke(
        app, ["run", str(path), *TINY, "--set", "server.rounds=2", "--out", str(out), "--quiet"]
    )
    assert first.exit_code == 0, first.output
    overrides = [a for a in TINY if a != "--set"] + ["server.rounds=2"]
    assert load_config(out / "config.toml") == load_config(path, overrides).model_copy(
        update={"deploy": RunConfig().deploy}  # a simulation's config.toml has no [deploy]
    )

    # Resumed once complete: nothing written, one line that says how to extend it.
    files = lambda: {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != LOCK}  # noqa: E731
    before = files()
    again = runner.invoke(app, ["run", "--resume", str(out)])
    assert again.exit_code == 0
    assert again.output.strip().splitlines() == [
        f"{out} is complete (2 rounds, server.rounds = 2): nothing to resume; to train it "
        f"further, extend it: fedforge run --resume {out} --set server.rounds=4"
    ]
    assert files() == before  # nothing written
    extended = runner.invoke(app, ["run", "--resume", str(out), "--set", "server.rounds=3"])
    assert extended.exit_code == 0, extended.output
    assert json.loads((out / "history.json").read_text())[-1]["round"] == 3


def test_version_and_keys_start_without_torch(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from fedforge.cli import app\n"
        "for args in (['--version'], ['keys', 'init', sys.argv[1]],\n"
        "             ['keys', 'add-client', 'alice', '--keys', sys.argv[1]]):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, exc.code\n"
        "print('heavy:', sorted(m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "keys")],
        capture_output=True, text=True, timeout=DEADLINE, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "fedforge 0.1.0" in proc.stdout and "heavy: []" in proc.stdout
    assert (tmp_path / "keys" / "alice" / "client.crt").is_file()
    import fedforge

    assert set(fedforge.__all__) == set(fedforge._EXPORTS)
    for name in fedforge.__all__:
        assert getattr(fedforge, name) is not None
