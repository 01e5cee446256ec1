"""Server and client processes over mutual TLS on loopback: the happy path and crashes.

A loopback deployment computes what the sequential simulation with the same configuration
computes (every client in every round, so sampling is the same), through server and client
crashes. Deployment client ids are the indices of the sorted client names and simulation
clients are 0..n-1, so the names sort in id order.
"""

from __future__ import annotations

import math
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedforge.config import load_config
from fedforge.experiment import build_dataset, simulate_config
from fedforge.report.history import History
from fedforge.report.live import LiveState
from tests.net.helpers import (
    PATIENCE,
    client_state_dir,
    free_port,
    make_keys,
    start_client,
    start_server,
    stop_all,
    stored_run,
    wait_for,
    write_config,
)

NAMES = ["c0", "c1", "c2"]
SCAFFOLD = '[algorithm]\nname = "scaffold"\n'
pytestmark = pytest.mark.timeout(PATIENCE * 300)


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _checkpoint(state: Path) -> tuple[str, History]:
    checkpoint = stored_run(state)
    return checkpoint.run_id, checkpoint.history


def _simulate(cfg: Path) -> tuple[dict[str, np.ndarray], History]:
    """The configured run in the sequential simulation (as ``fedforge run`` wires it,
    without writing a run directory)."""
    config = load_config(cfg)
    result = simulate_config(config, build_dataset(config), backend="sequential")
    return dict(result.state.params), result.history


def _assert_same_model(deployed: Path, simulated: dict[str, np.ndarray]) -> None:
    params = load_file(str(deployed))
    assert params.keys() == simulated.keys()
    for name in params:
        np.testing.assert_allclose(params[name], simulated[name], rtol=0, atol=1e-5, err_msg=name)


def _assert_same_history(got: History, want: History) -> None:
    assert [r.round for r in got] == [r.round for r in want]
    for g, w in zip(got, want, strict=True):
        assert g.clients_completed == w.clients_completed
        assert g.test_accuracy == pytest.approx(w.test_accuracy, abs=1e-6, nan_ok=True)
        assert g.metrics.keys() == w.metrics.keys()
        for key, value in w.metrics.items():
            assert g.metrics[key] == pytest.approx(value, abs=1e-5), key


def _serve_to_completion(tmp_path: Path, cfg: Path, keys: Path, port: int) -> None:
    """The server and every client of ``NAMES`` as processes, run until all exit 0."""
    server = start_server(cfg, tmp_path / "server.log")
    clients = [start_client(port, keys / n, tmp_path / f"{n}.log") for n in NAMES]
    try:
        assert server.wait(timeout=120 * PATIENCE) == 0, _log_tail(tmp_path / "server.log")
        for n, c in zip(NAMES, clients, strict=True):
            assert c.wait(timeout=30 * PATIENCE) == 0, _log_tail(tmp_path / f"{n}.log")
    finally:
        stop_all([server, *clients])


def test_fedavg_deployment_matches_simulation(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, NAMES)
    port = free_port()
    cfg = write_config(tmp_path, keys, port, rounds=3, epochs=2)
    _serve_to_completion(tmp_path, cfg, keys, port)
    _, history = _checkpoint(tmp_path / "state")
    assert [r.round for r in history] == [0, 1, 2, 3]  # round 0: the initial evaluation
    assert all(r.clients_completed == 3 and r.clients_failed == 0 for r in history[1:])
    assert history[-1].test_accuracy > 0.5
    assert "trained in 3 rounds" in (tmp_path / "c0.log").read_text()
    simulated, sim_history = _simulate(cfg)
    _assert_same_model(tmp_path / "state" / "final_model.safetensors", simulated)
    _assert_same_history(history, sim_history)
    assert [r.bytes_up for r in history] == [r.bytes_up for r in sim_history]
    # `fedforge dashboard STATE_DIR` shows the deployed run: its live log, settings, status.
    live = LiveState(tmp_path / "state").state()
    assert [r["round"] for r in live["rounds"]] == [0, 1, 2, 3]
    assert live["status"] == "finished" and live["total_rounds"] == 3
    assert live["rounds"][-1]["test_accuracy"] == pytest.approx(history[-1].test_accuracy)


