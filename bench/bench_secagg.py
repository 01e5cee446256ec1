"""Secure aggregation's cost: ``python -m bench.bench_secagg``.

CPU seconds throughout (``time.process_time``, one torch thread): the machine is shared, and
CPU time is what other load disturbs least.

Part 1, the protocol alone: for n clients and d parameters, every SecAgg+ message is
computed, checked and routed through a real ``SecAggRound`` (no training), with and without
10% of the clients vanishing after sharing their keys (the server must then reconstruct their
mask keys and remove their pairwise masks). Printed: client compute per client, each client
answering alone (as deployed) and all of them as one chunk (as the vectorized runtime does),
server compute, bytes up and down per client, against plaintext float32 (d * 4 bytes each
way).

Part 2, a whole round: mnist5k, 100 clients per round, a 784-128-10 MLP (d = 101,770), one
and five local epochs; plain weighted mean vs secure sum in the same process (sequential
backend), CPU seconds per round (median after the first) and bytes per round from the
history.

Part 3 (alone with ``--vectorized``), the vectorized backend: the same workload with FedAvg's
weighted mean and with the secure sum, alternated in one process, ``--repeats`` runs of
``--rounds`` rounds each; CPU seconds of each round (from the round's start to its end), the
first round of each run left out; medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from fedforge.config import RunConfig
from fedforge.core.params import ArraySpec
from fedforge.core.records import Record, RecordSpec
from fedforge.report.history import RoundRecord
from fedforge.runtime.exchange import RoundListener
from fedforge.secagg.client import SecAggClient
from fedforge.secagg.protocol import MASK, STEPS, SecAggParams
from fedforge.secagg.records import Layout
from fedforge.secagg.server import SecAggRound
from fedforge.secagg.session import keep


def protocol_cost(n: int, d: int, dropout: float, batched: bool = False) -> dict[str, float]:
    """One session's client CPU seconds (mean per client), server CPU seconds and bytes;
    ``batched``: the clients answer each step as one chunk (the vectorized runtime)."""
    rng = np.random.default_rng(0)
    spec = RecordSpec({"w": ArraySpec((d,), np.float32)})
    client = SecAggClient()
    client_seconds = 0.0
    sessions = {}
    started = time.process_time()
    for c in range(n):
        record = Record(c, 10, {"w": rng.normal(0, 0.01, d).astype(np.float32)})
        _, sessions[c] = keep(record, 1)
    client_seconds += time.process_time() - started
    server_seconds, up, down = 0.0, 0, 0
    started = time.process_time()
    server = SecAggRound(
        SecAggParams(), 1, list(range(n)), {c: 1.0 for c in range(n)}, Layout.of(spec), 10.0
    )
    server_seconds += time.process_time() - started
    gone = set(rng.choice(n, size=int(dropout * n), replace=False).tolist())
    for step in STEPS:
        started = time.process_time()
        tasks = server.tasks(step, {c: c for c in range(n)})
        server_seconds += time.process_time() - started
        tasks = [t for t in tasks if step != MASK or t.client_id not in gone]
        down += sum(a.nbytes for t in tasks for a in t.shared.values())
        started = time.process_time()
        if batched:
            answers = client.handle_chunk(tasks, [sessions[t.client_id] for t in tasks])
        else:
            answers = [client.handle(t, sessions[t.client_id]) for t in tasks]
        client_seconds += time.process_time() - started
        for task, answer in zip(tasks, answers, strict=True):
            assert not isinstance(answer, Exception)
            reply, sessions[task.client_id] = answer
            up += sum(a.nbytes for a in reply.arrays.values())
            started = time.process_time()
            assert server.check(step, reply) is None
            server.accept(step, reply)
            server_seconds += time.process_time() - started
    started = time.process_time()
    result = server.result()
    server_seconds += time.process_time() - started
    assert len(result.survivors) == n - len(gone)
    return {
        "client_ms": 1e3 * client_seconds / n,
        "server_s": server_seconds,
        "up_ratio": up / (n * d * 4),
        "down_ratio": down / (n * d * 4),
        "degree": server.degree,
    }


CLIENTS = 100  # parts 2 and 3: clients per round (all of them)


def _round_config(kind: str, backend: str, epochs: int, rounds: int) -> RunConfig:
    """The default workload at 100 clients x d = 101,770, all per round, one thread."""
    from fedforge.config import load_config

    return load_config(
        None,
        [
            f'aggregation.kind="{kind}"',
            "model.hidden=[128]",
            f"server.clients_per_round={CLIENTS}",
            f"server.rounds={rounds}",
            f"client.epochs={epochs}",
            f'runtime.backend="{backend}"',
            "runtime.threads=1",
        ],
    )


class _RoundCpu(RoundListener):
    """CPU seconds from each round's start to its end."""

    def __init__(self) -> None:
        self.started = 0.0
        self.seconds: list[float] = []

    def round_started(self, round_number: int, client_ids: list[int]) -> None:
        self.started = time.process_time()

    def round_finished(self, record: RoundRecord) -> None:
        if record.round > 0:
            self.seconds.append(time.process_time() - self.started)


