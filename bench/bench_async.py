"""Heterogeneous devices on the virtual clock: synchronous FedAvg (no deadline, a deadline,
over-selection) vs FedBuff, accuracy against simulated hours; and the clock's real cost.

MNIST (mnist5k), 1,000 clients (Dirichlet 0.5), logistic model, 2 local epochs of batch 2,
vectorized backend. Devices: log-normal speeds (sigma 1, median ``--speed`` steps/s),
log-normal bandwidths (20 / 5 Mbit/s medians), diurnal availability with 30% of the day
online. Synchronous runs sample ``--cohort`` online clients per round; FedBuff keeps
``--concurrency`` clients training and updates every ``--cohort`` arrivals (1/sqrt(1+s)
staleness weights). Part 1 prints accuracy against simulated hours and the simulated time
each run needs to reach synchronous FedAvg's final accuracy; the plot goes to
``bench/results/async_accuracy_time.png``. Part 2 times 1,000 clients x 100 rounds of
synchronous FedAvg with and without the clock (median of ``--repeats``, interleaved).
Part 3 runs the same asynchronous driver in real time over the network: ``--sites`` client
processes on loopback (mutual TLS), ``--slow`` of them throttled by a SIGSTOP/SIGCONT duty
cycle (running ``--duty`` of every 0.25 s, a CPU that many times slower), synchronous FedAvg
(every site in every round) against FedBuff (a server update every half the sites' arrivals),
wall seconds to reach the synchronous run's final accuracy.

    python -m bench.bench_async [--rounds 100] [--repeats 3] [--part 1|2|3|all]
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_deploy import ENV, start_clients, write_config
from bench.bench_deploy import history as deployed_history
from fedforge.config import RunConfig, load_config
from fedforge.data.federated import FederatedDataset
from fedforge.experiment import build_algorithm, build_clock, build_dataset, simulate_config
from fedforge.report.history import History

ROOT = Path(__file__).resolve().parents[1]


def base(args: argparse.Namespace) -> list[str]:
    return [
        "data.dataset=mnist5k",
        "partition.num_clients=1000",
        "model.name=logistic",
        "client.epochs=2",
        "client.batch_size=2",
        "client.lr=0.05",
        f"server.clients_per_round={args.cohort}",
        "runtime.backend=vectorized",
        "runtime.threads=1",
    ]


def clock(args: argparse.Namespace) -> list[str]:
    return [
        "clock.enabled=true",
        f"clock.speed_median={args.speed}",
        "clock.speed_sigma=1.0",
        "clock.availability='diurnal'",
        "clock.online_fraction=0.3",
    ]


def run(overrides: list[str], data: FederatedDataset | None = None) -> tuple[History, float]:
    cfg: RunConfig = load_config(None, overrides)
    data = data or build_dataset(cfg)
    started = time.perf_counter()
    result = simulate_config(cfg, data)
    return result.history, time.perf_counter() - started


def curve(history: History) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in history if not np.isnan(r.test_accuracy)]
    hours = np.array([r.metrics.get("clock.time", 0.0) / 3600 for r in rows])
    return hours, np.array([r.test_accuracy for r in rows])


def first_reach(history: History, target: float) -> float:
    hours, acc = curve(history)
    hit = np.flatnonzero(acc >= target)
    return float(hours[hit[0]]) if len(hit) else float("nan")


def accuracy_at(history: History, hours: float) -> float:
    h, acc = curve(history)
    return float(acc[np.searchsorted(h, hours, side="right") - 1])


def part1(args: argparse.Namespace) -> None:
    common = base(args) + clock(args)
    cfg = load_config(None, common)
    data = build_dataset(cfg)
    runs: dict[str, History] = {}
    runs["sync FedAvg, no deadline"], _ = run([*common, f"server.rounds={args.rounds}"], data)
    sync_seconds = runs["sync FedAvg, no deadline"][-1].metrics["clock.time"]
    deadline = args.deadline or 0.0
    if not deadline:  # the 70th percentile of the clients' task durations
        spec = build_clock(cfg, data.num_clients)
        assert spec is not None
        local = build_algorithm(cfg).local
        steps = np.array([local.num_steps(data.client_size(c)) for c in range(data.num_clients)])
        model_bytes = 4 * (784 * 10 + 10)
        ids = list(range(data.num_clients))
        seconds = spec.devices.durations(ids, steps, model_bytes, model_bytes)
        deadline = float(np.percentile(seconds, 70))
    variants = {
        f"sync FedAvg, deadline {deadline:.0f} s": [f"clock.deadline_s={deadline}"],
        "sync FedAvg, over-selection 1.3x": ["clock.over_selection=1.3"],
        "FedBuff": [
            "asynchronous.mode='fedbuff'",
            f"asynchronous.buffer={args.cohort}",
            f"asynchronous.concurrency={args.concurrency}",
        ],
    }
    for name, extra in variants.items():
        # every run covers the synchronous run's simulated time (a short first run measures
        # how many rounds or updates that takes)
        probe = args.rounds if name != "FedBuff" else args.updates
        history, _ = run([*common, *extra, f"server.rounds={probe}"], data)
        needed = math.ceil(probe * sync_seconds / history[-1].metrics["clock.time"] * 1.15)
        if needed > probe:
            history, _ = run([*common, *extra, f"server.rounds={min(needed, 5000)}"], data)
        runs[name] = history
    for name, history in runs.items():  # compared over the synchronous run's span
        runs[name] = History(r for r in history if r.metrics.get("clock.time", 0) <= sync_seconds)
    target = runs["sync FedAvg, no deadline"][-1].test_accuracy
    print(
        f"\nPart 1: target = sync FedAvg's final accuracy after {args.rounds} rounds "
        f"({100 * target:.2f}%, {sync_seconds / 3600:.2f} simulated hours)\n"
    )
    print(
        "| run | rounds / updates | simulated hours | final accuracy | accuracy at half the "
        "sync time | hours to reach the target | / sync's hours |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, history in runs.items():
        hours = history[-1].metrics["clock.time"] / 3600
        reach = first_reach(history, target)
        half = accuracy_at(history, sync_seconds / 2 / 3600)
        print(
            f"| {name} | {history[-1].round} | {hours:.2f} | {100 * history[-1].test_accuracy:.2f}% "
            f"| {100 * half:.2f}% | {reach:.2f} | {reach / (sync_seconds / 3600):.2f}x |"
        )
    plot(runs, target, args.plot)


def plot(runs: dict[str, History], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, history in runs.items():
        hours, acc = curve(history)
        ax.plot(hours, 100 * acc, label=name, linewidth=1.2)
    ax.axhline(100 * target, color="grey", linestyle=":", label="target (sync final)")
    ax.set(xlabel="simulated hours", ylabel="test accuracy (%)", title="MNIST, 1,000 clients")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"\nplot: {path}")


def part2(args: argparse.Namespace) -> None:
    plain = [*base(args), f"server.rounds={args.rounds}"]
    clocked = [*plain, *clock(args)]
    data = build_dataset(load_config(None, plain))
    times: dict[str, list[float]] = {"without the clock": [], "on the virtual clock": []}
    for _ in range(args.repeats):
        times["without the clock"].append(run(plain, data)[1])
        times["on the virtual clock"].append(run(clocked, data)[1])
    print(f"\nPart 2: 1,000 clients x {args.rounds} rounds, {args.cohort} per round, wall seconds")
    print("\n| run | median s | all |\n|---|---:|---|")
    for name, values in times.items():
        print(
            f"| {name} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |"
        )
    ratio = statistics.median(times["on the virtual clock"]) / statistics.median(
        times["without the clock"]
    )
    print(f"\nclock / no clock: {ratio:.3f}x (target <= 1.2x)")


def throttle(pids: list[int], duty: float, stop: threading.Event, period: float = 0.25) -> None:
    """Run ``pids`` for ``duty`` of every ``period`` seconds (a CPU 1 / duty times slower)."""
    while not stop.is_set():
        time.sleep(duty * period)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        time.sleep((1 - duty) * period)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def network_run(args: argparse.Namespace, fedbuff: bool) -> History:
    """One deployment on loopback: ``args.sites`` client processes, ``args.slow`` throttled."""
    names = [f"c{i:03d}" for i in range(args.sites)]
    extra = "linger_s = 0\nheartbeat_s = 1.0\n"
    rounds = args.net_rounds
    if fedbuff:
        buffer = max(1, args.sites // 2)
        extra += (
            f"[asynchronous]\nmode = 'fedbuff'\nbuffer = {buffer}\nconcurrency = {args.sites}\n"
        )
        rounds = args.net_rounds * args.sites // buffer  # as many arrivals as the sync run
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg, port = write_config(
            tmp, names, rounds=rounds, model="mlp", hidden=[64], partitions=args.sites,
            deploy_extra=extra, epochs=args.net_epochs,
        )  # fmt: skip
        server = subprocess.Popen(
            [sys.executable, "-m", "fedforge.cli", "server", str(cfg)],
            stdout=open(tmp / "server.log", "wb"),
            stderr=subprocess.STDOUT,
            env=ENV,
        )
        clients = start_clients(tmp, port, names)
        stop = threading.Event()
        slow = [c.pid for c in clients[: args.slow]]
        cycler = threading.Thread(target=throttle, args=(slow, args.duty, stop), daemon=True)
        cycler.start()
        try:
            assert server.wait(timeout=900) == 0, (tmp / "server.log").read_text()[-2000:]
        finally:
            stop.set()
            cycler.join()
            for c in clients:
                os.kill(c.pid, signal.SIGCONT)
            for c in clients:
                c.wait(timeout=60)
        return deployed_history(tmp)  # type: ignore[no-any-return]


def elapsed(h: History) -> np.ndarray:
    """Wall seconds since the first round started, at the end of each round or update."""
    return np.cumsum([r.wall_seconds for r in h[1:]])


def part3(args: argparse.Namespace) -> None:
    runs = {"sync FedAvg": network_run(args, False), "FedBuff": network_run(args, True)}
    sync = runs["sync FedAvg"]
    target, sync_s = sync[-1].test_accuracy, float(elapsed(sync)[-1])
    print(
        f"\nPart 3: real time over the network, {args.sites} client processes on loopback, "
        f"{args.slow} running {args.duty:.0%} of the time; target = sync FedAvg's final "
        f"accuracy after {args.net_rounds} rounds ({100 * target:.2f}%)\n"
    )
    print(
        "| run | rounds / updates | wall s | final accuracy | s to reach the target | / sync's s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, h in runs.items():
        seconds = elapsed(h)
        acc = np.array([r.test_accuracy for r in h[1:]])
        hit = np.flatnonzero(acc >= target)
        reach = float(seconds[hit[0]]) if len(hit) else math.nan
        arrived = [c for r in h[1:] for c in r.clients.get("arrived", [])]
        share = (
            f" ({sum(c < args.slow for c in arrived)} of {len(arrived)} results from slow sites)"
            if arrived
            else ""
        )
        print(
            f"| {name}{share} | {h[-1].round} | {seconds[-1]:.1f} | {100 * h[-1].test_accuracy:.2f}% "
            f"| {reach:.1f} | {reach / sync_s:.2f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--updates", type=int, default=400, help="FedBuff server updates")
    parser.add_argument("--cohort", type=int, default=20, help="clients per round = buffer")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--speed", type=float, default=0.05, help="median steps per second")
    parser.add_argument("--deadline", type=float, default=None, help="seconds (default: auto)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", choices=["1", "2", "3", "both", "all"], default="all")
    parser.add_argument("--sites", type=int, default=6, help="part 3: client processes")
    parser.add_argument("--slow", type=int, default=2, help="part 3: throttled sites")
    parser.add_argument("--duty", type=float, default=0.2, help="part 3: share of time run")
    parser.add_argument("--net-rounds", type=int, default=20, help="part 3: sync rounds")
    parser.add_argument("--net-epochs", type=int, default=5, help="part 3: local epochs")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench/results/async_accuracy_time.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part in ("1", "both", "all"):
        part1(args)
    if args.part in ("2", "both", "all"):
        part2(args)
    if args.part in ("3", "all"):
        part3(args)


if __name__ == "__main__":
    main()
