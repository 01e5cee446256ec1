"""Tasks and replies cross process boundaries as safe bytes (no pickle), losslessly."""

import contextlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedforge.core.records import FIT, ClientFailure, Record, Task
from fedforge.runtime.messages import (
    MAGIC,
    MAX_HEADER_BYTES,
    MessageError,
    decode_reply,
    decode_task,
    encode_failure,
    encode_reply,
    encode_task,
    json_depth,
)

SHARED = {
    "fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
    "fc.bias": np.array([np.nan, -0.0, np.inf], np.float32),
    "control/fc.bias": np.ones(3, np.float64),
    "count": np.array(7, np.int64),
    "flags": np.array([True, False]),
    "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # not C-contiguous
}
SEED = (1 << 127) + 12345


def params_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Same names in the same order, same dtypes and shapes, same bits (NaN included)."""
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


def test_task_round_trip_keeps_seed_scalars_and_arrays_bit_identical() -> None:
    state = {"control/fc.bias": np.array([1.5, -2.5, 3.0], np.float32)}
    task = Task(FIT, 7, 42, SEED, SHARED, {"clip.norm": 0.1 + 0.2})
    got = decode_task(encode_task(task, include_shared=True, state=state))
    assert got.includes_shared
    assert (got.task.stage, got.task.round, got.task.client_id) == (FIT, 7, 42)
    assert got.task.seed == SEED
    assert dict(got.task.scalars) == {"clip.norm": 0.1 + 0.2}
    assert params_equal(got.task.shared, SHARED)  # names in order, dtypes, bits (NaN, -0.0)
    assert got.state is not None and params_equal(got.state, state)


def test_task_without_shared_arrays_or_state() -> None:
    task = Task(FIT, 1, 3, 0, SHARED)
    got = decode_task(encode_task(task, include_shared=False))
    assert not got.includes_shared and got.task.shared == {} and got.state is None
    assert len(encode_task(task, include_shared=False)) < 200


def test_reply_round_trip() -> None:
    record = Record(
        5,
        17,
        {"w": np.full((2, 2), np.nan, np.float32), "b": np.zeros(0, np.float32)},
        scalars={"clip.clipped": 1.0},
        metrics={"train_loss": math.pi, "odd": float("inf")},
    )
    got = decode_reply(encode_reply(record, {"s": np.arange(3.0)}))
    assert not isinstance(got, ClientFailure)
    rec, state = got
    assert (rec.client_id, rec.num_examples) == (5, 17)
    assert type(rec.num_examples) is int
    assert params_equal(rec.arrays, record.arrays)
    assert rec.scalars == record.scalars
    assert rec.metrics["train_loss"] == math.pi and rec.metrics["odd"] == math.inf
    assert state is not None and params_equal(state, {"s": np.arange(3.0)})
    _, no_state = decode_reply(encode_reply(record, None))  # type: ignore[misc]
    assert no_state is None


def test_reply_keeps_an_invalid_example_count_for_the_driver_to_reject() -> None:
    rec, _ = decode_reply(encode_reply(Record(1, 2.5, {}), None))  # type: ignore[arg-type, misc]
    assert rec.num_examples == 2.5  # the transport never validates


def test_failure_round_trip() -> None:
    got = decode_reply(encode_failure(9, "ValueError: bad", "Traceback ...", rejected=True))
    assert got == ClientFailure(9, "ValueError: bad", "Traceback ...", rejected=True)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"hello world",
        MAGIC,
        MAGIC + b"\xff\xff\xff\xff{}",
        MAGIC + b"\x02\x00\x00\x00{}",  # no array names
        MAGIC + b"\x03\x00\x00\x00[1]",
        MAGIC + b'\x22\x00\x00\x00{"names": {"arrays": ["w"]}, "x": 1}',  # array absent
        MAGIC + b'\x0d\x00\x00\x00{"names": {}}garbage-safetensors',
    ],
)
def test_garbage_raises_message_error(garbage: bytes) -> None:
    with pytest.raises(MessageError):
        decode_reply(garbage)
    with pytest.raises(MessageError):
        decode_task(garbage)


def _header_message(header: bytes) -> bytes:
    return MAGIC + len(header).to_bytes(4, "little") + header


def test_deeply_nested_or_huge_headers_are_refused_before_parsing() -> None:
    # 100,000 nested arrays made json.loads raise RecursionError; brackets inside strings
    # are no nesting.
    nested = b'{"names": {}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    quoted = b'{"kind": "failure", "client_id": 1, "error": "' + b"[" * 5000 + b'", '
    quoted += b'"tb": "", "rejected": false, "names": {}}'
    for decode in (decode_reply, decode_task):
        with pytest.raises(MessageError, match="nested deeper than"):
            decode(_header_message(nested))
        with pytest.raises(MessageError, match="exceeds"):
            decode(MAGIC + (MAX_HEADER_BYTES + 1).to_bytes(4, "little") + b" " * (9 << 20))
    failure = decode_reply(_header_message(quoted))
    assert isinstance(failure, ClientFailure) and failure.error == "[" * 5000
    assert json_depth(b'{"a": [1, {"b": "]]{{"}], "c": "\\"}') == 3


def test_a_task_is_not_a_reply_and_a_reply_not_a_task() -> None:
    task = encode_task(Task(FIT, 1, 1, 1, {}), include_shared=True)
    with pytest.raises(MessageError, match="not a reply"):
        decode_reply(task)
    with pytest.raises(MessageError, match="not a task"):
        decode_task(encode_failure(1, "x"))


def test_unencodable_arrays_raise_message_error() -> None:
    with pytest.raises(MessageError):
        encode_reply(Record(1, 1, {"w": [1.0, 2.0]}), None)  # type: ignore[dict-item]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_reply_of_random_bytes_raises_only_message_error(data: bytes) -> None:
    for blob in (data, MAGIC + data):
        with contextlib.suppress(MessageError):
            decode_reply(blob)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_decode_reply_of_corrupted_messages_raises_only_message_error(data: st.DataObject) -> None:
    good = encode_reply(
        Record(3, 4, {"w": np.ones((2, 2), np.float32)}, metrics={"train_loss": 0.5}),
        {"s": np.zeros(2)},
    )
    buf = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    with contextlib.suppress(MessageError):
        decode_reply(bytes(buf[:cut]))
