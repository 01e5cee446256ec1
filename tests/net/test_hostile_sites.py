"""One broken or hostile site among honest ones, against a real server process over mutual
TLS: it may stop reading its stream, share its identity with a second live process, flood
the log with late chunks or forge log lines in its failure reports; the server names it, cuts
it off, and the honest sites' rounds go on."""

from __future__ import annotations

import os
import queue
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fedforge.core.records import FIT
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.proto import fedforge_pb2_grpc as pb_grpc
from fedforge.net.service import INVALID_LIMIT, PROTOCOL_VERSION
from tests.net.helpers import (
    PATIENCE,
    CraftedClient,
    base_architecture,
    free_port,
    make_keys,
    start_client,
    start_server,
    stop_all,
    stored_run,
    wait_for_port,
    write_config,
)

pytestmark = pytest.mark.timeout(PATIENCE * 300)
# A model of ~150 KB: more than a stream's initial flow-control window (64 KiB), so a task
# cannot reach a client that does not read its stream.
WIDE = ("hidden = [32]", "hidden = [512]")
FORGED = "2020-01-01 00:00:00,000 INFO round 9: 5 sampled, 5 accepted (forged)"


class Zombie:
    """A site that connects, declares itself, heartbeats, and never reads its stream (with
    its flow-control window left at 64 KiB: a client that reads nothing grants no more)."""

    def __init__(self, port: int, creds: Path) -> None:
        self.channel = grpc.secure_channel(
            f"127.0.0.1:{port}",
            grpc.ssl_channel_credentials(
                (creds / "ca.crt").read_bytes(),
                (creds / "client.key").read_bytes(),
                (creds / "client.crt").read_bytes(),
            ),
            options=[("grpc.http2.bdp_probe", 0)],
        )
        self.out: queue.Queue[pb.ClientMessage | None] = queue.Queue()
        hello = pb.Hello(protocol_version=PROTOCOL_VERSION)
        self.out.put(pb.ClientMessage(hello=hello))
        # The sizes and the model a welcomed client declares (the run's 64-512-10 MLP).
        declared = pb.Hello(
            protocol_version=PROTOCOL_VERSION, architecture=base_architecture((512,))
        )
        self.out.put(pb.ClientMessage(hello=declared))
        self.stream = pb_grpc.FederationStub(self.channel).Connect(self._requests())
        self.stop = threading.Event()
        threading.Thread(target=self._beat, daemon=True).start()

    def _requests(self) -> Iterator[pb.ClientMessage]:
        while (m := self.out.get()) is not None:
            yield m

    def _beat(self) -> None:
        while not self.stop.wait(0.3):
            self.out.put(pb.ClientMessage(heartbeat=pb.Heartbeat()))

    def close(self) -> None:
        self.stop.set()
        self.out.put(None)
        self.channel.close()


def _stale_chunk(client: CraftedClient, round_number: int) -> pb.ClientMessage:
    """A reply chunk for a task id the server never issued."""
    return pb.ClientMessage(
        envelope=client.envelope(round_number),
        reply=pb.ReplyChunk(stage=FIT, num_examples=1, chunk=pb.Chunk(), task_id=os.urandom(16)),
    )


def test_a_zombie_a_twin_and_a_flooding_liar_cannot_stall_or_blind_the_run(
    tmp_path: Path,
) -> None:
    # c0 is honest; c1 runs twice (two live processes, one identity); zombie never reads;
    # liar forges a log line in a failure report, then floods chunks with random task ids.
    keys = make_keys(tmp_path, ["c0", "c1", "liar", "zombie"])
    port = free_port()
    timeout = 8.0
    cfg = write_config(tmp_path, keys, port, rounds=4, clients=4, min_clients=2, timeout=timeout)
    cfg.write_text(cfg.read_text().replace(*WIDE))
    server_log = tmp_path / "server.log"
    server = start_server(cfg, server_log)
    twins = [start_client(port, keys / "c1", tmp_path / f"c1-{i}.log") for i in (1, 2)]
    procs = [server, start_client(port, keys / "c0", tmp_path / "c0.log"), *twins]
    zombie: Zombie | None = None
    try:
        wait_for_port(port)
        zombie = Zombie(port, keys / "zombie")
        liar = CraftedClient(port, keys / "liar", architecture=base_architecture((512,)))
        round_number, _ = liar.next_task()
        liar.out.put(
            pb.ClientMessage(
                envelope=liar.envelope(round_number),
                failure=pb.ClientFailureReport(
                    error=f"RuntimeError: boom\n{FORGED}\r\x1b[2K", task_id=liar.task_id
                ),
            )
        )
        for _ in range(20_000):
            liar.out.put(_stale_chunk(liar, round_number))
        threading.Thread(target=liar.drain, daemon=True).start()
        assert server.wait(timeout=180 * PATIENCE) == 0, server_log.read_text()[-3000:]
    finally:
        if zombie is not None:
            zombie.close()
        stop_all(procs)
    log = server_log.read_text()
    lines = log.splitlines()
    # The zombie: cut off at its first task's deadline, never sampled again.
    assert "client zombie: its task was not delivered within the 8 s deadline" in log
    assert sum("failure of zombie" in line for line in lines) == 1
    durations = [float(s) for s in re.findall(r"round \d+: \d+ sampled.* (\d+\.\d) s", log)]
    assert len(durations) >= 4 and all(d < timeout for d in durations[-3:]), durations
    # The twins: one line naming both addresses; then the connected one serves its rounds.
    flaps = [line for line in lines if "two live processes use this identity" in line]
    assert len(flaps) == 1, flaps
    assert len(set(re.findall(r"ipv4:127\.0\.0\.1:\d+", flaps[0]))) == 2
    refused = [(tmp_path / f"c1-{i}.log").read_text() for i in (1, 2)]
    assert any("ALREADY_EXISTS" in text for text in refused)
    # The liar: its words escaped on the failure's own line; its flood disconnected after
    # INVALID_LIMIT messages, in at most three lines of the log.
    assert not any(line.startswith("2020-01-01") for line in lines)
    assert "RuntimeError: boom\\x0a2020-01-01 00:00:00,000 INFO" in log
    assert "\\x0d\\x1b[2K" in log and "\x1b" not in log
    assert f"client liar sent {INVALID_LIMIT} invalid messages within" in log
    liar_lines = [line for line in lines if "liar" in line and "round" not in line]
    assert len([line for line in liar_lines if "connected" not in line]) <= 3, liar_lines
    last = stored_run(tmp_path / "state").history[-1]
    assert (last.round, last.clients_completed, last.clients_failed) == (4, 2, 0)  # c0, c1
    # A site learns what its training needs, not the server's paths or the others' sizes.
    assert "512" in liar.welcome_config  # (the model it trains)
    for secret in ("[deploy]", str(tmp_path), "state_dir", "site_examples", "address"):
        assert secret not in liar.welcome_config, secret
