"""Update codecs: what a client sends instead of its float32 update, and how the server reads it.

Every codec works on a batch ``x`` of shape ``(n, d)`` float32 (n clients' flattened updates,
processed together) and returns a payload: a small frozen dataclass of ``(n, ...)`` numeric
arrays of fixed dtypes (what goes on the wire, e.g. as safetensors). ``decode(payload, d)``
returns ``(n, d)`` float32, ``encoded_bytes(d)`` is the exact byte count of one row's arrays,
and ``from_arrays`` rebuilds a payload from its named arrays. Randomness comes from one seed
per row (an int in ``[0, 2**128)``, e.g. the row's task seed), seeding the row's own stream,
so a row's encoding never depends on the other rows of its batch. The quantizers and top-k
run as torch tensor programs (:mod:`fedforge.compress.kernels`) over the whole batch, on the
CPU or CUDA: a chunk of clients encodes to the bytes each client would send alone. The
quantizers, top-k and the rotation also offer ``weighted_sum(payload, d, weights)``: the
``(d,)`` weighted sum of the decoded rows, computed without an ``(n, d)`` array of them (the
server's weighted mean uses it, ``stages/compress.py``).

Bytes per parameter (d large; block scales are float32 ``low`` and ``step``)::

    Float16, BFloat16                      2
    StochasticQuantizer(bits, block)       bits/8 + 8/block   (8-bit/256: 1.031, 4-bit/256: 0.531)
    StochasticQuantizer(bits, None)        bits/8, plus 8 bytes per row
    TopK(ratio)                            8 * ratio          (int32 index + float32 value)
    rotation.Rotated(inner, block)         inner's at the padded length, plus 16 bytes per row

Place in the chain: after clipping and local DP noise (compressing a released record is
post-processing, so local DP holds), before masking. With central DP the server sums decoded
records, whose norm may exceed the clip norm (stochastic rounding moves each coordinate by up
to one step; top-k never raises it; the casts by a relative 2**-11 or 2**-8), so re-clip
after decoding or bound that excess in the sensitivity. No decode here commutes with
summation (per-row scales, indices and rotation seeds), so these codecs cannot precede
secure aggregation; a variant with a broadcast scale and rotation seed would (the sum of the
integer codes decodes to the sum). Robust aggregators see the decoded rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal, Protocol, Self, TypeVar

import numpy as np
import torch

from fedforge.compress import kernels
from fedforge.core.buffers import empty

Seeds = Sequence[int] | np.ndarray

# Philox counter tags: streams of the same row seed that never overlap.
_QUANTIZE, _ROTATE = 1, 2
_FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class Payload:
    """Base of the encoded payloads: every field is an ``(n, ...)`` numeric array."""

    def arrays(self) -> dict[str, np.ndarray]:
        """The named arrays to send (nested payloads flattened as ``prefix.name``)."""
        out: dict[str, np.ndarray] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Payload):
                out.update({f"{f.name}.{k}": v for k, v in value.arrays().items()})
            else:
                out[f.name] = value
        return out

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())

    def select(self, rows: slice | Sequence[int] | np.ndarray) -> Self:
        """The payload of some rows (e.g. one client's, to send alone)."""
        changes = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(
            self,
            **{
                k: v.select(rows) if isinstance(v, Payload) else np.ascontiguousarray(v[rows])
                for k, v in changes.items()
            },
        )


P = TypeVar("P", bound=Payload)


def concat(parts: Sequence[P]) -> P:
    """Rows of several payloads of one codec stacked into one batch (for one decode)."""
    first = parts[0]
    changes = {}
    for f in fields(first):
        values = [getattr(p, f.name) for p in parts]
        changes[f.name] = (
            concat(values) if isinstance(values[0], Payload) else np.concatenate(values)
        )
    return replace(first, **changes)


class Codec(Protocol[P]):
    @property
    def name(self) -> str: ...

    def encode(self, x: np.ndarray, seeds: Seeds | None = None) -> P: ...

    def decode(self, payload: P, d: int) -> np.ndarray: ...

    def encoded_bytes(self, d: int) -> int:
        """Exact bytes of one row's payload arrays for a ``d``-parameter update."""
        ...

    def from_arrays(self, arrays: Mapping[str, np.ndarray]) -> P: ...


def _batch(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"expected a batch of flattened updates (n, d>0), got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _check(payload: Payload, expected: Mapping[str, tuple[int, type]]) -> None:
    """Refuse a payload whose arrays are not the ``(n, width)`` arrays its codec produces."""
    arrays = payload.arrays()
    n = next(iter(arrays.values())).shape[0]
    for name, (width, dtype) in expected.items():
        a = arrays[name]
        if a.shape != (n, width) or a.dtype != dtype:
            raise ValueError(
                f"payload array {name!r} has shape {a.shape} and dtype {a.dtype}; this codec "
                f"needs (n, {width}) {np.dtype(dtype)}: decode with the codec and d it "
                "was encoded with"
            )


def _keys(seeds: Seeds | None, n: int) -> list[int]:
    if seeds is None:
        raise ValueError("this codec is randomized: pass one seed per row (e.g. task seeds)")
    keys = [int(s) for s in seeds]
    if len(keys) != n or any(not 0 <= k < 2**128 for k in keys):
        raise ValueError(f"need {n} seeds, each an int in [0, 2**128); got {len(keys)}")
    return keys


def _words(keys: Sequence[int], tag: int, count: int) -> np.ndarray:
    """``(n, count)`` uint64 from row ``i``'s Philox stream (key ``keys[i]``, counter tag)."""
    out = np.empty((len(keys), count), np.uint64)
    for i, key in enumerate(keys):  # only the keying is per row; the draws are C loops
        out[i] = np.random.Philox(key=key, counter=tag << 192).random_raw(count)
    return out


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x if x.flags.writeable else x.copy())


# --- casts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Float16Payload(Payload):
    values: np.ndarray  # (n, d) float16


@dataclass(frozen=True)
class Float16:
    """IEEE half precision, round to nearest even; saturates at +-65504 (no infinities)."""

    @property
    def name(self) -> str:
        return "float16"

    def encode(self, x: np.ndarray, seeds: Seeds | None = None) -> Float16Payload:
        x = _batch(x)
        return Float16Payload(np.clip(x, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16))

    def decode(self, payload: Float16Payload, d: int) -> np.ndarray:
        _check(payload, {"values": (d, np.float16)})
        return payload.values.astype(np.float32)

    def encoded_bytes(self, d: int) -> int:
        """``2 d``."""
        return 2 * d

    def from_arrays(self, arrays: Mapping[str, np.ndarray]) -> Float16Payload:
        return Float16Payload(**arrays)


@dataclass(frozen=True)
class BFloat16Payload(Payload):
    bits: np.ndarray  # (n, d) uint16: the top half of each float32, rounded


@dataclass(frozen=True)
class BFloat16:
    """bfloat16 (float32's range, 8 significant bits), round to nearest even; NaN stays NaN."""

    @property
    def name(self) -> str:
        return "bfloat16"

    def encode(self, x: np.ndarray, seeds: Seeds | None = None) -> BFloat16Payload:
        x = _batch(x)
        u = x.view(np.uint32)
        rounded = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
        bits = (rounded >> np.uint32(16)).astype(np.uint16)
        bits[np.isnan(x)] = 0x7FC0  # rounding could carry a NaN's payload into infinity
        return BFloat16Payload(bits)

    def decode(self, payload: BFloat16Payload, d: int) -> np.ndarray:
        _check(payload, {"bits": (d, np.uint16)})
        return (payload.bits.astype(np.uint32) << np.uint32(16)).view(np.float32)

    def encoded_bytes(self, d: int) -> int:
        """``2 d``."""
        return 2 * d

    def from_arrays(self, arrays: Mapping[str, np.ndarray]) -> BFloat16Payload:
        return BFloat16Payload(**arrays)


# --- stochastic uniform quantization -------------------------------------------------------


@dataclass(frozen=True)
class QuantizedPayload(Payload):
    codes: np.ndarray  # (n, ceil(d * bits / 8)) uint8, 8 // bits codes per byte, low bits first
    low: np.ndarray  # (n, blocks) float32: each block's minimum
    step: np.ndarray  # (n, blocks) float32: (max - min) / (2**bits - 1)


@dataclass(frozen=True)
class StochasticQuantizer:
    """Unbiased stochastic uniform quantization (QSGD-style) over each block's [min, max].

    A block (``block`` consecutive coordinates, or the whole row when None; the row is
    padded to a block multiple with its last value, which widens no range) gets
    ``2**bits`` levels ``low + k * step`` spanning its [min, max]; min-max rather than
    symmetric [-absmax, absmax] because its step is never larger. A coordinate at
    ``low + (k + f) step`` becomes ``k + 1`` with probability ``f`` and ``k`` otherwise
    (``f`` in fixed point, truncated to 16 bits: :func:`kernels.quantize`), so
    ``E[decode] = x`` up to float32 rounding and ``2**-16`` of a step, ``|decode - x| <=
    step``, variance ``<= step**2 / 4``. Inputs must be finite.
    """

    bits: Literal[1, 2, 4, 8] = 8
    block: int | None = 256

    def __post_init__(self) -> None:
        if self.bits not in (1, 2, 4, 8):
            raise ValueError(f"bits must be 1, 2, 4 or 8, got {self.bits}")
        if self.block is not None and self.block < 1:
            raise ValueError(f"block must be a positive size or None, got {self.block}")

    @property
    def name(self) -> str:
        return f"q{self.bits}/" + ("row" if self.block is None else str(self.block))

    def _blocks(self, d: int) -> tuple[int, int]:
        size = d if self.block is None else min(self.block, d)
        return size, -(-d // size)

    def encode(self, x: np.ndarray, seeds: Seeds | None = None) -> QuantizedPayload:
        x = _batch(x)
        codes, low, step = self.encode_tensor(_tensor(x), _keys(seeds, x.shape[0]))
        return QuantizedPayload(codes.numpy(), low.numpy(), step.numpy())

    def encode_tensor(
        self, x: torch.Tensor, keys: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The payload's (codes, low, step) of a float32 ``(n, d)`` tensor, on its device."""
        n, d = x.shape
        size, count = self._blocks(d)
        codes = torch.empty((n, -(-d * self.bits // 8)), dtype=torch.uint8, device=x.device)
        low = torch.empty((n, count), dtype=torch.float32, device=x.device)
        step = torch.empty_like(low)
        scratch = kernels.Scratch(x.device)
        for rows in kernels.tiles(n, d, x.device):  # (each tile's random lanes drawn for it)
            uniforms = torch.from_numpy(kernels.lanes(keys[rows], _QUANTIZE, d)).to(x.device)
            c, low[rows], step[rows] = kernels.quantize(x[rows], uniforms, self.bits, size, scratch)
            kernels.pack(c, self.bits, codes[rows], scratch)
        # A NaN or an infinity reaches its block's minimum or maximum.
        finite = torch.isfinite(low).all(dim=1) & torch.isfinite(step).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite)[:, 0].tolist()
            raise ValueError(f"rows {bad} are not finite: clip or reject them before quantizing")
        return codes, low, step

    def _tensors(
        self, payload: QuantizedPayload, d: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The payload's (codes, low, step) as tensors, refused unless shaped for ``d``."""
        count = self._blocks(d)[1]
        _check(
            payload,
            {
                "codes": (-(-d * self.bits // 8), np.uint8),
                "low": (count, np.float32),
                "step": (count, np.float32),
            },
        )
        return _tensor(payload.codes), _tensor(payload.low), _tensor(payload.step)

    def decode(self, payload: QuantizedPayload, d: int) -> np.ndarray:
        return self.decode_tensor(*self._tensors(payload, d), d).numpy()

    def decode_tensor(
        self, codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor, d: int
    ) -> torch.Tensor:
        """``(n, d)`` float32 from the payload's tensors, on their device."""
        size = self._blocks(d)[0]
        n = codes.shape[0]
        out = empty((n, d), torch.float32, codes.device)
        scratch = kernels.Scratch(codes.device)
        for rows in kernels.tiles(n, d, codes.device):
            values = kernels.unpack(codes[rows], self.bits, d, scratch)
            kernels.dequantize(values, low[rows], step[rows], size, out[rows])
        return out

    def weighted_sum(self, payload: QuantizedPayload, d: int, weights: np.ndarray) -> torch.Tensor:
        """``weights @ decode(payload, d)`` as ``(d,)`` float64, accumulated in float32 as the
        server's sum of a chunk of decoded records is, each tile of rows decoded into a small
        buffer and added at once (no ``(n, d)`` array of decoded rows)."""
        codes, low, step = self._tensors(payload, d)
        size = self._blocks(d)[0]
        with np.errstate(over="ignore"):  # (a weight past float32: a sum not finite, refused)
            w = torch.from_numpy(np.asarray(weights, np.float32))
        n = codes.shape[0]
        total = torch.zeros(d, dtype=torch.float32)  # (as a chunk's matrix-vector sum)
        scratch = kernels.Scratch(codes.device)
        for rows in kernels.tiles(n, d, codes.device):
            values = kernels.unpack(codes[rows], self.bits, d, scratch)
            out = scratch.get("decoded", (rows.stop - rows.start, d), torch.float32)
            kernels.dequantize(values, low[rows], step[rows], size, out)
            total.addmv_(out.t(), w[rows])
        return total.double()

    def encoded_bytes(self, d: int) -> int:
        """``ceil(d * bits / 8) + 8 * ceil(d / block)`` (one block per row when None)."""
        return -(-d * self.bits // 8) + 8 * self._blocks(d)[1]

    def from_arrays(self, arrays: Mapping[str, np.ndarray]) -> QuantizedPayload:
        return QuantizedPayload(**arrays)


# --- top-k sparsification ------------------------------------------------------------------


@dataclass(frozen=True)
class TopKPayload(Payload):
    indices: np.ndarray  # (n, k) int32, ascending
    values: np.ndarray  # (n, k) float32


@dataclass(frozen=True)
class TopK:
    """Keep the ``k = ceil(ratio * d)`` largest-magnitude coordinates of each row.

    Biased: pair it with :func:`with_error_feedback` so the dropped mass is sent later.
    """

    ratio: float

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"top-k ratio must be in (0, 1], got {self.ratio}")

    @property
    def name(self) -> str:
        return f"top-{self.ratio:g}"

    def k(self, d: int) -> int:
        return min(d, max(1, math.ceil(round(self.ratio * d, 6))))

    def encode(self, x: np.ndarray, seeds: Seeds | None = None) -> TopKPayload:
        x = _batch(x)
        d = x.shape[1]
        if d >= 2**31:
            raise ValueError(f"d = {d} does not fit int32 indices")
        indices, values = self.encode_tensor(_tensor(x))
        return TopKPayload(indices.to(torch.int32).numpy(), values.numpy())

    def encode_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices int64, values) of each row's ``k`` largest magnitudes, on ``x``'s device;
        ties at the cut go to the lowest indices."""
        n, d = x.shape
        k = self.k(d)
        indices = torch.empty((n, k), dtype=torch.int64, device=x.device)
        for rows in kernels.tiles(n, d, x.device):
            indices[rows] = kernels.top_k(x[rows], k)
        return indices, torch.gather(x, 1, indices)

    def decode(self, payload: TopKPayload, d: int) -> np.ndarray:
        k = self.k(d)
        _check(payload, {"indices": (k, np.int32), "values": (k, np.float32)})
        if payload.indices.size and not (0 <= payload.indices.min() <= payload.indices.max() < d):
            raise ValueError(f"top-k indices outside [0, {d}): the payload is corrupt")
        indices = torch.from_numpy(payload.indices.astype(np.int64))
        return self.decode_tensor(indices, _tensor(payload.values), d).numpy()

    def weighted_sum(
        self, payload: TopKPayload, d: int, weights: np.ndarray
    ) -> torch.Tensor | None:
        """``weights @ decode(payload, d)`` as ``(d,)`` float64 from the kept entries alone
        (no dense rows); None when some row's indices are not strictly ascending (never so
        from :meth:`encode`: such a payload is decoded as :meth:`decode` does)."""
        k = self.k(d)
        _check(payload, {"indices": (k, np.int32), "values": (k, np.float32)})
        indices = payload.indices
        if indices.size and not (0 <= indices.min() <= indices.max() < d):
            raise ValueError(f"top-k indices outside [0, {d}): the payload is corrupt")
        if k > 1 and not bool((np.diff(indices, axis=1) > 0).all()):
            return None
        with np.errstate(over="ignore", invalid="ignore"):  # (a sum not finite is refused)
            scaled = payload.values.astype(np.float64) * np.asarray(weights, np.float64)[:, None]
        total = torch.zeros(d, dtype=torch.float64)
        flat = torch.from_numpy(indices.astype(np.int64).reshape(-1))
        return total.index_add_(0, flat, torch.from_numpy(scaled.reshape(-1)))

    @staticmethod
    def decode_tensor(indices: torch.Tensor, values: torch.Tensor, d: int) -> torch.Tensor:
        out = empty((indices.shape[0], d), torch.float32, values.device).zero_()
        return out.scatter_(1, indices, values)

    def encoded_bytes(self, d: int) -> int:
        """``8 k`` with ``k = ceil(ratio * d)``: an int32 index and a float32 value each."""
        return 8 * self.k(d)

    def from_arrays(self, arrays: Mapping[str, np.ndarray]) -> TopKPayload:
        return TopKPayload(**arrays)


def with_error_feedback(
    codec: Codec[P], x: np.ndarray, residual: np.ndarray | None, seeds: Seeds | None = None
) -> tuple[P, np.ndarray]:
    """``codec`` applied to ``x + residual``; the new residual is exactly what the codec lost
    (for top-k: the dropped coordinates), so ``x + residual == decode(payload) +
    new_residual`` and, over rounds, what was sent plus the last residual is the sum of the
    updates (Seide et al. 2014; Stich et al. 2018). The residual is client state."""
    x = _batch(x)
    corrected = x.copy() if residual is None else np.add(x, _batch(residual))
    return error_feedback_(codec, corrected, seeds)


def error_feedback_(
    codec: Codec[P], corrected: np.ndarray, seeds: Seeds | None = None
) -> tuple[P, np.ndarray]:
    """:func:`with_error_feedback` of the already corrected rows, which it overwrites with
    the new residual (a float32 ``(n, d)`` array the caller owns)."""
    if isinstance(codec, TopK):  # what was not sent: the corrected update, sent entries zeroed
        rows = _tensor(corrected)
        indices, values = codec.encode_tensor(rows)
        payload = TopKPayload(indices.to(torch.int32).numpy(), values.numpy())
        rows.scatter_(1, indices, 0.0)  # (the values were gathered first)
        return payload, corrected
    payload = codec.encode(corrected, seeds)
    corrected -= codec.decode(payload, corrected.shape[1])
    return payload, corrected
