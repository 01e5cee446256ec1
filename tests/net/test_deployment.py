"""Server and client processes over mutual TLS on loopback: the happy path and crashes."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedforge.data.datasets import load_digits
from fedforge.runtime.checkpoint import CheckpointStore
from tests.net.helpers import (
    fedforge,
    free_port,
    make_keys,
    start_client,
    start_server,
    stop_all,
    wait_for,
    write_config,
)

NAMES = ["alice", "bob", "carol"]
pytestmark = pytest.mark.timeout(180)


def _history(state: Path):  # type: ignore[no-untyped-def]
    store = CheckpointStore(state)
    try:
        checkpoint = store.load()
    finally:
        store.close()
    assert checkpoint is not None
    return checkpoint.history


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def test_three_clients_over_mutual_tls(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, NAMES)
    port = free_port()
    cfg = write_config(tmp_path, keys, port, rounds=3)
    # carol brings her own data, more examples than her share of the built-in dataset:
    # the server must accept her sample count because she declared it.
    train, _ = load_digits()
    own = tmp_path / "carol.npz"
    np.savez(own, x=train.x[:900], y=train.y[:900])
    server = start_server(cfg, tmp_path / "server.log")
    clients = [start_client(port, keys / n, tmp_path / f"{n}.log") for n in NAMES[:2]]
    clients.append(
        fedforge(
            [
                "client",
                "--server",
                f"127.0.0.1:{port}",
                "--credentials",
                str(keys / "carol"),
                "--data",
                str(own),
            ],
            tmp_path / "carol.log",
        )
    )
    try:
        assert server.wait(timeout=120) == 0, _log_tail(tmp_path / "server.log")
        for n, c in zip(NAMES, clients, strict=True):
            assert c.wait(timeout=30) == 0, _log_tail(tmp_path / f"{n}.log")
    finally:
        stop_all([server, *clients])
    assert "with 900 examples" in (tmp_path / "carol.log").read_text()
    history = _history(tmp_path / "state")
    assert [r.round for r in history] == [1, 2, 3]
    assert all(r.clients_completed == 3 and r.clients_failed == 0 for r in history)
    assert history[-1].test_accuracy > 0.5
    assert (tmp_path / "state" / "final_model.safetensors").exists()
    assert "trained in 3 rounds" in (tmp_path / "alice.log").read_text()


def test_client_killed_mid_round_then_rejoining(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, NAMES)
    port = free_port()
    # Long local training so the kill lands while round 2 is in progress.
    cfg = write_config(tmp_path, keys, port, rounds=3, epochs=150, timeout=60)
    state = tmp_path / "state"
    server = start_server(cfg, tmp_path / "server.log")
    clients = [start_client(port, keys / n, tmp_path / f"{n}.log") for n in NAMES]
    procs = [server, *clients]
    try:
        wait_for(lambda: (state / "round_000001.safetensors").exists(), 90, "round 1")
        clients[1].send_signal(signal.SIGKILL)
        wait_for(lambda: (state / "round_000002.safetensors").exists(), 90, "round 2")
        procs.append(start_client(port, keys / "bob", tmp_path / "bob2.log"))  # bob comes back
        assert server.wait(timeout=120) == 0, _log_tail(tmp_path / "server.log")
    finally:
        stop_all(procs)
    history = _history(state)
    assert (history[1].clients_completed, history[1].clients_failed) == (2, 1)
    assert history[2].clients_completed == 3
    assert "client disconnected" in (tmp_path / "server.log").read_text()


def test_server_sigkill_and_restart_resumes_to_the_same_model(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, NAMES)
    port_a, port_b = free_port(), free_port()
    # Uninterrupted reference run.
    cfg_a = write_config(tmp_path, keys, port_a, "state_a", rounds=4, epochs=20)
    server = start_server(cfg_a, tmp_path / "a.log")
    clients = [start_client(port_a, keys / n, tmp_path / f"a_{n}.log") for n in NAMES]
    try:
        assert server.wait(timeout=120) == 0, _log_tail(tmp_path / "a.log")
    finally:
        stop_all([server, *clients])

    # The same run, with the server SIGKILLed after round 2 and restarted by the same command.
    cfg_b = write_config(tmp_path, keys, port_b, "state_b", rounds=4, epochs=20)
    state = tmp_path / "state_b"
    server = start_server(cfg_b, tmp_path / "b.log")
    clients = [start_client(port_b, keys / n, tmp_path / f"b_{n}.log") for n in NAMES]
    procs = [server, *clients]
    try:
        wait_for(lambda: (state / "round_000002.safetensors").exists(), 90, "round 2")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        restarted = start_server(cfg_b, tmp_path / "b.log")
        procs.append(restarted)
        assert restarted.wait(timeout=120) == 0, _log_tail(tmp_path / "b.log")
        for n, c in zip(NAMES, clients, strict=True):  # they reconnected on their own
            assert c.wait(timeout=30) == 0, _log_tail(tmp_path / f"b_{n}.log")
    finally:
        stop_all(procs)
    assert "resuming run" in (tmp_path / "b.log").read_text()
    history = _history(state)
    assert [r.round for r in history] == [1, 2, 3, 4]  # no completed round lost or repeated
    a = load_file(str(tmp_path / "state_a" / "final_model.safetensors"))
    b = load_file(str(state / "final_model.safetensors"))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6)
