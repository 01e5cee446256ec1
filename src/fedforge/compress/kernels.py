"""The codecs' tensor programs: a batch of flattened updates ``(n, d)`` encoded and decoded
with torch operations, on whatever device the tensors live (CPU or CUDA).

Every operation is elementwise or reduces within a row (a block's minimum and maximum, a
row's k-th largest magnitude), so a row's output never depends on the other rows: a chunk of
clients encodes to the same bytes as each client alone, and no operation is fused (no FMA), so
CPU and CUDA produce the same bytes. Random bits are generated on the host from each row's
seed (:func:`lanes`) and travel to the device. On the CPU a batch is processed a few rows at a
time (:func:`tiles`) so that the half dozen passes of an encode run in cache, not memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

TILE = 1 << 18  # elements per tile on the CPU (1 MiB of float32: the intermediates fit in L2)
LANE = 1 << 16  # 16-bit uniform lanes (four per 64-bit word): fixed point with 16 bits


def tiles(n: int, d: int, device: torch.device) -> Iterator[slice]:
    """Row ranges to process together: a few rows on the CPU, the whole batch on CUDA."""
    step = n if device.type != "cpu" else max(1, TILE // max(d, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def lanes(keys: Sequence[int], tag: int, count: int) -> np.ndarray:
    """``(n, count)`` uint16 from row ``i``'s SFC64 stream (seeded by ``keys[i]`` and the
    stream ``tag``): uniform integers, four per 64-bit word."""
    words = -(-count // 4)
    out = np.empty((len(keys), words), np.uint64)
    for i, key in enumerate(keys):  # only the seeding is per row; the draws are one C loop
        seed = np.random.SeedSequence(int(key), spawn_key=(tag,))
        out[i] = np.random.SFC64(seed).random_raw(words)
    return out.astype("<u8", copy=False).view("<u2")[:, :count]


def block_ranges(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum and maximum of every ``size``-run of each row (the last run may be short)."""
    n, d = x.shape
    full = d // size
    head = x[:, : full * size].reshape(n, full, size)
    low, high = head.amin(dim=2), head.amax(dim=2)  # (apart: aminmax is 10x slower here)
    if full * size < d:
        tail = x[:, full * size :]
        low = torch.cat([low, tail.amin(dim=1, keepdim=True)], dim=1)
        high = torch.cat([high, tail.amax(dim=1, keepdim=True)], dim=1)
    return low, high


class Scratch:
    """Tile-sized buffers reused across the tiles of one call: a fresh temporary of a few
    hundred KiB is a new mapping on the CPU, so it page-faults every time it is written
    (measured: 1 ms for a copy that takes 15 us in a buffer already touched)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}
        self._views: dict[tuple[int, ...], list[tuple[torch.Tensor, ...]]] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized ``shape`` tensor, the same memory every call with ``name``."""
        count = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < count:
            buffer = torch.empty(count, dtype=dtype, device=self.device)
            self._buffers[name] = buffer
        return buffer[:count].view(shape)

    def butterflies(self, src: torch.Tensor, dst: torch.Tensor, h: int, stop: int) -> torch.Tensor:
        """Radix-2 butterflies of spans ``h, 2h, ... < stop`` over the ``(lead, size)`` rows
        of ``src``, ping-ponging with ``dst`` (two of this object's buffers: their views are
        kept); returns the buffer holding the result."""
        key = (src.data_ptr(), dst.data_ptr(), *src.shape, h, stop)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = _butterfly_views(src, dst, h, stop)
        for first, second, total, difference in views:
            torch.add(first, second, out=total)
            torch.sub(first, second, out=difference)
        return src if len(views) % 2 == 0 else dst


def _blockwise(t: torch.Tensor, size: int, op: str, values: torch.Tensor) -> None:
    """In place, ``t (op)= values`` with one value per ``size``-run of each row (views of
    the whole runs, then the short last run: nothing is expanded)."""
    n, d = t.shape
    full = d // size
    head = t[:, : full * size].view(n, full, size)
    getattr(head, op)(values[:, :full, None])
    if full * size < d:
        getattr(t[:, full * size :], op)(values[:, full:])


