"""Issue 15 costs, side by side: ``python -m bench.bench_run_experience``.

1. FedSGD on the vectorized backend: full batch (``client.batch_size = 0``) against the old
   workaround, a batch size beyond every client's data (100,000): clients per chunk and wall
   time (both take identical steps and end with the same model).
2. The live log every CLI run now writes (``live.jsonl``, the dashboard's feed): the
   quickstart configuration with and without it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedforge.config import load_config
from fedforge.experiment import build_algorithm, build_dataset, build_model, simulate_config
from fedforge.report.listeners import ListenerGroup
from fedforge.report.live import LIVE, LiveLog
from fedforge.runtime.client_app import ClientApp
from fedforge.runtime.client_state import MemoryStateStore
from fedforge.runtime.driver import RoundListener
from fedforge.runtime.vectorized import VectorizedTransport
from fedforge.stages.base import StageChain


def fedsgd(batch_size: int, rounds: int) -> tuple[float, int, dict[str, np.ndarray]]:
    overrides = [
        f"client.batch_size={batch_size}",
        "client.epochs=1",
        "client.lr=0.5",
        f"server.rounds={rounds}",
        "runtime.backend=vectorized",
    ]
    config = load_config(None, overrides)
    data = build_dataset(config)
    model = build_model(config, data)
    app = ClientApp(build_algorithm(config), model, StageChain([]))
    transport = VectorizedTransport(app, data, MemoryStateStore())
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    try:
        chunk = transport.chunk_size(params, max(data.client_sizes()))
    except TypeError:  # before issue 15: sized on the nominal batch size
        chunk = transport.chunk_size(params)  # type: ignore[call-arg]
    start = time.perf_counter()
    result = simulate_config(config, data)
    return time.perf_counter() - start, chunk, result.state.params


def quickstart(listener: RoundListener | None, rounds: int) -> float:
    config = load_config(None, [f"server.rounds={rounds}"])
    data = build_dataset(config)
    start = time.perf_counter()
    simulate_config(config, data, listener=listener)
    return time.perf_counter() - start


def main(rounds: int = 20) -> None:
    print(
        f"## FedSGD on the vectorized backend, mnist5k, 100 clients, 10 per round, {rounds} rounds"
    )
    print("| client.batch_size | clients per chunk | wall s |")
    print("|---|---|---|")
    rows = {b: fedsgd(b, rounds) for b in (0, 100_000)}
    for b, (seconds, chunk, _) in rows.items():
        print(f"| {b} | {chunk} | {seconds:.2f} |")
    same = all(np.array_equal(rows[0][2][n], rows[100_000][2][n]) for n in rows[0][2])
    print(f"ratio (100000 / full batch): {rows[100_000][0] / rows[0][0]:.2f}x; same model: {same}")
    print()
    print(f"## Live log overhead: the quickstart configuration, {rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        plain = min(quickstart(None, rounds) for _ in range(2))
        logged = min(
            quickstart(ListenerGroup([LiveLog(Path(tmp) / f"{i}{LIVE}")]), rounds) for i in range(2)
        )
    print(f"without: {plain:.2f} s, with live.jsonl: {logged:.2f} s, ratio {logged / plain:.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
