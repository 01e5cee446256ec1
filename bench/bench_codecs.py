"""Encode and decode time per client of each update codec: ``python -m bench.bench_codecs``."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from fedforge.compress.codecs import BFloat16, Codec, Float16, StochasticQuantizer, TopK
from fedforge.compress.rotation import Rotated


def timings(d: int = 200_000, clients: int = 8, repeats: int = 3) -> dict[str, tuple[float, float]]:
    """Milliseconds per client to encode and to decode a batch of ``(clients, d)``, per codec
    (best of ``repeats``)."""
    x = np.random.default_rng(0).standard_normal((clients, d)).astype(np.float32)
    seeds = list(range(clients))
    codecs: list[Codec[Any]] = [
        Float16(),
        BFloat16(),
        StochasticQuantizer(8, 256),
        StochasticQuantizer(4, 256),
        StochasticQuantizer(4, None),
        TopK(0.01),
        Rotated(StochasticQuantizer(4, 4096)),
        Rotated(StochasticQuantizer(2, 4096)),
    ]
    out = {}
    for codec in codecs:
        enc = dec = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            payload = codec.encode(x, seeds)
            mid = time.perf_counter()
            codec.decode(payload, d)
            enc, dec = min(enc, mid - start), min(dec, time.perf_counter() - mid)
        out[codec.name] = (1e3 * enc / clients, 1e3 * dec / clients)
    return out


if __name__ == "__main__":
    for label, (enc_ms, dec_ms) in timings().items():
        print(f"{label:>22}  encode {enc_ms:7.2f} ms  decode {dec_ms:7.2f} ms  per client")
