"""A federation that survives its sites: hostile claims, hung or partitioned sites, silent
streams, revoked certificates, late clients. Real server and client processes over mutual
TLS on 127.0.0.1."""

from __future__ import annotations

import queue
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedforge.data.datasets import load_digits
from fedforge.net.codec import encode_params, split_payload
from fedforge.net.keys import (
    add_client,
    init_keys,
    request_certificate,
    revoke_client,
    sign_request,
)
from fedforge.net.proto import fedforge_pb2 as pb
from fedforge.net.proto import fedforge_pb2_grpc as pb_grpc
from fedforge.report.live import LiveState
from tests.net.helpers import (
    PATIENCE,
    CraftedClient,
    FreezableProxy,
    channel,
    fedforge,
    free_port,
    log_has,
    make_keys,
    start_client,
    start_server,
    stop_all,
    stored_history,
    wait_for,
    wait_for_port,
    write_config,
)

pytestmark = pytest.mark.timeout(PATIENCE * 300)
NAMES = ["c0", "c1", "c2"]
DATABASE = "state.sqlite"


def _history(state: Path) -> list[tuple[int, int, int]]:
    """(round, sampled, accepted) of every stored round."""
    return [(r.round, r.clients_sampled, r.clients_completed) for r in stored_history(state)]


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def test_a_claimed_size_never_raises_a_sites_cap(tmp_path: Path) -> None:
    # Sites bring their own data and declare its size; one declares 10,000,000 examples
    # and sends a large finite update claiming them all (99.99% of the weight if believed).
    keys = make_keys(tmp_path, ["a", "b", "liar"])
    port = free_port()
    cfg = write_config(
        tmp_path, keys, port, rounds=1, clients=3, timeout=30, deploy_extra='client_data = "own"'
    )
    train, _ = load_digits()
    procs = []
    for name, (lo, hi) in {"a": (0, 300), "b": (300, 700)}.items():
        np.savez(tmp_path / f"{name}.npz", x=train.x[lo:hi], y=train.y[lo:hi])
    server = start_server(cfg, tmp_path / "server.log")
    procs.append(server)
    try:
        wait_for_port(port)
        for name in ("a", "b"):
            procs.append(
                fedforge(
                    [
                        "client",
                        "--server",
                        f"127.0.0.1:{port}",
                        "--credentials",
                        str(keys / name),
                        "--data",
                        str(tmp_path / f"{name}.npz"),
                    ],
                    tmp_path / f"{name}.log",
                )
            )
        liar = CraftedClient(port, keys / "liar", declared=10_000_000)
        round_number, params = liar.next_task()
        update = {k: np.full_like(v, 5.0) for k, v in params.items()}
        liar.send_result(round_number, list(split_payload(encode_params(update))), 10_000_000)
        liar.drain()
        assert server.wait(timeout=120 * PATIENCE) == 0, _tail(tmp_path / "server.log")
    finally:
        stop_all(procs)
    log = (tmp_path / "server.log").read_text()
    # The high median of the declarations (300, 400 and the liar's) is 400: the liar counts
    # at most 4,000 (clamped, not rejected), and its update, far larger per local step than
    # the others', is refused: the round is retried without it.
    assert "client liar declares 10000000 examples, more than 10 x the median" in log
    assert "it counts 4000 (clamped" in log
    assert "outlying updates (liar: update norm" in log
    assert _history(tmp_path / "state")[-1] == (1, 2, 2)


