"""Every code block in README.md runs as written (issue 21).

* ``python`` blocks run in a fresh interpreter, in README order, the blocks of one section
  in one session (a later block uses what an earlier one made, as a reader pasting them
  would); the deployment client's block trains against a real server.
* ``bash`` commands are checked without training 50 rounds: each ``fedforge run`` command's
  configuration loads (its file and ``--set`` overrides, through the command line's own
  parser), ``--resume`` and ``dashboard`` name a directory an earlier command made,
  ``fedforge config`` and ``--version`` run, the credentials commands (``keys ...``) run in a
  scratch directory in order, ``server`` loads its configuration and ``client`` its
  credentials, ``pip install`` names extras that exist; ``fedforge new`` makes its project in
  the scratch directory and ``cd`` enters it, so the commands after it run in the project.
* Output samples run and match: the configuration error printed verbatim, the trace CSV
  reads as a trace.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer.main
from typer.testing import CliRunner

from fedforge.cli import app
from fedforge.config import RunConfig, load_config
from fedforge.experiment import check_simulation
from tests.net.helpers import free_port, stop_all, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    section: str  # the "## " section it is in


def blocks() -> list[Block]:
    found, section = [], ""
    fence = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
    text = README.read_text()
    position = 0
    for match in fence.finditer(text):
        headers = re.findall(r"^## (.+)$", text[position : match.start()], re.M)
        section = headers[-1] if headers else section
        position = match.end()
        found.append(Block(match.group(1), match.group(2), section))
    return found


def test_every_block_is_one_the_tests_know_how_to_run() -> None:
    kinds = {b.lang for b in blocks()}
    assert kinds <= {"python", "bash", ""}, kinds
    samples = [b.code for b in blocks() if b.lang == ""]
    assert len(samples) == 3  # the Ctrl-C line, the configuration error, the trace: below
    assert sum(b.lang == "python" for b in blocks()) >= 5
    assert {p for p in PRINTS if any(s.startswith(p) for s in other_sessions())} == set(PRINTS)


# Python blocks.

_DIGEST = """
import hashlib as _h
print("digest", _h.sha256(b"".join(
    result.state.params[name].tobytes() for name in sorted(result.state.params)
)).hexdigest(), flush=True)
"""


def run_python(code: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """(stdout, stderr) of ``code`` run in a namespace of its own, in ``cwd`` (in this
    process: a fresh interpreter would add seconds of imports to every block)."""
    out, err = io.StringIO(), io.StringIO()
    module = types.ModuleType("readme_session")  # a module, as a script's classes need
    monkeypatch.chdir(cwd)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        exec(compile(code, "README.md", "exec"), module.__dict__)
    monkeypatch.chdir(ROOT)
    return out.getvalue(), err.getvalue()


def test_the_python_api_blocks_run_in_order_and_the_first_is_reproducible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = [b.code for b in blocks() if b.lang == "python" and b.section.startswith("Python API")]
    assert len(api) >= 4
    first, rest = api[0], api[1:]
    assert "manual_seed" not in first and "def model()" in first  # the seed is simulate's
    # The first example twice, torch's global RNG moved in between (as in a new interpreter):
    # the initial model follows `seed=` alone, so both print the same.
    again = "import torch as _t\n_t.manual_seed(12345)\n" + first
    session = "\n".join([first, _DIGEST, again, _DIGEST, *rest])
    stdout, stderr = run_python(session, tmp_path, monkeypatch)
    accuracies = [float(a) for a in re.findall(r"^test accuracy ([\d.]+)$", stdout, re.M)]
    digests = re.findall(r"^digest (\w+)$", stdout, re.M)
    assert len(accuracies) == 2 and accuracies[0] == accuracies[1] > 0.8
    assert len(digests) == 2 and digests[0] == digests[1]
    assert "clip.clipped" in stdout and "fed_eval.accuracy" in stdout
    assert re.search(r"^\d+ simulated seconds$", stdout, re.M)
    capped = re.search(r"^capped FedAvg: test accuracy ([\d.]+)$", stdout, re.M)
    assert capped is not None and float(capped.group(1)) > 0.8
    # Default verbosity: progress lines on stderr, round 0 and the last round.
    assert re.search(r"^round 0/10: accuracy ", stderr, re.M)
    assert re.search(r"^round 10/10: accuracy ", stderr, re.M)


def other_sessions() -> dict[str, str]:
    """The python blocks of every other section, one session per section (the deployment
    client's block runs against a server, below)."""
    sessions: dict[str, list[str]] = {}
    for b in blocks():
        api = b.section.startswith("Python API")
        if b.lang == "python" and not api and "FederatedClient" not in b.code:
            sessions.setdefault(b.section, []).append(b.code)
    return {section: "\n".join(codes) for section, codes in sessions.items()}


# What a section's session must print, where its README text says so.
PRINTS = {"Reinforcement learning": r"^held-out mean return 500\.0$"}


@pytest.mark.parametrize("section", sorted(other_sessions()))
def test_the_python_blocks_of_every_other_section_run(
    section: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdout, _ = run_python(other_sessions()[section], tmp_path, monkeypatch)
    for prefix, pattern in PRINTS.items():
        if section.startswith(prefix):
            assert re.search(pattern, stdout, re.M), stdout


def test_the_deployment_client_block_trains_against_a_real_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's client block as written, but for the server's port (a free one), against
    a real server process."""
    (client_block,) = [
        b.code for b in blocks() if b.lang == "python" and "FederatedClient" in b.code
    ]
    from fedforge.data.datasets import load_digits
    from fedforge.net.keys import add_client, init_keys

    init_keys(tmp_path / "keys", ["localhost", "127.0.0.1"])
    add_client(tmp_path / "keys", "alice", tmp_path / "keys" / "alice")
    train, _ = load_digits()
    np.savez(tmp_path / "alice_data.npz", x=train.x[:200], y=train.y[:200])
    port = free_port()
    (tmp_path / "server.toml").write_text(SERVER.format(port=port))
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "fedforge.cli", "server", "server.toml"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_port(port, timeout=120)
        assert '"127.0.0.1:8443"' in client_block
        run_python(
            client_block.replace("127.0.0.1:8443", f"127.0.0.1:{port}"), tmp_path, monkeypatch
        )
        assert server.wait(timeout=120) == 0
    finally:
        stop_all([server])  # type: ignore[list-item]
        log.close()
    assert "complete: 2 rounds" in (tmp_path / "server.log").read_text()
    assert (tmp_path / "client-state" / "alice").is_dir()
    assert (tmp_path / "server-state" / "final_model.safetensors").is_file()


SERVER = """
[data]
dataset = "digits"
[partition]
num_clients = 1
[model]
name = "logistic"
[client]
epochs = 1
batch_size = 32
[server]
rounds = 2
clients_per_round = 1
[deploy]
address = "127.0.0.1:{port}"
keys = "keys"
state_dir = "server-state"
min_clients = 1
client_data = "own"
linger_s = 0
"""


# Bash blocks.


def commands(code: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, ``&&``
    chains split."""
    out: list[list[str]] = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            out.append(words[:cut])
            words = words[cut + 1 :]
    return out


def parse(args: list[str]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The subcommand path and its parsed parameters, by the command line's own parser."""
    command: Any = typer.main.get_command(app)
    parent, name, path = None, "fedforge", []
    while hasattr(command, "get_command") and args and not args[0].startswith("-"):
        parent = command.context_class(command, info_name=name, parent=parent)
        name, args = args[0], args[1:]
        command = command.get_command(parent, name)
        assert command is not None, f"fedforge has no command {name!r}"
        path.append(name)
    return tuple(path), command.make_context(name, list(args), parent=parent).params


class Shell:
    """Runs or checks a README block's commands in order, in a scratch directory."""

    def __init__(self, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.scratch = scratch
        self.monkeypatch = monkeypatch
        self.runner = CliRunner()
        self.made: set[str] = set()  # run directories earlier commands make
        self.cwd = ROOT  # where configuration files are found (a new project, once entered)

    @property
    def here(self) -> Path:
        """Where credentials are made and read: the project entered, else the scratch."""
        return self.cwd if self.cwd.is_relative_to(self.scratch) else self.scratch

    def run(self, argv: list[str]) -> None:
        if argv[0] == "pip":
            return self.pip(argv)
        if argv[0] == "cd":  # into a project `fedforge new` made
            self.cwd = self.scratch / argv[1] if self.cwd == ROOT else self.cwd / argv[1]
            assert self.cwd.is_dir(), argv
            return None
        if argv[:3] == ["python", "-m", "pytest"]:
            assert " ".join(argv) in (ROOT / ".ci" / "run").read_text()
            return None
        if argv[:2] == ["python", "-c"] and argv[3:4] == [">"]:  # python -c CODE > FILE
            made = subprocess.run([sys.executable, "-c", argv[2]], capture_output=True, text=True)
            assert made.returncode == 0, made.stderr
            (self.scratch / argv[4]).write_text(made.stdout)
            return None
        assert argv[0] == "fedforge", f"README command the tests do not know: {argv}"
        args, target = argv[1:], None
        if ">" in args:  # fedforge config > my.toml
            args, target = args[: args.index(">")], args[args.index(">") + 1]
        if args in (["--version"], ["config"]):
            result = self.runner.invoke(app, args)
            assert result.exit_code == 0, result.output
            if args == ["config"]:
                assert target is not None
                (self.scratch / target).write_text(result.output)
                assert load_config(self.scratch / target) == RunConfig()
            return None
        assert target is None, argv
        path, params = parse(args)
        if path == ("run",):
            return self.fedforge_run(params)
        if path == ("new",):
            return self.new(args)
        if path == ("dashboard",):
            from fedforge.report.dashboard import is_loopback_host, read_token

            # A run directory an earlier command made, or a server's default state directory.
            deployed = str(params["run_dir"]) == RunConfig().deploy.state_dir
            assert deployed or str(params["run_dir"]) in self.made, params["run_dir"]
            if not is_loopback_host(params["host"]):  # served beyond loopback: with a token
                token_file = params["token_file"] and self.scratch / params["token_file"]
                assert read_token(token_file) is not None
        elif path == ("server",):
            load_config(self.cwd / params["config"], params["set_"])
        elif path == ("client",):
            from fedforge.net.keys import ClientCredentials

            ClientCredentials.load(self.here / params["credentials"])
            if params["config"] is not None:  # the site's own configuration and data
                from fedforge.net.site import prepare

                data = self.cwd / params["data"] if params["data"] else None
                prepare(load_config(self.cwd / params["config"]), data)
        elif path[0] == "keys":
            self.keys(args)
        else:
            raise AssertionError(f"README command the tests do not know: {argv}")
        return None

    def fedforge_run(self, params: dict[str, Any]) -> None:
        if params["resume"] is not None:
            assert str(params["resume"]) in self.made, params["resume"]
            return
        config = self.cwd / params["config"] if params["config"] else None
        check_simulation(load_config(config, params["set_"]))
        if params["out"] is not None:
            self.made.add(str(params["out"]))

    def keys(self, args: list[str]) -> None:
        """Credentials commands run for real; between the site's and the coordinator's steps
        the files travel as the README's comments say."""
        self.monkeypatch.chdir(self.here)
        if args[:2] == ["keys", "sign"]:
            if not (self.scratch / "keys").exists():  # the coordinator's own keys
                assert self.runner.invoke(app, ["keys", "init", "keys"]).exit_code == 0
            shutil.copy(self.scratch / "credentials" / "client.csr", self.scratch / args[2])
        if args[:2] == ["keys", "renew"] and not (self.scratch / "keys").exists():
            # the coordinator's keys, in which the site was registered earlier
            for setup in (
                ["keys", "init", "keys"],
                ["keys", "add-client", args[2], "--keys", "keys"],
            ):
                assert self.runner.invoke(app, setup).exit_code == 0
        result = self.runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        if args[:2] == ["keys", "sign"]:
            for name in ("client.crt", "ca.crt"):
                shutil.copy(self.scratch / name, self.scratch / "credentials" / name)
        self.monkeypatch.chdir(ROOT)

    def new(self, args: list[str]) -> None:
        """``fedforge new``: the project is made (or the templates listed) for real."""
        self.monkeypatch.chdir(self.scratch)
        result = self.runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        self.monkeypatch.chdir(ROOT)

    def pip(self, argv: list[str]) -> None:
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        extras = project["optional-dependencies"]
        for word in argv[2:]:
            for extra in re.findall(r"\[([\w,-]+)\]", word):
                assert set(extra.split(",")) <= set(extras), word
            if word.startswith("torch=="):
                assert word in project["dependencies"], word


def test_every_bash_command_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    bash = [b for b in blocks() if b.lang == "bash"]
    assert len(bash) >= 10
    shell = Shell(tmp_path, monkeypatch)
    seen = 0
    for index, block in enumerate(bash):
        shell.scratch, shell.cwd = tmp_path / str(index), ROOT  # each block from the top
        shell.scratch.mkdir()
        for argv in commands(block.code):
            shell.run(argv)
            seen += 1
    assert seen >= 30


def test_the_configuration_error_sample_is_what_the_command_prints() -> None:
    (sample,) = [b.code for b in blocks() if b.lang == "" and b.code.startswith("$ ")]
    command, *expected = sample.rstrip("\n").splitlines()
    argv = shlex.split(command.removeprefix("$ "))
    assert argv[:2] == ["fedforge", "run"]
    result = CliRunner().invoke(app, argv[1:])
    assert result.exit_code == 2
    assert result.output.rstrip("\n").splitlines() == expected


def test_the_ctrl_c_sample_is_what_an_interrupted_run_prints(tmp_path: Path) -> None:
    import sqlite3

    from fedforge.report.stops import interrupted_text

    (sample,) = [b.code for b in blocks() if b.lang == "" and b.code.startswith("interrupted")]
    found = re.fullmatch(r"interrupted after round (\d+) .*--resume (\S+)\n", sample)
    assert found is not None
    run_dir = tmp_path / found.group(2)
    (run_dir / "checkpoint").mkdir(parents=True)
    db = sqlite3.connect(run_dir / "checkpoint" / "state.sqlite")
    with db:
        db.execute("CREATE TABLE rounds (round INTEGER PRIMARY KEY)")
        db.execute("INSERT INTO rounds VALUES (?)", (int(found.group(1)),))
    db.close()
    assert interrupted_text(run_dir) + "\n" == sample.replace(found.group(2), str(run_dir))


def test_the_trace_sample_reads_as_a_trace(tmp_path: Path) -> None:
    from fedforge.runtime.devices import read_trace

    (sample,) = [b.code for b in blocks() if b.lang == "" and b.code.startswith("client,")]
    path = tmp_path / "devices.csv"
    path.write_text(sample)
    devices = read_trace(path, 2)
    assert len(devices) == 2


def test_quickstart_says_how_to_install_a_cpu_only_torch() -> None:
    quickstart = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    pinned = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pinned is not None
    command = (
        f"pip install torch=={pinned.group(1)} --index-url https://download.pytorch.org/whl/cpu"
    )
    assert f"`{command}`" in quickstart
    assert "GPU" in quickstart


def test_readme_documents_the_dashboard_and_trackers() -> None:
    text = README.read_text()
    for phrase in (
        "fedforge run --dashboard",
        "fedforge dashboard RUN_DIR",
        "pip install 'fedforge[tensorboard]'",
        "pip install 'fedforge[mlflow]'",
        "`live.jsonl`",
    ):
        assert phrase in text, phrase
    extras = (ROOT / "pyproject.toml").read_text()
    assert 'tensorboard = ["tensorboard' in extras and 'mlflow = ["mlflow' in extras
    assert '"report/assets/*.html"' in extras  # the dashboard page ships in the wheel
