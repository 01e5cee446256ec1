"""Sessions against a misbehaving client, in process: bounded outboxes, undelivered tasks,
two processes of one identity, late-chunk floods and forged log lines."""

from __future__ import annotations

import logging
import os
import time

import pytest

from fedforge.core.records import FIT, ClientFailure, Task
from fedforge.net.hub import OUTBOX_LIMIT, Hub, IdentityInUse
from fedforge.net.peer import LogLimiter, peer_host, peer_text
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.service import INVALID_LIMIT
from tests.net.test_transport import SHARED, _fail, _receive, _setup


def test_an_outbox_that_stays_full_closes_its_session(caplog: pytest.LogCaptureFixture) -> None:
    hub = Hub("run-1")
    session = hub.open("a", 0, 0)
    message = pb.ServerMessage(heartbeat=pb.Heartbeat())
    with caplog.at_level(logging.WARNING, "fedforge"):
        assert all(hub.send(session, message) for _ in range(OUTBOX_LIMIT))
        assert not hub.send(session, message) and session.closed
    assert "client a does not read its stream" in caplog.text
    assert hub.connected_ids() == []


def test_a_task_its_client_never_takes_closes_the_session_at_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub, _, transport, (a, b) = _setup(timeout=0.3)
    transport.submit([Task(FIT, 1, 0, 0, SHARED), Task(FIT, 1, 1, 1, SHARED)])
    _receive(b)  # b reads its task (and does not answer); a never reads its stream
    with caplog.at_level(logging.WARNING, "fedforge"):
        replies = {r.client_id: r for r in (transport.poll(5.0), transport.poll(5.0))}
    zombie, silent = replies[0], replies[1]
    assert isinstance(zombie, ClientFailure) and "was not delivered" in zombie.error
    assert isinstance(silent, ClientFailure) and "no result within the 0.3 s" in silent.error
    assert a.closed and not b.closed
    assert hub.session_for(0) is None  # never sampled again
    assert "client a: its task was not delivered within the 0.3 s deadline" in caplog.text


def test_two_live_processes_of_one_identity_do_not_evict_each_other(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = Hub("run-1", heartbeat_s=1.0)
    first = hub.open("alice", 0, 0, "ipv4:10.0.0.1:5000")
    with caplog.at_level(logging.WARNING, "fedforge"):
        second = hub.open("alice", 0, 0, "ipv4:10.0.0.2:6000")  # a restart: replaces
        assert first.closed and not second.closed
        for port in (5001, 5002, 5003):  # the first process, back again and again
            with pytest.raises(IdentityInUse, match="already connected"):
                hub.open("alice", 0, 0, f"ipv4:10.0.0.1:{port}")
    flaps = [r.getMessage() for r in caplog.records if "two live processes" in r.getMessage()]
    assert len(flaps) == 1
    assert "ipv4:10.0.0.2:6000" in flaps[0] and "ipv4:10.0.0.1:5001" in flaps[0]
    assert not second.closed and hub.session_for(0) is second
    # Once the connected one falls silent (a hung process), a newcomer replaces it.
    second.last_seen = time.monotonic() - 10
    third = hub.open("alice", 0, 0, "ipv4:10.0.0.1:5004")
    assert second.closed and hub.session_for(0) is third


def test_late_chunks_with_ever_new_task_ids_are_cut_off_in_a_few_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, service, _, (a, _) = _setup()
    with caplog.at_level(logging.DEBUG, "fedforge"):
        for _ in range(2000):
            service._handle(
                a,
                pb.ClientMessage(
                    envelope=pb.Envelope(run_id="run-1", round=1, nonce=os.urandom(16)),
                    reply=pb.ReplyChunk(stage=FIT, chunk=pb.Chunk(), task_id=os.urandom(16)),
                ),
            )
            if a.closed:
                break
    assert a.closed
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) <= 3, warnings
    assert f"client a sent {INVALID_LIMIT} invalid messages" in warnings[-1]


def test_a_failure_report_cannot_forge_a_log_line() -> None:
    _, service, transport, (a, _) = _setup()
    transport.submit([Task(FIT, 1, 0, 0, SHARED)])
    body, round_number, _ = _receive(a)
    _fail(service, a, round_number, body.task_id, "boom\n2020-01-01 INFO forged\x1b[2K\u202e")
    reply = transport.poll(5.0)
    assert isinstance(reply, ClientFailure)
    assert reply.error == "boom\\x0a2020-01-01 INFO forged\\x1b[2K\\u202e"


def test_peer_text_is_one_visible_line_and_refusals_are_logged_at_a_bounded_rate() -> None:
    assert peer_text("a\r\nb\\c\t\u2028\u200bé") == "a\\x0d\\x0ab\\\\c\\x09\\u2028\\u200bé"
    assert peer_text("x" * 10, limit=4) == "xxxx..."
    assert peer_host("ipv4:10.0.0.7:51234") == "ipv4:10.0.0.7"
    assert peer_host("ipv6:[::1]:51234") == "ipv6:[::1]"
    limiter = LogLimiter(interval_s=0.2, max_keys=2)
    assert [limiter.allow("a") for _ in range(4)] == [0, None, None, None]
    time.sleep(0.25)
    assert limiter.allow("a") == 3  # the next line says how many were not logged
    assert limiter.allow("b") == 0 and limiter.allow("c") == 0
    assert limiter.allow("a") == 0  # forgotten: at most max_keys remembered