def test_silent_and_revoked_streams_do_not_lock_sites_out(tmp_path: Path) -> None:
    # 40 streams with a revoked certificate and 3 with a registered one complete TLS and
    # never send a Hello; the sites still join at once.
    keys = make_keys(tmp_path, [*NAMES, "eve", "mallory"])
    revoke_client(keys, "mallory")
    port = free_port()
    cfg = write_config(  # (a share of the data for eve too: she is registered)
        tmp_path,
        keys,
        port,
        rounds=1,
        clients=4,
        per_round=3,
        min_clients=3,
        deploy_extra="hello_timeout_s = 2.0",
    )
    server = start_server(cfg, tmp_path / "server.log")
    held: list[queue.Queue[pb.ClientMessage | None]] = []

    def silent_stream(name: str) -> Iterator[pb.ServerMessage]:
        q: queue.Queue[pb.ClientMessage | None] = queue.Queue()
        held.append(q)
        creds = keys / name
        ch = channel(
            port,
            (creds / "ca.crt").read_bytes(),
            (creds / "client.key").read_bytes(),
            (creds / "client.crt").read_bytes(),
        )
        stream: Iterator[pb.ServerMessage] = pb_grpc.FederationStub(ch).Connect(iter(q.get, None))
        return stream

    def refusal(stream: Iterator[pb.ServerMessage]) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as info:
            next(stream)
        return info.value.code()  # type: ignore[no-any-return]

    clients = []
    try:
        wait_for_port(port)
        revoked = [silent_stream("mallory") for _ in range(40)]
        eves = [silent_stream("eve") for _ in range(3)]
        clients = [start_client(port, keys / n, tmp_path / f"{n}.log") for n in NAMES]
        assert server.wait(timeout=90 * PATIENCE) == 0, _tail(tmp_path / "server.log")
        assert all(refusal(s) == grpc.StatusCode.PERMISSION_DENIED for s in revoked)
        codes = sorted(refusal(s).name for s in eves)
        # Two may wait for their Hello (then are cancelled), a third is refused at once.
        assert codes == ["CANCELLED", "CANCELLED", "RESOURCE_EXHAUSTED"]
    finally:
        for q in held:
            q.put(None)
        stop_all([server, *clients])
    # The sites joined at once: none was ever refused for want of a server thread.
    for name in NAMES:
        assert "RESOURCE_EXHAUSTED" not in (tmp_path / f"{name}.log").read_text()
    log = (tmp_path / "server.log").read_text()
    assert "refused revoked certificate of 'mallory' from ipv4:127.0.0.1" in log
    assert log.count("refused revoked certificate") == 1  # 40 refusals, one line a minute
    assert "that sent no Hello within 2 s" in log


def test_a_restarted_site_replaces_its_hung_session(tmp_path: Path) -> None:
    # A site's process hangs (SIGSTOP) mid-run; the operator starts it again with the same
    # credentials long before the server could notice the hang (heartbeats every 30 s: it
    # would after 75 s, longer than a new process takes to start even on a loaded machine).
    keys = make_keys(tmp_path, NAMES)
    port = free_port()
    # Many rounds: a round of this model takes milliseconds, and the hang must begin while the
    # run still has rounds to go, however late a loaded machine lets this test see round 1
    # end (the hung site then holds its round until its new process replaces it).
    cfg = write_config(tmp_path, keys, port, rounds=200, clients=3, epochs=3, heartbeat=30.0)
    server = start_server(cfg, tmp_path / "server.log")
    clients = {n: start_client(port, keys / n, tmp_path / f"{n}.log") for n in NAMES}
    restarted = None
    try:
        wait_for(lambda: log_has(tmp_path / "server.log", "round 1:"), 90 * PATIENCE, "round 1")
        clients["c2"].send_signal(signal.SIGSTOP)
        restarted = start_client(port, keys / "c2", tmp_path / "c2-again.log")
        assert server.wait(timeout=120 * PATIENCE) == 0, _tail(tmp_path / "server.log")
        assert restarted.wait(timeout=30 * PATIENCE) == 0, _tail(tmp_path / "c2-again.log")
    finally:
        clients["c2"].send_signal(signal.SIGCONT)
        stop_all([server, *clients.values(), *([restarted] if restarted else [])])
    assert re.search(
        r"client c2 connected again \(from ipv4:127\.0\.0\.1:\d+\): its previous session "
        r"\(from ipv4:127\.0\.0\.1:\d+\) is closed",
        (tmp_path / "server.log").read_text(),
    )
    assert _history(tmp_path / "state")[-1][2] == 3  # the new c2 trained in the last round