def test_scaffold_with_federated_evaluation_resumes_after_server_sigkill(
    tmp_path: Path,
) -> None:
    """SCAFFOLD with federated evaluation, the server SIGKILLed after round 1 and restarted by
    the same command: the server state (model, control variate) comes back from the checkpoint,
    every client rereads the state version the replayed round started from, and the run ends
    with the simulation's model and federated-evaluation metrics."""
    keys = make_keys(tmp_path, NAMES)
    port = free_port()
    extra = SCAFFOLD + "[evaluation]\nfraction = 0.5\nholdout = 0.25\n"
    cfg = write_config(tmp_path, keys, port, rounds=4, epochs=8, extra=extra)
    state = tmp_path / "state"
    server = start_server(cfg, tmp_path / "server.log")
    clients = [start_client(port, keys / n, tmp_path / f"{n}.log") for n in NAMES]
    procs = [server, *clients]
    try:
        wait_for(lambda: (state / "round_000001.safetensors").exists(), 90 * PATIENCE, "round 1")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10 * PATIENCE)
        assert not (state / "final_model.safetensors").exists()  # killed mid-run
        restarted = start_server(cfg, tmp_path / "server.log")
        procs.append(restarted)
        assert restarted.wait(timeout=120 * PATIENCE) == 0, _log_tail(tmp_path / "server.log")
        for n, c in zip(NAMES, clients, strict=True):  # they reconnected on their own
            assert c.wait(timeout=30 * PATIENCE) == 0, _log_tail(tmp_path / f"{n}.log")
    finally:
        stop_all(procs)
    assert "resuming run" in (tmp_path / "server.log").read_text()
    run_id, history = _checkpoint(state)
    assert [r.round for r in history] == [0, 1, 2, 3, 4]  # no completed round lost or repeated
    for record in history[1:]:
        assert record.clients_completed == 3
        assert record.metrics["fed_eval.clients"] == 2
        assert 0 < record.metrics["fed_eval.accuracy"] <= 1
    simulated, sim_history = _simulate(cfg)
    _assert_same_model(state / "final_model.safetensors", simulated)
    _assert_same_history(history, sim_history)
    # Each client keeps its control variate on disk, versioned by round.
    for cid, name in enumerate(NAMES):
        run_dir = client_state_dir(tmp_path, name) / run_id
        assert (run_dir / f"{cid}.prev.safetensors").exists()
        saved = load_file(str(run_dir / f"{cid}.safetensors"))
        assert saved and all(k.startswith("control/") for k in saved)
        assert any(np.abs(v).sum() > 0 for v in saved.values())


def test_client_sigkilled_mid_round_restarts_with_its_state(tmp_path: Path) -> None:
    """SCAFFOLD; c1 is SIGKILLed while it trains in round 2 and restarted. The server sees the
    disconnect at once; every round needs both records, so round 2 is retried once c1 is
    back. The restarted c1 must continue from the control variate its first process wrote, or
    the model would differ from the simulation's."""
    names = NAMES[:2]
    keys = make_keys(tmp_path, names)
    port = free_port()
    cfg = write_config(
        tmp_path,
        keys,
        port,
        rounds=3,
        clients=2,
        epochs=12,
        min_completed=2,
        timeout=60,
        extra=SCAFFOLD,
    )
    state = tmp_path / "state"
    c1_log = tmp_path / "c1.log"
    server = start_server(cfg, tmp_path / "server.log")
    clients = [start_client(port, keys / n, tmp_path / f"{n}.log") for n in names]
    procs = [server, *clients]
    try:
        wait_for(
            lambda: "round 2: received a fit task" in c1_log.read_text(), 90 * PATIENCE, "round 2"
        )
        clients[1].send_signal(signal.SIGKILL)
        clients[1].wait(timeout=10 * PATIENCE)
        restarted = start_client(port, keys / "c1", tmp_path / "c1_again.log")
        procs.append(restarted)
        assert server.wait(timeout=120 * PATIENCE) == 0, _log_tail(tmp_path / "server.log")
        assert restarted.wait(timeout=30 * PATIENCE) == 0, _log_tail(tmp_path / "c1_again.log")
    finally:
        stop_all(procs)
    assert "round 2: fit done" not in c1_log.read_text()  # it died while training
    server_log = (tmp_path / "server.log").read_text()
    assert "failure of c1: client disconnected" in server_log
    assert "re-sampling" in server_log
    run_id, history = _checkpoint(state)
    assert [r.round for r in history] == [0, 1, 2, 3]
    assert all(r.clients_completed == 2 for r in history[1:])
    again = (tmp_path / "c1_again.log").read_text()
    assert "trained in 2 rounds" in again  # rounds 2 and 3 ...
    assert (client_state_dir(tmp_path, "c1") / run_id / "1.safetensors").exists()
    # ... starting from the state its first process left on disk.
    simulated, _ = _simulate(cfg)
    _assert_same_model(state / "final_model.safetensors", simulated)


