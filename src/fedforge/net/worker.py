"""A site's side of one connection: builds the run's model, data and client app when
welcomed, answers each pushed task, and keeps the site's state (one directory per run).

What the server sends is bounded before it is allocated (:func:`task_size_limit`), and a
site refuses to go on under another id than the one its state for the run belongs to.
"""

from __future__ import annotations

import logging
import os
import queue
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import torch

from fedforge.config import RunConfig
from fedforge.core.errors import FedforgeError
from fedforge.core.params import spec_of
from fedforge.core.records import FIT, Record, Task
from fedforge.experiment import (
    build_aggregation,
    build_algorithm,
    build_loop,
    build_sample_dp,
    build_stages,
)
from fedforge.net.codec import DEFAULT_CHUNK_BYTES, ProtocolError, encoded_size_bound
from fedforge.net.peer import peer_text
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.service import PROTOCOL_VERSION
from fedforge.net.site import LocalSite, join
from fedforge.net.stream import Encoded, StreamDecoder, chunk_parts, encode_pieces
from fedforge.runtime.client_app import ClientApp
from fedforge.runtime.client_state import DiskStateStore, EphemeralSessions
from fedforge.secagg.aggregation import SecureAggregation
from fedforge.secagg.client import SecAggClient
from fedforge.secagg.protocol import SESSION
from fedforge.secagg.session import Identity
from fedforge.stages.base import StageChain
from fedforge.train.torch_model import trainable_names
from fedforge.train.user_loop import SiteEvaluation
from fedforge.workload.fingerprint import fingerprint

log = logging.getLogger("fedforge")

DEFAULT_STATE_ROOT = Path("client-state")
Outbox = queue.Queue[pb.ClientMessage | Iterator[pb.ClientMessage] | None]
# What a task may announce beyond what the run's broadcast arrays encode to: the
# secure-aggregation steps' keys, shares and ciphertexts (a few hundred bytes per neighbour).
TASK_ALLOWANCE_BYTES = 16 << 20


