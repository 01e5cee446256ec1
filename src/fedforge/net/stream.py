"""Streamed payloads: arrays encoded chunk by chunk from their own memory, and chunks decoded
straight into the arrays they describe.

The payload is a safetensors file (``decode_params`` reads it whole), produced and consumed
without ever holding it as one byte string:

- :func:`encode_pieces` lays out the header and a byte view of each array (no copy of the
  data): the round's broadcast is encoded once and every client's stream reads the same
  memory; :func:`chunk_parts` cuts the pieces into protocol chunks (one chunk-sized copy at
  a time, written into the outgoing message in place).
- :class:`StreamDecoder` checks each chunk as :class:`~fedforge.net.codec.Reassembler` does,
  parses the header as soon as it has arrived, checks it against the expected arrays (names,
  shapes, dtypes: the records' own validation, before anything is allocated), allocates each
  array once and copies every chunk's bytes straight into it, checking each completed run of
  floats for finiteness as it lands (a NaN is refused at its chunk, not after the transfer).
  The transfer's digest is checked at its last chunk; only then are the arrays handed out.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedforge.aggregate.kinds import rows_finite
from fedforge.core.params import Params, ParamSpec
from fedforge.net.codec import ALLOWED_DTYPES, ProtocolError, check_chunk, check_complete
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.runtime.validation import layout_error

# safetensors' dtype names of the dtypes allowed on the wire (little-endian).
DTYPE_NAMES: dict[np.dtype, str] = {
    np.dtype("<f2"): "F16",
    np.dtype("<f4"): "F32",
    np.dtype("<f8"): "F64",
    np.dtype("u1"): "U8",
    np.dtype("<u2"): "U16",
    np.dtype("<i4"): "I32",
    np.dtype("<u4"): "U32",
    np.dtype("<i8"): "I64",
    np.dtype("<u8"): "U64",
}
NAMED_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
assert set(DTYPE_NAMES) == ALLOWED_DTYPES
MAX_HEADER_BYTES = 16 << 20  # a header describing any real model is far smaller


@dataclass(frozen=True)
class Encoded:
    """A payload as pieces (its 8-byte length and JSON header, then each array's bytes, viewed
    in place), with its size and SHA-256 digest."""

    pieces: tuple[memoryview, ...]
    size: int
    digest: bytes


def _byte_view(arr: np.ndarray) -> memoryview:
    return memoryview(arr.reshape(-1).view(np.uint8).data)


def encode_pieces(params: Mapping[str, np.ndarray]) -> Encoded:
    """``params`` as a safetensors payload in pieces, arrays in name order; the arrays are
    viewed, not copied (non-contiguous ones are made contiguous), and must not change while
    the pieces are in use."""
    arrays: dict[str, np.ndarray] = {}
    for name in sorted(params):
        arr = np.asarray(params[name])
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")
        if arr.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {arr.dtype} cannot be sent")
        arrays[name] = arr
    header: dict[str, object] = {}
    offset = 0
    for name, arr in arrays.items():
        entry = {"dtype": DTYPE_NAMES[arr.dtype], "shape": list(arr.shape)}
        header[name] = {**entry, "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes
    head = len(text).to_bytes(8, "little") + text
    pieces = (memoryview(head), *(_byte_view(a) for a in arrays.values() if a.nbytes))
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return Encoded(pieces, len(head) + offset, digest.digest())


def _slices(pieces: Sequence[memoryview], chunk_bytes: int) -> Iterator[bytes]:
    """The pieces' bytes in ``chunk_bytes`` slices (the last one shorter)."""
    parts: list[memoryview] = []
    have = 0
    for piece in pieces:
        start = 0
        while start < len(piece):
            take = min(chunk_bytes - have, len(piece) - start)
            parts.append(piece[start : start + take])
            have, start = have + take, start + take
            if have == chunk_bytes:
                yield parts[0].tobytes() if len(parts) == 1 else b"".join(parts)
                parts, have = [], 0
    if parts:
        yield b"".join(parts)


