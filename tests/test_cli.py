"""End-to-end: the ``fedforge`` command in a subprocess, as a user runs it."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedforge.config import load_config

SMALL = """
seed = 3
[data]
dataset = "digits"
[partition]
scheme = "dirichlet"
num_clients = 12
alpha = 0.5
[model]
name = "logistic"
[client]
epochs = 2
batch_size = 16
lr = 0.5
[server]
rounds = 3
clients_per_round = 4
"""


def fedforge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedforge.cli", *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_run_writes_a_complete_run_directory(tmp_path: Path) -> None:
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    out = tmp_path / "run"
    proc = fedforge("run", str(cfg), "--set", "server.rounds=4", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stderr

    resolved = load_config(out / "config.toml")
    assert resolved.server.rounds == 4 and resolved.seed == 3  # override applied, all keys kept
    history = json.loads((out / "history.json").read_text())
    assert [row["round"] for row in history] == [0, 1, 2, 3, 4]
    for key in [
        "test_accuracy",
        "test_loss",
        "train_loss",
        "clients_sampled",
        "clients_completed",
        "clients_failed",
        "bytes_down",
        "bytes_up",
        "train_seconds",
        "aggregate_seconds",
        "eval_seconds",
        "wall_seconds",
        "metrics",
        "clients",
    ]:
        assert key in history[1]
    assert history[-1]["test_accuracy"] > 0.5
    assert history[1]["clients_sampled"] == 4 and history[1]["clients_completed"] == 4
    model = load_file(str(out / "model.safetensors"))
    assert model["0.weight"].shape == (10, 64)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Same seed again: identical history (but for timings) and identical model bytes.
    out2 = tmp_path / "run2"
    assert (
        fedforge(
            "run", str(cfg), "--set", "server.rounds=4", "--out", str(out2), "--quiet"
        ).returncode
        == 0
    )
    strip = lambda rows: [  # noqa: E731
        {k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows
    ]
    assert strip(json.loads((out2 / "history.json").read_text())) == strip(history)
    assert (out2 / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_bad_config_fails_before_training_naming_the_key(tmp_path: Path) -> None:
    proc = fedforge(
        "run",
        "--set",
        "partition.scheme=zipf",
        "--set",
        "server.round=3",
        "--out",
        str(tmp_path / "never"),
    )
    assert proc.returncode == 2
    assert "partition.scheme" in proc.stderr and "'dirichlet'" in proc.stderr
    assert "server.round" in proc.stderr and "rounds" in proc.stderr
    assert not (tmp_path / "never").exists()


RESUMABLE = """
seed = 5
[data]
dataset = "digits"
[partition]
num_clients = 20
[model]
hidden = [64]
[algorithm]
name = "scaffold"
[client]
epochs = 2
batch_size = 8
lr = 0.05
[server]
rounds = 12
clients_per_round = 10
optimizer = "adam"
[evaluation]
fraction = 0.3
"""


def test_sigkilled_run_resumes_to_the_same_final_model(tmp_path: Path) -> None:
    """Server state, optimizer state and SCAFFOLD's client states are all checkpointed: a run
    killed mid-way and resumed ends exactly where an uninterrupted one does."""
    cfg = tmp_path / "r.toml"
    cfg.write_text(RESUMABLE)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    base = ["run", str(cfg), "--quiet"]
    assert fedforge(*base, "--out", str(whole)).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedforge.cli", *base, "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = killed / "checkpoint" / "round_000003.safetensors"
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "history.json").exists(), "the run finished before it was killed"
    assert (killed / "clients" / "slots.bin").exists()  # SCAFFOLD's states: one mapped file
    resumed = fedforge("run", "--resume", str(killed), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(whole / "model.safetensors"))
    b = load_file(str(killed / "model.safetensors"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    strip = lambda rows: [  # noqa: E731
        {k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows
    ]
    history_whole = json.loads((whole / "history.json").read_text())
    history_killed = json.loads((killed / "history.json").read_text())
    assert strip(history_killed) == strip(history_whole)
    assert "fed_eval.accuracy" in history_whole[-1]["metrics"]


def test_resume_refuses_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    proc = fedforge("run", "--resume", str(tmp_path))
    assert proc.returncode == 2 and "not a run directory" in proc.stderr


# Issue 15: nothing lost, provenance, discoverable configuration.


def test_version_run_help_and_config_listing() -> None:
    from typer.testing import CliRunner

    import fedforge
    from fedforge.cli import app

    runner = CliRunner()
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and fedforge.__version__ in version.output
    helped = runner.invoke(app, ["run", "--help"])
    assert helped.exit_code == 0 and "fedforge config" in " ".join(helped.output.split())
    listing = runner.invoke(app, ["config"])
    assert listing.exit_code == 0
    by_key, section = {}, ""
    for line in listing.output.splitlines():  # TOML: [section] headers, then its keys
        if line.startswith("["):
            section = line[1 : line.index("]")] + "."
        elif " = " in line:
            key = line.removeprefix("# ").split(" = ")[0]
            by_key[section + key] = line
    assert by_key["server.rounds"].startswith("rounds = 50") and ">= 1" in (by_key["server.rounds"])
    assert "fedavg, fedprox, scaffold" in by_key["algorithm.name"]
    assert '"127.0.0.1:8443"' in by_key["deploy.address"]
    assert "fedprox: proximal coefficient" in by_key["algorithm.mu"]
    assert "optional" in by_key["server.lr"] and "unset" in by_key["server.lr"]
    assert by_key["server.lr"].startswith("# lr =")  # unset: commented out
    assert "0 = the client's whole data" in by_key["client.batch_size"]


def test_existing_out_is_refused_without_overwrite(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedforge.cli import app

    old = tmp_path / "old"
    old.mkdir()
    (old / "config.toml").write_text("seed = 1\n")
    (old / "history.json").write_text("[]\n")
    runner = CliRunner()
    refused = runner.invoke(app, ["run", "--set", "server.rounds=1", "--out", str(old), "--quiet"])
    assert refused.exit_code == 2
    assert "--overwrite" in refused.output and "error" in refused.output
    assert (old / "history.json").read_text() == "[]\n" and len(list(old.iterdir())) == 2
    both = runner.invoke(app, ["run", "--resume", str(old), "--overwrite"])
    assert both.exit_code == 2 and (old / "history.json").exists()


def test_overwrite_replaces_a_run_and_records_provenance(tmp_path: Path) -> None:
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text("seed = 1\n")
    (out / "stale.txt").write_text("from an earlier run")
    args = ["run", str(cfg), "--set", "server.rounds=1", "--set", "runtime.backend=auto"]
    proc = fedforge(*args, "--out", str(out), "--overwrite", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "stale.txt").exists()

    prov = json.loads((out / "provenance.json").read_text())
    import torch

    import fedforge as package

    assert prov["fedforge"] == package.__version__ and prov["torch"] == torch.__version__
    assert prov["numpy"] == np.__version__
    assert prov["python"] == ".".join(map(str, sys.version_info[:3]))
    history = json.loads((out / "history.json").read_text())
    assert prov["backend_requested"] == "auto"
    assert prov["backend"] in ("vectorized", "workers", "sequential")
    assert prov["device"] in ("cpu", "cuda", "cuda:0")
    assert "--overwrite" in prov["command"] and str(out) in prov["command"]
    assert prov["started"] <= prov["finished"] and len(history) == 2

    text = (out / "config.toml").read_text()
    assert "deploy" not in text
    assert load_config(out / "config.toml").server.rounds == 1

    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == modes["config.toml"] == modes["history.json"]


def test_runs_started_together_get_their_own_directories(tmp_path: Path) -> None:
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    cmd = [sys.executable, "-m", "fedforge.cli", "run", str(cfg), "--set", "server.rounds=1"]
    procs = [
        subprocess.Popen(
            [*cmd, "--quiet"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    for run_dir in runs:
        assert json.loads((run_dir / "history.json").read_text())[-1]["round"] == 1
        assert (run_dir / "model.safetensors").exists() and (run_dir / "provenance.json").exists()


def test_a_private_run_reports_epsilon_and_stops_at_its_budget(tmp_path: Path) -> None:
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    out = tmp_path / "dp"
    proc = fedforge(
        "run", str(cfg), "--out", str(out), "--quiet",
        "--set", "server.rounds=3", "--set", "privacy.mode='central'",
        "--set", "privacy.target_epsilon=20", "--set", "privacy.clip_norm=0.5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "eps 20 (delta 1e-05, " in proc.stderr or "eps 19.9" in proc.stderr
    assert "1e-05, replace-one client)" in proc.stderr  # the relation epsilon is for
    assert "above 10" in proc.stderr  # a loose guarantee is warned about before training
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["metrics"]["dp.epsilon"] <= 20
    assert history[-1]["labels"]["dp.noise"].startswith("os-entropy")
    assert (out / "report.png").stat().st_size > 0


def test_configuration_errors_print_one_line_each_with_the_fix_verbatim(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.util

    import torch
    from typer.testing import CliRunner

    from fedforge.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, p=None: None if n == "ray" else real(n, p)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "never"
    # (runtime.device applies to the vectorized backend only: one run each)
    for sets, line in (
        (
            ["runtime.backend=ray"],
            "  runtime.backend: 'ray' needs Ray, which is not installed; "
            "pip install 'fedforge[ray]' or pick another backend",
        ),
        (
            ["runtime.backend=vectorized", "runtime.device=cuda"],
            "  runtime.device: 'cuda' needs CUDA, which is not available on this machine; "
            "use 'cpu' or leave it unset",
        ),
    ):
        args = ["run", *(arg for s in sets for arg in ("--set", s))]
        result = CliRunner().invoke(app, [*args, "--out", str(out)])
        assert result.exit_code == 2 and not out.exists()
        assert result.output.splitlines() == ["error: invalid configuration:", line]


def test_fedbuff_without_the_clock_is_refused_before_a_run_directory_exists(
    tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from fedforge.cli import app

    out = tmp_path / "never"
    sets = ["asynchronous.mode=fedbuff", "asynchronous.concurrency=20"]
    args = [a for s in sets for a in ("--set", s)]
    result = CliRunner().invoke(app, ["run", *args, "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()
    assert "set clock.enabled = true" in result.output