def test_a_partitioned_site_is_dropped_within_heartbeats_and_waited_for(tmp_path: Path) -> None:
    # c2 reaches the server through a relay that then stops forwarding (a silent partition).
    # Every round needs all three results: the server drops c2's dead session within a few
    # heartbeats, retries with the two sites left, then waits for c2 (never exits) and
    # finishes once the network heals. Eight rounds: the partition must begin while the run
    # still has rounds to go, however late a loaded machine lets this test see round 1 end.
    keys = make_keys(tmp_path, NAMES)
    port = free_port()
    proxy = FreezableProxy(port)
    cfg = write_config(
        tmp_path,
        keys,
        port,
        rounds=8,
        clients=3,
        min_clients=2,
        timeout=60,
        min_completed=3,
        max_retries=1,
        heartbeat=3.0,
    )
    server = start_server(cfg, tmp_path / "server.log")
    clients = [start_client(port, keys / n, tmp_path / f"{n}.log") for n in NAMES[:2]]
    clients.append(start_client(proxy.port, keys / "c2", tmp_path / "c2.log"))
    server_log = tmp_path / "server.log"
    try:
        wait_for(lambda: log_has(server_log, "client c2 (id 2) connected"), 90 * PATIENCE, "c2")
        wait_for(
            lambda: log_has(server_log, "round 1: 3 sampled, 3 accepted"), 90 * PATIENCE, "round 1"
        )
        proxy.freeze()
        wait_for(
            lambda: log_has(server_log, "client c2 sent nothing for"), 10 * PATIENCE, "detection"
        )
        wait_for(
            lambda: log_has(server_log, "waiting up to 60 s"), 30 * PATIENCE, "the server to wait"
        )
        assert server.poll() is None  # waiting for its site, not giving up
        proxy.thaw()
        assert server.wait(timeout=90 * PATIENCE) == 0, _tail(server_log)
        assert clients[2].wait(timeout=30 * PATIENCE) == 0, _tail(tmp_path / "c2.log")
    finally:
        proxy.close()
        stop_all([server, *clients])
    assert [accepted for _, _, accepted in _history(tmp_path / "state")[1:]] == [3] * 8


def test_rounds_start_with_the_sites_there_and_late_sites_learn_the_run_ended(
    tmp_path: Path,
) -> None:
    # Three sites, three per round, two needed: c2 is down while the run takes place; when
    # it comes up after the last round, the server tells it the run is complete.
    keys = make_keys(tmp_path, NAMES)
    port = free_port()
    cfg = write_config(tmp_path, keys, port, rounds=2, clients=3, min_clients=2, linger=60)
    server = start_server(cfg, tmp_path / "server.log")
    clients = [start_client(port, keys / n, tmp_path / f"{n}.log") for n in NAMES[:2]]
    try:
        wait_for(
            lambda: log_has(tmp_path / "server.log", "answering late clients"),
            120 * PATIENCE,
            "the run",
        )
        late = start_client(port, keys / "c2", tmp_path / "c2.log")
        clients.append(late)
        assert late.wait(timeout=60 * PATIENCE) == 0, _tail(tmp_path / "c2.log")
    finally:
        stop_all([server, *clients])
    assert "run complete after 2 rounds" in (tmp_path / "c2.log").read_text()
    log = (tmp_path / "server.log").read_text()
    assert "waiting for clients: " in log
    assert "round 2: 2 sampled, 2 accepted" in log


def test_sites_make_their_own_keys_and_a_revocation_needs_no_restart(tmp_path: Path) -> None:
    # Each site makes its key and a signing request; the coordinator signs the requests.
    keys = tmp_path / "keys"
    assert (
        fedforge(["keys", "init", str(keys)], tmp_path / "keys.log").wait(timeout=60 * PATIENCE)
        == 0
    )
    for name in NAMES[:2]:  # what the commands below run
        site = tmp_path / "sites" / name
        sign_request(keys, request_certificate(name, site), site)
    site = tmp_path / "sites" / "c2"
    steps = [
        ["keys", "request", "c2", "--out", str(site)],
        ["keys", "sign", str(site / "client.csr"), "--keys", str(keys)],
    ]
    for step in steps:
        assert fedforge(step, tmp_path / "keys.log").wait(timeout=60 * PATIENCE) == 0, _tail(
            tmp_path / "keys.log"
        )
    assert sorted(p.name for p in keys.rglob("*.key")) == ["ca.key", "server.key"]
    assert "CA fingerprint" in (tmp_path / "keys.log").read_text()
    port = free_port()
    # Rounds of milliseconds: the run must outlast the revocation (the server is stopped below).
    cfg = write_config(tmp_path, keys, port, rounds=100_000, clients=3, min_clients=2)
    server = start_server(cfg, tmp_path / "server.log")
    sites = tmp_path / "sites"
    clients = {n: start_client(port, sites / n, tmp_path / f"{n}.log") for n in NAMES}
    try:
        wait_for(lambda: log_has(tmp_path / "server.log", "round 2:"), 120 * PATIENCE, "round 2")
        # c2 is revoked while connected (not refused at a later connection).
        connected = "client c2 (id 2) connected"
        wait_for(lambda: log_has(tmp_path / "server.log", connected), 120 * PATIENCE, "c2")
        revoke_client(keys, "c2")
        wait_for(
            lambda: log_has(tmp_path / "server.log", "client c2: its certificate was revoked"),
            20 * PATIENCE,
            "the revocation",
        )
        assert clients["c2"].wait(timeout=60 * PATIENCE) == 1  # refused when it reconnects
        assert server.poll() is None
    finally:
        stop_all([server, *clients.values()])
    assert "revoked" in (tmp_path / "c2.log").read_text()


