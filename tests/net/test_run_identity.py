"""A deployment's run keeps what it was started with, across restarts of real server
processes: its client ids (and with them each site's privacy ledger), its partitions and its
configuration; a full disk ends the server in one line with the state intact."""

from __future__ import annotations

import itertools
import re
import resource
from pathlib import Path

import pytest

from fedforge.config import load_config
from fedforge.core.errors import ConfigError
from fedforge.net.keys import add_client
from fedforge.net.server import run_server
from tests.net.helpers import (
    PATIENCE,
    fedforge,
    free_port,
    make_keys,
    start_client,
    start_server,
    stop_all,
    stored_run,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.timeout(PATIENCE * 300)
DP_SGD = '[privacy]\nmode = "sample"\nnoise_multiplier = 1.0\n'


def _stored(state: Path) -> tuple[int, list[float]]:
    """(the last stored round, the largest DP-SGD epsilon a site reported in each round)."""
    checkpoint = stored_run(state)
    epsilons = [r.metrics["dp_sgd.epsilon.max"] for r in checkpoint.history[1:]]
    return checkpoint.state.round, epsilons


def test_a_new_site_and_a_full_disk_leave_ids_privacy_and_state_intact(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, ["alice", "bob"])
    port = free_port()
    cfg = write_config(tmp_path, keys, port, rounds=3, clients=3, min_clients=2, extra=DP_SGD)
    cfg.write_text(cfg.read_text().replace("hidden = [32]", "hidden = [512]"))  # ~150 KB
    state = tmp_path / "state"
    logs = {n: tmp_path / f"{n}.log" for n in ("server", "again", "alice", "bob")}
    server = start_server(cfg, logs["server"])
    procs = [server, *(start_client(port, keys / n, logs[n]) for n in ("alice", "bob"))]
    try:
        # Round 1 is stored; then no file may grow beyond 100 KB (a checkpoint is ~150 KB):
        # the disk is full for the next checkpoint.
        wait_for(lambda: (state / "round_000001.safetensors").exists(), 120 * PATIENCE, "round 1")
        resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (100_000, 100_000))
        assert server.wait(timeout=120 * PATIENCE) == 1
        log = logs["server"].read_text()
        assert "Traceback" not in log
        said = re.findall(r"error: cannot write \S+: File too large; .*", log)
        assert len(said) == 1, log
        assert "saved rounds are intact" in said[0] and f"fedforge server {cfg}" in said[0]
        stored, _ = _stored(state)
        assert stored >= 1
        # The run may grow longer (and how it is served may change); a new site joins with
        # the next id. The sites that were there reconnect on their own and keep their ids.
        add_client(keys, "aaron", keys / "aaron")
        longer = ["--set", "server.rounds=4", "--set", "deploy.min_clients=3"]
        again = fedforge(["server", str(cfg), *longer], logs["again"])
        procs += [again, start_client(port, keys / "aaron", tmp_path / "aaron.log")]
        assert again.wait(timeout=120 * PATIENCE) == 0, logs["again"].read_text()[-3000:]
    finally:
        stop_all(procs)
    log = logs["again"].read_text()
    assert "newly registered aaron (id 2) join with the next ids" in log
    assert re.search(r"server\.rounds 3 -> 4 \(\d completed\)", log)
    for name, cid in (("alice", 0), ("bob", 1)):
        joined = re.findall(rf"as {name} \(id (\d+)\)", logs[name].read_text())
        assert len(joined) >= 2 and set(joined) == {str(cid)}, joined
    # Each site's privacy ledger followed it: the epsilon a site reports only grows.
    last, epsilons = _stored(state)
    assert last == 4 and len(epsilons) == 4
    assert all(b > a for a, b in itertools.pairwise(epsilons)), epsilons
    # Like a simulation's run directory, the state directory holds the history and report.
    assert (state / "history.json").is_file() and (state / "report.png").is_file()
    # What the run computes with cannot change: refused at start, naming the key ...
    with pytest.raises(ConfigError, match=r"partition\.num_clients = 4 differs from the run's 3"):
        run_server(load_config(cfg, ["server.rounds=4", "partition.num_clients=4"]))
    # ... and a site registered beyond the run's partitions is refused, saying what to do.
    add_client(keys, "zed", keys / "zed")
    with pytest.raises(ConfigError, match=r"zed \(id 3\) would have none: start a new run"):
        run_server(load_config(cfg, ["server.rounds=4"]))
