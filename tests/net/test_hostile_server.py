"""A site against a compromised or unreachable server, and with unusable credentials: real
client processes, a hand-made TLS server in the test process."""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from fedforge.config import load_config
from fedforge.core.records import FIT
from fedforge.net.deployment import site_config_toml
from fedforge.net.keys import ServerCredentials, add_client
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.proto import fedforge_pb2_grpc as pb_grpc
from tests.net.helpers import (
    PATIENCE,
    fedforge,
    free_port,
    make_keys,
    start_client,
    stop_all,
    write_config,
)

pytestmark = pytest.mark.timeout(PATIENCE * 300)
HUGE = 2 << 30  # what the compromised server announces: 2 GiB


class HostileServer(pb_grpc.FederationServicer):
    """Welcomes a client with a valid configuration, then announces a 2 GiB task; once the
    client reports its failure, says the run is complete."""

    def __init__(self, config_toml: str) -> None:
        self.config_toml = config_toml
        self.reports: list[str] = []  # the failure reports received
        self.reported = threading.Event()

    def _read(self, requests: Iterator[pb.ClientMessage]) -> None:
        try:
            for message in requests:
                if message.WhichOneof("body") == "failure":
                    self.reports.append(message.failure.error)
                    self.reported.set()
        except grpc.RpcError:
            pass

    def Connect(
        self, request_iterator: Iterator[pb.ClientMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.ServerMessage]:
        next(request_iterator)  # the Hello
        threading.Thread(target=self._read, args=(request_iterator,), daemon=True).start()
        envelope = pb.Envelope(run_id="hostile", round=1, nonce=os.urandom(16))
        welcome = pb.Welcome(
            client_name="c0", client_id=0, config_toml=self.config_toml, heartbeat_ms=1000
        )
        yield pb.ServerMessage(envelope=envelope, welcome=welcome)
        chunk = pb.Chunk(
            transfer_id=os.urandom(16),
            index=0,
            count=HUGE >> 20,
            total_bytes=HUGE,
            sha256=os.urandom(32),
            data=os.urandom(1 << 20),
        )
        task = pb.TaskChunk(stage=FIT, seed=bytes(16), chunk=chunk, task_id=b"t" * 16)
        yield pb.ServerMessage(envelope=envelope, task=task)
        self.reported.wait(timeout=60 * PATIENCE)
        yield pb.ServerMessage(envelope=envelope, run_complete=pb.RunComplete(rounds=1))


def test_a_site_bounds_what_a_server_announces_and_explains_unusable_credentials(
    tmp_path: Path,
) -> None:
    keys = make_keys(tmp_path, ["c0"])
    add_client(keys, "old", keys / "old", validity=dt.timedelta(minutes=-1))  # expired
    port = free_port()
    config = load_config(write_config(tmp_path, keys, port, clients=1))
    hostile = HostileServer(site_config_toml(config))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_FederationServicer_to_server(hostile, server)  # type: ignore[no-untyped-call]
    creds = ServerCredentials.load(keys)
    tls = grpc.ssl_server_credentials(
        [(creds.private_key, creds.certificate)],
        root_certificates=creds.ca_certificate,
        require_client_auth=True,
    )
    assert server.add_secure_port(f"127.0.0.1:{port}", tls) == port
    server.start()
    logs = {name: tmp_path / f"{name}.log" for name in ("site", "bare", "expired")}
    address = f"127.0.0.1:{port}"
    procs = [
        start_client(port, keys / "c0", logs["site"]),
        # No credentials: every TLS handshake is refused ("Socket closed"), which used to be
        # retried forever.
        fedforge(["client", "--server", address, "--name", "c0"], logs["bare"]),
        fedforge(
            ["client", "--server", address, "--credentials", str(keys / "old")], logs["expired"]
        ),
    ]
    try:
        codes = [p.wait(timeout=120 * PATIENCE) for p in procs]
    finally:
        stop_all(procs)
        server.stop(grace=None)
    text = {name: path.read_text() for name, path in logs.items()}
    assert codes == [0, 1, 1], text
    # The announced 2 GiB is refused at the first chunk, before any of it is allocated, and
    # the server is told why.
    assert len(hostile.reports) == 1, hostile.reports
    refusal = f"task refused: transfer of {HUGE} bytes exceeds the limit of "
    assert hostile.reports[0].startswith(refusal)
    assert int(hostile.reports[0][len(refusal) :].split()[0]) < 64 << 20
    assert "refused a fit task from the server" in text["site"]
    assert (
        "closed the connection 4 times before answering: it probably requires TLS" in (text["bare"])
    )
    assert "old/client.crt expired on" in text["expired"]
    assert "fedforge keys renew old" in text["expired"]