def _blockwise_sub(x: torch.Tensor, size: int, values: torch.Tensor, out: torch.Tensor) -> None:
    """``out = x - values`` with one value per ``size``-run of each row (as :func:`_blockwise`)."""
    n, d = x.shape
    full = d // size
    runs = slice(0, full * size)
    head = out[:, runs].view(n, full, size)
    torch.sub(x[:, runs].view(n, full, size), values[:, :full, None], out=head)
    if full * size < d:
        torch.sub(x[:, full * size :], values[:, full:], out=out[:, full * size :])


def quantize(
    x: torch.Tensor, uniforms: torch.Tensor, bits: int, size: int, scratch: Scratch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stochastic rounding of each ``size``-block to ``2**bits`` levels over its [min, max]:
    ``(codes uint8 (n, d), low, step)``, the codes in ``scratch``. In fixed point with 16
    fractional bits, a coordinate at ``low + (k + r / 65536) step`` (``r`` the integer part
    of its scaled fraction) becomes ``k + 1`` when its uniform 16-bit lane ``u`` carries
    ``r + u`` past 65535 (probability ``r / 65536``), else ``k``: integer operations only
    after the scaling. Every pass writes into a scratch buffer (no temporaries)."""
    top = 2**bits - 1
    n, d = x.shape
    low, high = block_ranges(x, size)
    step = ((high.double() - low) / top).float()
    inverse = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
    t = scratch.get("scaled", (n, d), torch.float32)
    _blockwise_sub(x, size, low, t)
    _blockwise(t, size, "mul_", inverse * float(LANE))  # (exact: a power of 2)
    t.clamp_(0.0, float(top * LANE))
    fixed = scratch.get("fixed", (n, d), torch.int32)
    fixed.copy_(t)  # truncation is the floor of a non-negative value
    lanes32 = scratch.get("lanes", (n, d), torch.int32)
    lanes32.copy_(uniforms)
    fixed.add_(lanes32).bitwise_right_shift_(16)
    codes = scratch.get("codes", (n, d), torch.uint8)
    codes.copy_(fixed)
    return codes, low, step


def dequantize(
    codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor, size: int, out: torch.Tensor
) -> torch.Tensor:
    """``low + code * step`` per block, into the float32 ``(n, d)`` tensor ``out``."""
    out.copy_(codes)
    _blockwise(out, size, "mul_", step)
    _blockwise(out, size, "add_", low)
    return out


def pack(codes: torch.Tensor, bits: int, out: torch.Tensor, scratch: Scratch) -> None:
    """``8 // bits`` codes per byte, the first in the low bits, into ``out`` (n, ceil(d /
    (8 // bits))) uint8."""
    per = 8 // bits
    if per == 1:
        out.copy_(codes)
        return
    n, d = codes.shape
    full = d // per
    grouped = codes[:, : full * per].view(n, full, per)
    head = out[:, :full]
    head.copy_(grouped[:, :, 0])
    shifted = scratch.get("shifted", (n, full), torch.uint8)
    for j in range(1, per):
        head |= torch.bitwise_left_shift(grouped[:, :, j], bits * j, out=shifted)
    if full * per < d:  # the last byte's codes, zeros above them
        last = out[:, full]
        last.copy_(codes[:, full * per])
        for j in range(1, d - full * per):
            last |= codes[:, full * per + j] << (bits * j)


def unpack(packed: torch.Tensor, bits: int, d: int, scratch: Scratch) -> torch.Tensor:
    """The ``(n, d)`` uint8 codes of :func:`pack`'s bytes (in ``scratch``)."""
    per = 8 // bits
    if per == 1:
        return packed
    mask = 2**bits - 1
    n, width = packed.shape
    codes = scratch.get("unpacked", (n, width, per), torch.uint8)
    shifted = scratch.get("shifted", (n, width), torch.uint8)
    for j in range(per):
        torch.bitwise_right_shift(packed, bits * j, out=shifted)
        torch.bitwise_and(shifted, mask, out=codes[:, :, j])
    return codes.view(n, -1)[:, :d]


def top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending, int64) of the ``k`` largest magnitudes of each row; among equal
    magnitudes at the cut the lowest indices win, so the choice never depends on how the
    selection is computed (introselect on the CPU, ``torch.topk`` elsewhere)."""
    if x.device.type == "cpu":
        return torch.from_numpy(_top_k_rows(x.numpy(), k))
    magnitude = x.abs()
    cut = torch.topk(magnitude, k, dim=1, sorted=True).values[:, -1:]
    above = magnitude > cut
    tied = magnitude == cut
    want = k - above.sum(dim=1, keepdim=True)
    if bool((tied.sum(dim=1, keepdim=True) > want).any()):
        tied &= torch.cumsum(tied, dim=1) <= want  # the lowest tied indices fill the rest
    return torch.nonzero(above | tied)[:, 1].reshape(x.shape[0], k)


def _top_k_rows(x: np.ndarray, k: int) -> np.ndarray:
    """:func:`top_k` of a CPU batch with NumPy, row by row: the cut (the k-th largest
    magnitude) is selected among the candidates at or above a threshold read from a strided
    sample (a small fraction of the row when k is), which hold every magnitude at or above
    the cut whenever they are at least k; otherwise, or with a NaN, among the whole row."""
    n, d = x.shape
    magnitude = np.abs(x)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(magnitude.sum(axis=1))
    out = np.empty((n, k), np.int64)
    for i in range(n):
        row = magnitude[i]
        candidates = _candidates(row, k) if finite[i] else None
        if candidates is None:
            candidates = np.arange(d)
            values = row
        else:
            values = row[candidates]
        cut = np.partition(values, len(values) - k)[len(values) - k]
        chosen = candidates[values >= cut]
        if len(chosen) > k:  # ties at the cut: every larger one, then the lowest tied
            above = candidates[values > cut]
            tied = candidates[values == cut][: k - len(above)]
            chosen = np.union1d(above, tied)
        out[i] = chosen
    return out


SAMPLE = 4096  # magnitudes read per row to place the candidates' threshold


def _candidates(row: np.ndarray, k: int) -> np.ndarray | None:
    """The ascending indices of the magnitudes at or above a threshold that about twice k
    of them pass (from every ``d / SAMPLE``-th one), or None when fewer than k pass or a
    quarter of the row would (then selecting among all is as fast)."""
    d = len(row)
    sample = row[:: max(1, d // SAMPLE)]
    above = min(len(sample) - 1, 2 * k * len(sample) // d + 8)  # sampled ones above it
    threshold = np.partition(sample, len(sample) - 1 - above)[len(sample) - 1 - above]
    candidates = np.flatnonzero(row >= threshold)
    if len(candidates) < k or len(candidates) > d // 4:
        return None
    return candidates


def fwht_(a: torch.Tensor, size: int, scratch: Scratch | None = None) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform of every ``size``-run of the rows of the
    contiguous ``a`` (``size`` a power of 2), in place, as radix-2 butterflies over the
    index bits from the lowest up; returns ``a``.

    A butterfly over a low bit pairs neighbours a few floats apart, which strided kernels
    process several times slower than long runs, so the butterflies over the low half of the
    bits run on each block transposed (its low bits made the slow axis), then the block is
    transposed back for the others: the same additions in the same order, the same bits.
    The butterflies run between two scratch buffers whose views are made once per call
    shape (their Python cost is a third of a row's transform otherwise)."""
    scratch = scratch or Scratch(a.device)
    lead = a.numel() // size
    bits = size.bit_length() - 1
    low = 1 << (bits // 2)  # the span of the low bits
    high = size // low
    x = a.view(lead, size)
    first = scratch.get("fwht.first", (lead, size), a.dtype)
    second = scratch.get("fwht.second", (lead, size), a.dtype)
    first.view(lead, low, high).copy_(x.view(lead, high, low).transpose(1, 2))
    done = scratch.butterflies(first, second, high, size)  # the low bits (transposed)
    free = second if done is first else first
    free.view(lead, high, low).copy_(done.view(lead, low, high).transpose(1, 2))
    x.copy_(scratch.butterflies(free, done, low, size))  # the high bits
    return a


def _butterfly_views(
    src: torch.Tensor, dst: torch.Tensor, h: int, stop: int
) -> list[tuple[torch.Tensor, ...]]:
    """For radix-2 butterflies of spans ``h, 2h, ... < stop`` over the ``(lead, size)`` rows
    of ``src``, ping-ponging with ``dst``: each one's (first half, second half, sum out,
    difference out) views."""
    lead, size = src.shape
    views: list[tuple[torch.Tensor, ...]] = []
    while h < stop:
        s = src.view(lead, size // (2 * h), 2, h)
        t = dst.view(lead, size // (2 * h), 2, h)
        views.append((s[:, :, 0], s[:, :, 1], t[:, :, 0], t[:, :, 1]))
        src, dst = dst, src
        h *= 2
    return views
