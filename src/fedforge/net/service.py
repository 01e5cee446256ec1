"""The gRPC service: authenticates a client, then streams its session both ways."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc

from fedforge.core.records import ClientFailure, Record
from fedforge.net.codec import ProtocolError
from fedforge.net.hub import Hub, IdentityInUse, ReplyHeader, Session
from fedforge.net.keys import ServerCredentials
from fedforge.net.peer import LogLimiter, peer_host, peer_text
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.proto import fedforge_pb2_grpc as pb_grpc
from fedforge.net.registry import certificate_identity
from fedforge.workload.fingerprint import Fingerprint, received

log = logging.getLogger("fedforge")
PROTOCOL_VERSION = 5  # 3: tasks carry an id that replies and failure reports echo;
# 4: secure aggregation's share digests and refused shares; 5: the Hello after the Welcome
# carries the architecture fingerprint
# A session that sends this many invalid messages within INVALID_WINDOW_S is disconnected.
INVALID_LIMIT = 32
INVALID_WINDOW_S = 10.0
MAX_REJECT_REPLIES = 4  # Reject messages sent per session; later ones are dropped silently
MAX_PENDING_HELLOS = 2  # streams of one identity that may wait for their Hello at once
LOGGED_REPLY_BYTES = 1 << 20  # a reply this large is logged with its transfer time
REFUSAL_LOG_S = 60.0  # refused connections: the first of an address is logged, then one a minute


class FederationService(pb_grpc.FederationServicer):
    """One ``Connect`` stream per client; the server pushes, the client answers."""

    def __init__(
        self,
        hub: Hub,
        credentials: ServerCredentials | None,
        client_ids: dict[str, int],
        welcome_config: str,
        heartbeat_s: float,
        hello_timeout_s: float = 10.0,
        architecture: Fingerprint | None = None,
    ) -> None:
        self.hub = hub
        self.architecture = architecture  # the server's model fingerprint (None: unchecked)
        self.credentials = credentials
        self.client_ids = client_ids
        self.welcome_config = welcome_config
        self.heartbeat_s = heartbeat_s
        self.hello_timeout_s = hello_timeout_s
        self._pending: dict[str, int] = {}  # identity -> streams waiting for their Hello
        self._pending_lock = threading.Lock()
        self._refusals = LogLimiter(REFUSAL_LOG_S)

    def _refuse(
        self, context: grpc.ServicerContext, code: grpc.StatusCode, reason: str, what: str
    ) -> None:
        """Abort the stream with ``code`` and ``reason``; log ``what`` (a refused connection)
        at most once a minute per peer address and kind, with the count of those not logged."""
        peer = context.peer()
        unlogged = self._refusals.allow((peer_host(peer), code))
        if unlogged is not None:
            more = f" ({unlogged} more from {peer_host(peer)} since the last such line)"
            log.warning("%s from %s%s", what, peer, more if unlogged else "")
        context.abort(code, reason)

    def _authenticate(self, context: grpc.ServicerContext) -> str:
        """The client's registered, unrevoked name from its verified certificate, checked
        before the stream reads anything (so a refused certificate holds nothing)."""
        assert self.credentials is not None
        pem = context.auth_context().get("x509_pem_cert")
        if not pem:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        name, serial = certificate_identity(pem[0])
        if serial in self.credentials.revoked_now():
            self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate of {name!r} is revoked",
                f"refused revoked certificate of {name!r}",
            )
        if self.credentials.registry.serial(name) != serial or name not in self.client_ids:
            self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{name!r} is not a registered client",
                f"refused unregistered client {name!r}",
            )
        return name

    def _read_hello(
        self, request_iterator: Iterator[pb.ClientMessage], context: grpc.ServicerContext, who: str
    ) -> pb.ClientMessage | None:
        """The stream's first message, or None when it sends none within the hello timeout
        (the stream is then cancelled: a silent stream holds a server thread for at most
        that long, and one identity may hold at most MAX_PENDING_HELLOS of them)."""
        with self._pending_lock:
            crowded = self._pending.get(who, 0) >= MAX_PENDING_HELLOS
            if not crowded:
                self._pending[who] = self._pending.get(who, 0) + 1
        if crowded:
            self._refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many connections await a Hello",
                f"refused a stream of {who}: too many await a Hello",
            )
        timer = threading.Timer(self.hello_timeout_s, context.cancel)
        timer.daemon = True
        timer.start()
        try:
            return next(request_iterator, None)
        except grpc.RpcError:
            return None
        finally:
            timer.cancel()
            with self._pending_lock:
                self._pending[who] -= 1
                if not self._pending[who]:
                    del self._pending[who]

    def Connect(
        self, request_iterator: Iterator[pb.ClientMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.ServerMessage]:
        authenticated = self._authenticate(context) if self.credentials is not None else None
        first = self._read_hello(request_iterator, context, authenticated or context.peer())
        if first is None:
            self._refuse(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "no Hello in time",
                f"closed a stream ({authenticated or 'unauthenticated'}) that sent no Hello "
                f"within {self.hello_timeout_s:g} s",
            )
            return  # abort raises; this line only informs the type checker
        if first.WhichOneof("body") != "hello":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Hello")
        if first.hello.protocol_version != PROTOCOL_VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {first.hello.protocol_version} unsupported",
            )
        name = authenticated or first.hello.name  # insecure: the Hello's name
        if name not in self.client_ids:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"unknown client {name!r}")
        if self.hub.finished is not None:
            log.info("client %s connected after the run completed: told so", name)
            yield self.hub.complete_message()
            return
        try:
            session = self.hub.open(
                name, self.client_ids[name], first.hello.num_examples, context.peer()
            )
        except IdentityInUse as exc:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
            return  # abort raises; this line only informs the type checker
        session.on_close.append(context.cancel)  # a closed session ends its stream
        log.info("client %s (id %d) connected from %s", name, session.client_id, context.peer())
        reader = threading.Thread(
            target=self._read, args=(request_iterator, session), daemon=True, name=f"read-{name}"
        )
        reader.start()
        context.add_callback(lambda: self.hub.close(session))
        welcome = pb.Welcome(
            client_name=name,
            client_id=session.client_id,
            config_toml=self.welcome_config,
            heartbeat_ms=int(self.heartbeat_s * 1000),
        )
        yield pb.ServerMessage(envelope=self.hub.envelope(), welcome=welcome)
        yield from session.drain(self.heartbeat_s, pb.ServerMessage(heartbeat=pb.Heartbeat()))
        if session.refusal is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, session.refusal)

    def _read(self, requests: Iterator[pb.ClientMessage], session: Session) -> None:
        try:
            for message in requests:
                if session.closed:
                    break
                session.seen()
                self._handle(session, message)
        except grpc.RpcError:
            pass  # the stream broke; the close callback reports any task in flight
        except Exception:
            log.exception("unexpected error reading from client %s", session.name)
        finally:
            self.hub.close(session)

    def _architecture_problem(self, session: Session, hello: pb.Hello) -> str | None:
        """Why the client's model is not the server's (None: the same architecture)."""
        if self.architecture is None:
            return None
        theirs = received(list(hello.architecture))
        if theirs is None:
            return "the client sent no valid architecture fingerprint"
        diff = self.architecture.difference(theirs, "the server", session.name)
        if diff is None:
            return None
        return (
            f"architecture mismatch: the server's model is {self.architecture.digest}, "
            f"{session.name}'s is {theirs.digest}; first difference: {diff}"
        )

    def _invalid(self, session: Session, reason: str) -> bool:
        """Count an invalid message; log the session's first one; disconnect a session that
        sends INVALID_LIMIT of them within INVALID_WINDOW_S (logged once). True if the
        session may still be answered."""
        now = time.monotonic()
        with session.lock:
            session.invalid_times.append(now)
            while now - session.invalid_times[0] > INVALID_WINDOW_S:
                session.invalid_times.popleft()
            session.invalid += 1
            count, burst = session.invalid, len(session.invalid_times)
        if count == 1:
            log.warning("client %s: %s", session.name, reason)
        else:
            log.debug("client %s: %s", session.name, reason)
        if burst >= INVALID_LIMIT and not session.closed:
            log.warning(
                "client %s sent %d invalid messages within %g s: disconnected (last: %s)",
                session.name,
                burst,
                INVALID_WINDOW_S,
                reason,
            )
            self.hub.close(session, f"disconnected after {burst} invalid messages")
            return False
        return count <= MAX_REJECT_REPLIES

    def _reject(self, session: Session, reason: str, *, fail_task: bool) -> None:
        if self._invalid(session, reason):
            self.hub.send(
                session,
                pb.ServerMessage(envelope=self.hub.envelope(), reject=pb.Reject(reason=reason)),
            )
        if not fail_task:
            return
        with session.lock:
            task, session.task = session.task, None
        if task is not None:
            task.receiver.discard()
            self.hub.uploads.released()
            self.hub.results.put(
                (task.task_id, ClientFailure(session.client_id, reason, rejected=True))
            )

    def _handle(self, session: Session, message: pb.ClientMessage) -> None:
        kind = message.WhichOneof("body")
        if kind == "heartbeat":
            return
        if kind == "hello":  # the data-size declarations, accepted once per session
            hello = message.hello
            problem = None if session.ready else self._architecture_problem(session, hello)
            if problem is not None:
                log.warning("refused client %s: %s", session.name, problem)
                self.hub.refuse(session, problem)
                return
            if session.declared_examples <= 0 < hello.num_examples:
                session.declared_examples = int(hello.num_examples)
            if session.declared_holdout <= 0 < hello.holdout_examples:
                session.declared_holdout = int(hello.holdout_examples)
            self.hub.mark_ready(session)
            return
        env = message.envelope
        if env.run_id != self.hub.run_id:
            self._reject(session, f"message for run {env.run_id!r} rejected", fail_task=False)
            return
        if kind == "reply":
            task_id = message.reply.task_id
        elif kind == "failure":
            task_id = message.failure.task_id
        else:
            task_id = b""
        task = session.task
        if kind in ("reply", "failure") and (task is None or task_id != task.task_id):
            # A late answer to an earlier task (an exchange or attempt whose deadline passed):
            # not this task's, so neither a reply to it nor a protocol violation.
            self._drop_stale(session, kind, task_id)
            return
        if task is None or env.round != task.round:
            self._reject(
                session,
                f"message for round {env.round} rejected: no task in progress",
                fail_task=False,
            )
            return
        if not self.hub.fresh_nonce(env.nonce):
            self._reject(session, "replayed or malformed nonce rejected", fail_task=False)
            return
        if kind == "failure":
            with session.lock:
                if session.task is not task:
                    return
                session.task = None
            # The client's own words: escaped, so they cannot forge a line of the server's log.
            error = peer_text(message.failure.error, 2000)
            self.hub.results.put((task.task_id, ClientFailure(session.client_id, error)))
            return
        if kind != "reply":
            self._reject(session, f"unexpected message {kind!r}", fail_task=True)
            return
        reply = message.reply
        if reply.stage != task.stage:
            self._reject(
                session,
                f"{reply.stage[:40]!r} reply rejected: the task is {task.stage!r}",
                fail_task=True,
            )
            return
        if task.header is None and not self.hub.uploads.acquire(session, task):
            return  # its task ended while the reply waited for a slot
        try:
            arrays = task.receiver.add(reply.chunk)
            if task.header is None:  # the transfer's first chunk (the receiver checked)
                task.reply_started = time.time()
                task.header = ReplyHeader(
                    int(reply.num_examples), dict(reply.scalars), dict(reply.metrics)
                )
            if arrays is None:
                return
        except ProtocolError as exc:
            self._reject(session, f"reply rejected: {exc}", fail_task=True)
            return
        with session.lock:
            if session.task is not task:
                return
            session.task = None
        self.hub.uploads.released()
        header = task.header
        ended = time.time()
        size = task.receiver.received
        log.log(
            logging.INFO if size >= LOGGED_REPLY_BYTES else logging.DEBUG,
            "round %d: received a %s reply of %s (%.1f MB) in %.3f s (%.6f-%.6f)",
            task.round,
            task.stage,
            session.name,
            size / 1e6,
            ended - task.reply_started,
            task.reply_started,
            ended,
        )
        record = Record(
            session.client_id,
            header.num_examples,
            arrays,
            scalars=header.scalars,
            metrics=header.metrics,
        )
        self.hub.results.put((task.task_id, record))

    def _drop_stale(self, session: Session, kind: str, task_id: bytes) -> None:
        """Drop a reply chunk or failure report for a task that is not the client's current
        one. The chunks of one late transfer pass silently; the session's first late task is
        logged, and every further one counts as an invalid message (so a client sending
        chunks with ever new task ids is disconnected, not logged line by line)."""
        with session.lock:
            if session.stale_task_id == task_id:
                return
            session.stale_task_id = task_id
            session.stale_tasks += 1
            first = session.stale_tasks == 1
        if not first:
            self._invalid(session, f"a late {kind} for task {task_id[:8].hex() or '(no id)'}")
            return
        log.warning(
            "client %s: dropped a late %s for task %s, which is not its current task",
            session.name,
            kind,
            task_id[:8].hex() or "(no id)",
        )
