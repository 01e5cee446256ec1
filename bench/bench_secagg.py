"""Secure aggregation's cost: ``python -m bench.bench_secagg``.

Part 1, the protocol alone: for n clients and d parameters, every SecAgg+ message is
computed, checked and routed through a real ``SecAggRound`` (no training), with and without
10% of the clients vanishing after sharing their keys (the server must then reconstruct their
mask keys and remove their pairwise masks). Printed: client compute per client, server
compute, bytes up and down per client, against plaintext float32 (d * 4 bytes each way).

Part 2, a whole round: mnist5k, 100 clients per round, a 784-128-10 MLP (d = 101,770), one
local epoch; plain weighted mean vs secure sum in the same process (sequential backend, one
torch thread), seconds per round and bytes per round from the history.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from fedforge.core.params import ArraySpec
from fedforge.core.records import Record, RecordSpec
from fedforge.secagg.client import SecAggClient, keep
from fedforge.secagg.protocol import MASK, STEPS, SecAggParams
from fedforge.secagg.records import Layout
from fedforge.secagg.server import SecAggRound


def protocol_cost(n: int, d: int, dropout: float) -> dict[str, float]:
    """One session's client seconds (mean per client), server seconds and bytes."""
    rng = np.random.default_rng(0)
    spec = RecordSpec({"w": ArraySpec((d,), np.float32)})
    client = SecAggClient()
    client_seconds = 0.0
    sessions = {}
    started = time.perf_counter()
    for c in range(n):
        record = Record(c, 10, {"w": rng.normal(0, 0.01, d).astype(np.float32)})
        _, sessions[c] = keep(record, 1)
    client_seconds += time.perf_counter() - started
    server_seconds, up, down = 0.0, 0, 0
    started = time.perf_counter()
    server = SecAggRound(
        SecAggParams(), 1, list(range(n)), {c: 1.0 for c in range(n)}, Layout.of(spec), 10.0
    )
    server_seconds += time.perf_counter() - started
    gone = set(rng.choice(n, size=int(dropout * n), replace=False).tolist())
    for step in STEPS:
        started = time.perf_counter()
        tasks = server.tasks(step, {c: c for c in range(n)})
        server_seconds += time.perf_counter() - started
        for task in tasks:
            if step == MASK and task.client_id in gone:
                continue
            down += sum(a.nbytes for a in task.shared.values())
            started = time.perf_counter()
            reply, sessions[task.client_id] = client.handle(task, sessions[task.client_id])
            client_seconds += time.perf_counter() - started
            up += sum(a.nbytes for a in reply.arrays.values())
            started = time.perf_counter()
            assert server.check(step, reply) is None
            server.accept(step, reply)
            server_seconds += time.perf_counter() - started
    started = time.perf_counter()
    result = server.result()
    server_seconds += time.perf_counter() - started
    assert len(result.survivors) == n - len(gone)
    return {
        "client_ms": 1e3 * client_seconds / n,
        "server_s": server_seconds,
        "up_ratio": up / (n * d * 4),
        "down_ratio": down / (n * d * 4),
        "degree": server.degree,
    }


def round_cost(epochs: int, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Plain vs secure rounds of the default workload at 100 clients per round."""
    from fedforge.config import load_config
    from fedforge.experiment import build_dataset, simulate_config

    torch.set_num_threads(1)
    out = {}
    for kind in ("mean", "secure_sum"):
        config = load_config(
            None,
            [
                f'aggregation.kind="{kind}"',
                "model.hidden=[128]",
                "server.clients_per_round=100",
                f"server.rounds={rounds}",
                f"client.epochs={epochs}",
                'runtime.backend="sequential"',
            ],
        )
        result = simulate_config(config, build_dataset(config))
        rows = result.history[1:]
        out[kind] = {
            "round_s": statistics.median(r.wall_seconds for r in rows),
            "aggregate_s": statistics.median(r.aggregate_seconds for r in rows),
            "up_mb": rows[-1].bytes_up / 1e6,
            "down_mb": rows[-1].bytes_down / 1e6,
            "accuracy": rows[-1].test_accuracy,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="n <= 50 and d <= 1e5 only")
    args = parser.parse_args()
    sizes = [10, 50] if args.quick else [10, 50, 100, 200]
    dims = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    print(
        "| n | d | dropouts | degree | client ms/client | server s | up / plaintext | down / plaintext |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        for d in dims:
            for dropout in (0.0, 0.1):
                c = protocol_cost(n, d, dropout)
                print(
                    f"| {n} | {d:.0e} | {dropout:.0%} | {c['degree']:.0f} | {c['client_ms']:.1f} "
                    f"| {c['server_s']:.2f} | {c['up_ratio']:.3f} | {c['down_ratio']:.3f} |",
                    flush=True,
                )
    print("\n| local epochs | aggregation | round s | up MB | down MB | accuracy |")
    print("|---:|---|---:|---:|---:|---:|")
    ratios = []
    for epochs in (1, 5):
        rounds = round_cost(epochs)
        for kind, r in rounds.items():
            print(
                f"| {epochs} | {kind} | {r['round_s']:.2f} | {r['up_mb']:.1f} "
                f"| {r['down_mb']:.1f} | {r['accuracy']:.2%} |"
            )
        plain, secure = rounds["mean"], rounds["secure_sum"]
        ratios.append(
            f"E={epochs}: secure / plain round time {secure['round_s'] / plain['round_s']:.2f}x, "
            f"bytes up {secure['up_mb'] / plain['up_mb']:.3f}x, "
            f"bytes down {secure['down_mb'] / plain['down_mb']:.3f}x"
        )
    print("\n" + "\n".join(ratios))


if __name__ == "__main__":
    main()
