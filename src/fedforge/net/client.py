"""``fedforge client``: connect, authenticate, answer pushed tasks, reconnect after failures.

A task is answered by the same :class:`~fedforge.runtime.client_app.ClientApp` the simulation
runs, with the same seed, so a deployment computes what a simulation computes. Client state
(e.g. SCAFFOLD's control variate) lives in a :class:`DiskStateStore` under the client's state
directory, one subdirectory per run, and survives a client restart.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from fedforge.config import RunConfig
from fedforge.core.errors import FedforgeError
from fedforge.core.records import FIT, Record, Task
from fedforge.experiment import (
    build_aggregation,
    build_algorithm,
    build_loop,
    build_sample_dp,
    build_stages,
)
from fedforge.net.codec import (
    Reassembler,
    array_bytes,
    decode_params,
    encode_params,
    split_payload,
)
from fedforge.net.keys import ClientCredentials
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.proto import fedforge_pb2_grpc as pb_grpc
from fedforge.net.server import grpc_options
from fedforge.net.service import PROTOCOL_VERSION
from fedforge.net.site import LocalSite, join, ready
from fedforge.runtime.client_app import ClientApp
from fedforge.runtime.client_state import DiskStateStore, EphemeralSessions
from fedforge.secagg.aggregation import SecureAggregation
from fedforge.secagg.client import SecAggClient
from fedforge.secagg.protocol import SESSION
from fedforge.secagg.session import Identity
from fedforge.stages.base import StageChain
from fedforge.train.user_loop import SiteEvaluation
from fedforge.workload.fingerprint import fingerprint

log = logging.getLogger("fedforge")

DEFAULT_STATE_ROOT = Path("client-state")
Outbox = queue.Queue[pb.ClientMessage | Iterator[pb.ClientMessage] | None]
# Refusals that retrying cannot change. Anything else (UNAVAILABLE, RESOURCE_EXHAUSTED, a
# stream cancelled or timed out...) is transient: the client reconnects with backoff.
FATAL = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
}
# gRPC's words for a TLS handshake that failed on a certificate (ours or the server's).
TLS_REFUSALS = ("CERTIFICATE_VERIFY_FAILED", "BAD_SIGNATURE", "certificate verify failed")
SILENT_SERVER_HEARTBEATS = 3.0  # a server silent this many heartbeat intervals is gone


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter between reconnection attempts."""

    initial_s: float = 0.5
    max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_s, self.initial_s * 2.0**attempt) * random.uniform(0.5, 1.5))


class FatalClientError(FedforgeError):
    """The server refused this client for good (bad credentials, revoked, duplicate...)."""


