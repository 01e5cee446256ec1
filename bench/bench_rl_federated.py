"""Federated RL end to end through ``fedforge.simulate`` (the workload ``[rl]`` builds).

    python -m bench.bench_rl_federated speedup [--seeds 0 1] [--agents 1 3 10]
    python -m bench.bench_rl_federated faulty [--seeds 0] [--budget 1000]
    python -m bench.bench_rl_federated spread [--seeds 0 1 2] [--rounds 40]
    python -m bench.bench_rl_federated runtimes [--agents 100] [--repeats 3]

``speedup``: CartPole-v1 (horizon 500, discount 0.999, policy MLP 16-16), FedPG (each agent
reports its GPOMDP estimate from ``--episodes`` trajectories at the global policy; the server
steps with Adam, ``--server-lr``); trajectories per agent until the round's mean return of the
agents' own episodes reaches 475 (the run stops there), per K and seed, and the median.

``faulty``: 10 agents of which 3 faulty (each attack), FedPG with the plain mean, FedPG with
the coordinate median, and FedPG-BR (filter + SCSG, Adam steps; the paper's settings are
``--episodes 16 --server-lr 0.001 --sigma 0.06``, its standardized estimator by default, and
the rounds in which the filter kept every honest agent are printed); trajectories per agent until
the global policy's mean return (3 episodes on each of 2 held-out settings of gymnasium's
default physics: the faulty agents' own episodes would pull the agents' mean down) reaches
475, within ``--budget`` trajectories per agent (else "not within", with the best round's).

``spread``: pole lengths uniform in [0.35, 0.65] across 10 agents, FedAvg of policies (5 local
Adam steps) with and without the KL penalty toward the global policy; the held-out return
after ``--rounds`` rounds per seed, its mean and standard deviation across seeds.

``runtimes``: one round of FedPG for ``--agents`` agents (10 episodes each, fresh policy) on
the vectorized runtime (torch dynamics, one tensor program), the sequential runtime
(gymnasium, one agent after another), and a plain gymnasium loop (no fedforge: each agent's
episodes collected on gymnasium and its gradient computed, one after another). CPU seconds of
this process (``time.process_time``), one torch thread, median of ``--repeats`` interleaved
repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from fedforge import simulate
from fedforge.aggregate.gather import RobustAggregation
from fedforge.aggregate.kinds import Aggregation, WeightedMean
from fedforge.aggregate.server_opt import FedAdam
from fedforge.algorithms.base import Algorithm
from fedforge.algorithms.fedavg import FedAvg
from fedforge.config.rl import RLConfig
from fedforge.rl.envs import CARTPOLE
from fedforge.rl.estimators import Estimator, stacked_policy_gradient
from fedforge.rl.fedpg_br_server import fedpg_br
from fedforge.rl.gym_collect import collect_gym
from fedforge.rl.physics import agent_physics
from fedforge.rl.policy import Policy, mlp, stack
from fedforge.rl.workload import RETURN, TRAJECTORIES, env_spec, rl_workload
from fedforge.runtime.stopping import StopRule
from fedforge.train.program import LocalSGD

TARGET = 475.0


def run_to_target(
    rl: RLConfig,
    algorithm: Algorithm,
    aggregation: Aggregation,
    budget: int,
    seed: int,
    metric: str = RETURN,
    kept: list[str] | None = None,
) -> tuple[float | None, float, float]:
    """(trajectories per agent when the round's ``metric`` reached the target, or None; the
    best round's value; wall seconds). ``kept``, if given, receives a line on the filter:
    in how many rounds it kept every honest agent, and excluded every faulty one."""
    rounds = budget // rl.episodes
    started = time.perf_counter()
    result = simulate(
        rl_workload(rl, seed),
        algorithm=algorithm,
        aggregation=aggregation,
        rounds=rounds,
        clients_per_round=rl.agents,
        seed=seed,
        backend="vectorized",
        stop_when=StopRule(metric, threshold=TARGET),
        verbose=0,
    )
    seconds = time.perf_counter() - started
    best = max((r.metrics.get(metric, 0.0) for r in result.history), default=0.0)
    last = result.history[-1]
    reached = last.metrics.get(metric, 0.0) >= TARGET
    used = sum(r.metrics.get(TRAJECTORIES, 0.0) for r in result.history)
    if kept is not None:
        faulty = set(range(rl.faulty))
        excluded = [set(r.clients.get("excluded", [])) for r in result.history[1:]]
        honest_kept = sum(e <= faulty for e in excluded)
        faulty_out = sum(e >= faulty for e in excluded)
        kept.append(f"{honest_kept}/{len(excluded)} all honest kept, {faulty_out} all faulty out")
    return (used if reached else None), best, seconds


def fedpg(server_lr: float) -> FedAvg:
    return FedAvg(LocalSGD(lr=1.0), server_optimizer=FedAdam(lr=server_lr, beta2=0.999))


def speedup(args: argparse.Namespace) -> None:
    print("| K | seed | trajectories per agent to 475 | best return | wall s |")
    print("|---:|---:|---:|---:|---:|")
    medians = {}
    for k in args.agents:
        found = []
        for seed in args.seeds:
            rl = RLConfig(agents=k, episodes=args.episodes, method="fedpg", heldout=0)
            used, best, seconds = run_to_target(
                rl, fedpg(args.server_lr), WeightedMean(), args.budget, seed
            )
            found.append(used)
            shown = f"{used:.0f}" if used is not None else f"not within {args.budget}"
            print(f"| {k} | {seed} | {shown} | {best:.1f} | {seconds:.0f} |", flush=True)
        reached = [u for u in found if u is not None]
        if len(reached) == len(found):
            medians[k] = statistics.median(reached)
    print("median trajectories per agent:", medians)
    if 1 in medians:
        for k, m in medians.items():
            print(f"K={k}: speedup {medians[1] / m:.2f}x (K^(2/3) = {k ** (2 / 3):.2f})")


def faulty(args: argparse.Namespace) -> None:
    print(
        "| attack | server | seed | trajectories per agent to 475 | best return | wall s | filter |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    for attack in args.attacks:
        for server in args.servers:
            for seed in args.seeds:
                method = "fedpg_br" if server == "fedpg_br" else "fedpg"
                rl = RLConfig(
                    agents=10, episodes=args.episodes, method=method, heldout=2, faulty=3,
                    fault=attack, eval_episodes=3,
                )  # fmt: skip
                algorithm: Algorithm = fedpg(args.server_lr)
                aggregation: Aggregation = WeightedMean()
                kept: list[str] | None = None
                if server == "median":
                    aggregation = RobustAggregation("median")
                elif server == "fedpg_br":
                    algorithm = fedpg_br(rl, seed, FedAdam(lr=args.server_lr, beta2=0.999))
                    aggregation = RobustAggregation(
                        "fedpg_br", sigma=args.sigma, batch_size=rl.episodes, alpha=args.alpha
                    )
                    kept = []
                used, best, seconds = run_to_target(
                    rl, algorithm, aggregation, args.budget, seed, "test_episode_return", kept
                )
                shown = f"{used:.0f}" if used is not None else f"not within {args.budget}"
                print(
                    f"| {attack} | {server} | {seed} | {shown} | {best:.1f} | {seconds:.0f} "
                    f"| {kept[0] if kept else ''} |",
                    flush=True,
                )


def spread(args: argparse.Namespace) -> None:
    print("| local update | seed | held-out return after rounds |")
    print("|---|---:|---:|")
    for label, penalty, coef in (("FedAvg", "none", 0.0), ("FedAvg + KL", "kl", args.kl)):
        finals = []
        for seed in args.seeds:
            rl = RLConfig(
                agents=10, episodes=10, iterations=5, penalty=penalty, penalty_coef=coef,
                spread={"length": (0.35, 0.65)}, heldout=10, eval_episodes=3,
            )  # fmt: skip
            result = simulate(
                rl_workload(rl, seed),
                algorithm=FedAvg(LocalSGD(lr=args.lr)),
                rounds=args.rounds,
                clients_per_round=10,
                seed=seed,
                backend="vectorized",
                verbose=0,
            )
            final = result.history[-1].metrics["test_episode_return"]
            finals.append(final)
            print(f"| {label} | {seed} | {final:.1f} |", flush=True)
        print(
            f"{label}: mean {statistics.mean(finals):.1f}, "
            f"std {statistics.pstdev(finals):.1f} over seeds {args.seeds}"
        )


def runtimes(args: argparse.Namespace) -> None:
    k = args.agents
    rl = RLConfig(agents=k, episodes=10, method="fedpg", heldout=0)

    def one_round(backend: str) -> Callable[[], None]:
        def run() -> None:
            simulate(
                rl_workload(rl, 0), algorithm=fedpg(0.01), rounds=1, clients_per_round=k,
                backend=backend, verbose=0,  # type: ignore[arg-type]
            )  # fmt: skip

        return run

    def plain() -> None:
        env = CARTPOLE
        policy = Policy(mlp(env.obs_dim, env.num_actions, (16, 16)))
        theta = policy.init(0)
        physics = agent_physics(env_spec(rl), range(k), 0)
        estimator = Estimator("gpomdp", 0.999)
        for agent in range(k):
            one = stack([theta])
            traj = collect_gym(env, policy, one, physics[agent : agent + 1], [agent], 10, 500)
            stacked_policy_gradient(policy, one, traj, estimator)

    contenders = {
        "vectorized": one_round("vectorized"),
        "sequential": one_round("sequential"),
        "plain gymnasium": plain,
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            started = time.process_time()
            fn()
            times[name].append(time.process_time() - started)
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values):.3f} CPU s, runs {np.round(values, 3)}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["speedup", "faulty", "spread", "runtimes"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--budget", type=int, default=5000)
    parser.add_argument("--server-lr", type=float, default=0.01)
    parser.add_argument(
        "--attacks", nargs="+", default=["random_noise", "random_action", "sign_flip"]
    )
    parser.add_argument("--servers", nargs="+", default=["mean", "median", "fedpg_br"])
    parser.add_argument("--sigma", type=float, default=0.06)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--kl", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        if args.experiment == "runtimes":
            args.agents = args.agents[0] if args.agents != [1, 3, 10] else 100
        {"speedup": speedup, "faulty": faulty, "spread": spread, "runtimes": runtimes}[
            args.experiment
        ](args)


if __name__ == "__main__":
    main()
