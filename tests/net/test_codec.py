import contextlib
import hashlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedforge.net.codec import (
    ProtocolError,
    Reassembler,
    decode_params,
    encode_params,
    split_payload,
)
from fedforge.net.proto import fedforge_pb2 as pb

PARAMS = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)}


def _reassemble(chunks: list[pb.Chunk], max_bytes: int = 1 << 20) -> bytes | None:
    r = Reassembler(max_bytes)
    out = None
    for c in chunks:
        out = r.add(c)
    return out


def test_roundtrip_in_many_chunks() -> None:
    payload = encode_params(PARAMS)
    chunks = list(split_payload(payload, chunk_bytes=7))
    assert len(chunks) == -(-len(payload) // 7)
    got = decode_params(_reassemble(chunks) or b"")
    for k, v in PARAMS.items():
        np.testing.assert_array_equal(got[k], v)


def test_chunk_errors_are_protocol_errors() -> None:
    chunks = list(split_payload(encode_params(PARAMS), chunk_bytes=16))
    with pytest.raises(ProtocolError, match="out of order"):
        _reassemble([chunks[0], chunks[2]])
    with pytest.raises(ProtocolError, match="starts at chunk"):
        _reassemble(chunks[1:])
    other = list(split_payload(encode_params(PARAMS), chunk_bytes=16))
    with pytest.raises(ProtocolError, match="does not belong"):
        _reassemble([chunks[0], other[1]])
    with pytest.raises(ProtocolError, match="exceeds"):
        _reassemble(chunks, max_bytes=10)
    truncated = [
        pb.Chunk(**{**_fields(c), "data": c.data[:-1]}) if c.index == len(chunks) - 1 else c
        for c in chunks
    ]
    with pytest.raises(ProtocolError, match="truncated"):
        _reassemble(truncated)
    flipped = [
        pb.Chunk(**{**_fields(c), "data": bytes([c.data[0] ^ 1]) + c.data[1:]})
        if c.index == 1
        else c
        for c in chunks
    ]
    with pytest.raises(ProtocolError, match="digest"):
        _reassemble(flipped)


def _fields(chunk: pb.Chunk) -> dict:  # type: ignore[type-arg]
    return {f.name: getattr(chunk, f.name) for f in chunk.DESCRIPTOR.fields}


def test_empty_payloads_round_trip() -> None:
    """The evaluate stage sends no arrays: an empty dict survives encoding and chunking."""
    payload = encode_params({})
    chunks = list(split_payload(payload, chunk_bytes=4))
    assert decode_params(_reassemble(chunks) or b"x") == {}
    assert decode_params(b"") == {}
    (single,) = split_payload(b"")
    assert single.count == 1 and single.total_bytes == 0
    assert _reassemble([single]) == b""


def test_task_seeds_travel_as_16_little_endian_bytes() -> None:
    from fedforge.core.rng import RngStreams
    from fedforge.net.transport import seed_bytes

    seed = RngStreams(7).task_seed(3, 11)
    message = pb.TaskChunk(stage="fit", seed=seed_bytes(seed))
    wire = pb.TaskChunk.FromString(message.SerializeToString())
    assert len(wire.seed) == 16 and int.from_bytes(wire.seed, "little") == seed


def test_unlisted_dtypes_are_refused() -> None:
    with pytest.raises(ProtocolError, match="not allowed on the wire"):
        decode_params(encode_params({"b": np.array([True, False])}))
    with pytest.raises(ProtocolError, match="not allowed on the wire"):
        decode_params(encode_params({"i": np.arange(3, dtype=np.int8)}))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=4096))
def test_fuzz_decode_params_raises_only_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_params(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_client_message_decoding(data: bytes) -> None:
    """Random bytes as a wire message: either a protobuf parse error, or a message whose
    chunk the reassembler accepts or refuses with ProtocolError (never anything else)."""
    from google.protobuf.message import DecodeError

    try:
        message = pb.ClientMessage.FromString(data)
    except DecodeError:
        return
    try:
        payload = Reassembler(1 << 16).add(message.reply.chunk)
        if payload is not None:
            decode_params(payload)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    index=st.integers(0, 5),
    count=st.integers(0, 5),
    total=st.integers(0, 1 << 17),
    digest=st.binary(max_size=40),
    tid=st.binary(max_size=20),
    data=st.binary(max_size=64),
)
def test_fuzz_chunk_fields(
    index: int, count: int, total: int, digest: bytes, tid: bytes, data: bytes
) -> None:
    chunk = pb.Chunk(
        transfer_id=tid, index=index, count=count, total_bytes=total, sha256=digest, data=data
    )
    try:
        out = Reassembler(1 << 16).add(chunk)
    except ProtocolError:
        return
    if out is not None:  # only a single complete, digest-correct chunk may be accepted
        assert hashlib.sha256(out).digest() == digest and count == 1
