"""Server-side state shared by the gRPC handlers and the transport: sessions and replies.

Each connected client has a :class:`Session` with an outbox the handler streams from (the
handler blocks on it: work is pushed, never polled). Replies and failures flow to the
transport through one queue, each tagged with the id of the task it answers: 16 random bytes
per task (one client, one exchange, one attempt), so an answer to an earlier exchange or
attempt of the same round can never pass for the current one. All coordination uses conditions
and blocking queues.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from fedforge.core.errors import FedforgeError
from fedforge.core.records import ClientFailure, Record
from fedforge.net.codec import Reassembler
from fedforge.net.proto import fedforge_pb2 as pb

log = logging.getLogger("fedforge")

Outgoing = pb.ServerMessage | Iterable[pb.ServerMessage]
TASK_ID_BYTES = 16


def new_task_id() -> bytes:
    return os.urandom(TASK_ID_BYTES)


class DuplicateClientError(FedforgeError):
    """A client connected while another stream with its identity is open."""


@dataclass
class ReplyHeader:
    """The header fields of a reply, read from its first chunk."""

    num_examples: int
    scalars: dict[str, float]
    metrics: dict[str, float]


@dataclass
class PendingTask:
    """The task a client is working on: its reply must echo ``task_id`` and carry this round
    and stage."""

    task_id: bytes
    round: int
    stage: str
    reassembler: Reassembler
    header: ReplyHeader | None = None


@dataclass
class Session:
    name: str
    client_id: int
    declared_examples: int
    declared_holdout: int = 0
    outbox: queue.Queue[Outgoing | None] = field(default_factory=queue.Queue)
    task: PendingTask | None = None
    # The last task id a stale message was dropped for (logged once, not once per chunk).
    stale_task_id: bytes = b""
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, item: Outgoing) -> None:
        self.outbox.put(item)

    def drain(self, heartbeat_s: float, heartbeat: pb.ServerMessage) -> Iterator[pb.ServerMessage]:
        """Messages to stream to the client, until the session closes."""
        while not self.closed:
            try:
                item = self.outbox.get(timeout=heartbeat_s)
            except queue.Empty:
                yield heartbeat
                continue
            if item is None:
                return
            if isinstance(item, pb.ServerMessage):
                yield item
            else:
                yield from item


class Hub:
    """Connected sessions, the per-round nonce set and the reply queue."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.current_round = 0
        self._sessions: dict[str, Session] = {}
        self._changed = threading.Condition()
        self._nonces: set[bytes] = set()
        self._nonce_lock = threading.Lock()
        # (task id, reply): the transport takes a reply only for a task id it is waiting on.
        self.results: queue.Queue[tuple[bytes, Record | ClientFailure]] = queue.Queue()

    def envelope(self, round_number: int | None = None) -> pb.Envelope:
        return pb.Envelope(
            run_id=self.run_id,
            round=self.current_round if round_number is None else round_number,
            nonce=os.urandom(16),
        )

    # Sessions ---------------------------------------------------------------------------
    def open(self, name: str, client_id: int, declared_examples: int) -> Session:
        with self._changed:
            if name in self._sessions and not self._sessions[name].closed:
                raise DuplicateClientError(f"client {name!r} is already connected")
            session = Session(name, client_id, declared_examples)
            self._sessions[name] = session
            self._changed.notify_all()
        return session

    def close(self, session: Session) -> None:
        with self._changed:
            session.closed = True
            session.outbox.put(None)
            if self._sessions.get(session.name) is session:
                del self._sessions[session.name]
            self._changed.notify_all()
        with session.lock:
            task, session.task = session.task, None
        if task is not None:
            self.results.put(
                (task.task_id, ClientFailure(session.client_id, "client disconnected"))
            )

    def connected_ids(self) -> list[int]:
        with self._changed:
            return sorted(s.client_id for s in self._sessions.values())

    def session_for(self, client_id: int) -> Session | None:
        with self._changed:
            return next((s for s in self._sessions.values() if s.client_id == client_id), None)

    def wait_for_clients(self, count: int, timeout: float | None = None) -> bool:
        """Block until ``count`` clients are connected (no polling)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while len(self._sessions) < count:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def broadcast(self, message: pb.ServerMessage) -> None:
        with self._changed:
            for session in self._sessions.values():
                session.send(message)

    # Replay protection -------------------------------------------------------------------
    def start_round(self, round_number: int) -> None:
        """Enter ``round_number``; the nonces seen are forgotten when the round changes (every
        exchange of a round, and every retried attempt, shares the round's nonce set)."""
        with self._nonce_lock:
            if round_number != self.current_round:
                self._nonces.clear()
            self.current_round = round_number

    def fresh_nonce(self, nonce: bytes) -> bool:
        """True the first time a 16-byte nonce is seen this round."""
        if len(nonce) != 16:
            return False
        with self._nonce_lock:
            if nonce in self._nonces:
                return False
            self._nonces.add(nonce)
            return True
