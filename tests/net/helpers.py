"""Real server and client processes on 127.0.0.1 for the deployment tests."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np

from fedforge.core.records import FIT
from fedforge.net.codec import Reassembler, decode_params
from fedforge.net.keys import add_client, init_keys
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.proto import fedforge_pb2_grpc as pb_grpc
from fedforge.net.service import PROTOCOL_VERSION
from fedforge.report.history import RoundRecord
from fedforge.runtime.checkpoint import Checkpoint, CheckpointStore

# How much longer than on a quiet machine the tests wait for a process or an event before
# they fail (on a loaded machine a process can take a minute to import torch): generous
# deadlines cost nothing when things work.
PATIENCE = 3

BASE_CONFIG = """
seed = 3
[data]
dataset = "digits"
[partition]
scheme = "dirichlet"
num_clients = {num_clients}
alpha = 1.0
[model]
name = "mlp"
hidden = [32]
[client]
epochs = {epochs}
batch_size = 16
lr = 0.1
[server]
rounds = {rounds}
{per_round}
{server_extra}
[deploy]
address = "127.0.0.1:{port}"
keys = "{keys}"
state_dir = "{state}"
min_clients = {min_clients}
round_timeout_s = {timeout}
heartbeat_s = {heartbeat}
min_completed = {min_completed}
max_retries = {max_retries}
linger_s = {linger}
{deploy_extra}
{extra}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_keys(root: Path, names: list[str]) -> Path:
    keys = root / "keys"
    init_keys(keys, ["localhost", "127.0.0.1"])
    for name in names:
        add_client(keys, name, keys / name)
    return keys


def write_config(
    root: Path,
    keys: Path,
    port: int,
    state: str = "state",
    *,
    rounds: int = 3,
    clients: int = 3,
    per_round: int | None = None,
    uniform: bool = True,
    min_clients: int | None = None,
    epochs: int = 1,
    timeout: float = 30,
    min_completed: int = 1,
    max_retries: int = 3,
    linger: float = 0,
    heartbeat: float = 3.0,
    deploy_extra: str = "",
    server_extra: str = "",
    extra: str = "",
) -> Path:
    """A run configuration; ``server_extra`` and ``deploy_extra`` add keys to ``[server]`` and
    ``[deploy]``, and ``extra`` appends TOML sections (e.g. ``[algorithm]``). ``uniform``
    False: the rounds draw no fixed number of clients (Poisson sampling, FedBuff), so
    ``clients_per_round`` is not written."""
    path = root / f"{state}.toml"
    path.write_text(
        BASE_CONFIG.format(
            num_clients=clients,
            epochs=epochs,
            rounds=rounds,
            per_round=f"clients_per_round = {per_round or clients}" if uniform else "",
            port=port,
            keys=keys,
            state=root / state,
            min_clients=min_clients or clients,
            timeout=timeout,
            min_completed=min_completed,
            max_retries=max_retries,
            linger=linger,
            heartbeat=heartbeat,
            deploy_extra=deploy_extra,
            server_extra=server_extra,
            extra=extra,
        )
    )
    return path