class SiteWorker:
    """Holds the client app, data and state store of one connection and answers tasks."""

    def __init__(
        self, outbox: Outbox, site: LocalSite, state_dir: Path | None, identity: Identity | None
    ) -> None:
        self.outbox = outbox
        self.identity = identity
        self.site = site
        self.state_dir = state_dir
        self.run_id = ""
        self.receiver: StreamDecoder | None = None
        self.refused_transfer = b""  # the transfer id of a task refused at its first chunk

    def welcome(self, message: pb.ServerMessage) -> None:
        w = message.welcome
        self.run_id = message.envelope.run_id
        self.client_id = int(w.client_id)
        self.config = RunConfig.model_validate(tomllib.loads(w.config_toml))
        # One small model per process: extra intra-op threads only oversubscribe the cores.
        torch.set_num_threads(self.config.runtime.threads or 1)
        joined = join(self.site, self.config, self.client_id)
        self.data = joined.data
        self.app = ClientApp(
            build_algorithm(self.config, trainable_names(joined.model)),
            joined.model,
            StageChain(build_stages(self.config, population=None)),
            build_sample_dp(self.config),
            secure_client(self.config, self.identity),
            build_loop(joined.workload),
            SiteEvaluation.of(joined.workload),
        )
        architecture = fingerprint(joined.model, joined.workload.schema)
        self.max_task_bytes = task_size_limit(self.app)
        root = self.state_dir or DEFAULT_STATE_ROOT / _safe_name(w.client_name)
        disk = DiskStateStore(root / _safe_name(self.run_id))
        check_own_id(disk.directory, self.client_id)
        self.store = EphemeralSessions(disk, SESSION)
        holdout = len(self.data.holdout) if self.data.holdout is not None else 0
        held = f"{len(self.data.train)} examples ({holdout} held out)"
        if self.data.site is not None:  # an opaque site: its own object (an RL agent's env)
            held = f"its own {type(self.data.site).__name__} ({str(self.data.site)[:200]})"
        log.info(
            "joined run %s as %s (id %d) with %s; state in %s",
            self.run_id,
            w.client_name,
            self.client_id,
            held,
            disk.directory,
        )
        # Declare the data sizes: the server caps the sample counts it accepts from us by them.
        self.outbox.put(
            pb.ClientMessage(
                hello=pb.Hello(
                    protocol_version=PROTOCOL_VERSION,
                    num_examples=len(self.data.train),
                    holdout_examples=holdout,
                    architecture=list(architecture.entries),
                )
            )
        )

    def _envelope(self, round_number: int) -> pb.Envelope:
        return pb.Envelope(run_id=self.run_id, round=round_number, nonce=os.urandom(16))

    def _reply_messages(
        self, round_number: int, stage: str, task_id: bytes, encoded: Encoded, record: Record
    ) -> Iterator[pb.ClientMessage]:
        # Chunks are cut from the record's arrays as the stream takes them (no encoded copy).
        for part in chunk_parts(encoded, DEFAULT_CHUNK_BYTES):
            message = pb.ClientMessage(envelope=self._envelope(round_number))
            reply = message.reply
            reply.stage = stage
            reply.task_id = task_id
            if part.index == 0:  # the server reads the header from the first chunk
                reply.num_examples = record.num_examples
                reply.scalars.update(record.scalars)
                reply.metrics.update(record.metrics)
            part.fill(reply.chunk)
            yield message

    def task(self, message: pb.ServerMessage) -> int:
        """Consume one chunk; when the task is complete, answer it. Returns 1 for an
        answered fit task, else 0."""
        if message.envelope.run_id != self.run_id:
            log.warning("ignoring a task for another run")
            return 0
        body = message.task
        if body.chunk.transfer_id == self.refused_transfer:
            return 0  # the rest of a task refused at its first chunk
        if body.chunk.index == 0:
            # What the server announces is checked against what the run can send before any
            # of it is allocated: a compromised server cannot make this site allocate more.
            # Received straight into the arrays the task hands the client app.
            self.receiver = StreamDecoder(max_bytes=self.max_task_bytes)
            self.receive_started = time.time()
        if self.receiver is None:
            log.warning("ignoring a task chunk without its transfer's start")
            return 0
        try:
            shared = self.receiver.add(body.chunk)
        except ProtocolError as exc:
            self.receiver = None
            self.refused_transfer = body.chunk.transfer_id
            log.warning("refused a %s task from the server: %s", peer_text(body.stage, 40), exc)
            self.outbox.put(
                pb.ClientMessage(
                    envelope=self._envelope(int(message.envelope.round)),
                    failure=pb.ClientFailureReport(
                        error=f"task refused: {exc}", task_id=body.task_id
                    ),
                )
            )
            return 0
        if shared is None:
            return 0
        size, self.receiver = self.receiver.received, None
        # The reply (or failure report) echoes the task's id: the server takes no other.
        round_number, stage, task_id = int(message.envelope.round), body.stage, body.task_id
        shown = peer_text(stage, 40)  # the server's word, in this site's log
        received = time.time()
        log.info(
            "round %d: received a %s task (%.1f MB, %d array bytes) in %.3f s (%.6f-%.6f)",
            round_number,
            shown,
            size / 1e6,
            sum(a.nbytes for a in shared.values()),
            received - self.receive_started,
            self.receive_started,
            received,
        )
        try:
            task = Task(
                stage,
                round_number,
                self.client_id,
                int.from_bytes(body.seed, "little"),
                shared,
                dict(body.scalars),
            )
            del shared
            started = time.perf_counter()
            state = self.app.stored_state(task, self.store)
            record, new_state = self.app.handle(task, self.data, state)
            if new_state is not None:  # saved before the reply: a retried round reads it back
                self.store.put(self.client_id, new_state, round_number)
            log.info(
                "round %d: %s done in %.4f s", round_number, shown, time.perf_counter() - started
            )
        except Exception as exc:
            log.exception("the %s task of round %d failed", shown, round_number)
            self.outbox.put(
                pb.ClientMessage(
                    envelope=self._envelope(round_number),
                    failure=pb.ClientFailureReport(
                        error=f"{type(exc).__name__}: {exc}", task_id=task_id
                    ),
                )
            )
            return 0
        encoded = encode_pieces(record.arrays)
        log.info(
            "round %d: sending a %s reply (%d bytes, %d array bytes)",
            round_number,
            shown,
            encoded.size,
            sum(a.nbytes for a in record.arrays.values()),
        )
        self.outbox.put(self._reply_messages(round_number, stage, task_id, encoded, record))
        return 1 if stage == FIT else 0


def check_own_id(directory: Path, client_id: int) -> None:
    """Refuse to go on when the server gives this site another id than the one its state for
    the run was kept under (its privacy ledger, control variate... would not follow it)."""
    path = directory / "client_id"
    if path.exists() and path.read_text().strip() != str(client_id):
        raise FedforgeError(
            f"the server now calls this site client id {client_id}, but its state for this "
            f"run ({directory}) belongs to client id {path.read_text().strip()}: refusing to "
            "train without it; tell the coordinator (a run's client ids must not change)"
        )
    path.write_text(f"{client_id}\n")


def task_size_limit(app: ClientApp) -> int:
    """The largest task this client accepts: twice what the run's broadcast (the model and
    the algorithm's server state, such as SCAFFOLD's control variate) encodes to, which any
    downlink codec only shrinks, plus room for the secure-aggregation steps."""
    params = app.model.get_params()
    shared = {**params, **app.algorithm.broadcast(app.algorithm.init(params))}
    return 2 * encoded_size_bound(spec_of(shared)) + TASK_ALLOWANCE_BYTES


def secure_client(config: RunConfig, identity: Identity | None) -> SecAggClient | None:
    """The secure-aggregation side of a deployed client, when the run uses it."""
    aggregation = build_aggregation(config)  # the server's: the same withholding rules
    if not isinstance(aggregation, SecureAggregation):
        return None
    return SecAggClient(identity, withhold_metrics=aggregation.withhold_metrics)


def _safe_name(name: str) -> str:
    """A name usable as one path component."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return cleaned or "client"
