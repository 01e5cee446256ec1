"""The network transport and the service's reply handling, in process (no sockets): tasks go
down as chunked TaskChunks, replies come back as Records or ClientFailures."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import pytest

import fedforge.net.transport as transport_module
from fedforge.core.records import EVALUATE, FIT, ClientFailure, Record, Reply, Task
from fedforge.net.codec import Reassembler, decode_params, encode_params, split_payload
from fedforge.net.hub import Hub, Session
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.service import FederationService
from fedforge.net.transport import NetworkTransport

SHARED = {"w": np.arange(40, dtype=np.float32).reshape(4, 10), "b": np.ones(10, np.float32)}
SEED = (1 << 127) + 12345  # needs all 128 bits


class Exchange:
    """Runs ``transport.exchange(tasks)`` in a thread; the test plays the clients."""

    def __init__(self, transport: NetworkTransport, tasks: list[Task]) -> None:
        self.replies: list[Reply] = []
        self.thread = threading.Thread(
            target=lambda: self.replies.extend(transport.exchange(tasks)), daemon=True
        )
        self.thread.start()

    def result(self) -> dict[int, Reply]:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        out: dict[int, Reply] = {}
        for reply in self.replies:
            assert isinstance(reply, Record | ClientFailure)
            out[reply.client_id] = reply
        return out


def _setup(timeout: float = 5.0) -> tuple[Hub, FederationService, NetworkTransport, list[Session]]:
    hub = Hub("run-1")
    service = FederationService(hub, None, {"a": 0, "b": 1}, "", 1.0)
    sessions = [hub.open("a", 0, 100), hub.open("b", 1, 0)]
    transport = NetworkTransport(
        hub, round_timeout_s=timeout, chunk_bytes=64, max_payload_bytes=1 << 20
    )
    return hub, service, transport, sessions


def _receive(session: Session) -> tuple[pb.TaskChunk, int, dict[str, np.ndarray]]:
    """The next task pushed to ``session``: its last chunk, round and decoded arrays."""
    item = session.outbox.get(timeout=10)
    assert item is not None
    messages = [item] if isinstance(item, pb.ServerMessage) else list(item)
    assembler = Reassembler(1 << 20)
    payload = None
    for message in messages:
        assert message.WhichOneof("body") == "task"
        payload = assembler.add(message.task.chunk)
    assert payload is not None
    return messages[-1].task, messages[-1].envelope.round, decode_params(payload)


def _reply(
    service: FederationService,
    session: Session,
    round_number: int,
    stage: str,
    arrays: dict[str, np.ndarray],
    *,
    n: int = 7,
    payload: bytes | None = None,
    **header: Any,
) -> None:
    data = encode_params(arrays) if payload is None else payload
    for chunk in split_payload(data, 48):
        first = chunk.index == 0
        service._handle(
            session,
            pb.ClientMessage(
                envelope=pb.Envelope(run_id="run-1", round=round_number, nonce=os.urandom(16)),
                reply=pb.ReplyChunk(
                    stage=stage,
                    num_examples=n if first else 0,
                    scalars=header.get("scalars", {}) if first else {},
                    metrics=header.get("metrics", {}) if first else {},
                    chunk=chunk,
                ),
            ),
        )


def _rejects(session: Session) -> list[str]:
    out = []
    while not session.outbox.empty():
        item = session.outbox.get()
        if isinstance(item, pb.ServerMessage) and item.WhichOneof("body") == "reject":
            out.append(item.reject.reason)
    return out


def test_tasks_go_down_once_encoded_and_records_come_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    real = transport_module.encode_params

    def counting(params: dict[str, np.ndarray]) -> bytes:
        calls.append(1)
        return real(params)

    monkeypatch.setattr(transport_module, "encode_params", counting)
    _, service, transport, (a, b) = _setup(timeout=1.0)
    tasks = [Task(FIT, 3, cid, SEED + cid, SHARED, {"clip_norm": 2.5}) for cid in (0, 1)]
    exchange = Exchange(transport, tasks)
    for session, cid in ((a, 0), (b, 1)):
        body, round_number, arrays = _receive(session)
        assert (body.stage, round_number, dict(body.scalars)) == (FIT, 3, {"clip_norm": 2.5})
        assert int.from_bytes(body.seed, "little") == SEED + cid
        assert len(body.seed) == 16 and body.deadline_unix_ms > 0
        for k, v in SHARED.items():
            np.testing.assert_array_equal(arrays[k], v)
    update = {"w": np.full((4, 10), 0.5, np.float32), "b": np.zeros(10, np.float32)}
    # b answers an evaluate task it was never given: ignored (and told), then stays silent.
    _reply(service, b, 3, EVALUATE, {}, metrics={"accuracy": 1.0, "loss": 0.0})
    _reply(service, a, 3, FIT, update, n=42, scalars={"clipped": 1.0}, metrics={"train_loss": 0.3})
    replies = exchange.result()
    assert calls == [1]  # one encoding for the whole exchange
    record = replies[0]
    assert isinstance(record, Record)
    assert (record.num_examples, record.scalars, record.metrics) == (
        42,
        {"clipped": 1.0},
        {"train_loss": pytest.approx(0.3)},
    )
    for k, v in update.items():
        np.testing.assert_array_equal(record.arrays[k], v)
    failure = replies[1]
    assert isinstance(failure, ClientFailure) and not failure.rejected
    assert "no result within" in failure.error
    assert any("'evaluate' reply rejected" in r for r in _rejects(b))
    assert b.task is None  # the late task is withdrawn


def test_evaluate_replies_without_arrays_round_trip() -> None:
    _, service, transport, (a, b) = _setup()
    tasks = [Task(EVALUATE, 2, cid, 0, SHARED) for cid in (0, 1)]
    exchange = Exchange(transport, tasks)
    for session in (a, b):
        body, _, _ = _receive(session)
        assert body.stage == EVALUATE and int.from_bytes(body.seed, "little") == 0
    _reply(service, a, 2, EVALUATE, {}, n=9, metrics={"accuracy": 0.75, "loss": 0.5})
    _reply(service, b, 2, EVALUATE, {}, n=3, payload=b"", metrics={"accuracy": 1.0, "loss": 0.1})
    replies = exchange.result()
    for cid, n, acc in ((0, 9, 0.75), (1, 3, 1.0)):
        record = replies[cid]
        assert isinstance(record, Record)
        assert (record.arrays, record.num_examples, record.metrics["accuracy"]) == ({}, n, acc)


def test_protocol_violations_failures_and_disconnects() -> None:
    hub, service, transport, (a, b) = _setup()
    c = hub.open("c", 2, 0)
    tasks = [Task(FIT, 1, cid, cid, SHARED) for cid in (0, 1, 2, 3)]  # 3 never connected
    exchange = Exchange(transport, tasks)
    for session in (a, b, c):
        _receive(session)
    # a: bytes that are no safetensors file; the wrong round is ignored, not fatal.
    _reply(service, a, 7, FIT, SHARED)
    assert a.task is not None
    _reply(service, a, 1, FIT, {}, payload=os.urandom(100))
    # b reports that its training failed; c disconnects.
    service._handle(
        b,
        pb.ClientMessage(
            envelope=pb.Envelope(run_id="run-1", round=1, nonce=os.urandom(16)),
            failure=pb.ClientFailureReport(error="out of memory"),
        ),
    )
    hub.close(c)
    replies = exchange.result()
    assert set(replies) == {0, 1, 2, 3}
    rejected, failed, gone, never = (replies[i] for i in range(4))
    assert isinstance(rejected, ClientFailure) and rejected.rejected
    assert "undecodable" in rejected.error
    assert isinstance(failed, ClientFailure) and not failed.rejected
    assert failed.error == "out of memory"
    assert isinstance(gone, ClientFailure) and gone.error == "client disconnected"
    assert isinstance(never, ClientFailure) and "before the exchange" in never.error
    assert any("no task in progress" in r for r in _rejects(a))


def test_replayed_nonces_are_rejected_within_a_round_and_forgotten_after() -> None:
    hub = Hub("run-1")
    hub.start_round(1)
    nonce = os.urandom(16)
    assert hub.fresh_nonce(nonce) and not hub.fresh_nonce(nonce)
    hub.start_round(1)  # a second exchange of the same round keeps the round's nonces
    assert not hub.fresh_nonce(nonce)
    hub.start_round(2)
    assert hub.fresh_nonce(nonce)
    assert not hub.fresh_nonce(b"short")
