"""The network transport and the service's reply handling, in process (no sockets): tasks go
down as chunked TaskChunks, replies come back as Records or ClientFailures; answers to
earlier tasks (another exchange or attempt of the round) are dropped."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

import numpy as np
import pytest

import fedforge.net.transport as transport_module
from fedforge.core.records import EVALUATE, FIT, ClientFailure, Record, Reply, Task
from fedforge.net.codec import Reassembler, decode_params, encode_params, split_payload
from fedforge.net.hub import Hub, Session
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.service import FederationService
from fedforge.net.stream import Encoded
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
    while isinstance(item, pb.ServerMessage) and item.WhichOneof("body") == "reject":
        item = session.outbox.get(timeout=10)  # (a reply refused as it arrived is told so)
    assert item is not None
    messages = [item] if isinstance(item, pb.ServerMessage) else list(item)
    assembler = Reassembler(1 << 20)
    payload = None
    for message in messages:
        assert message.WhichOneof("body") == "task"
        payload = assembler.add(message.task.chunk)
    assert payload is not None
    return messages[-1].task, messages[-1].envelope.round, decode_params(payload)


def _reply_messages(
    round_number: int,
    stage: str,
    task_id: bytes,
    arrays: dict[str, np.ndarray],
    *,
    n: int = 7,
    payload: bytes | None = None,
    **header: Any,
) -> list[pb.ClientMessage]:
    """A client's chunked answer to the task ``task_id``."""
    data = encode_params(arrays) if payload is None else payload
    return [
        pb.ClientMessage(
            envelope=pb.Envelope(run_id="run-1", round=round_number, nonce=os.urandom(16)),
            reply=pb.ReplyChunk(
                stage=stage,
                num_examples=n if chunk.index == 0 else 0,
                scalars=header.get("scalars", {}) if chunk.index == 0 else {},
                metrics=header.get("metrics", {}) if chunk.index == 0 else {},
                chunk=chunk,
                task_id=task_id,
            ),
        )
        for chunk in split_payload(data, 48)
    ]


def _reply(
    service: FederationService,
    session: Session,
    round_number: int,
    stage: str,
    task_id: bytes,
    arrays: dict[str, np.ndarray],
    **kwargs: Any,
) -> None:
    for message in _reply_messages(round_number, stage, task_id, arrays, **kwargs):
        service._handle(session, message)


