"""Collecting trajectories for many RL agents: one tensor program vs gymnasium one by one.

    python -m bench.bench_rl_collect [--agents 100] [--repeats 3] [--cases short long acrobot]

For each case, the same trajectories (same policies, physics and seeds) are collected by

- the vectorized collector (``fedforge.rl.collect``) for all agents at once,
- the same collector for one agent (what one agent alone costs in it),
- the gymnasium collector (``fedforge.rl.gym_collect``): one gymnasium env per agent, episodes
  one after another, the policy evaluated per step: the sequential runtime's path, and what a
  plain gymnasium loop does.

Times are CPU seconds of this process (``time.process_time``; torch and BLAS limited to one
thread), median of ``--repeats`` interleaved repeats; the machine is shared, so wall time
would measure the neighbours too. Before timing, the two collectors' trajectories are checked
equal, bit for bit.

Cases: ``short`` CartPole-v1 with freshly initialized policies (episodes of ~20 steps), 10
episodes per agent; ``long`` CartPole-v1 with a policy trained here first (episodes near the
500-step limit), 4 episodes per agent; ``acrobot`` Acrobot-v1 with fresh policies (episodes
run to the 500-step limit), 4 episodes per agent. Pole lengths spread 0.35-0.65, Acrobot's
second link mass 0.8-1.2.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from threadpoolctl import threadpool_limits

from fedforge.rl.collect import collect
from fedforge.rl.envs import ACROBOT, CARTPOLE, BatchEnv
from fedforge.rl.estimators import Estimator
from fedforge.rl.gym_collect import collect_gym
from fedforge.rl.local import LocalRL, local_update
from fedforge.rl.physics import EnvSpec, agent_physics
from fedforge.rl.policy import Policy, Tensors, mlp, stack
from fedforge.rl.trajectories import Trajectories


@dataclass(frozen=True)
class Case:
    name: str
    env: BatchEnv
    spread: dict[str, tuple[float, float]]
    episodes: int
    trained: bool


CASES = {
    "short": Case("CartPole-v1, fresh policies", CARTPOLE, {"length": (0.35, 0.65)}, 10, False),
    "long": Case("CartPole-v1, trained policy", CARTPOLE, {"length": (0.35, 0.65)}, 4, True),
    "acrobot": Case("Acrobot-v1, fresh policies", ACROBOT, {"link_mass_2": (0.8, 1.2)}, 4, False),
}
HORIZON = 500


def trained_cartpole(policy: Policy) -> Tensors:
    """A CartPole policy that balances: 60 local GPOMDP steps of one agent (vectorized)."""
    theta = policy.init(0)
    cfg = LocalRL(Estimator("gpomdp", 0.999, True), episodes=10, iterations=60, lr=0.02)
    physics = CARTPOLE.default_physics()[None]
    result = local_update(cfg, CARTPOLE, policy, stack([theta]), theta, physics, [0])
    return {name: t[0] for name, t in result.params.items()}


def check_equal(env: BatchEnv, fast: Trajectories, slow: Trajectories) -> None:
    fields = ("obs", "actions", "rewards", "alive", "terminated", "truncated")
    if not all(torch.equal(getattr(fast, f), getattr(slow, f)) for f in fields):
        raise SystemExit(f"{env.env_id}: the collectors disagree; the timing would be meaningless")


def cpu_seconds(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def run_case(case: Case, agents: int, repeats: int) -> dict[str, float]:
    env = case.env
    policy = Policy(mlp(env.obs_dim, env.num_actions))
    if case.trained:
        theta = trained_cartpole(policy)
        params = stack([theta] * agents)
    else:
        params = stack([policy.init(k) for k in range(agents)])
    physics = agent_physics(EnvSpec(env_id=env.env_id, spread=case.spread), range(agents), 0)
    seeds = list(range(1000, 1000 + agents))
    one = {name: t[:1] for name, t in params.items()}
    contenders: dict[str, Callable[[], Trajectories]] = {
        "vectorized, all agents": lambda: collect(
            env, policy, params, physics, seeds, case.episodes, HORIZON
        ),
        "vectorized, one agent": lambda: collect(
            env, policy, one, physics[:1], seeds[:1], case.episodes, HORIZON
        ),
        "gymnasium, agent by agent": lambda: collect_gym(
            env, policy, params, physics, seeds, case.episodes, HORIZON
        ),
    }
    fast = contenders["vectorized, all agents"]()
    check_equal(env, fast, contenders["gymnasium, agent by agent"]())
    steps = int(fast.lengths.sum())
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(cpu_seconds(fn))
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n{case.name}: {agents} agents x {case.episodes} episodes, {steps} env steps")
    print(f"mean episode length {steps / (agents * case.episodes):.1f}")
    for name, value in medians.items():
        print(f"  {name:28s} {value:8.3f} CPU s")
    gym = medians["gymnasium, agent by agent"]
    vec = medians["vectorized, all agents"]
    print(f"  gymnasium / vectorized: {gym / vec:.1f}x")
    print(f"  vectorized all / one agent: {vec / medians['vectorized, one agent']:.1f}x")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        for key in args.cases:
            run_case(CASES[key], args.agents, args.repeats)


if __name__ == "__main__":
    main()