def test_operator_mistakes_get_clear_refusals(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, ["a"])
    port = free_port()
    # --insecure on a non-loopback address.
    cfg = write_config(tmp_path, keys, port, rounds=1, clients=1)
    cfg.write_text(cfg.read_text().replace("127.0.0.1:", "0.0.0.0:"))
    insecure = fedforge(["server", str(cfg), "--insecure", "--client", "a"], tmp_path / "i.log")
    assert insecure.wait(timeout=60 * PATIENCE) == 1
    assert "--insecure refuses to listen on 0.0.0.0" in (tmp_path / "i.log").read_text()
    # A client certificate from another CA (the server would refuse it in the handshake).
    foreign = tmp_path / "foreign"
    init_keys(foreign, ["localhost"])
    add_client(foreign, "a", foreign / "a")
    (foreign / "a" / "ca.crt").write_bytes((keys / "ca.crt").read_bytes())
    client = start_client(port, foreign / "a", tmp_path / "c.log")
    assert client.wait(timeout=60 * PATIENCE) == 1
    assert "the server will not accept this certificate" in (tmp_path / "c.log").read_text()
    # A state directory with checkpoints but no run database is not started over.
    cfg = write_config(tmp_path, keys, port, rounds=1, clients=1)
    state = tmp_path / "state"
    state.mkdir()
    (state / "round_000003.safetensors").write_bytes(b"left over")
    server = start_server(cfg, tmp_path / "s.log")
    assert server.wait(timeout=60 * PATIENCE) == 1
    assert "but no run to resume" in (tmp_path / "s.log").read_text()


def test_one_server_owns_a_state_directory_and_a_killed_one_is_not_shown_running(
    tmp_path: Path,
) -> None:
    """A second ``fedforge server`` on a live server's state directory (even with --new-run)
    is refused with one line naming the owner, and deletes nothing; the dashboard shows the
    live server ``running`` and the SIGKILLed one ``killed``."""
    keys = make_keys(tmp_path, NAMES)
    cfg = write_config(tmp_path, keys, free_port(), rounds=1)  # waits for clients that never come
    state, first_log, second_log = tmp_path / "state", tmp_path / "first.log", tmp_path / "2.log"
    first = start_server(cfg, first_log)
    try:
        wait_for(lambda: log_has(first_log, "serving on"), 60 * PATIENCE, "the first server")
        stored = (state / DATABASE).stat().st_ino  # the first server writes on into it
        other_port = f"deploy.address=127.0.0.1:{free_port()}"
        second = fedforge(["server", str(cfg), "--set", other_port, "--new-run"], second_log)
        assert second.wait(timeout=60 * PATIENCE) == 1
        said = [line for line in second_log.read_text().splitlines() if line.strip()]
        assert len(said) == 1, said
        assert f"deploy.state_dir {state} is in use by the run in process {first.pid}" in said[0]
        assert (state / DATABASE).stat().st_ino == stored  # --new-run deleted nothing
        assert first.poll() is None
        assert LiveState(state).state()["status"] == "running"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10 * PATIENCE)
    finally:
        stop_all([first])
    live = LiveState(state).state()
    assert live["status"] == "killed" and str(first.pid) in live["status_reason"]
