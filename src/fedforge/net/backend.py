"""The network backend: the round loop's ClientBackend, fulfilled by connected clients."""

from __future__ import annotations

import hashlib
import queue
import time
from collections.abc import Iterator, Sequence

from fedforge.core.params import Params
from fedforge.core.results import ClientFailure, ClientOutcome
from fedforge.core.rng import Purpose, RngStreams
from fedforge.net.codec import Reassembler, encode_params, split_payload
from fedforge.net.hub import Hub, Task
from fedforge.net.proto import fedforge_pb2 as pb


class NetworkBackend:
    """Pushes the global model to each sampled client and yields results as they arrive.

    A client that has not answered by the round deadline is dropped from the round.
    """

    def __init__(
        self,
        hub: Hub,
        streams: RngStreams,
        *,
        round_timeout_s: float,
        chunk_bytes: int,
        max_payload_bytes: int,
    ) -> None:
        self.hub = hub
        self.streams = streams
        self.round_timeout_s = round_timeout_s
        self.chunk_bytes = chunk_bytes
        self.max_payload_bytes = max_payload_bytes

    def _task_messages(
        self, payload: bytes, digest: bytes, round_number: int, seed: int, deadline_ms: int
    ) -> Iterator[pb.ServerMessage]:
        for chunk in split_payload(payload, self.chunk_bytes, digest):
            yield pb.ServerMessage(
                envelope=self.hub.envelope(round_number),
                task=pb.FitTaskChunk(chunk=chunk, client_seed=seed, deadline_unix_ms=deadline_ms),
            )

    def run(
        self, round_number: int, client_ids: Sequence[int], params: Params
    ) -> Iterator[ClientOutcome]:
        self.hub.start_round(round_number)
        payload = encode_params(params)
        digest = hashlib.sha256(payload).digest()
        deadline = time.monotonic() + self.round_timeout_s
        deadline_ms = int((time.time() + self.round_timeout_s) * 1000)
        pending: set[int] = set()
        for cid in client_ids:
            session = self.hub.session_for(cid)
            if session is None:
                yield ClientFailure(cid, "client disconnected before the round started")
                continue
            with session.lock:
                session.task = Task(round_number, Reassembler(self.max_payload_bytes))
            seed = self.streams.int_seed(Purpose.CLIENT, round_number, cid)
            session.send(self._task_messages(payload, digest, round_number, seed, deadline_ms))
            pending.add(cid)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                got_round, outcome = self.hub.results.get(timeout=remaining)
            except queue.Empty:
                break
            if got_round == round_number and outcome.client_id in pending:
                pending.discard(outcome.client_id)
                yield outcome
        for cid in sorted(pending):
            session = self.hub.session_for(cid)
            if session is not None:
                with session.lock:
                    session.task = None
            yield ClientFailure(cid, f"no result within the {self.round_timeout_s:g} s deadline")

    def close(self) -> None:
        """Sessions are owned by the server."""
