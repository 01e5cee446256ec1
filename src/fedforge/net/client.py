"""``fedforge client``: connect, authenticate, train on pushed work, reconnect after failures."""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from fedforge.config import RunConfig
from fedforge.core.errors import FedforgeError
from fedforge.data.datasets import ArrayDataset
from fedforge.data.federated import FederatedDataset
from fedforge.experiment import build_algorithm, build_dataset, build_model
from fedforge.net.codec import Reassembler, decode_params, encode_params, split_payload
from fedforge.net.keys import ClientCredentials
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.proto import fedforge_pb2_grpc as pb_grpc
from fedforge.net.server import grpc_options
from fedforge.net.service import PROTOCOL_VERSION
from fedforge.train.torch_model import TorchModel

log = logging.getLogger("fedforge")

# The client's local data, given the run's built-in federated dataset and the client's id.
DataLoader = Callable[[FederatedDataset, int], ArrayDataset]
Outbox = queue.Queue[pb.ClientMessage | Iterator[pb.ClientMessage] | None]
FATAL = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
}


def builtin_partition(data: FederatedDataset, client_id: int) -> ArrayDataset:
    """The client's share of the run's built-in dataset (for demos and tests)."""
    if client_id >= data.num_clients:
        raise FedforgeError(f"client id {client_id} has no partition ({data.num_clients} exist)")
    return data.client(client_id)


def npz_loader(path: str) -> DataLoader:
    """Local data from an ``.npz`` with arrays ``x`` (float32) and ``y`` (int64)."""

    def load(data: FederatedDataset, client_id: int) -> ArrayDataset:
        with np.load(path, allow_pickle=False) as f:
            return ArrayDataset(f["x"].astype(np.float32), f["y"].astype(np.int64))

    return load


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
        data_loader: DataLoader = builtin_partition,
        *,
        name: str = "",
        max_message_mb: int = 16,
        backoff: Backoff | None = None,
        max_attempts: int | None = None,
    ) -> None:
        self.address = address
        self.credentials = credentials
        self.data_loader = data_loader
        self.name = name
        self.max_message_mb = max_message_mb
        self.backoff = backoff or Backoff()
        self.max_attempts = max_attempts

    def run(self) -> int:
        """Serve the run until it completes; return the number of rounds trained in."""
        attempt, trained = 0, 0
        while True:
            try:
                done, count = self._session()
                trained += count
                if done:
                    return trained
                attempt = 0 if count else attempt + 1
            except grpc.RpcError as exc:
                code = exc.code()
                if code in FATAL or code == grpc.StatusCode.ALREADY_EXISTS:
                    raise FatalClientError(
                        f"server refused the client: {code.name}: {exc.details()}"
                    ) from None
                log.warning("connection lost (%s: %s)", code.name, exc.details())
                attempt += 1
            if self.max_attempts is not None and attempt > self.max_attempts:
                raise FedforgeError(f"gave up after {attempt} failed connection attempts")
            delay = self.backoff.delay(attempt)
            log.info("reconnecting in %.1f s", delay)
            time.sleep(delay)

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

    def _session(self) -> tuple[bool, int]:
        """One connection: returns (run complete, rounds trained in this connection)."""
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
        trained = 0
        with self._channel() as channel:
            stream = pb_grpc.FederationStub(channel).Connect(requests())  # type: ignore[no-untyped-call]
            try:
                worker = _Worker(outbox, self.data_loader)
                for message in stream:
                    kind = message.WhichOneof("body")
                    if kind == "welcome":
                        worker.welcome(message)
                        _start_heartbeats(outbox, stop, message.welcome.heartbeat_ms / 1000)
                    elif kind == "task":
                        trained += worker.task(message)
                    elif kind == "reject":
                        log.warning("server rejected a message: %s", message.reject.reason)
                    elif kind == "run_complete":
                        log.info("run complete after %d rounds", message.run_complete.rounds)
                        return True, trained
            finally:
                stop.set()
                outbox.put(None)
        return False, trained


