"""A safe binary encoding of tasks and replies for crossing a process boundary (no pickle).

A message is ``MAGIC | u32 header length | JSON header | safetensors blob``. The header holds
the small fields (stage, round, client id, the 128-bit seed as a decimal string, scalars,
metrics, the example count, and for a failure its error and traceback) and the names of the
arrays in their original order; the blob holds the arrays, each name prefixed by its group
(``shared/``, ``state/``, ``arrays/``), bit for bit. Decoding checks every field's type and
raises :class:`MessageError` on anything malformed, so garbage never reaches the runtime.

Values are carried as they are: the transport never validates a record (the driver does),
so a NaN update or a wrong shape arrives exactly as the client produced it.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedforge.core.errors import FedforgeError
from fedforge.core.params import Params
from fedforge.core.records import ClientFailure, Record, Task

MAGIC = b"FFM1"
_LENGTH = struct.Struct("<I")
# A header holds a few small fields and the array names: far below these bounds, which are
# checked before the JSON is parsed (so nesting cannot exhaust the parser's recursion).
MAX_HEADER_BYTES = 8 << 20
MAX_HEADER_DEPTH = 8
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(rb"[\[\]{}]")
_SHARED, _STATE, _ARRAYS = "shared", "state", "arrays"


class MessageError(FedforgeError):
    """Bytes that are not a valid task or reply message."""


@dataclass(frozen=True)
class TaskMessage:
    """A decoded task. When the message did not carry the shared arrays (the receiver holds
    them from an earlier task of the same exchange), ``task.shared`` is empty and
    ``includes_shared`` is False."""

    task: Task
    state: Params | None
    includes_shared: bool


Number = int | float | bool


def _number(value: object, what: str) -> Number:
    """A JSON-safe Python number of the same kind (bool, integer or float)."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value)
    raise MessageError(f"{what} must be a number, got {type(value).__name__}")


def _floats(values: object, what: str) -> dict[str, float]:
    if not isinstance(values, dict):
        raise MessageError(f"{what} must be an object")
    out: dict[str, float] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not isinstance(value, int | float):
            raise MessageError(f"{what} must map names to numbers")
        out[key] = float(value)
    return out


