"""The project's own test (python -m pytest -q): two rounds of the configured run in
simulation (shortened: fewer, shorter episodes), the trained policy loads, and every
deployed agent's own file holds its simulated environment. Needs the rl extra."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedforge.config import load_config
from fedforge.experiment import run_experiment
from fedforge.workload.imports import load_object

HERE = Path(__file__).resolve().parent
SHORT = ["server.rounds=2", "rl.episodes=3", "rl.max_episode_steps=100", "rl.eval_episodes=2"]


def test_two_rounds_in_simulation_and_the_policy_loads(tmp_path: Path) -> None:
    pytest.importorskip("gymnasium", reason="needs the rl extra: pip install 'fedforge[rl]'")
    config = load_config(HERE / "fedforge.toml", SHORT)
    result = run_experiment(config, tmp_path / "run")
    history = result.history
    assert [r.round for r in history] == [0, 1, 2]
    assert history[-1].clients_completed == config.server.clients_per_round
    assert 1 <= history[-1].metrics["test_episode_return"] <= 100  # the horizon caps it
    load_policy = load_object("models:load_policy", HERE, "models.py")
    make_policy = load_object("models:make_policy", HERE, "models.py")
    trained, fresh = load_policy(tmp_path / "run"), make_policy()  # type: ignore[operator]
    assert trained.state_dict().keys() == fresh.state_dict().keys()
    assert any(not torch.equal(trained.state_dict()[k], v) for k, v in fresh.state_dict().items())


def test_each_agent_file_holds_its_simulated_environment() -> None:
    agent_physics = load_object("data:agent_physics", HERE, "data.py")
    agents = sorted((HERE / "agents").glob("agent*.toml"))
    assert len(agents) == load_config(HERE / "fedforge.toml").rl.agents  # type: ignore[union-attr]
    for k, own in enumerate(agents):
        simulated = agent_physics(agent=k)  # type: ignore[operator]
        deployed = agent_physics(own)  # type: ignore[operator]
        assert deployed["length"] == pytest.approx(simulated["length"], abs=1e-4)
    lengths = {agent_physics(own)["length"] for own in agents}  # type: ignore[operator]
    assert len(lengths) == len(agents)  # every agent its own pole