@pytest.mark.parametrize(
    "extra",
    [
        '[privacy]\nmode = "central"\nnoise_multiplier = 0.5\nadaptive_clip = true\n'
        "count_stddev = 1.0\nseeded_noise = true\nclip_norm = 0.5\n"
        '[update]\ncodec = "rotated_q4"\n',
        '[privacy]\nmode = "sample"\nnoise_multiplier = 1.0\nseeded_noise = true\n',
    ],
    ids=["central-adaptive-compressed", "dp-sgd"],
)
def test_private_and_compressed_deployment_matches_simulation(tmp_path: Path, extra: str) -> None:
    """Client-side clipping and compression (or DP-SGD) on real client processes, the
    server's decoding, noise and accountant: with seeded noise, the deployed run releases the
    simulation's model and reports the same epsilons and bytes."""
    keys = make_keys(tmp_path, NAMES)
    port = free_port()
    cfg = write_config(tmp_path, keys, port, rounds=2, extra=extra)
    _serve_to_completion(tmp_path, cfg, keys, port)
    _, history = _checkpoint(tmp_path / "state")
    epsilon = history[-1].metrics.get("dp.epsilon", history[-1].metrics.get("dp_sgd.epsilon.max"))
    assert epsilon is not None and epsilon > 0
    simulated, sim_history = _simulate(cfg)
    _assert_same_model(tmp_path / "state" / "final_model.safetensors", simulated)
    _assert_same_history(history, sim_history)
    assert [r.bytes_up for r in history] == [r.bytes_up for r in sim_history]


def test_secure_aggregation_survives_a_client_sigkilled_mid_protocol(tmp_path: Path) -> None:
    """SecAgg+ over mutual TLS with keys signed by each site's certificate. In round 2, c0 is
    paused (SIGSTOP) while it trains, so the round's secure session cannot start; c2, which
    has trained and holds its record for the session, is SIGKILLed; c0 resumes. The session
    runs with the two sites left (complete graph of 3, threshold 2), and the restarted c2
    takes part again in round 3."""
    keys = make_keys(tmp_path, NAMES)
    port = free_port()
    extra = '[aggregation]\nkind = "secure_sum"\n[secagg]\ncomplete_graph = true\n'
    cfg = write_config(tmp_path, keys, port, rounds=3, epochs=20, timeout=60, extra=extra)
    logs = {n: tmp_path / f"{n}.log" for n in NAMES}
    server = start_server(cfg, tmp_path / "server.log")
    clients = [start_client(port, keys / n, logs[n]) for n in NAMES]
    procs = [server, *clients]
    try:
        wait_for(
            lambda: "round 2: received a fit task" in logs["c0"].read_text(), 90 * PATIENCE, "c0"
        )
        clients[0].send_signal(signal.SIGSTOP)
        wait_for(
            lambda: "round 2: fit done" in logs["c2"].read_text(), 60 * PATIENCE, "c2's training"
        )
        clients[2].send_signal(signal.SIGKILL)
        clients[2].wait(timeout=10 * PATIENCE)
        clients[0].send_signal(signal.SIGCONT)
        restarted = start_client(port, keys / "c2", tmp_path / "c2_again.log")
        procs.append(restarted)
        assert server.wait(timeout=120 * PATIENCE) == 0, _log_tail(tmp_path / "server.log")
        assert restarted.wait(timeout=30 * PATIENCE) == 0, _log_tail(tmp_path / "c2_again.log")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        stop_all(procs)
    _, history = _checkpoint(tmp_path / "state")
    assert [r.round for r in history] == [0, 1, 2, 3]
    assert history[1].clients_completed == 3 and history[3].clients_completed == 3
    assert history[2].clients_completed == 2  # c2's record died with it: either before its
    # fit reply left the process (a failed fit) or after it (dropped from the secure session)
    lost = history[2].clients.get("secagg_dropped", []) + history[2].clients.get("failed", [])
    assert 2 in lost
    assert all(r.metrics["secagg.threshold"] == 2 for r in history[1:])
    assert history[-1].test_accuracy > 0.5
    assert "secagg/unmask done" in (tmp_path / "c2_again.log").read_text()
    # No secret of a session was written to a site's disk.
    for name in NAMES:
        for path in (tmp_path / "client-state" / name).rglob("*.safetensors"):
            assert b"secagg/" not in path.read_bytes()


