"""The project's own test (python -m pytest -q): two rounds of the configured run in
simulation, and every site's data fits the model."""

from __future__ import annotations

from pathlib import Path

from fedforge.config import load_config
from fedforge.experiment import run_experiment

HERE = Path(__file__).resolve().parent


def test_two_rounds_in_simulation(tmp_path: Path) -> None:
    config = load_config(HERE / "fedforge.toml", ["server.rounds=2"])
    result = run_experiment(config, tmp_path / "run")
    assert [r.round for r in result.history] == [0, 1, 2]
    assert result.history[-1].clients_completed == config.server.clients_per_round
    assert result.history[-1].test_accuracy > 0.8  # above the 63% of "always benign"
