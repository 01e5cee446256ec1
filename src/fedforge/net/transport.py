"""The network transport: the driver's :class:`~fedforge.runtime.transport.Transport`,
fulfilled by connected clients.

An exchange encodes the shared arrays once, pushes each task down its client's session in
chunks, and yields every reply as it arrives: a :class:`Record` (decoded by the service), or
a :class:`ClientFailure` for a client that disconnected, reported a failure or missed the
deadline (``rejected=True`` when its answer broke the protocol). Records are not validated
here: the driver checks them against the algorithm's record spec, as in simulation.

Every task gets a fresh random id that the client's answer echoes; the exchange takes only
replies tagged with the ids of its own tasks, so a late answer to an earlier exchange (the
round's fit during its evaluation) or an earlier attempt of a retried round is dropped.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import time
from collections.abc import Iterator, Sequence

from fedforge.core.params import Params
from fedforge.core.records import ClientFailure, Reply, Task
from fedforge.net.codec import Reassembler, encode_params, split_payload
from fedforge.net.hub import Hub, PendingTask, new_task_id
from fedforge.net.proto import fedforge_pb2 as pb

log = logging.getLogger("fedforge")
SEED_BYTES = 16


def seed_bytes(seed: int) -> bytes:
    """A task's 128-bit seed as 16 little-endian bytes."""
    return int(seed).to_bytes(SEED_BYTES, "little")


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

    def reply_limit(self, stage: str) -> int:
        return min(self.reply_limits.get(stage, self.max_payload_bytes), self.max_payload_bytes)

    def _task_messages(
        self, task: Task, task_id: bytes, payload: bytes, digest: bytes, deadline_ms: int
    ) -> Iterator[pb.ServerMessage]:
        seed = seed_bytes(task.seed)
        scalars = {k: float(v) for k, v in task.scalars.items()}
        for chunk in split_payload(payload, self.chunk_bytes, digest):
            yield pb.ServerMessage(
                envelope=self.hub.envelope(task.round),
                task=pb.TaskChunk(
                    stage=task.stage,
                    seed=seed,
                    scalars=scalars,
                    deadline_unix_ms=deadline_ms,
                    chunk=chunk,
                    task_id=task_id,
                ),
            )

    def exchange(self, tasks: Sequence[Task]) -> Iterator[Reply]:
        if not tasks:
            return
        self.hub.start_round(max(t.round for t in tasks))
        deadline = time.monotonic() + self.round_timeout_s
        deadline_ms = int((time.time() + self.round_timeout_s) * 1000)
        # Every task of an exchange shares one ``shared`` dict: encode it once.
        encoded: dict[int, tuple[Params, bytes, bytes]] = {}
        pending: dict[int, bytes] = {}  # client id -> the id of its task in this exchange
        for task in tasks:
            cid = task.client_id
            session = self.hub.session_for(cid)
            if session is None:
                yield ClientFailure(cid, "client disconnected before the exchange started")
                continue
            if id(task.shared) not in encoded:
                payload = encode_params(task.shared)
                encoded[id(task.shared)] = (
                    task.shared,  # keeps the dict alive, so its id stays unique
                    payload,
                    hashlib.sha256(payload).digest(),
                )
            _, payload, digest = encoded[id(task.shared)]
            pending_task = PendingTask(
                new_task_id(), task.round, task.stage, Reassembler(self.reply_limit(task.stage))
            )
            with session.lock:
                session.task = pending_task
            session.send(
                self._task_messages(task, pending_task.task_id, payload, digest, deadline_ms)
            )
            pending[cid] = pending_task.task_id
        encoded.clear()
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                task_id, reply = self.hub.results.get(timeout=remaining)
            except queue.Empty:
                break
            if pending.get(reply.client_id) == task_id:
                del pending[reply.client_id]
                yield reply
            else:  # it raced an earlier exchange's deadline: not an answer to this one
                log.debug("dropped a stale result of client %d", reply.client_id)
        for cid, task_id in sorted(pending.items()):
            session = self.hub.session_for(cid)
            if session is not None:
                with session.lock:
                    if session.task is not None and session.task.task_id == task_id:
                        session.task = None
            yield ClientFailure(cid, f"no result within the {self.round_timeout_s:g} s deadline")

    def close(self) -> None:
        """Sessions are owned by the server."""