def test_bytes_counted_are_the_bytes_clients_transmit_and_codecs_match_simulation(
    tmp_path: Path,
) -> None:
    """Top-k with error feedback up and bfloat16 down, on real client processes: each
    round's ``bytes_up`` equals the array bytes the clients' gRPC replies carried (parsed
    from the safetensors payloads they sent, as their logs report), ``bytes_down`` the array
    bytes they received, and the model equals the simulation's (the residuals live in each
    site's own client state)."""
    keys = make_keys(tmp_path, NAMES)
    port = free_port()
    extra = '[update]\ncodec = "topk"\ntopk_fraction = 0.05\ndownlink = "bfloat16"\n'
    cfg = write_config(tmp_path, keys, port, rounds=3, extra=extra)
    _serve_to_completion(tmp_path, cfg, keys, port)
    _, history = _checkpoint(tmp_path / "state")
    sent: dict[int, int] = {}
    received: dict[int, int] = {}
    for name in NAMES:
        log = (tmp_path / f"{name}.log").read_text()
        for r, n in re.findall(r"round (\d+): sending a fit reply \(\d+ bytes, (\d+) array", log):
            sent[int(r)] = sent.get(int(r), 0) + int(n)
        for r, n in re.findall(r"round (\d+): received a fit task \([\d.]+ MB, (\d+) array", log):
            received[int(r)] = received.get(int(r), 0) + int(n)
    assert [r.bytes_up for r in history[1:]] == [sent[r] for r in (1, 2, 3)]
    assert [r.bytes_down for r in history[1:]] == [received[r] for r in (1, 2, 3)]
    params = sum(a.size for a in _simulate(cfg)[0].values())
    assert history[1].bytes_down == 3 * 2 * params  # 2 bytes a parameter down ...
    assert history[1].bytes_up == 3 * 8 * math.ceil(0.05 * params)  # ... 5% x 8 bytes up
    simulated, sim_history = _simulate(cfg)
    _assert_same_model(tmp_path / "state" / "final_model.safetensors", simulated)
    assert [r.bytes_up for r in history] == [r.bytes_up for r in sim_history]