def _fail(
    service: FederationService, session: Session, round_number: int, task_id: bytes, error: str
) -> None:
    service._handle(
        session,
        pb.ClientMessage(
            envelope=pb.Envelope(run_id="run-1", round=round_number, nonce=os.urandom(16)),
            failure=pb.ClientFailureReport(error=error, task_id=task_id),
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
    real = transport_module.encode_pieces

    def counting(params: dict[str, np.ndarray]) -> Encoded:
        calls.append(1)
        return real(params)

    monkeypatch.setattr(transport_module, "encode_pieces", counting)
    _, service, transport, (a, b) = _setup(timeout=1.0)
    tasks = [Task(FIT, 3, cid, SEED + cid, SHARED, {"clip_norm": 2.5}) for cid in (0, 1)]
    exchange = Exchange(transport, tasks)
    ids = []
    for session, cid in ((a, 0), (b, 1)):
        body, round_number, arrays = _receive(session)
        ids.append(body.task_id)
        assert (body.stage, round_number, dict(body.scalars)) == (FIT, 3, {"clip_norm": 2.5})
        assert len(body.task_id) == 16
        assert int.from_bytes(body.seed, "little") == SEED + cid
        assert len(body.seed) == 16 and body.deadline_unix_ms > 0
        for k, v in SHARED.items():
            np.testing.assert_array_equal(arrays[k], v)
    update = {"w": np.full((4, 10), 0.5, np.float32), "b": np.zeros(10, np.float32)}
    assert ids[0] != ids[1]
    # b answers a task it was never given: dropped without a word, then stays silent.
    _reply(service, b, 3, EVALUATE, os.urandom(16), {}, metrics={"accuracy": 1.0, "loss": 0.0})
    _reply(
        service,
        a,
        3,
        FIT,
        ids[0],
        update,
        n=42,
        scalars={"clipped": 1.0},
        metrics={"train_loss": 0.3},
    )
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
    assert _rejects(b) == []
    assert b.task is None  # the late task is withdrawn


def test_evaluate_replies_without_arrays_round_trip() -> None:
    _, service, transport, (a, b) = _setup()
    tasks = [Task(EVALUATE, 2, cid, 0, SHARED) for cid in (0, 1)]
    exchange = Exchange(transport, tasks)
    ids = []
    for session in (a, b):
        body, _, _ = _receive(session)
        ids.append(body.task_id)
        assert body.stage == EVALUATE and int.from_bytes(body.seed, "little") == 0
    _reply(service, a, 2, EVALUATE, ids[0], {}, n=9, metrics={"accuracy": 0.75, "loss": 0.5})
    _reply(
        service,
        b,
        2,
        EVALUATE,
        ids[1],
        {},
        n=3,
        payload=b"",
        metrics={"accuracy": 1.0, "loss": 0.1},
    )
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
    ids = [_receive(session)[0].task_id for session in (a, b, c)]
    # a: bytes that are no safetensors file; the wrong round is ignored, not fatal.
    _reply(service, a, 7, FIT, ids[0], SHARED)
    assert a.task is not None
    _reply(service, a, 1, FIT, ids[0], {}, payload=os.urandom(100))
    # b reports that its training failed; c disconnects.
    _fail(service, b, 1, ids[1], "out of memory")
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


def _stale_drops(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "dropped a late" in r.getMessage()]


def test_a_late_fit_failure_is_not_charged_to_the_rounds_evaluate_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="fedforge")
    _, service, transport, (a, b) = _setup(timeout=0.3)
    fit = Exchange(transport, [Task(FIT, 1, cid, cid, SHARED) for cid in (0, 1)])
    fit_ids = [_receive(session)[0].task_id for session in (a, b)]
    _reply(service, a, 1, FIT, fit_ids[0], SHARED, metrics={"train_loss": 0.1})
    replies = fit.result()  # b is still training at the deadline
    assert isinstance(replies[0], Record)
    assert isinstance(replies[1], ClientFailure) and "no result within" in replies[1].error

    transport.round_timeout_s = 10.0
    evaluate = Exchange(transport, [Task(EVALUATE, 1, cid, 0, SHARED) for cid in (0, 1)])
    eval_ids = [_receive(session)[0].task_id for session in (a, b)]
    assert not set(eval_ids) & set(fit_ids)
    # b's fit task fails now, during the round's evaluate exchange: that is not b's answer to
    # the evaluate task, which b then completes.
    _fail(service, b, 1, fit_ids[1], "RuntimeError: out of memory")
    assert b.task is not None and b.task.task_id == eval_ids[1]
    _reply(service, a, 1, EVALUATE, eval_ids[0], {}, n=5, metrics={"accuracy": 0.5, "loss": 1})
    _reply(service, b, 1, EVALUATE, eval_ids[1], {}, n=6, metrics={"accuracy": 1.0, "loss": 0})
    replies = evaluate.result()
    for cid, n in ((0, 5), (1, 6)):
        record = replies[cid]
        assert isinstance(record, Record) and record.num_examples == n
    assert _rejects(b) == []
    assert len(_stale_drops(caplog)) == 1


def test_late_chunks_and_results_of_an_earlier_attempt_do_not_touch_the_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="fedforge")
    hub, service, transport, (a, b) = _setup(timeout=0.3)
    first = Exchange(transport, [Task(FIT, 2, 0, 0, SHARED)])
    first_id = _receive(a)[0].task_id
    late = _reply_messages(2, FIT, first_id, SHARED, n=11, metrics={"train_loss": 0.9})
    assert len(late) > 3
    for message in late[:2]:  # a's answer is still on the wire at the deadline
        service._handle(a, message)
    replies = first.result()
    assert isinstance(replies[0], ClientFailure) and not replies[0].rejected
    # A result that raced the deadline of attempt 0 is still queued when attempt 1 starts.
    stale = Record(0, 11, {k: np.full_like(v, 9.0) for k, v in SHARED.items()})
    hub.results.put((first_id, stale))

    transport.round_timeout_s = 10.0
    retry = Exchange(transport, [Task(FIT, 2, cid, cid, SHARED) for cid in (0, 1)])
    ids = [_receive(session)[0].task_id for session in (a, b)]
    for message in late[2:]:  # the rest of attempt 0's answer reaches attempt 1
        service._handle(a, message)
    assert a.task is not None and a.task.task_id == ids[0] and a.task.header is None
    update = {k: np.full_like(v, 0.25) for k, v in SHARED.items()}
    _reply(service, a, 2, FIT, ids[0], update, n=12, metrics={"train_loss": 0.2})
    _reply(service, b, 2, FIT, ids[1], SHARED, n=13, metrics={"train_loss": 0.3})
    replies = retry.result()
    record = replies[0]
    assert isinstance(record, Record) and record.num_examples == 12
    for k, v in update.items():
        np.testing.assert_array_equal(record.arrays[k], v)
    assert isinstance(replies[1], Record) and replies[1].num_examples == 13
    assert _rejects(a) == []
    assert len(_stale_drops(caplog)) == 1  # once for attempt 0's task, not once per chunk


