"""Compression of the broadcast (downlink): the global model and the algorithm's broadcast
travel as float16 or bfloat16 (2 bytes per parameter instead of 4); every client decodes them
back to float32 before it trains or evaluates, and ``bytes_down`` counts what was sent.

Clients train from the decoded model and send their delta against it; the server applies
the aggregate delta to its own float32 model, so the rounding error of the broadcast does
not accumulate in the global model. bfloat16 keeps float32's range (no overflow) with 8
significant bits; float16 has 11 bits but overflows above 65504 (refused: sent as float32).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fedforge.compress.codecs import BFloat16, Float16
from fedforge.core.params import Params

Downlink = Literal["none", "float16", "bfloat16"]


def encode_broadcast(arrays: Params, kind: Downlink) -> Params:
    """The float32 arrays encoded as ``kind`` (others, and float16 overflows, unchanged)."""
    if kind == "none":
        return arrays
    out: Params = {}
    for name, arr in arrays.items():
        if arr.dtype != np.float32:
            out[name] = arr
        elif kind == "float16":
            fits = not arr.size or float(np.abs(arr).max()) <= 65504.0
            out[name] = (
                Float16().encode(arr.reshape(1, -1)).values.reshape(arr.shape) if fits else arr
            )
        else:
            out[name] = BFloat16().encode(arr.reshape(1, -1)).bits.reshape(arr.shape)
    return out


def decode_broadcast(arrays: Params) -> Params:
    """float32 arrays back from a compressed broadcast (float16 values, bfloat16 bits)."""
    out: Params = {}
    for name, arr in arrays.items():
        if arr.dtype == np.float16:
            out[name] = arr.astype(np.float32)
        elif arr.dtype == np.uint16:  # bfloat16: the top half of a float32
            out[name] = (arr.astype(np.uint32) << np.uint32(16)).view(np.float32)
        else:
            out[name] = arr
    return out