def test_distributed_dp_over_secure_aggregation_on_real_processes(tmp_path: Path) -> None:
    """Distributed DP over the network: sites add discrete Gaussian noise inside SecAgg+ with
    signed keys; the server reports epsilon from the realized contributors and receives no
    training loss or example count."""
    keys = make_keys(tmp_path, NAMES)
    port = free_port()
    extra = (
        '[aggregation]\nkind = "secure_sum"\n[secagg]\ncomplete_graph = true\n'
        '[privacy]\nmode = "distributed"\nnoise_multiplier = 1.0\n'
    )
    cfg = write_config(tmp_path, keys, port, rounds=2, extra=extra)
    _serve_to_completion(tmp_path, cfg, keys, port)
    _, history = _checkpoint(tmp_path / "state")
    last = history[-1]
    assert [r.clients_completed for r in history[1:]] == [3, 3]
    # 2 releases at z = 1, replace-one (Delta = 2C): rho = 2 x 2^2 / 2
    assert last.metrics["dp.rho"] == pytest.approx(2 * 2.0, rel=1e-3)
    assert last.metrics["dp.epsilon"] > 0 and math.isnan(last.train_loss)


def _update_lines(server_log: Path) -> list[str]:
    """The server's one line per completed round or update."""
    return re.findall(r"round \d+: \d+ sampled", server_log.read_text())


def test_fedbuff_over_the_network_does_not_wait_for_a_frozen_client(tmp_path: Path) -> None:
    """FedBuff in real time (buffer 2, three clients training at once): c2 is frozen
    (SIGSTOP) once it has its first task, holding a task. The server keeps updating with c0
    and c1, which get new work as soon as they answer; when c2 wakes up, five updates later,
    its result arrives stale and is weighted down, and the run completes. (Heartbeats every
    30 s: a frozen client would be cut off after 75 silent seconds, longer than the freeze
    lasts even on a loaded machine.)"""
    keys = make_keys(tmp_path, NAMES)
    port = free_port()
    fedbuff = '[asynchronous]\nmode = "fedbuff"\nbuffer = 2\nconcurrency = 3\n'
    cfg = write_config(
        tmp_path, keys, port, rounds=40, epochs=4, heartbeat=30.0, extra=fedbuff, uniform=False
    )
    server_log, c2_log = tmp_path / "server.log", tmp_path / "c2.log"
    server = start_server(cfg, server_log)
    clients = [start_client(port, keys / n, tmp_path / f"{n}.log") for n in NAMES]
    try:
        # (the run starts once all three have joined: c2's first task means it has)
        wait_for(
            lambda: "received a fit task" in c2_log.read_text(), 90 * PATIENCE, "c2's first task"
        )
        clients[2].send_signal(signal.SIGSTOP)
        frozen_at = len(_update_lines(server_log))
        # (a synchronous round of all three clients would wait for c2 here)
        wait_for(
            lambda: len(_update_lines(server_log)) >= frozen_at + 5,
            90 * PATIENCE,
            "updates without c2",
        )
        clients[2].send_signal(signal.SIGCONT)
        assert server.wait(timeout=120 * PATIENCE) == 0, _log_tail(server_log)
        for n, c in zip(NAMES, clients, strict=True):
            assert c.wait(timeout=30 * PATIENCE) == 0, _log_tail(tmp_path / f"{n}.log")
    finally:
        for c in clients:
            c.send_signal(signal.SIGCONT)
        stop_all([server, *clients])
    _, history = _checkpoint(tmp_path / "state")
    assert [r.round for r in history] == list(range(41))
    assert all(r.clients_completed == 2 and r.labels["async"] == "fedbuff" for r in history[1:])
    # updates made of c0's and c1's results only (at least 4 of the 5 made while c2 was
    # frozen: a reply c2 sent just before the freeze may be in one)
    assert sum(set(r.clients["arrived"]) <= {0, 1} for r in history[1:]) >= 4
    # the result c2 held while frozen was computed on a model several updates old
    stale = [r for r in history[1:] if 2 in r.clients["arrived"]]
    assert stale and max(r.metrics["async.staleness.max"] for r in stale) >= 3, [
        (r.clients["arrived"], r.metrics["async.staleness.max"]) for r in history[1:]
    ]
    assert history[-1].test_accuracy > history[0].test_accuracy + 0.3
    # The server started again on the complete run (say, killed while it lingered) exits.
    again = start_server(cfg, tmp_path / "server_again.log")
    try:
        assert again.wait(timeout=60 * PATIENCE) == 0, _log_tail(tmp_path / "server_again.log")
    finally:
        stop_all([again])