def test_a_reply_with_the_tasks_id_but_another_stage_is_rejected() -> None:
    _, service, transport, (a, b) = _setup()
    exchange = Exchange(transport, [Task(FIT, 4, cid, cid, SHARED) for cid in (0, 1)])
    ids = [_receive(session)[0].task_id for session in (a, b)]
    _reply(service, a, 4, EVALUATE, ids[0], {}, metrics={"accuracy": 1.0, "loss": 0.0})
    _fail(service, b, 4, b"", "a report that names no task")  # dropped: b stays pending
    assert b.task is not None
    _reply(service, b, 4, FIT, ids[1], SHARED)
    replies = exchange.result()
    assert isinstance(replies[0], ClientFailure) and replies[0].rejected
    assert "'evaluate' reply rejected" in replies[0].error
    assert isinstance(replies[1], Record)


def test_tasks_go_out_while_others_are_in_flight_and_replies_come_as_they_arrive() -> None:
    _, service, transport, (a, b) = _setup(timeout=0.5)
    transport.submit([Task(FIT, 1, 0, 0, SHARED)])
    a_id = _receive(a)[0].task_id
    transport.submit([Task(FIT, 2, 1, 1, SHARED)])  # while a still trains
    body, round_number, _ = _receive(b)
    assert transport.in_flight == 2 and round_number == 2
    _reply(service, b, 2, FIT, body.task_id, SHARED, n=5)
    first = transport.poll(5.0)
    assert isinstance(first, Record) and (first.client_id, first.num_examples) == (1, 5)
    assert transport.poll(0.05) is None and transport.in_flight == 1  # a has not answered
    with pytest.raises(RuntimeError, match="in flight"):
        list(transport.exchange([Task(FIT, 2, 1, 1, SHARED)]))
    late = transport.poll()  # until a's deadline
    assert isinstance(late, ClientFailure) and late.client_id == 0
    assert "no result within" in late.error and a.task is None  # withdrawn
    _reply(service, a, 1, FIT, a_id, SHARED)  # too late: dropped
    assert transport.poll(0.05) is None and transport.in_flight == 0
    transport.submit([Task(FIT, 3, 0, 0, SHARED), Task(FIT, 3, 1, 1, SHARED)])
    transport.cancel()
    assert transport.in_flight == 0 and a.task is None and b.task is None


