"""Federated RL: CartPole agents, each learning in its own physics (pole length), FedAvg.

An agent's data is its environment, so the sample is each deployed agent's own configuration:
``agents/agent<k>.toml`` gives agent k the pole length simulated agent k draws from
``[rl] spread`` (seed 0), so the deployment trains on the simulation's environments.
"""

from __future__ import annotations

from pathlib import Path

AGENTS = 2  # [rl] agents in fedforge.toml
AGENT = """\
# agent{k}'s own configuration (fedforge client agents/agent{k}.toml): its environment, which
# never leaves it, and its local work. Keep env, method and hidden equal to the server's
# fedforge.toml (the handshake refuses a mismatch), and max_episode_steps, episodes and
# eval_episodes too (the agent collects what its own file says). The step size (client.lr)
# and the rounds come from the server.
seed = 0

[rl]
env = "CartPole-v1"
method = "fedavg"
hidden = [16, 16]
max_episode_steps = 500
episodes = 10
eval_episodes = 5
physics = {{ length = {length!r} }}  # its pole (half) length; or agent = {index}: its draw

[server]
clients_per_round = {agents}  # as fedforge.toml's (unused here, but the file is checked whole)
"""


def write(project: Path) -> list[Path]:
    """Write ``project/agents/agent<k>.toml`` for the agents of ``project/fedforge.toml``."""
    from fedforge.config import load_config
    from fedforge.rl.workload import agent_of

    config = load_config(project / "fedforge.toml")
    assert config.rl is not None and config.rl.agents == AGENTS
    folder = project / "agents"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(AGENTS):
        length = round(agent_of(config.rl, config.seed, index).physics[3], 4)  # CartPole: length
        path = folder / f"agent{index + 1}.toml"
        path.write_text(AGENT.format(k=index + 1, index=index, length=length, agents=AGENTS))
        written.append(path)
    return written