class FederatedClient:
    def __init__(
        self,
        address: str,
        credentials: ClientCredentials | None,
        site: LocalSite | None = None,
        *,
        name: str = "",
        max_message_mb: int = 16,
        backoff: Backoff | None = None,
        max_attempts: int | None = None,
        state_dir: Path | None = None,
    ) -> None:
        """``site`` is this client's own workload and data (see :class:`LocalSite`; default:
        the run's built-in workload and the client's share of its dataset); with a workload,
        data given as a path is read and checked against the model before the client
        connects. ``state_dir`` holds the client's persistent state (one subdirectory per
        run); default ``client-state/<client name>`` in the working directory."""
        if credentials is None:
            log.warning(
                "INSECURE: no TLS: the server is not authenticated and traffic to %s is "
                "unencrypted; never use this over a network",
                address,
            )
        self.address = address
        self.credentials = credentials
        self.site = site or LocalSite()
        self.name = name
        self.max_message_mb = max_message_mb
        self.backoff = backoff or Backoff()
        self.max_attempts = max_attempts
        self.state_dir = state_dir
        self._trained = 0  # fit tasks answered in this run
        self._joined = False  # the current connection was welcomed

    def run(self) -> int:
        """Serve the run until it completes; return the number of fit tasks answered."""
        attempt = 0
        self._trained = 0
        self.site = ready(self.site)  # a workload's data is read and checked before connecting
        while True:
            self._joined = False
            try:
                if self._session():
                    return self._trained
                attempt = 1 if self._joined else attempt + 1
            except grpc.RpcError as exc:
                code, details = exc.code(), str(exc.details())
                if code in FATAL:
                    raise FatalClientError(
                        f"server refused the client: {code.name}: {details}"
                    ) from None
                if not self._joined and any(word in details for word in TLS_REFUSALS):
                    raise FatalClientError(
                        "the TLS handshake failed on a certificate: the server does not "
                        "accept this client's certificate, or the server's certificate is not "
                        f"signed by this client's ca.crt ({details})"
                    ) from None
                log.warning("connection lost (%s: %s)", code.name, details)
                # After a session that was established, back off from the start again.
                attempt = 1 if self._joined else attempt + 1
            if self.max_attempts is not None and attempt > self.max_attempts:
                raise FedforgeError(f"gave up after {attempt} failed connection attempts")
            delay = self.backoff.delay(attempt)
            log.info("reconnecting in %.1f s", delay)
            time.sleep(delay)

    def _identity(self) -> Identity | None:
        """What signs this client's secure-aggregation keys: its certificate key."""
        c = self.credentials
        return (
            None if c is None else Identity.from_pem(c.private_key, c.certificate, c.ca_certificate)
        )

    def _channel(self) -> grpc.Channel:
        options = grpc_options(self.max_message_mb)
        if self.credentials is None:
            return grpc.insecure_channel(self.address, options=options)
        tls = grpc.ssl_channel_credentials(
            root_certificates=self.credentials.ca_certificate,
            private_key=self.credentials.private_key,
            certificate_chain=self.credentials.certificate,
        )
        return grpc.secure_channel(self.address, tls, options=options)

    def _session(self) -> bool:
        """One connection; True when the run is complete. Counts answered fit tasks in
        ``self._trained`` and sets ``self._joined`` once the server welcomed the client."""
        outbox: Outbox = queue.Queue()
        stop = threading.Event()

        def requests() -> Iterator[pb.ClientMessage]:
            while (item := outbox.get()) is not None:
                if isinstance(item, pb.ClientMessage):
                    yield item
                else:
                    yield from item  # a result, chunked lazily

        outbox.put(
            pb.ClientMessage(hello=pb.Hello(protocol_version=PROTOCOL_VERSION, name=self.name))
        )
        with self._channel() as channel:
            stream = pb_grpc.FederationStub(channel).Connect(requests())  # type: ignore[no-untyped-call]
            watch = _ServerWatch(stream, stop)
            try:
                worker = _Worker(outbox, self.site, self.state_dir, self._identity())
                for message in stream:
                    watch.busy = True
                    kind = message.WhichOneof("body")
                    if kind == "welcome":
                        # Heartbeats first: building the model and data may take a while,
                        # and a client silent for a few heartbeats counts as gone.
                        heartbeat_s = message.welcome.heartbeat_ms / 1000
                        _start_heartbeats(outbox, stop, heartbeat_s)
                        worker.welcome(message)
                        self._joined = True
                        watch.start(heartbeat_s * SILENT_SERVER_HEARTBEATS)
                    elif kind == "task":
                        self._trained += worker.task(message)
                    elif kind == "reject":
                        log.warning("server rejected a message: %s", message.reject.reason)
                    elif kind == "run_complete":
                        log.info("run complete after %d rounds", message.run_complete.rounds)
                        return True
                    watch.seen()
            finally:
                stop.set()
                outbox.put(None)
        return False


class _ServerWatch:
    """Cancels the stream when the server has sent nothing (not even a heartbeat) for
    ``silent_s`` while the client waits for it: a silent network partition, after which the
    client reconnects. Time spent working on a task does not count."""

    def __init__(self, stream: grpc.Future, stop: threading.Event) -> None:
        self.stream = stream
        self.stop = stop
        self.busy = False
        self.last = time.monotonic()

    def seen(self) -> None:
        self.last = time.monotonic()
        self.busy = False

    def start(self, silent_s: float) -> None:
        def watch() -> None:
            while not self.stop.wait(silent_s / 4):
                if not self.busy and time.monotonic() - self.last > silent_s:
                    log.warning(
                        "no message from the server for %.1f s: reconnecting",
                        time.monotonic() - self.last,
                    )
                    self.stream.cancel()
                    return

        self.seen()
        threading.Thread(target=watch, daemon=True, name="server-watch").start()