class AsyncRun:
    """The asynchronous driver over the network transport in a thread, the test playing
    the clients (``a``, ``b``, ``c``: ids 0, 1, 2); FedAvg on one array ``w``."""

    def __init__(self, buffer: int, updates: int, size: int = 3) -> None:
        from fedforge.algorithms.fedavg import FedAvg
        from fedforge.core.params import spec_of
        from fedforge.core.rng import RngStreams
        from fedforge.report.history import History
        from fedforge.runtime.async_driver import AsyncDriver, FedBuff
        from fedforge.runtime.driver import Driver
        from fedforge.runtime.sampling import UniformSampler
        from fedforge.train.program import LocalSGD

        hub, self.service, self.transport, (a, b) = _setup(timeout=10.0)
        self.sessions = {0: a, 1: b, 2: hub.open("c", 2, 0)}
        algorithm = FedAvg(local=LocalSGD(lr=0.1, epochs=1, batch_size=4))
        params = {"w": np.zeros(size, np.float32)}
        driver = Driver(
            algorithm=algorithm,
            transport=self.transport,
            sampler=UniformSampler(3),
            streams=RngStreams(0),
            model_spec=spec_of(params),
            trainable=["w"],
            population=lambda: [0, 1, 2],
            population_size=lambda: 3,
            example_cap=lambda cid, stage: 100,
        )
        self.run = AsyncDriver(driver, FedBuff(buffer=buffer, concurrency=3), poll_s=0.05)
        self.history = History()
        self.final: list[Any] = []
        state = algorithm.init(params)
        self.thread = threading.Thread(
            target=lambda: self.final.append(self.run.run(state, updates, self.history)),
            daemon=True,
        )
        self.thread.start()

    def receive(self, cid: int) -> tuple[pb.TaskChunk, int, dict[str, np.ndarray]]:
        return _receive(self.sessions[cid])

    def answer(self, cid: int, task: tuple[pb.TaskChunk, int, Any], change: float) -> None:
        body, round_number, _ = task
        delta = {"w": np.full(len(task[2]["w"]), change, np.float32)}
        loss = {"train_loss": 1.0}
        session = self.sessions[cid]
        _reply(self.service, session, round_number, FIT, body.task_id, delta, n=10, metrics=loss)

    def fail(self, cid: int, task: tuple[pb.TaskChunk, int, Any]) -> None:
        _fail(self.service, self.sessions[cid], task[1], task[0].task_id, "RuntimeError: boom")

    def finish(self) -> Any:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive() and self.final
        return self.final[0]


def test_fedbuff_in_real_time_weighs_each_arrival_by_its_staleness() -> None:
    """Three clients answer in a constructed order: each finished client gets new work at
    once, and every update (buffer 1) applies the arrival's change times
    1 / sqrt(1 + staleness); a rejected answer changes nothing."""
    run = AsyncRun(buffer=1, updates=4)
    tasks = {cid: run.receive(cid) for cid in (0, 1, 2)}  # everyone starts on version 0
    assert {r for _, r, _ in tasks.values()} == {1}
    run.answer(1, tasks.pop(1), 1.0)  # fresh: w = 1
    tasks[1] = run.receive(1)  # b restarts at once, on version 1
    assert tasks[1][1] == 2 and tasks[1][2]["w"][0] == pytest.approx(1.0)
    run.answer(0, tasks.pop(0), 2.0)  # started on v0, arrives at v1: staleness 1
    tasks[0] = run.receive(0)
    run.answer(2, tasks.pop(2), 4.0)  # staleness 2
    tasks[2] = run.receive(2)
    run.answer(0, tasks.pop(0), np.nan)  # rejected; a rests, then gets new work on v3
    tasks[0] = run.receive(0)
    assert tasks[0][1] == 4
    run.answer(1, tasks.pop(1), 8.0)  # started on v1, arrives at v3: staleness 2
    final = run.finish()
    expected = 1.0 + 2.0 / np.sqrt(2) + 4.0 / np.sqrt(3) + 8.0 / np.sqrt(3)
    np.testing.assert_allclose(final.params["w"], np.full(3, expected), rtol=1e-6)
    got = [(x.client_id, x.started, x.arrived, x.staleness) for x in run.run.arrivals]
    assert got == [(1, 0, 0, 0), (0, 0, 1, 1), (2, 0, 2, 2), (1, 1, 3, 2)]
    history = run.history
    assert [r.metrics["async.staleness.max"] for r in history[1:]] == [0, 1, 2, 2]
    assert [r.clients["arrived"] for r in history[1:]] == [[1], [0], [2], [1]]
    assert history[-1].clients["rejected"] == [0] and history[-1].clients_sampled == 2
    assert run.transport.in_flight == 0 and run.sessions[0].task is None  # work withdrawn


