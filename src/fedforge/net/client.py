"""``fedforge client``: connect, authenticate, answer pushed tasks, reconnect after failures.

A task is answered (by :class:`~fedforge.net.worker.SiteWorker`) with the same
:class:`~fedforge.runtime.client_app.ClientApp` the simulation runs, with the same seed, so a
deployment computes what a simulation computes. Client state (e.g. SCAFFOLD's control variate)
lives in a :class:`~fedforge.runtime.client_state.DiskStateStore` under the client's state
directory, one subdirectory per run, and survives a client restart.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedforge.core.errors import FedforgeError
from fedforge.net.keys import ClientCredentials
from fedforge.net.peer import peer_text
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.proto import fedforge_pb2_grpc as pb_grpc
from fedforge.net.server import grpc_options
from fedforge.net.service import PROTOCOL_VERSION
from fedforge.net.site import LocalSite, ready
from fedforge.net.worker import Outbox, SiteWorker
from fedforge.secagg.session import Identity

log = logging.getLogger("fedforge")

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
# A server that closes the connection once its TLS handshake is under way ("Socket closed",
# not "Handshake read failed": that is a relay with nothing behind it), this many times in a
# row and never once welcoming the client, refuses it in the TLS handshake (a server that is
# down refuses the connection instead).
CLOSED_BEFORE_WELCOME = 4
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
        closed = 0  # connections in a row the server closed before welcoming the client
        self._trained = 0
        self.site = ready(self.site)  # a workload's data is read and checked before connecting
        while True:
            self._joined = False
            try:
                if self._session():
                    return self._trained
                attempt = 1 if self._joined else attempt + 1
            except grpc.RpcError as exc:
                code, details = exc.code(), peer_text(str(exc.details()))
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
                refused = "Socket closed" in details and "Handshake read failed" not in details
                closed = closed + 1 if refused and not self._joined else 0
                if closed >= CLOSED_BEFORE_WELCOME:
                    raise FatalClientError(self._closed_explanation(closed)) from None
                log.warning("connection lost (%s: %s)", code.name, details)
                # After a session that was established, back off from the start again.
                attempt = 1 if self._joined else attempt + 1
            if self.max_attempts is not None and attempt > self.max_attempts:
                raise FedforgeError(f"gave up after {attempt} failed connection attempts")
            delay = self.backoff.delay(attempt)
            log.info("reconnecting in %.1f s", delay)
            time.sleep(delay)

    def _closed_explanation(self, times: int) -> str:
        if self.credentials is None:
            return (
                f"the server closed the connection {times} times before answering: it "
                "probably requires TLS; pass this site's --credentials"
            )
        return (
            f"the server closed the connection {times} times before answering: it refuses "
            "this client's certificate in the TLS handshake (revoked and replaced, issued by "
            "another CA, or expired on the server's clock); ask the coordinator"
        )

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
                worker = SiteWorker(outbox, self.site, self.state_dir, self._identity())
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
                        log.warning(
                            "server rejected a message: %s", peer_text(message.reject.reason)
                        )
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
