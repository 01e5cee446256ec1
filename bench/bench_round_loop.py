"""fedforge's sequential runtime vs a plain PyTorch FedAvg loop, side by side in one process.

Same data, partition, sampling, initial weights and batch order. Prints round-loop wall
seconds (start-up excluded: both share the same data loading), final accuracy and ratios.

    python bench/bench_round_loop.py [--rounds 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from bench.plain_loop import plain_fedavg
from fedforge.config import load_config
from fedforge.experiment import build_algorithm, build_dataset, build_model
from fedforge.runtime.simulation import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=None, help="default: the config's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="config override")
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = list(args.set) + ([f"server.rounds={args.rounds}"] if args.rounds else [])
    cfg = load_config(None, overrides)
    data = build_dataset(cfg)
    model = build_model(cfg, data)
    c, s = cfg.client, cfg.server

    def run_fedforge() -> float:
        result = simulate(
            copy.deepcopy(model),
            data,
            build_algorithm(cfg),
            rounds=s.rounds,
            clients_per_round=s.clients_per_round,
            seed=cfg.seed,
            backend="sequential",
        )
        return result.history[-1].test_accuracy

    def run_plain() -> float:
        accs = plain_fedavg(
            copy.deepcopy(model),
            data,
            rounds=s.rounds,
            clients_per_round=s.clients_per_round,
            epochs=c.epochs,
            batch_size=c.batch_size,
            lr=c.lr,
            seed=cfg.seed,
        )
        return accs[-1]

    times: dict[str, list[float]] = {"fedforge sequential": [], "plain PyTorch loop": []}
    walls: dict[str, list[float]] = {name: [] for name in times}
    accuracy: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved, so drift affects both alike
        for name, fn in (("fedforge sequential", run_fedforge), ("plain PyTorch loop", run_plain)):
            start, cpu = time.perf_counter(), time.process_time()
            accuracy[name] = fn()
            times[name].append(time.process_time() - cpu)
            walls[name].append(time.perf_counter() - start)

    print(
        f"workload: {cfg.data.dataset}, {cfg.partition.num_clients} clients "
        f"{cfg.partition.scheme}({cfg.partition.alpha}), {s.clients_per_round}/round, "
        f"{s.rounds} rounds, E={c.epochs} B={c.batch_size} lr={c.lr}, torch threads=1, "
        f"median of {args.repeats}"
    )
    base = statistics.median(times["plain PyTorch loop"])
    print(f"{'runtime':<22}{'loop CPU s':>12}{'ratio':>8}{'wall s':>9}{'accuracy':>10}")
    for name, ts in times.items():
        med, wall = statistics.median(ts), statistics.median(walls[name])
        print(f"{name:<22}{med:>12.2f}{med / base:>8.2f}{wall:>9.2f}{100 * accuracy[name]:>9.2f}%")
    gap = 100 * abs(accuracy["fedforge sequential"] - accuracy["plain PyTorch loop"])
    print(f"accuracy gap: {gap:.2f} points")


if __name__ == "__main__":
    main()