def test_a_fast_client_contributes_once_per_buffer() -> None:
    """A client that answers at once gets new work at once, but a buffer takes one result per
    client: its second result is held for the next buffer (and it gets no third task until
    then), so one fast (or malicious) client cannot make an update on its own."""
    run = AsyncRun(buffer=3, updates=2)
    tasks = {cid: run.receive(cid) for cid in (0, 1, 2)}
    run.answer(0, tasks.pop(0), 100.0)
    second = run.receive(0)  # new work at once, still on version 0
    assert second[1] == 1
    run.answer(0, second, 100.0)  # held for the next buffer
    with pytest.raises(queue.Empty):  # and no third task while it is held
        run.sessions[0].outbox.get(timeout=0.5)
    run.answer(1, tasks.pop(1), 1.0)
    run.answer(2, tasks.pop(2), 1.0)  # update 1: (100 + 1 + 1) / 3 = 34
    # b restarted on version 0 as it answered; c and a (its held result entering buffer 2)
    # on version 1
    tasks = {cid: run.receive(cid) for cid in (0, 1, 2)}
    assert [tasks[cid][1] for cid in (0, 1, 2)] == [2, 1, 2]
    run.answer(1, tasks.pop(1), 1.0)  # 1 stale
    run.answer(2, tasks.pop(2), 1.0)  # update 2: a's held result (1 stale), b, c
    final = run.finish()
    expected = 34.0 + (100.0 / np.sqrt(2) + 1.0 / np.sqrt(2) + 1.0) / 3
    np.testing.assert_allclose(final.params["w"], np.full(3, expected), rtol=1e-6)
    assert [r.clients["arrived"] for r in run.history[1:]] == [[0, 1, 2], [0, 1, 2]]
    assert run.history[2].metrics["async.staleness.max"] == 1


def test_a_failing_client_rests_before_its_next_task() -> None:
    """A client whose task fails is not handed the model again at once (a failing client
    would otherwise pull the model in a loop): it rests 1 s, then 2 s after a second failure."""
    run = AsyncRun(buffer=2, updates=1, size=10_000)
    tasks = {cid: run.receive(cid) for cid in (0, 1, 2)}
    started = time.monotonic()
    run.fail(0, tasks.pop(0))
    tasks[0] = run.receive(0)
    first_rest = time.monotonic() - started
    started = time.monotonic()
    run.fail(0, tasks.pop(0))
    tasks[0] = run.receive(0)
    second_rest = time.monotonic() - started
    assert 0.9 < first_rest < 1.9 < second_rest
    run.answer(1, tasks.pop(1), 1.0)
    run.answer(2, tasks.pop(2), 3.0)
    final = run.finish()
    np.testing.assert_allclose(final.params["w"], np.full(10_000, 2.0))
    assert run.history[1].clients["failed"] == [0, 0]


def test_a_reply_queued_before_the_deadline_is_taken_when_polled_after_it() -> None:
    _, service, transport, (a, _) = _setup(timeout=0.3)
    transport.submit([Task(FIT, 1, 0, 0, SHARED)])
    body, round_number, _ = _receive(a)
    _reply(service, a, round_number, FIT, body.task_id, SHARED, n=5)  # in time
    time.sleep(0.5)  # the driver was busy (an update, an evaluation, a checkpoint)
    reply = transport.poll(0.1)
    assert isinstance(reply, Record) and reply.num_examples == 5


def test_a_task_for_a_session_replaced_during_submit_fails_at_once() -> None:
    hub, _, transport, (a, _) = _setup(timeout=30.0)
    looked_up = hub.session_for

    def reconnecting(cid: int) -> Session | None:
        session = looked_up(cid)
        if session is a:
            hub.open("a", 0, 100)  # a reconnects right after the lookup: a is closed
        return session

    hub.session_for = reconnecting  # type: ignore[method-assign]
    transport.submit([Task(FIT, 1, 0, 0, SHARED)])
    reply = transport.poll(1.0)
    assert isinstance(reply, ClientFailure) and reply.error == "client disconnected"
    assert transport.in_flight == 0 and a.task is None
