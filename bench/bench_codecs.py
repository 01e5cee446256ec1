"""Encode and decode CPU time per client of each update codec: ``python -m bench.bench_codecs``.

A chunk of clients is encoded as one batch (as the vectorized runtime does), and the same
clients one at a time (as a deployed client or the sequential runtime does); milliseconds of
this process's CPU time per client, best of ``repeats``, torch on one thread.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np
import torch

from fedforge.compress.codecs import BFloat16, Codec, Float16, StochasticQuantizer, TopK
from fedforge.compress.rotation import Rotated

CODECS: list[Codec[Any]] = [
    Float16(),
    BFloat16(),
    StochasticQuantizer(8, 256),
    StochasticQuantizer(4, 256),
    StochasticQuantizer(4, None),
    TopK(0.01),
    Rotated(StochasticQuantizer(4, 4096)),
    Rotated(StochasticQuantizer(2, 4096)),
]


def _best(fn: Any, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def timings(
    d: int = 200_000, clients: int = 100, repeats: int = 3
) -> dict[str, tuple[float, float, float, float]]:
    """Per codec, milliseconds per client: (batch encode, batch decode, one-by-one encode,
    one-by-one decode) for ``clients`` updates of ``d`` coordinates."""
    x = (0.01 * np.random.default_rng(0).standard_normal((clients, d))).astype(np.float32)
    seeds = list(range(clients))
    out = {}
    for codec in CODECS:
        payload = codec.encode(x, seeds)
        rows = [codec.encode(x[i : i + 1], seeds[i : i + 1]) for i in range(clients)]
        times = (
            _best(lambda c=codec: c.encode(x, seeds), repeats),
            _best(lambda c=codec, p=payload: c.decode(p, d), repeats),
            _best(
                lambda c=codec: [c.encode(x[i : i + 1], seeds[i : i + 1]) for i in range(clients)],
                repeats,
            ),
            _best(lambda c=codec, r=rows: [c.decode(p, d) for p in r], repeats),
        )
        out[codec.name] = tuple(1e3 * t / clients for t in times)  # type: ignore[assignment]
    return out  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--d", type=int, default=200_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"ms of CPU per client, d = {args.d}, {args.clients} clients, torch threads 1")
    print(
        f"{'codec':>22} {'batch encode':>13} {'batch decode':>13} {'alone encode':>13} "
        f"{'alone decode':>13}"
    )
    for label, (be, bd, ae, ad) in timings(args.d, args.clients).items():
        print(f"{label:>22} {be:13.2f} {bd:13.2f} {ae:13.2f} {ad:13.2f}")


if __name__ == "__main__":
    main()
