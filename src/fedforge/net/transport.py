"""The network transport: the driver's :class:`~fedforge.runtime.transport.Transport`,
fulfilled by connected clients.

Tasks are submitted (pushed down their clients' sessions in chunks, the shared arrays encoded
once) and their replies polled as they arrive, so new tasks can go out while others are in
flight (asynchronous training); an exchange is a submit followed by polls until every task is
answered. A reply is a :class:`Record` (decoded by the service), or a :class:`ClientFailure`
for a client that disconnected, reported a failure or missed its task's deadline
(``rejected=True`` when its answer broke the protocol). Records are not validated here: the
driver checks them against the algorithm's record spec, as in simulation.

Every task gets a fresh random id that the client's answer echoes; only replies tagged with
the id of a task still in flight are taken, so a late answer to an earlier exchange (the
round's fit during its evaluation), an earlier attempt of a retried round or a task past its
deadline is dropped.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from fedforge.core.params import Params, ParamSpec
from fedforge.core.records import ClientFailure, Reply, Task
from fedforge.net.hub import Hub, PendingTask, Session, new_task_id
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.stream import Encoded, StreamDecoder, chunk_parts, encode_pieces

log = logging.getLogger("fedforge")
SEED_BYTES = 16


def seed_bytes(seed: int) -> bytes:
    """A task's 128-bit seed as 16 little-endian bytes."""
    return int(seed).to_bytes(SEED_BYTES, "little")


@dataclass(frozen=True)
class _InFlight:
    client_id: int
    deadline: float  # time.monotonic()
    task: PendingTask
    session: Session


def _delivering(
    messages: Iterator[pb.ServerMessage], task: PendingTask
) -> Iterator[pb.ServerMessage]:
    """``messages``, marking ``task`` delivered once the stream has taken the last one."""
    yield from messages
    task.delivered = True


