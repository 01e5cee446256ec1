"""Wire encoding: arrays as safetensors bytes, streamed in integrity-checked chunks.

Pure functions and one small reassembler; every malformed input raises ProtocolError, so a
decoder fed garbage fails cleanly and the server keeps serving.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from fedforge.core.errors import FedforgeError
from fedforge.core.params import Params, ParamSpec
from fedforge.net.proto import fedforge_pb2 as pb

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB pieces: far below gRPC's message limits
# Floats, and the integer types of encoded updates (quantized codes, indices, seeds, client
# ids, secure aggregation's ring words); every
# record is then checked against its spec's exact dtypes and shapes.
ALLOWED_DTYPES = frozenset(
    np.dtype(t)
    for t in (
        np.float16,
        np.float32,
        np.float64,
        np.uint8,
        np.uint16,
        np.int32,
        np.uint32,
        np.int64,
        np.uint64,
    )
)


class ProtocolError(FedforgeError):
    """A message broke the protocol (bad chunk, digest, encoding, replay, ...)."""


def encode_params(params: Params) -> bytes:
    """Safetensors bytes of ``params`` (an empty dict encodes to a valid, empty file)."""
    return save({k: np.ascontiguousarray(v) for k, v in params.items()})


def array_bytes(payload: bytes) -> int:
    """Bytes of array data in a safetensors payload: its length less the 8-byte header
    length and the JSON header (what the history's byte counts count)."""
    if len(payload) < 8:
        return 0
    return len(payload) - 8 - int.from_bytes(payload[:8], "little")


def decode_params(payload: bytes) -> Params:
    """Parse safetensors bytes into arrays of allowed dtypes; raise ProtocolError otherwise.

    An empty dict (or an empty payload) decodes to ``{}``: stages such as evaluate send
    no arrays."""
    if not payload:
        return {}
    try:
        params = load(payload)
    except (SafetensorError, ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"undecodable parameter payload: {exc}") from None
    for name, arr in params.items():
        if arr.dtype not in ALLOWED_DTYPES:
            raise ProtocolError(f"{name}: dtype {arr.dtype} is not allowed on the wire")
    return params


def split_payload(
    payload: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES, digest: bytes | None = None
) -> Iterator[pb.Chunk]:
    """Chunks of ``payload``, each carrying the transfer id, position and whole-payload digest
    (pass ``digest`` to reuse one computed earlier). Chunks are produced lazily."""
    transfer_id = os.urandom(16)
    digest = digest or hashlib.sha256(payload).digest()
    count = max(1, -(-len(payload) // chunk_bytes))
    for index in range(count):
        yield pb.Chunk(
            transfer_id=transfer_id,
            index=index,
            count=count,
            total_bytes=len(payload),
            sha256=digest,
            data=payload[index * chunk_bytes : (index + 1) * chunk_bytes],
        )


def encoded_size_bound(spec: ParamSpec) -> int:
    """An upper bound on the safetensors size of arrays matching ``spec``: their bytes plus a
    generous header allowance. A transfer that announces more cannot be a valid record, so
    it is refused before any of it is received."""
    data = sum(
        int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in spec.values()
    )
    header = 8 + 1024 + sum(len(name.encode()) + 160 for name in spec)
    return int(data) + header


class Reassembler:
    """Collects the chunks of one transfer in order and checks size and digest.

    The announced size is checked against ``max_bytes`` at the first chunk; the chunks are
    copied into one buffer of that size and hashed as they arrive (no list of parts, no
    join), so a transfer costs its announced size once while it is received."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._first: pb.Chunk | None = None
        self._buffer = bytearray()
        self._hash = hashlib.sha256()
        self._count = 0
        self._size = 0

    def add(self, chunk: pb.Chunk) -> bytes | None:
        """Add the next chunk; return the payload when complete, else None."""
        first = check_chunk(self._first, chunk, self._count, self.max_bytes)
        if self._first is None:
            self._first = first
            self._buffer = bytearray(chunk.total_bytes)
        end = self._size + len(chunk.data)
        if end > first.total_bytes:
            raise ProtocolError("transfer is longer than announced")
        self._buffer[self._size : end] = chunk.data
        self._hash.update(chunk.data)
        self._size = end
        self._count += 1
        if self._count < first.count:
            return None
        check_complete(first, self._size, self._hash.digest())
        payload = bytes(self._buffer)
        self._buffer = bytearray()
        return payload


def check_chunk(first: pb.Chunk | None, chunk: pb.Chunk, received: int, max_bytes: int) -> pb.Chunk:
    """Check ``chunk`` as the next (``received`` came before it) of the transfer that
    ``first`` started (None: ``chunk`` must start one, announcing at most ``max_bytes``);
    return the transfer's first chunk."""
    if first is None:
        if chunk.index != 0:
            raise ProtocolError(f"transfer starts at chunk {chunk.index}, expected 0")
        if chunk.total_bytes > max_bytes:
            raise ProtocolError(
                f"transfer of {chunk.total_bytes} bytes exceeds the limit of "
                f"{max_bytes} bytes for this reply"
            )
        if chunk.count < 1 or chunk.count > max(1, chunk.total_bytes):
            raise ProtocolError(
                f"transfer of {chunk.total_bytes} bytes in {chunk.count} chunks is malformed"
            )
        if len(chunk.sha256) != 32 or len(chunk.transfer_id) != 16:
            raise ProtocolError("chunk header has a malformed digest or transfer id")
        return chunk
    if (chunk.transfer_id, chunk.count, chunk.total_bytes, chunk.sha256) != (
        first.transfer_id,
        first.count,
        first.total_bytes,
        first.sha256,
    ):
        raise ProtocolError("chunk does not belong to the transfer in progress")
    if chunk.index != received:
        raise ProtocolError(f"chunk {chunk.index} out of order, expected {received}")
    return first


def check_complete(first: pb.Chunk, size: int, digest: bytes) -> None:
    """Check a transfer whose last chunk arrived: its size and digest as announced."""
    if size != first.total_bytes:
        raise ProtocolError(f"transfer truncated: {size} of {first.total_bytes} bytes")
    if digest != first.sha256:
        raise ProtocolError("payload digest mismatch (corrupted or tampered transfer)")