def fedforge(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A ``fedforge`` process run in the log's directory, so a client's default state
    directory (``client-state/<name>``) lands in the test's temporary directory."""
    out = open(log, "ab")  # noqa: SIM115 (kept open for the child's lifetime)
    return subprocess.Popen(
        [sys.executable, "-m", "fedforge.cli", *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=log.parent,
    )


def start_server(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return fedforge(["server", str(config)], log)


def start_client(port: int, credentials: Path, log: Path) -> subprocess.Popen[bytes]:
    return fedforge(
        ["client", "--server", f"127.0.0.1:{port}", "--credentials", str(credentials)], log
    )


def client_state_dir(root: Path, name: str) -> Path:
    """Where a client started by :func:`start_client` in ``root`` keeps its state."""
    return root / "client-state" / name


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def wait_for_run(
    server: subprocess.Popen[bytes], sites: subprocess.Popen[bytes], timeout: float
) -> int:
    """The server's exit code once it ends; a sites process that fails first ends the wait
    at once (the server would wait for its clients until ``timeout``)."""
    wait_for(
        lambda: server.poll() is not None or sites.poll() not in (None, 0),
        timeout,
        "the server to end",
    )
    assert server.poll() is not None, f"the sites exited {sites.returncode} before the server"
    return server.returncode


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def wait_for_port(port: int, timeout: float = 60 * PATIENCE) -> None:
    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(listening, timeout, f"a server on port {port}")


def channel(port: int, ca: bytes, key: bytes | None, cert: bytes | None) -> grpc.Channel:
    tls = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", tls)


def base_architecture(hidden: tuple[int, ...] = (32,)) -> list[str]:
    """The architecture fingerprint of BASE_CONFIG's model (the 64-32-10 MLP on digits, or
    the given hidden widths), which a client declares with its data sizes."""
    from fedforge.train.models import mlp
    from fedforge.workload.fingerprint import fingerprint

    return list(fingerprint(mlp(64, 10, list(hidden)), {"data.dataset": "digits"}).entries)


class CraftedClient:
    """Speaks the protocol by hand so the test can send what a real client never would."""

    def __init__(
        self, port: int, creds: Path, declared: int = 0, architecture: list[str] | None = None
    ) -> None:
        self.architecture = architecture if architecture is not None else base_architecture()
        self.channel = channel(
            port,
            (creds / "ca.crt").read_bytes(),
            (creds / "client.key").read_bytes(),
            (creds / "client.crt").read_bytes(),
        )
        self.declared = declared
        self.out: queue.Queue[pb.ClientMessage | None] = queue.Queue()
        self.out.put(
            pb.ClientMessage(
                hello=pb.Hello(protocol_version=PROTOCOL_VERSION, num_examples=declared)
            )
        )
        self.stream = pb_grpc.FederationStub(self.channel).Connect(self._requests())
        self.rejects: list[str] = []
        self.done = threading.Event()
        self.muted = False  # stops the heartbeats
        self.heartbeat()
        self.ended_by: grpc.StatusCode | None = None
        self.saw_run_complete = False
        self.run_id = ""
        self.task_id = b""
        self.welcome_config = ""  # the configuration the server sent this site

    def _requests(self) -> Iterator[pb.ClientMessage]:
        while (m := self.out.get()) is not None:
            yield m

    def first_error(self) -> grpc.RpcError:
        try:
            for _ in self.stream:
                pass
        except grpc.RpcError as exc:
            return exc
        raise AssertionError("the server accepted the connection")

    def next_task(self, keep: bool = True) -> tuple[int, dict[str, np.ndarray]]:
        """The round and the shared arrays of the next task (a fit task: the model);
        ``keep=False``: its chunks are read and dropped (no arrays)."""
        assembler = Reassembler(1 << 30)
        for message in self.stream:
            kind = message.WhichOneof("body")
            if kind == "welcome":
                self.run_id = message.envelope.run_id
                self.welcome_config = message.welcome.config_toml
                # Declare the data sizes and the model, as a real client does once welcomed.
                hello = pb.Hello(
                    protocol_version=PROTOCOL_VERSION,
                    num_examples=self.declared,
                    architecture=self.architecture,
                )
                self.out.put(pb.ClientMessage(hello=hello))
            elif kind == "task":
                assert message.task.stage == FIT and len(message.task.seed) == 16
                self.task_id = message.task.task_id
                chunk = message.task.chunk
                if not keep:
                    if chunk.index == chunk.count - 1:
                        return message.envelope.round, {}
                    continue
                payload = assembler.add(chunk)
                if payload is not None:
                    return message.envelope.round, decode_params(payload)
        raise AssertionError("stream ended before a task")

    def envelope(self, round_number: int, nonce: bytes | None = None) -> pb.Envelope:
        return pb.Envelope(run_id=self.run_id, round=round_number, nonce=nonce or os.urandom(16))

    def send_result(
        self, round_number: int, chunks: list[pb.Chunk], n: int, repeat_first: bool = False
    ) -> None:
        for i, chunk in enumerate(chunks):
            msg = pb.ClientMessage(
                envelope=self.envelope(round_number),
                reply=pb.ReplyChunk(
                    stage=FIT,
                    num_examples=n,
                    metrics={"train_loss": 0.5},
                    chunk=chunk,
                    task_id=self.task_id,
                ),
            )
            self.out.put(msg)
            if repeat_first and i == 0:
                self.out.put(msg)  # a replay: identical message, identical nonce

    def heartbeat(self, every_s: float = 0.3) -> None:
        """Send heartbeats until the stream ends: alive, whether or not it answers."""

        def beat() -> None:
            while not self.done.wait(every_s) and not self.muted:
                self.out.put(pb.ClientMessage(heartbeat=pb.Heartbeat()))

        threading.Thread(target=beat, daemon=True).start()

    def drain(self) -> None:
        try:
            for message in self.stream:
                if message.WhichOneof("body") == "reject":
                    self.rejects.append(message.reject.reason)
                if message.WhichOneof("body") == "run_complete":
                    self.saw_run_complete = True
                    break
        except grpc.RpcError as exc:
            self.ended_by = exc.code()
        self.done.set()
        self.out.put(None)
        self.channel.close()


class FreezableProxy:
    """A TCP relay on 127.0.0.1 to ``upstream_port`` that can stop forwarding in both
    directions while keeping every connection open: a silent network partition."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.flowing = threading.Event()
        self.flowing.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            self.flowing.wait()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:  # the server is not up (yet): as if the network refused
                downstream.close()
                continue
            for src, dst in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            self.flowing.wait()
            try:
                data = src.recv(1 << 16)
                self.flowing.wait()  # held until the partition heals, as TCP would retransmit it
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            s.close()

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self.listener.close()


def stored_run(state: Path) -> Checkpoint:
    """The run stored in the state directory ``state`` (it must hold one)."""
    store = CheckpointStore(state)
    try:
        checkpoint = store.load()
    finally:
        store.close()
    assert checkpoint is not None
    return checkpoint


def log_has(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text(errors="replace")


def stored_history(state: Path) -> list[RoundRecord]:
    """The round records a server checkpointed in its state directory."""
    return list(stored_run(state).history)
