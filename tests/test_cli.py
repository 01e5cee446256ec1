"""End-to-end: the ``fedforge`` command in a subprocess, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

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
    assert [row["round"] for row in history] == [1, 2, 3, 4]
    for key in [
        "test_accuracy",
        "test_loss",
        "train_loss",
        "clients_sampled",
        "clients_completed",
        "clients_failed",
        "bytes_down",
        "bytes_up",
        "wall_seconds",
    ]:
        assert key in history[0]
    assert history[-1]["test_accuracy"] > 0.5
    assert history[0]["clients_sampled"] == 4 and history[0]["clients_completed"] == 4
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
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]  # noqa: E731
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