def json_depth(text: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON ``text``, counted without parsing
    (brackets inside strings do not count)."""
    depth = deepest = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', text)):
        depth += 1 if match.group() in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


def _pack(header: dict[str, Any], groups: dict[str, Params | None]) -> bytes:
    tensors: dict[str, np.ndarray] = {}
    names: dict[str, list[str] | None] = {}
    for group, arrays in groups.items():
        if arrays is None:
            names[group] = None
            continue
        names[group] = list(arrays)
        for name, arr in arrays.items():
            if not isinstance(arr, np.ndarray):
                raise MessageError(f"{group} {name!r}: expected a numpy array")
            tensors[f"{group}/{name}"] = arr if arr.flags.c_contiguous else arr.copy(order="C")
    try:
        head = json.dumps({**header, "names": names}, allow_nan=True).encode()
        blob = st_save(tensors) if tensors else b""
    except Exception as exc:  # unencodable values (object dtype, non-string keys, ...)
        raise MessageError(f"cannot encode the message: {exc}") from exc
    return MAGIC + _LENGTH.pack(len(head)) + head + blob


def _unpack(data: bytes) -> tuple[dict[str, Any], dict[str, Params | None]]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MessageError(f"a message is bytes, got {type(data).__name__}")
    data = bytes(data)
    start = len(MAGIC) + _LENGTH.size
    if len(data) < start or data[: len(MAGIC)] != MAGIC:
        raise MessageError("not a fedforge message (bad magic)")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    if start + length > len(data):
        raise MessageError("truncated message header")
    if length > MAX_HEADER_BYTES:
        raise MessageError(f"message header of {length} bytes exceeds {MAX_HEADER_BYTES}")
    text = data[start : start + length]
    if json_depth(text) > MAX_HEADER_DEPTH:
        raise MessageError(f"message header nested deeper than {MAX_HEADER_DEPTH} levels")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MessageError(f"bad message header: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("names"), dict):
        raise MessageError("bad message header: not an object with array names")
    blob = data[start + length :]
    try:
        tensors = st_load(blob) if blob else {}
    except Exception as exc:  # safetensors raises its own error types on garbage
        raise MessageError(f"bad message arrays: {exc}") from exc
    groups: dict[str, Params | None] = {}
    used = 0
    for group, names in header["names"].items():
        if names is None:
            groups[group] = None
            continue
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise MessageError(f"bad array names for {group!r}")
        try:
            groups[group] = {n: tensors[f"{group}/{n}"] for n in names}
        except KeyError as exc:
            raise MessageError(f"message lacks array {exc.args[0]!r}") from None
        used += len(names)
    if used != len(tensors):
        raise MessageError("message holds arrays its header does not name")
    return header, groups


def _field(header: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = header.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MessageError(f"bad or missing field {key!r}")
    return value


def encode_task(task: Task, *, include_shared: bool = True, state: Params | None = None) -> bytes:
    """``task`` with the client's ``state`` (read by the sender); without ``include_shared``
    the receiver must already hold the exchange's shared arrays."""
    header = {
        "kind": "task",
        "stage": task.stage,
        "round": int(task.round),
        "client_id": int(task.client_id),
        "seed": str(int(task.seed)),
        "scalars": {k: _number(v, f"scalar {k!r}") for k, v in task.scalars.items()},
    }
    groups = {_SHARED: dict(task.shared) if include_shared else None, _STATE: state}
    return _pack(header, groups)


def decode_task(data: bytes) -> TaskMessage:
    header, groups = _unpack(data)
    if header.get("kind") != "task":
        raise MessageError("not a task message")
    seed = _field(header, "seed", str)
    if not seed.isdigit():
        raise MessageError("bad task seed")
    shared = groups.get(_SHARED)
    task = Task(
        stage=_field(header, "stage", str),
        round=_field(header, "round", int),
        client_id=_field(header, "client_id", int),
        seed=int(seed),
        shared=shared if shared is not None else {},
        scalars=_floats(header.get("scalars"), "scalars"),
    )
    return TaskMessage(task, groups.get(_STATE), shared is not None)


def encode_reply(record: Record, state: Params | None) -> bytes:
    """A client's record and its new state (None: the state is unchanged)."""
    header = {
        "kind": "record",
        "client_id": _number(record.client_id, "client_id"),
        "num_examples": _number(record.num_examples, "num_examples"),
        "scalars": {k: _number(v, f"scalar {k!r}") for k, v in record.scalars.items()},
        "metrics": {k: _number(v, f"metric {k!r}") for k, v in record.metrics.items()},
    }
    return _pack(header, {_ARRAYS: dict(record.arrays), _STATE: state})


def encode_failure(
    client_id: int, error: str, traceback: str = "", *, rejected: bool = False
) -> bytes:
    """A client that raised (or, ``rejected``, whose answer could not be encoded)."""
    header = {
        "kind": "failure",
        "client_id": int(client_id),
        "error": error,
        "tb": traceback,
        "rejected": bool(rejected),
    }
    return _pack(header, {})


def decode_reply(data: bytes) -> tuple[Record, Params | None] | ClientFailure:
    """The record and new state a client sent, or the failure it reported."""
    header, groups = _unpack(data)
    kind = header.get("kind")
    if kind == "failure":
        return ClientFailure(
            _field(header, "client_id", int),
            _field(header, "error", str),
            _field(header, "tb", str),
            _field(header, "rejected", bool),
        )
    if kind != "record":
        raise MessageError("not a reply message")
    arrays = groups.get(_ARRAYS)
    if arrays is None:
        raise MessageError("a record message must carry its arrays")
    num_examples = header.get("num_examples")
    if not isinstance(num_examples, int | float):  # bool is an int: kept as sent
        raise MessageError("bad or missing field 'num_examples'")
    record = Record(
        client_id=_field(header, "client_id", int),
        num_examples=num_examples,  # type: ignore[arg-type]  # validated by the driver
        arrays=arrays,
        scalars=_floats(header.get("scalars"), "scalars"),
        metrics=_floats(header.get("metrics"), "metrics"),
    )
    return record, groups.get(_STATE)