def _start_heartbeats(outbox: Outbox, stop: threading.Event, interval_s: float) -> None:
    def beat() -> None:
        while not stop.wait(interval_s):
            outbox.put(pb.ClientMessage(heartbeat=pb.Heartbeat()))

    threading.Thread(target=beat, daemon=True, name="heartbeat").start()


class _Worker:
    """Holds the model and data of one connection and answers fit tasks."""

    def __init__(self, outbox: Outbox, loader: DataLoader) -> None:
        self.outbox = outbox
        self.loader = loader
        self.run_id = ""
        self.reassembler: Reassembler | None = None

    def welcome(self, message: pb.ServerMessage) -> None:
        w = message.welcome
        self.run_id = message.envelope.run_id
        self.client_id = int(w.client_id)
        self.config = RunConfig.model_validate(tomllib.loads(w.config_toml))
        # One small model per process: extra intra-op threads only oversubscribe the cores.
        torch.set_num_threads(self.config.runtime.threads or 1)
        federated = build_dataset(self.config)  # built once: model shapes and built-in data
        self.data = self.loader(federated, self.client_id)
        self.model = TorchModel(build_model(self.config, federated))
        self.algorithm = build_algorithm(self.config)
        log.info(
            "joined run %s as %s (id %d) with %d examples",
            self.run_id,
            w.client_name,
            self.client_id,
            len(self.data),
        )
        # Declare the data size: the server caps the sample counts it accepts from us by it.
        self.outbox.put(
            pb.ClientMessage(
                hello=pb.Hello(protocol_version=PROTOCOL_VERSION, num_examples=len(self.data))
            )
        )

    def _envelope(self, round_number: int) -> pb.Envelope:
        return pb.Envelope(run_id=self.run_id, round=round_number, nonce=os.urandom(16))

    def _result_messages(
        self, round_number: int, encoded: bytes, num_examples: int, train_loss: float
    ) -> Iterator[pb.ClientMessage]:
        for piece in split_payload(encoded):
            yield pb.ClientMessage(
                envelope=self._envelope(round_number),
                result=pb.ClientResultChunk(
                    chunk=piece, num_examples=num_examples, train_loss=train_loss
                ),
            )

    def task(self, message: pb.ServerMessage) -> int:
        """Consume one chunk; when the model is complete, train and send the result."""
        if message.envelope.run_id != self.run_id:
            log.warning("ignoring a task for another run")
            return 0
        chunk = message.task.chunk
        if chunk.index == 0:
            self.reassembler = Reassembler(max_bytes=1 << 40)
            self.receive_started = time.time()
        assert self.reassembler is not None
        payload = self.reassembler.add(chunk)
        if payload is None:
            return 0
        self.reassembler = None  # release the chunks
        round_number = message.envelope.round
        received = time.time()
        log.info(
            "round %d: received %.1f MB model in %.3f s (%.6f-%.6f)",
            round_number,
            len(payload) / 1e6,
            received - self.receive_started,
            self.receive_started,
            received,
        )
        try:
            params = decode_params(payload)
            del payload
            rng = np.random.default_rng(message.task.client_seed)
            started = time.perf_counter()
            result = self.algorithm.client_update(
                self.client_id, self.model, params, self.data, rng
            )
            log.info("round %d: trained in %.4f s", round_number, time.perf_counter() - started)
        except Exception as exc:
            log.exception("local training failed")
            self.outbox.put(
                pb.ClientMessage(
                    envelope=self._envelope(round_number),
                    failure=pb.ClientFailureReport(error=str(exc)),
                )
            )
            return 0
        num_examples, train_loss = result.num_examples, result.train_loss
        encoded = encode_params(result.update)
        del params, result  # only the encoded bytes are needed from here
        self.outbox.put(self._result_messages(round_number, encoded, num_examples, train_loss))
        return 1
