"""Federated RL over gRPC on loopback: a `fedforge server` and two `fedforge client CONFIG`
processes, each agent with its own environment from its own configuration; only policy
changes travel (the records the server validates are the policy's arrays)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedforge.rl.envs import CARTPOLE
from fedforge.rl.workload import Agent
from tests.net.helpers import fedforge, free_port, make_keys, stop_all, stored_history

pytestmark = pytest.mark.timeout(240)
AGENTS = ["agent0", "agent1"]

RUN = """
seed = 5
[rl]
agents = 2
episodes = 3
max_episode_steps = 60
heldout = 2
eval_episodes = 2
spread = {{ length = [0.35, 0.65] }}
{own}
[client]
lr = 0.05
[server]
rounds = 2
clients_per_round = 2
[evaluation]
fraction = 1.0
[deploy]
address = "127.0.0.1:{port}"
keys = "{keys}"
state_dir = "{state}"
min_clients = 2
round_timeout_s = 120
linger_s = 0
"""


def test_two_agents_train_over_the_network_on_their_own_environments(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, AGENTS)
    port = free_port()
    state = tmp_path / "state"

    def config(name: str, own: str) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(RUN.format(own=own, port=port, keys=keys, state=state))
        return path

    server_config = config("server", "")
    # Each agent's own physics: one given outright, one drawn by its id from the spread.
    own = {
        "agent0": config("agent0", "physics = { length = 0.4 }"),
        "agent1": config("agent1", "agent = 1"),
    }
    server = fedforge(["server", str(server_config)], tmp_path / "server.log")
    clients = [
        fedforge(
            [
                "client",
                str(own[name]),
                "--server",
                f"127.0.0.1:{port}",
                "--credentials",
                str(keys / name),
            ],
            tmp_path / f"{name}.log",
        )
        for name in AGENTS
    ]
    try:
        assert server.wait(timeout=200) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for name, client in zip(AGENTS, clients, strict=True):
            assert client.wait(timeout=60) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        stop_all([server, *clients])
    history = stored_history(state)
    assert [r.round for r in history] == [0, 1, 2]
    for record in history[1:]:
        assert record.clients_completed == 2
        assert record.metrics["trajectories"] == 3.0
        assert record.metrics["fed_eval.clients"] == 2.0
        assert 1 <= record.metrics["fed_eval.episode_return"] <= 60
        assert 1 <= record.metrics["test_episode_return"] <= 60
        # Two records of the policy's 4*16+16+16*16+16+16*2+2 float32 numbers each (plus
        # framing): nothing of the size of a trajectory's observations travelled up.
        assert record.bytes_up < 2 * (386 * 4 + 1024)
    final = load_file(str(state / "final_model.safetensors"))
    assert set(final) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert all(np.isfinite(v).all() for v in final.values())
    server_log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in server_log
    # Each agent joined with the environment its own configuration names.
    assert (
        "its own Agent (Agent(env_id='CartPole-v1', horizon=60, physics=(9.8, 1.0, 0.1, 0.4, "
        in (tmp_path / "agent0.log").read_text()
    )
    assert "agent=1, fault=None)" in (tmp_path / "agent1.log").read_text()


def test_an_agents_physics_come_from_its_own_configuration() -> None:
    from fedforge.config.rl import RLConfig
    from fedforge.rl.workload import agent_of

    spread = {"length": (0.35, 0.65)}
    given = agent_of(RLConfig(spread=spread, physics={"length": 0.4}), 5, -1)
    drawn = agent_of(RLConfig(spread=spread, agent=1), 5, -1)
    simulated = agent_of(RLConfig(spread=spread), 5, 1)
    length = CARTPOLE.parameters.index("length")
    assert isinstance(given, Agent) and given.physics[length] == 0.4
    assert drawn == simulated  # a deployed agent 1 holds what simulation's agent 1 holds
    assert 0.35 <= drawn.physics[length] <= 0.65