def round_cost(epochs: int, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Plain vs secure rounds on the sequential backend."""
    from fedforge.experiment import build_dataset, simulate_config

    torch.set_num_threads(1)
    out = {}
    for kind in ("mean", "secure_sum"):
        config = _round_config(kind, "sequential", epochs, rounds)
        clock = _RoundCpu()
        result = simulate_config(config, build_dataset(config), listener=clock)
        rows = result.history[1:]
        out[kind] = {
            "round_s": statistics.median(clock.seconds[1:]),
            "up_mb": rows[-1].bytes_up / 1e6,
            "down_mb": rows[-1].bytes_down / 1e6,
            "accuracy": rows[-1].test_accuracy,
        }
    return out


def vectorized_cost(epochs: int, rounds: int, repeats: int) -> dict[str, list[float]]:
    """CPU seconds per round (first round of each run left out) of the plain mean and the
    secure sum on the vectorized backend, the two alternated."""
    from fedforge.experiment import build_dataset, simulate_config

    torch.set_num_threads(1)
    seconds: dict[str, list[float]] = {"mean": [], "secure_sum": []}
    data = None
    for _ in range(repeats):
        for kind in seconds:
            config = _round_config(kind, "vectorized", epochs, rounds)
            data = data or build_dataset(config)
            clock = _RoundCpu()
            simulate_config(config, data, listener=clock)
            seconds[kind] += clock.seconds[1:]
    return seconds


def vectorized_table(epochs: tuple[int, ...], rounds: int, repeats: int) -> None:
    """Part 3's table; *added ms per client*: the secure round's median over the plain
    one's, per client of the round."""
    print(
        "| local epochs | aggregation | CPU s per round (median) | rounds | ratio "
        "| added ms per client |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for e in epochs:
        cost = vectorized_cost(e, rounds, repeats)
        plain = statistics.median(cost["mean"])
        for kind, values in cost.items():
            median = statistics.median(values)
            added = 1e3 * (median - plain) / CLIENTS
            print(
                f"| {e} | {kind} | {median:.3f} | {len(values)} | {median / plain:.2f}x "
                f"| {added:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="n <= 50 and d <= 1e5 only")
    parser.add_argument(
        "--vectorized", action="store_true", help="only part 3: vectorized rounds, CPU time"
    )
    parser.add_argument("--rounds", type=int, default=4, help="part 3: rounds per run")
    parser.add_argument("--repeats", type=int, default=3, help="part 3: runs per contender")
    args = parser.parse_args()
    if args.vectorized:
        vectorized_table((5, 1), args.rounds, args.repeats)
        return
    sizes = [10, 50] if args.quick else [10, 50, 100, 200]
    dims = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    print(
        "| n | d | dropouts | degree | client ms/client (alone / one chunk) | server s "
        "| up / plaintext | down / plaintext |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        for d in dims:
            for dropout in (0.0, 0.1):
                c = protocol_cost(n, d, dropout)
                chunk = protocol_cost(n, d, dropout, batched=True)
                print(
                    f"| {n} | {d:.0e} | {dropout:.0%} | {c['degree']:.0f} "
                    f"| {c['client_ms']:.1f} / {chunk['client_ms']:.1f} | {c['server_s']:.2f} "
                    f"| {c['up_ratio']:.3f} | {c['down_ratio']:.3f} |",
                    flush=True,
                )
    print("\n| local epochs | aggregation | CPU s per round | up MB | down MB | accuracy |")
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
    print("\n" + "\n".join(ratios) + "\n")
    vectorized_table((5, 1), args.rounds, args.repeats)


if __name__ == "__main__":
    main()
