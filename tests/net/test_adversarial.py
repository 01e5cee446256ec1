"""Hostile and broken peers against a real server process: all rejected, server keeps serving."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedforge.config import load_config
from fedforge.core.records import FIT
from fedforge.experiment import build_dataset
from fedforge.net.codec import encode_params, split_payload
from fedforge.net.keys import add_client, init_keys, revoke_client
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.proto import fedforge_pb2_grpc as pb_grpc
from fedforge.net.service import PROTOCOL_VERSION
from fedforge.runtime.checkpoint import CheckpointStore
from tests.net.helpers import (
    PATIENCE,
    CraftedClient,
    channel,
    free_port,
    start_client,
    start_server,
    stop_all,
    wait_for_port,
    write_config,
)

pytestmark = pytest.mark.timeout(PATIENCE * 300)


def _zero_update(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.zeros_like(v) for k, v in params.items()}


OVERCLAIM = 10_000_000
BEHAVIOURS: dict[str, Callable[[CraftedClient, int, dict[str, np.ndarray]], None]] = {
    "nan": lambda c, r, p: c.send_result(
        r, list(split_payload(encode_params({k: np.full_like(v, np.nan) for k, v in p.items()}))), 5
    ),
    "shape": lambda c, r, p: c.send_result(
        r, list(split_payload(encode_params({k: np.zeros(3, np.float32) for k in p}))), 5
    ),
    "inflated": lambda c, r, p: c.send_result(
        r, list(split_payload(encode_params(_zero_update(p)))), 10**9
    ),
    # Declares (in its Hello) and claims 10,000,000 examples, within deploy.max_examples, but
    # holds a share of the built-in dataset: the server knows its real size.
    "overclaim": lambda c, r, p: c.send_result(
        r, list(split_payload(encode_params(_zero_update(p)))), OVERCLAIM
    ),
    "garbage": lambda c, r, p: c.send_result(r, list(split_payload(os.urandom(999))), 5),
    "truncated": lambda c, r, p: c.send_result(
        r,
        [
            *(chunks := list(split_payload(encode_params(_zero_update(p)), 64)))[:-1],
            pb.Chunk(
                transfer_id=chunks[-1].transfer_id,
                index=chunks[-1].index,
                count=chunks[-1].count,
                total_bytes=chunks[-1].total_bytes,
                sha256=chunks[-1].sha256,
                data=chunks[-1].data[:-5],
            ),
        ],
        5,
    ),
    "replay": lambda c, r, p: c.send_result(
        r, list(split_payload(encode_params(_zero_update(p)), 256)), 5, repeat_first=True
    ),
    "silent": lambda c, r, p: None,  # alive (heartbeats), never answers
    "mute": lambda c, r, p: setattr(c, "muted", True),  # falls silent: a dead session
    # Announces a 1 GiB result (the model's update is ~10 KB): refused at the first chunk.
    "oversized": lambda c, r, p: c.send_result(r, [_huge_first_chunk()], 5),
    # Floods invalid messages (another run's id): disconnected, logged once.
    "flood": lambda c, r, p: [c.out.put(_foreign_message(r)) for _ in range(FLOOD)],
}
FLOOD = 2000


def _huge_first_chunk() -> pb.Chunk:
    return pb.Chunk(
        transfer_id=os.urandom(16),
        index=0,
        count=1 << 10,
        total_bytes=1 << 30,
        sha256=os.urandom(32),
        data=os.urandom(1 << 10),
    )


def _foreign_message(round_number: int) -> pb.ClientMessage:
    return pb.ClientMessage(
        envelope=pb.Envelope(run_id="another-run", round=round_number, nonce=os.urandom(16)),
        reply=pb.ReplyChunk(stage=FIT, num_examples=1, chunk=pb.Chunk()),
    )


def test_malformed_replayed_and_inflated_results_are_rejected(tmp_path: Path) -> None:
    # One share of the built-in dataset per client (the server refuses clients without one).
    honest = "z-honest"
    names = sorted([honest, *BEHAVIOURS])
    assert names[-1] == honest
    keys = tmp_path / "keys"
    init_keys(keys, ["localhost", "127.0.0.1"])
    for name in names:
        add_client(keys, name, keys / name)
    port = free_port()
    cfg = write_config(
        tmp_path,
        keys,
        port,
        rounds=1,
        clients=len(names),
        min_clients=len(names),
        server_extra='sampler = "poisson"\nsampling_rate = 1.0',  # every client, honest too
        uniform=False,
        timeout=10,
        heartbeat=1.5,  # mute is cut off (after 3.75 s of silence) before the deadline
    )
    overclaim_id = names.index("overclaim")
    data = build_dataset(load_config(cfg))
    real_size = data.client_size(overclaim_id)
    assert real_size < OVERCLAIM
    server = start_server(cfg, tmp_path / "server.log")
    honest_client = start_client(port, keys / honest, tmp_path / "honest.log")
    crafted: dict[str, CraftedClient] = {}
    try:
        # Garbage on the TLS port must not disturb the server.
        wait_for_port(port)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(os.urandom(4096))
        crafted = {
            name: CraftedClient(port, keys / name, OVERCLAIM if name == "overclaim" else 0)
            for name in BEHAVIOURS
        }

        def act(name: str) -> None:
            client = crafted[name]
            round_number, params = client.next_task()
            BEHAVIOURS[name](client, round_number, params)
            client.drain()

        threads = [threading.Thread(target=act, args=(n,)) for n in BEHAVIOURS]
        for t in threads:
            t.start()
        assert server.wait(timeout=120 * PATIENCE) == 0, (tmp_path / "server.log").read_text()[
            -3000:
        ]
        for t in threads:
            t.join(timeout=30 * PATIENCE)
    finally:
        stop_all([server, honest_client])
    store = CheckpointStore(tmp_path / "state")
    checkpoint = store.load()
    store.close()
    assert checkpoint is not None
    assert [r.round for r in checkpoint.history] == [0, 1]
    record = checkpoint.history[1]
    # honest + replay (its replayed duplicate is dropped, the result itself is valid).
    assert record.clients_sampled == len(names)
    assert record.clients_completed == 2
    # nan, shape, inflated, overclaim, garbage, truncated, oversized
    assert record.clients_rejected == 7
    assert overclaim_id in record.clients["rejected"]
    # silent (dropped at the deadline), mute (dead: no heartbeats), flood (disconnected)
    assert record.clients_failed == 3
    log = (tmp_path / "server.log").read_text()
    for reason in [
        "NaN",
        "shape",
        "outside the allowed range",
        f"num_examples {OVERCLAIM} outside the allowed range [1, {real_size}]",
        "undecodable",
        "truncated",
        "no result within",
        "client mute sent nothing for",
        f"transfer of {1 << 30} bytes exceeds the limit of",
        "client flood sent 32 invalid messages within",
    ]:
        assert reason in log, reason
    # Garbage on the TLS port costs no line (gRPC's own log is quiet unless asked).
    assert "Handshake failed" not in log
    # The flood: one line when it starts, one when it is cut off, one for the round.
    assert sum("flood" in line for line in log.splitlines()) <= 5
    assert crafted["flood"].rejects.__len__() <= 4
    # Its stream was ended by the server (with an error status, or closed before the run
    # ended: the flood never saw the run complete).
    assert crafted["flood"].done.is_set()
    assert crafted["flood"].ended_by is not None or not crafted["flood"].saw_run_complete
    # One line per round naming the clients that failed or were rejected.
    assert "round 1: 12 sampled, 2 accepted, 7 rejected, 3 failed" in log
    assert "failed: flood, mute, silent" in log
    assert any("replayed" in r for r in crafted["replay"].rejects)
    honest_size = data.client_size(names.index(honest))
    assert f"with {honest_size} examples" in (tmp_path / "honest.log").read_text()


def test_unauthenticated_revoked_foreign_and_duplicate_clients_are_refused(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    init_keys(keys, ["localhost", "127.0.0.1"])
    for name in ["alice", "mallory"]:
        add_client(keys, name, keys / name)
    revoke_client(keys, "mallory")
    foreign = tmp_path / "foreign"
    init_keys(foreign, ["localhost"])
    add_client(foreign, "alice", foreign / "alice")  # same name, another CA
    port = free_port()
    cfg = write_config(tmp_path, keys, port, rounds=1, clients=2, timeout=30)
    server = start_server(cfg, tmp_path / "server.log")
    ca = (keys / "ca.crt").read_bytes()
    try:
        wait_for_port(port)
        # No client certificate at all: the TLS handshake fails.
        anonymous = pb_grpc.FederationStub(channel(port, ca, None, None))
        with pytest.raises(grpc.RpcError) as info:
            list(
                anonymous.Connect(
                    iter([pb.ClientMessage(hello=pb.Hello(protocol_version=PROTOCOL_VERSION))]),
                    timeout=5,  # the handshake never succeeds: fails or times out
                    wait_for_ready=True,
                )
            )
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        # Revoked certificate: authenticated, then refused.
        assert CraftedClient(port, keys / "mallory").first_error().code() == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        # A certificate from another CA: the handshake fails.
        creds = foreign / "alice"
        stub = pb_grpc.FederationStub(
            channel(
                port, ca, (creds / "client.key").read_bytes(), (creds / "client.crt").read_bytes()
            )
        )
        with pytest.raises(grpc.RpcError) as info:
            list(
                stub.Connect(
                    iter([pb.ClientMessage(hello=pb.Hello(protocol_version=PROTOCOL_VERSION))]),
                    timeout=20,
                )
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # The real alice connects; alice connecting again (her first session hung, say)
        # replaces the first session, whose stream the server ends.
        first = CraftedClient(port, keys / "alice")
        assert next(first.stream).WhichOneof("body") == "welcome"  # alice is registered
        second = CraftedClient(port, keys / "alice")
        assert next(second.stream).WhichOneof("body") == "welcome"
        assert first.first_error().code() == grpc.StatusCode.CANCELLED
        assert server.poll() is None  # still serving after all of that
    finally:
        stop_all([server])
