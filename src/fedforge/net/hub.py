"""Server-side state shared by the gRPC handlers and the transport: sessions and replies.

Each connected client has a :class:`Session` with an outbox the handler streams from (the
handler blocks on it: work is pushed, never polled). Replies and failures flow to the
transport through one queue, each tagged with the id of the task it answers: 16 random bytes
per task (one client, one exchange, one attempt), so an answer to an earlier exchange or
attempt of the same round can never pass for the current one. All coordination uses conditions
and blocking queues.

A session's outbox is bounded (:data:`OUTBOX_LIMIT` items): a client that does not read its
stream cannot make the server queue work for it without end; its session is closed instead.
Two live processes holding one identity would evict each other forever: the hub lets a new
session replace a live one once, and refuses a newcomer while the session it would replace
is alive and replaced another recently (logged once, naming both addresses).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from fedforge.core.records import ClientFailure, Record
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.stream import StreamDecoder

log = logging.getLogger("fedforge")

Outgoing = pb.ServerMessage | Iterable[pb.ServerMessage]
TASK_ID_BYTES = 16
OUTBOX_LIMIT = 16  # items (a task, a rejection...) waiting to be streamed to one client
# A session that sent something within this many heartbeat intervals is alive; a newcomer
# of its identity within FLAP_HEARTBEATS intervals (at least FLAP_MIN_S) of the previous
# replacement is refused while it is.
ALIVE_HEARTBEATS = 2.0
FLAP_HEARTBEATS = 12.0
FLAP_MIN_S = 30.0


class IdentityInUse(Exception):
    """A second live process connected with an identity that is connected and alive."""


def new_task_id() -> bytes:
    return os.urandom(TASK_ID_BYTES)


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
    receiver: StreamDecoder  # the reply, received straight into its arrays
    header: ReplyHeader | None = None
    reply_started: float = 0.0  # time.time() of the reply's first chunk
    # Every chunk of the task was handed to the client's stream (a client that does not
    # read it never gets there).
    delivered: bool = False


@dataclass
class Session:
    name: str
    client_id: int
    declared_examples: int
    declared_holdout: int = 0
    peer: str = ""  # the client's address, as gRPC gives it
    outbox: queue.Queue[Outgoing | None] = field(default_factory=lambda: queue.Queue(OUTBOX_LIMIT))
    task: PendingTask | None = None
    # The last task id a stale message was dropped for (logged once, not once per chunk).
    stale_task_id: bytes = b""
    stale_tasks: int = 0  # late tasks answered (each counted once, whatever its chunks)
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_seen: float = field(default_factory=time.monotonic)  # the last message received
    # The client declared its data sizes (its Hello after the Welcome): it may be sampled.
    ready: bool = False
    invalid: int = 0  # invalid messages received (the first is logged, not the rest)
    invalid_times: deque[float] = field(default_factory=deque)  # the recent ones
    # Called once when the hub closes the session (ends the client's stream).
    on_close: list[Callable[[], object]] = field(default_factory=list)
    # Why the server refused the client for good (its stream ends with FAILED_PRECONDITION).
    refusal: str | None = None

    def seen(self) -> None:
        self.last_seen = time.monotonic()

    def send(self, item: Outgoing) -> bool:
        """Queue ``item`` for the client; False when its outbox is full (the client does not
        read its stream: the caller closes the session)."""
        try:
            self.outbox.put_nowait(item)
        except queue.Full:
            return False
        return True

    def drain(self, heartbeat_s: float, heartbeat: pb.ServerMessage) -> Iterator[pb.ServerMessage]:
        """Messages to stream to the client, until the session closes."""
        while not self.closed:
            try:
                item = self.outbox.get(timeout=heartbeat_s)
            except queue.Empty:
                yield heartbeat
                continue
            if item is None or self.closed:
                return
            if isinstance(item, pb.ServerMessage):
                yield item
            else:
                yield from item


class UploadSlots:
    """At most ``limit`` replies received at once (0: no limit): a reply's arrays are held
    from its first chunk until its last verifies, so this bounds the server's memory for
    replies in flight to ``limit`` updates. The reader of a reply that finds every slot taken
    waits (not reading its stream, so gRPC's flow control holds the client back), keeping
    its session alive, until a slot frees or its task is over (deadline, disconnect).

    A slot is held by a (session, task) pair while the task is the session's current one
    and its reply has started: whatever ends the task (its reply complete or refused, the
    deadline, a disconnect) frees the slot; :meth:`released` wakes the waiters at once."""

    def __init__(self, limit: int, recheck_s: float = 0.5) -> None:
        self.limit = limit
        self.recheck_s = recheck_s  # the longest a waiter sleeps without looking again
        self._holders: list[tuple[Session, PendingTask]] = []
        self._changed = threading.Condition()

    def _busy(self) -> int:
        self._holders = [(s, t) for s, t in self._holders if not s.closed and s.task is t]
        return len(self._holders)

    def acquire(self, session: Session, task: PendingTask) -> bool:
        """Take a slot for ``task``'s reply; False when the task ended while waiting."""
        if not self.limit:
            return True
        with self._changed:
            while self._busy() >= self.limit:
                if session.closed or session.task is not task:
                    return False
                session.seen()  # it is sending (we are not reading): alive
                self._changed.wait(self.recheck_s)
            if session.closed or session.task is not task:
                return False
            self._holders.append((session, task))
            return True

    def released(self) -> None:
        """A reply ended (complete, refused or abandoned): let a waiter look again."""
        if self.limit:
            with self._changed:
                self._changed.notify_all()


class Hub:
    """Connected sessions, the per-round nonce set and the reply queue."""

    def __init__(self, run_id: str, heartbeat_s: float = 5.0, max_uploads: int = 0) -> None:
        self.run_id = run_id
        self.uploads = UploadSlots(max_uploads)
        self.heartbeat_s = heartbeat_s
        self.current_round = 0
        self.finished: int | None = None  # the last round, once the run is complete
        self._sessions: dict[str, Session] = {}
        self._replaced: dict[str, float] = {}  # name -> when a session of it was last replaced
        self._flapping: set[str] = set()  # names whose flapping was logged (once)
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
    def open(self, name: str, client_id: int, declared_examples: int, peer: str = "") -> Session:
        """A new session for ``name``. An authenticated client that connects again replaces
        its previous session (frozen, or silently cut off by the network), which is closed;
        unless that session is alive and itself replaced another recently: two processes
        share the identity, and the newcomer is refused (:class:`IdentityInUse`)."""
        now = time.monotonic()
        with self._changed:
            old = self._sessions.get(name)
            if old is not None and self._flaps(old, now):
                first = name not in self._flapping
                self._flapping.add(name)
                if first:
                    log.warning(
                        "client %s: two live processes use this identity (connected from %s, "
                        "and again from %s): they would evict each other; the newcomer is "
                        "refused while the connected one is alive",
                        name,
                        old.peer or "?",
                        peer or "?",
                    )
                raise IdentityInUse(
                    f"client {name} is already connected (from {old.peer or '?'}) and alive; "
                    "is another process using these credentials?"
                )
            session = Session(name, client_id, declared_examples, peer=peer)
            self._sessions[name] = session
            if old is not None:
                self._replaced[name] = now
            self._changed.notify_all()
        if old is not None and not old.closed:
            log.warning(
                "client %s connected again (from %s): its previous session (from %s) is closed",
                name,
                peer or "?",
                old.peer or "?",
            )
            self.close(old, "replaced by a new session of the same client")
        return session

    def _flaps(self, old: Session, now: float) -> bool:
        """Whether replacing ``old`` now would be flapping: it is alive (sent something within
        ALIVE_HEARTBEATS intervals) and replaced a session of its name recently."""
        window = max(FLAP_MIN_S, FLAP_HEARTBEATS * self.heartbeat_s)
        alive = now - old.last_seen < ALIVE_HEARTBEATS * self.heartbeat_s
        return alive and not old.closed and now - self._replaced.get(old.name, -window) < window

    def close(self, session: Session, reason: str = "client disconnected") -> None:
        with self._changed:
            if session.closed:
                return
            session.closed = True
            if self._sessions.get(session.name) is session:
                del self._sessions[session.name]
                self._flapping.discard(session.name)  # a later flapping is logged again
            self._changed.notify_all()
        with session.lock:
            task, session.task = session.task, None
        if task is not None:
            task.receiver.discard()
            self.results.put((task.task_id, ClientFailure(session.client_id, reason)))
        self.uploads.released()
        # The callbacks first (the handler's ``context.cancel``: the client sees its stream
        # cancelled), then the end of the outbox (else the stream could end as if complete;
        # a full outbox needs no end: its reader sees the session closed).
        # A refused session skips the callbacks: its handler ends the stream with the refusal.
        if session.refusal is None:
            for callback in session.on_close:
                callback()
        with contextlib.suppress(queue.Full):
            session.outbox.put_nowait(None)

    def refuse(self, session: Session, reason: str) -> None:
        """Close ``session`` for good: its stream ends with ``reason`` (a client that cannot
        take part, e.g. another architecture), which the client does not retry."""
        session.refusal = reason
        self.close(session, reason)

    def reap(self, silent_after_s: float) -> list[str]:
        """Close every session that sent nothing (not even a heartbeat) for
        ``silent_after_s``; return their names. A dead session is never sampled."""
        now = time.monotonic()
        with self._changed:
            dead = [s for s in self._sessions.values() if now - s.last_seen > silent_after_s]
        for session in dead:
            log.warning(
                "client %s sent nothing for %.1f s (heartbeats stopped): closing its session",
                session.name,
                now - session.last_seen,
            )
            self.close(session, f"no message for {now - session.last_seen:.1f} s")
        return [s.name for s in dead]

    def close_where(self, doomed: Callable[[str], bool], reason: str) -> None:
        """Close the sessions of every client ``doomed(name)`` (e.g. a revoked certificate)."""
        with self._changed:
            sessions = [s for s in self._sessions.values() if doomed(s.name)]
        for session in sessions:
            log.warning("client %s: %s; closing its session", session.name, reason)
            self.close(session, reason)

    def declared_sizes(self, *, holdout: bool = False) -> dict[str, int]:
        """Each connected client's declared training-set (or held-out set) size (0: none)."""
        with self._changed:
            return {
                s.name: s.declared_holdout if holdout else s.declared_examples
                for s in self._sessions.values()
            }

    def mark_ready(self, session: Session) -> None:
        """The client has declared its data sizes: from now on it may be sampled."""
        with self._changed:
            session.ready = True
            self._changed.notify_all()

    def _ready(self) -> list[Session]:
        return [s for s in self._sessions.values() if s.ready]

    def connected_ids(self) -> list[int]:
        """The clients that may be sampled: connected, and their sizes declared."""
        with self._changed:
            return sorted(s.client_id for s in self._ready())

    def session_for(self, client_id: int) -> Session | None:
        with self._changed:
            return next((s for s in self._sessions.values() if s.client_id == client_id), None)

    def wait_for_clients(
        self, count: int, timeout: float | None = None, *, log_every_s: float = 30.0
    ) -> bool:
        """Block until ``count`` clients are connected and have declared their sizes (woken
        by every change, no polling),
        logging who is awaited when it has to wait, then every ``log_every_s``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        next_log = time.monotonic()
        with self._changed:
            while len(self._ready()) < count:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return False
                if now >= next_log:
                    log.info(
                        "waiting for clients: %d connected (%s), %d needed to start a round",
                        len(self._ready()),
                        ", ".join(sorted(s.name for s in self._ready())) or "none",
                        count,
                    )
                    next_log = now + log_every_s
                wake = next_log if deadline is None else min(next_log, deadline)
                self._changed.wait(max(wake - now, 0.0))
        return True

    def wait_for_change(self, timeout: float) -> None:
        """Block until a client connects or disconnects, or ``timeout`` passes."""
        with self._changed:
            self._changed.wait(timeout)

    def finish(self, rounds: int) -> None:
        """The run is complete: tell every connected client, and every client that connects
        from now on."""
        self.finished = rounds
        self.broadcast(self.complete_message())

    def complete_message(self) -> pb.ServerMessage:
        assert self.finished is not None
        return pb.ServerMessage(
            envelope=self.envelope(), run_complete=pb.RunComplete(rounds=self.finished)
        )

    def send(self, session: Session, item: Outgoing) -> bool:
        """Queue ``item`` for ``session``'s client; a client whose outbox is full does not read
        its stream: its session is closed (logged) and False returned."""
        if session.send(item):
            return True
        if not session.closed:
            log.warning(
                "client %s does not read its stream (%d messages wait for it): closing its session",
                session.name,
                OUTBOX_LIMIT,
            )
            self.close(session, "its stream is not read (send queue full)")
        return False

    def broadcast(self, message: pb.ServerMessage) -> None:
        with self._changed:
            sessions = list(self._sessions.values())
        for session in sessions:
            self.send(session, message)

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
