"""End-to-end: the ``fedforge`` command in a subprocess, as a user runs it."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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