@dataclass(frozen=True)
class ChunkPart:
    """One protocol chunk of a payload, written into a message with :meth:`fill`."""

    transfer_id: bytes
    index: int
    count: int
    total_bytes: int
    sha256: bytes
    data: bytes

    def fill(self, chunk: pb.Chunk) -> None:
        """Write this chunk into ``chunk``, a field of the outgoing message: a message built
        around a finished chunk copies it, at a fraction of the speed (about a tenth here)."""
        chunk.transfer_id = self.transfer_id
        chunk.index = self.index
        chunk.count = self.count
        chunk.total_bytes = self.total_bytes
        chunk.sha256 = self.sha256
        chunk.data = self.data


def chunk_parts(encoded: Encoded, chunk_bytes: int) -> Iterator[ChunkPart]:
    """The chunks of ``encoded`` (a fresh transfer id), cut lazily from its pieces."""
    transfer_id = os.urandom(16)
    count = max(1, -(-encoded.size // chunk_bytes))
    for index, data in enumerate(_slices(encoded.pieces, chunk_bytes)):
        yield ChunkPart(transfer_id, index, count, encoded.size, encoded.digest, data)


def stream_chunks(encoded: Encoded, chunk_bytes: int) -> Iterator[pb.Chunk]:
    """The chunks of ``encoded`` as messages of their own."""
    for part in chunk_parts(encoded, chunk_bytes):
        chunk = pb.Chunk()
        part.fill(chunk)
        yield chunk


@dataclass(frozen=True)
class Slot:
    """Where one array's bytes lie in a payload's data section."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def parse_header(text: bytes, data_bytes: int) -> list[Slot]:
    """The arrays a safetensors header describes, in data order; ProtocolError unless they
    are allowed dtypes exactly tiling the ``data_bytes`` after the header."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in pairs}) != len(pairs):
            raise ProtocolError("payload header names an array twice")
        return dict(pairs)

    try:
        header = json.loads(text, object_pairs_hook=unique)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"undecodable parameter payload: header: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("undecodable parameter payload: header is not an object")
    header.pop("__metadata__", None)
    slots = []
    for name, entry in header.items():
        try:
            dtype: np.dtype = NAMED_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(
                f"{name[:60]}: malformed or disallowed header entry ({exc})"
            ) from None
        if any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise ProtocolError(f"{name[:60]}: negative shape or offsets in the header")
        if end - begin != int(np.prod(shape, dtype=object)) * dtype.itemsize:
            raise ProtocolError(f"{name[:60]}: data offsets do not match its shape")
        slots.append(Slot(name, dtype, shape, begin, end))
    slots.sort(key=lambda s: (s.begin, s.end))
    at = 0
    for slot in slots:
        if slot.begin != at:
            raise ProtocolError("payload arrays overlap or leave gaps")
        at = slot.end
    if at != data_bytes:
        raise ProtocolError(f"payload arrays cover {at} of its {data_bytes} data bytes")
    return slots


class StreamDecoder:
    """Receives one transfer chunk by chunk into its arrays (see the module docstring).

    ``spec``: the arrays the payload must hold, checked at its header (None: any allowed
    arrays). ``finite``: refuse a float that is NaN or infinite at the chunk it arrives in.
    """

    def __init__(self, max_bytes: int, spec: ParamSpec | None = None, finite: bool = False):
        self.max_bytes = max_bytes
        self.spec = spec
        self.finite = finite
        self.received = 0  # bytes so far
        self._first: pb.Chunk | None = None
        self._count = 0
        self._hash = hashlib.sha256()
        self._head = bytearray()  # the length and header, until parsed
        self._data_start = -1  # payload offset of the data section, once the header is parsed
        self._slots: list[Slot] = []
        self._arrays: dict[str, np.ndarray] = {}
        self._views: list[np.ndarray] = []  # each array's bytes, in data order
        self._slot = 0  # the array being filled
        self._checked = 0  # its elements checked for finiteness
        self._discarded = False
        self._lock = threading.Lock()

    def discard(self) -> None:
        """Drop what was received (a refused or abandoned transfer frees its arrays now);
        safe from another thread than the one adding chunks."""
        with self._lock:
            self._discarded = True
            self._arrays, self._views, self._head = {}, [], bytearray()

    @property
    def header_done(self) -> bool:
        return self._data_start >= 0

    def add(self, chunk: pb.Chunk) -> Params | None:
        """Take the next chunk; the arrays once the transfer is complete, else None."""
        with self._lock:
            if self._discarded:
                raise ProtocolError("the transfer was abandoned")
            return self._add(chunk)

    def _add(self, chunk: pb.Chunk) -> Params | None:
        first = check_chunk(self._first, chunk, self._count, self.max_bytes)
        self._first = first
        data = memoryview(chunk.data)
        if self.received + len(data) > first.total_bytes:
            raise ProtocolError("transfer is longer than announced")
        self._hash.update(data)
        self.received += len(data)
        self._count += 1
        if not self.header_done:
            data = self._take_header(data, first.total_bytes)
        if len(data):
            self._fill(data)
        if self._count < first.count:
            return None
        check_complete(first, self.received, self._hash.digest())
        if not self.header_done:
            if self.received == 0:  # an empty payload: no arrays (as ``decode_params``)
                return {}
            raise ProtocolError("undecodable parameter payload: no complete header")
        arrays, self._arrays, self._views = self._arrays, {}, []
        return arrays

    def _take_header(self, data: memoryview, total: int) -> memoryview:
        """Collect header bytes; parse the header once complete and allocate the arrays.
        Returns what of ``data`` lies beyond the header."""
        if len(self._head) < 8:
            take = min(8 - len(self._head), len(data))
            self._head += data[:take]
            data = data[take:]
            if len(self._head) < 8:
                return data
            length = int.from_bytes(self._head, "little")
            if not 0 < length <= min(MAX_HEADER_BYTES, total - 8):
                raise ProtocolError(f"undecodable parameter payload: header of {length} bytes")
        need = 8 + int.from_bytes(self._head[:8], "little")
        take = min(need - len(self._head), len(data))
        self._head += data[:take]
        data = data[take:]
        if len(self._head) < need:
            return data
        self._data_start = need
        self._slots = parse_header(bytes(self._head[8:]), total - need)
        self._head = bytearray()
        if self.spec is not None:
            layout = {s.name: (s.shape, s.dtype) for s in self._slots}
            problem = layout_error(layout, self.spec)
            if problem is not None:
                raise ProtocolError(f"arrays do not match the record's: {problem}")
        for slot in self._slots:  # allocated only now: the sizes are checked
            arr = np.empty(slot.shape, slot.dtype)
            self._arrays[slot.name] = arr
            self._views.append(arr.reshape(-1).view(np.uint8))
        self._skip_empty()
        return data

    def _skip_empty(self) -> None:
        while self._slot < len(self._slots) and not len(self._views[self._slot]):
            self._slot += 1

    def _fill(self, data: memoryview) -> None:
        """Copy ``data`` (the next bytes of the data section) into the arrays."""
        at = 0
        while at < len(data):
            slot = self._slots[self._slot]
            view = self._views[self._slot]
            offset = self.received - len(data) + at - self._data_start - slot.begin
            take = min(len(view) - offset, len(data) - at)
            view[offset : offset + take] = np.frombuffer(data[at : at + take], np.uint8)
            at += take
            if self.finite:
                self._check_finite(slot, (offset + take) // slot.dtype.itemsize)
            if offset + take == len(view):
                self._slot += 1
                self._checked = 0
                self._skip_empty()

    def _check_finite(self, slot: Slot, filled: int) -> None:
        """Check the elements of ``slot`` completed since the last check."""
        if slot.dtype.kind != "f" or filled <= self._checked:
            return
        flat = self._arrays[slot.name].reshape(-1)[self._checked : filled]
        if not rows_finite(flat[None])[0]:
            raise ProtocolError(f"{slot.name}: NaN or infinite")
        self._checked = filled
