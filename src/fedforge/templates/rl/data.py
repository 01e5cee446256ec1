"""An agent's data is its environment: with [rl], fedforge builds it (data.loader cannot be
set with [rl]). In simulation agent k's physical parameters are drawn from [rl] spread (they
depend only on the run seed and k); deployed, each agent's own agents/agent<k>.toml gives
its physics outright (physics = { length = 0.4 }) or names its draw (agent = k). Gymnasium
runs the agent's episodes; only policy updates leave it.

agent_physics shows what an agent holds (python data.py)."""

from __future__ import annotations

from pathlib import Path

from fedforge.config import load_config
from fedforge.rl.envs import batch_env
from fedforge.rl.workload import agent_of

HERE = Path(__file__).resolve().parent


def agent_physics(config: Path = HERE / "fedforge.toml", agent: int = 0) -> dict[str, float]:
    """The physical parameters of agent ``agent`` of ``config`` (for an agent's own file,
    ``agent`` is ignored: its rl.physics or rl.agent decides)."""
    run = load_config(config)
    assert run.rl is not None, f"{config} has no [rl] section"
    held = agent_of(run.rl, run.seed, agent)
    return dict(zip(batch_env(run.rl.env).parameters, held.physics, strict=True))


if __name__ == "__main__":
    run = load_config(HERE / "fedforge.toml")
    assert run.rl is not None
    for k in range(run.rl.agents):
        print(f"simulated agent {k}: {agent_physics(agent=k)}")
    for own in sorted((HERE / "agents").glob("*.toml")):
        print(f"{own.relative_to(HERE)}: {agent_physics(own)}")