class NetworkTransport:
    """Pushes tasks to connected clients; a client that has not answered within
    ``round_timeout_s`` of the exchange's start is dropped from it."""

    def __init__(
        self,
        hub: Hub,
        *,
        round_timeout_s: float,
        chunk_bytes: int,
        max_payload_bytes: int,
    ) -> None:
        self.hub = hub
        self.round_timeout_s = round_timeout_s
        self.chunk_bytes = chunk_bytes
        self.max_payload_bytes = max_payload_bytes
        # stage -> the largest reply a valid record of it encodes to (from its wire spec);
        # a reply announcing more is refused at its first chunk.
        self.reply_limits: dict[str, int] = {}
        # stage -> the arrays its replies must hold (checked at a reply's header, before its
        # arrays are allocated); a stage without one is checked by the driver once received.
        self.reply_specs: dict[str, ParamSpec] = {}
        self._in_flight: dict[bytes, _InFlight] = {}  # by task id
        self._ready: deque[Reply] = deque()  # failures decided when submitting
        self._encoded: tuple[Params, Encoded] | None = None  # (shared, its payload)

    def reply_limit(self, stage: str) -> int:
        return min(self.reply_limits.get(stage, self.max_payload_bytes), self.max_payload_bytes)

    def _task_messages(
        self, task: Task, task_id: bytes, payload: Encoded, deadline_ms: int
    ) -> Iterator[pb.ServerMessage]:
        seed = seed_bytes(task.seed)
        scalars = {k: float(v) for k, v in task.scalars.items()}
        for part in chunk_parts(payload, self.chunk_bytes):
            message = pb.ServerMessage(envelope=self.hub.envelope(task.round))
            body = message.task
            body.stage = task.stage
            body.seed = seed
            body.scalars.update(scalars)
            body.deadline_unix_ms = deadline_ms
            body.task_id = task_id
            part.fill(body.chunk)
            yield message

    def _encode(self, shared: Params) -> Encoded:
        """``shared``'s payload; tasks sharing one dict (an exchange's, or the tasks an
        asynchronous run hands out on one model version) encode it once: a header and a view
        of each array, which every client's stream cuts its chunks from (no copy of the
        model, none per client). The server never writes a model's arrays in place (an
        update makes new ones); if anything did, the digest taken here would no longer match
        and the clients would refuse the task, not train on a torn model."""
        if self._encoded is None or self._encoded[0] is not shared:
            self._encoded = None  # (the previous payload is released before the next is made)
            # (keeping the dict alive keeps its identity unique)
            self._encoded = (shared, encode_pieces(shared))
        return self._encoded[1]

    def submit(self, tasks: Sequence[Task]) -> None:
        """Push ``tasks`` to their clients and return at once; their replies come from
        :meth:`poll`. Each task's deadline is ``round_timeout_s`` from now."""
        if not tasks:
            return
        self.hub.start_round(max(t.round for t in tasks))
        deadline = time.monotonic() + self.round_timeout_s
        deadline_ms = int((time.time() + self.round_timeout_s) * 1000)
        for task in tasks:
            cid = task.client_id
            session = self.hub.session_for(cid)
            if session is None:
                self._ready.append(
                    ClientFailure(cid, "client disconnected before the exchange started")
                )
                continue
            payload = self._encode(task.shared)
            receiver = StreamDecoder(
                self.reply_limit(task.stage), self.reply_specs.get(task.stage), finite=True
            )
            pending = PendingTask(new_task_id(), task.round, task.stage, receiver)
            with session.lock:
                closed = session.closed  # (replaced since it was looked up: no one reads it)
                if not closed:
                    session.task = pending
            messages = self._task_messages(task, pending.task_id, payload, deadline_ms)
            if closed or not self.hub.send(session, _delivering(messages, pending)):
                self._ready.append(ClientFailure(cid, "client disconnected"))
                continue
            self._in_flight[pending.task_id] = _InFlight(cid, deadline, pending, session)

    @property
    def in_flight(self) -> int:
        """Submitted tasks whose reply (or failure) :meth:`poll` has not returned yet."""
        return len(self._in_flight) + len(self._ready)

    def poll(self, timeout: float | None = None) -> Reply | None:
        """The next reply to a submitted task, as it arrives, or a failure for a task past
        its deadline (the earliest first, ties by client id); ``None`` when nothing is in
        flight, or nothing came within ``timeout`` seconds (``None``: until one does)."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._ready:
                return self._ready.popleft()
            if not self._in_flight:
                return None
            now = time.monotonic()
            task_id, due = min(
                self._in_flight.items(), key=lambda kv: (kv[1].deadline, kv[1].client_id)
            )
            if due.deadline <= now and self.hub.results.empty():
                # (a reply already queued is taken first: it came before the driver looked)
                self._forget(task_id)
                if not due.task.delivered:
                    return self._not_reading(due)
                return ClientFailure(
                    due.client_id, f"no result within the {self.round_timeout_s:g} s deadline"
                )
            wait = due.deadline - now if end is None else min(due.deadline, end) - now
            if wait <= 0 and self.hub.results.empty():
                return None
            try:
                task_id, reply = self.hub.results.get(timeout=max(wait, 0.0))
            except queue.Empty:
                continue
            flight = self._in_flight.get(task_id)
            if flight is not None and flight.client_id == reply.client_id:
                del self._in_flight[task_id]
                return reply
            # it raced its task's deadline, or answers a cancelled task: not a reply now
            log.debug("dropped a stale result of client %d", reply.client_id)

    def _not_reading(self, due: _InFlight) -> ClientFailure:
        """The failure of a client whose task its stream never took in time: it does not read
        what the server sends (a zombie). Its session is closed, so it is not sampled again
        and nothing more is queued for it."""
        reason = (
            f"its task was not delivered within the {self.round_timeout_s:g} s deadline: "
            "the client does not read its stream; disconnected"
        )
        if not due.session.closed:
            log.warning("client %s: %s", due.session.name, reason)
            self.hub.close(due.session, reason)
        return ClientFailure(due.client_id, f"no result: {reason}")

    def _forget(self, task_id: bytes) -> None:
        """Stop waiting for a task: its client's late answer will be dropped."""
        flight = self._in_flight.pop(task_id)
        flight.task.receiver.discard()  # (a reply cut off midway frees its arrays now)
        session = self.hub.session_for(flight.client_id)
        if session is not None:
            with session.lock:
                if session.task is not None and session.task.task_id == task_id:
                    session.task = None
        self.hub.uploads.released()

    def cancel(self) -> None:
        """Stop waiting for every task in flight (and forget failures not yet polled)."""
        for task_id in list(self._in_flight):
            self._forget(task_id)
        self._ready.clear()

    def exchange(self, tasks: Sequence[Task]) -> Iterator[Reply]:
        """Submit ``tasks`` and yield every reply (or failure) as it comes; nothing else may
        be in flight."""
        if self.in_flight:
            raise RuntimeError("an exchange cannot start while other tasks are in flight")
        self.submit(tasks)
        try:
            while self.in_flight:
                reply = self.poll()
                if reply is not None:
                    yield reply
        finally:
            self.cancel()
            self._encoded = None

    def close(self) -> None:
        """Sessions are owned by the server."""
