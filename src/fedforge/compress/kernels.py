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


def _blockwise(t: torch.Tensor, size: int, op: str, values: torch.Tensor) -> None:
    """In place, ``t (op)= values`` with one value per ``size``-run of each row (views of
    the whole runs, then the short last run: nothing is expanded)."""
    n, d = t.shape
    full = d // size
    head = t[:, : full * size].view(n, full, size)
    getattr(head, op)(values[:, :full, None])
    if full * size < d:
        getattr(t[:, full * size :], op)(values[:, full:])


def quantize(
    x: torch.Tensor, uniforms: torch.Tensor, bits: int, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stochastic rounding of each ``size``-block to ``2**bits`` levels over its [min, max]:
    ``(codes uint8 (n, d), low, step)``. In fixed point with 16 fractional bits, a coordinate
    at ``low + (k + r / 65536) step`` (``r`` the integer part of its scaled fraction) becomes
    ``k + 1`` when its uniform 16-bit lane ``u`` carries ``r + u`` past 65535 (probability
    ``r / 65536``), else ``k``: integer operations only after the scaling."""
    top = 2**bits - 1
    low, high = block_ranges(x, size)
    step = ((high.double() - low) / top).float()
    inverse = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
    t = x.clone()
    _blockwise(t, size, "sub_", low)
    _blockwise(t, size, "mul_", inverse * float(LANE))  # (exact: a power of 2)
    t.clamp_(0.0, float(top * LANE))
    fixed = t.to(torch.int32)  # truncation is the floor of a non-negative value
    fixed.add_(uniforms.to(torch.int32)).bitwise_right_shift_(16)
    return fixed.to(torch.uint8), low, step


def dequantize(
    codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor, size: int, out: torch.Tensor
) -> torch.Tensor:
    """``low + code * step`` per block, into the float32 ``(n, d)`` tensor ``out``."""
    out.copy_(codes)
    _blockwise(out, size, "mul_", step)
    _blockwise(out, size, "add_", low)
    return out


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``8 // bits`` codes per byte, the first in the low bits."""
    per = 8 // bits
    if per == 1:
        return codes
    n, d = codes.shape
    padded = torch.zeros((n, -(-d // per) * per), dtype=torch.uint8, device=codes.device)
    padded[:, :d] = codes
    grouped = padded.view(n, -1, per)
    packed = grouped[:, :, 0].clone()
    for j in range(1, per):
        packed |= grouped[:, :, j] << (bits * j)
    return packed


def unpack(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    per = 8 // bits
    if per == 1:
        return packed
    mask = 2**bits - 1
    n, width = packed.shape
    codes = torch.empty((n, width, per), dtype=torch.uint8, device=packed.device)
    for j in range(per):
        torch.bitwise_and(packed >> (bits * j), mask, out=codes[:, :, j])
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
    """:func:`top_k` of a CPU batch with NumPy (a partition per row, several times torch's
    selection speed here)."""
    n, d = x.shape
    magnitude = np.abs(x)
    cut = np.partition(magnitude, d - k, axis=1)[:, d - k]
    out = np.empty((n, k), np.int64)
    for i in range(n):
        chosen = np.flatnonzero(magnitude[i] >= cut[i])
        if len(chosen) > k:  # ties at the cut: every larger one, then the lowest tied
            above = np.flatnonzero(magnitude[i] > cut[i])
            tied = np.flatnonzero(magnitude[i] == cut[i])[: k - len(above)]
            chosen = np.union1d(above, tied)
        out[i] = chosen
    return out


def fwht_(a: torch.Tensor, size: int) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform of every ``size``-run of the rows of ``a``
    (``size`` a power of 2), as radix-2 butterflies; returns the transformed tensor."""
    lead = a.numel() // size
    src = a.reshape(lead, size)
    dst = torch.empty_like(src)
    h = 1
    while h < size:
        s = src.view(lead, size // (2 * h), 2, h)
        t = dst.view(lead, size // (2 * h), 2, h)
        torch.add(s[:, :, 0], s[:, :, 1], out=t[:, :, 0])
        torch.sub(s[:, :, 0], s[:, :, 1], out=t[:, :, 1])
        src, dst = dst, src
        h *= 2
    return src.view(a.shape)