def _start_heartbeats(outbox: Outbox, stop: threading.Event, interval_s: float) -> None:
    def beat() -> None:
        while not stop.wait(interval_s):
            outbox.put(pb.ClientMessage(heartbeat=pb.Heartbeat()))

    threading.Thread(target=beat, daemon=True, name="heartbeat").start()


class _Worker:
    """Holds the client app, data and state store of one connection and answers tasks."""

    def __init__(
        self, outbox: Outbox, site: LocalSite, state_dir: Path | None, identity: Identity | None
    ) -> None:
        self.outbox = outbox
        self.identity = identity
        self.site = site
        self.state_dir = state_dir
        self.run_id = ""
        self.reassembler: Reassembler | None = None

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
            build_algorithm(self.config, [n for n, _ in joined.model.named_parameters()]),
            joined.model,
            StageChain(build_stages(self.config, population=None)),
            build_sample_dp(self.config),
            secure_client(self.config, self.identity),
            build_loop(joined.workload),
            SiteEvaluation.of(joined.workload),
        )
        architecture = fingerprint(joined.model, joined.workload.schema)
        root = self.state_dir or DEFAULT_STATE_ROOT / _safe_name(w.client_name)
        disk = DiskStateStore(root / _safe_name(self.run_id))
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
        self, round_number: int, stage: str, task_id: bytes, encoded: bytes, record: Record
    ) -> Iterator[pb.ClientMessage]:
        for piece in split_payload(encoded):
            header = piece.index == 0  # the server reads the header from the first chunk
            yield pb.ClientMessage(
                envelope=self._envelope(round_number),
                reply=pb.ReplyChunk(
                    stage=stage,
                    num_examples=record.num_examples if header else 0,
                    scalars=record.scalars if header else {},
                    metrics=record.metrics if header else {},
                    chunk=piece,
                    task_id=task_id,
                ),
            )

    def task(self, message: pb.ServerMessage) -> int:
        """Consume one chunk; when the task is complete, answer it. Returns 1 for an
        answered fit task, else 0."""
        if message.envelope.run_id != self.run_id:
            log.warning("ignoring a task for another run")
            return 0
        body = message.task
        if body.chunk.index == 0:
            self.reassembler = Reassembler(max_bytes=1 << 40)
            self.receive_started = time.time()
        if self.reassembler is None:
            log.warning("ignoring a task chunk without its transfer's start")
            return 0
        payload = self.reassembler.add(body.chunk)
        if payload is None:
            return 0
        self.reassembler = None  # release the chunks
        # The reply (or failure report) echoes the task's id: the server takes no other.
        round_number, stage, task_id = int(message.envelope.round), body.stage, body.task_id
        received = time.time()
        log.info(
            "round %d: received a %s task (%.1f MB, %d array bytes) in %.3f s (%.6f-%.6f)",
            round_number,
            stage,
            len(payload) / 1e6,
            array_bytes(payload),
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
                decode_params(payload),
                dict(body.scalars),
            )
            del payload
            started = time.perf_counter()
            state = self.app.stored_state(task, self.store)
            record, new_state = self.app.handle(task, self.data, state)
            if new_state is not None:  # saved before the reply: a retried round reads it back
                self.store.put(self.client_id, new_state, round_number)
            log.info(
                "round %d: %s done in %.4f s", round_number, stage, time.perf_counter() - started
            )
        except Exception as exc:
            log.exception("the %s task of round %d failed", stage, round_number)
            self.outbox.put(
                pb.ClientMessage(
                    envelope=self._envelope(round_number),
                    failure=pb.ClientFailureReport(
                        error=f"{type(exc).__name__}: {exc}", task_id=task_id
                    ),
                )
            )
            return 0
        encoded = encode_params(record.arrays)
        log.info(
            "round %d: sending a %s reply (%d bytes, %d array bytes)",
            round_number,
            stage,
            len(encoded),
            array_bytes(encoded),
        )
        self.outbox.put(self._reply_messages(round_number, stage, task_id, encoded, record))
        return 1 if stage == FIT else 0


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
