"""Hostile sites in secure aggregation against a real server process over mutual TLS: each is
excluded at the step where it cheats and named; the honest sites' rounds complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.net.helpers import (
    PATIENCE,
    free_port,
    make_keys,
    start_server,
    stop_all,
    stored_history,
    wait_for_run,
    write_config,
)
from tests.net.hostile_sites import start_sites

pytestmark = pytest.mark.timeout(PATIENCE * 300)
HONEST = ["alice", "bob", "carol", "dave"]
HOSTILE = {"mallory-key": "key", "mallory-sig": "sig", "mallory-x": "shifty"}


def test_hostile_sites_are_excluded_and_the_honest_rounds_complete(tmp_path: Path) -> None:
    """Seven sites, a complete graph (threshold 4). Every round, mallory-sig advertises keys it
    did not sign and mallory-key an all-zero key: the server refuses both at the advertise
    step. mallory-x sends garbage shares in round 1 (its neighbours refuse them: excluded at
    the mask step), crafted shares at the unmask step of round 2 (discarded: they differ
    from what it dealt; the sum stays exact), and a crafted masked input in round 3 (the
    sum is impossible: refused, and the round retried without the known culprits)."""
    names = sorted([*HONEST, *HOSTILE])
    ids = {name: i for i, name in enumerate(names)}
    keys = make_keys(tmp_path, names)
    port = free_port()
    extra = '[aggregation]\nkind = "secure_sum"\n[secagg]\ncomplete_graph = true\n'
    cfg = write_config(
        tmp_path, keys, port, rounds=3, clients=len(names), timeout=60 * PATIENCE, extra=extra
    )
    server = start_server(cfg, tmp_path / "server.log")
    behaviours = [f"{n}={HOSTILE.get(n, 'honest')}" for n in names]
    sites = start_sites(port, keys, tmp_path / "client-state", behaviours, tmp_path / "sites.log")
    log = tmp_path / "server.log"
    try:
        assert wait_for_run(server, sites, 200 * PATIENCE) == 0, log.read_text()[-4000:]
        assert sites.wait(timeout=30 * PATIENCE) == 0, (tmp_path / "sites.log").read_text()[-4000:]
    finally:
        stop_all([server, sites])
    history = stored_history(tmp_path / "state")
    assert [r.round for r in history] == [0, 1, 2, 3]
    hostile_ids = sorted(ids[n] for n in HOSTILE)
    first, second, third = history[1:]
    assert first.clients["secagg_excluded"] == hostile_ids
    assert first.clients_completed == 4 and "secagg_failed" not in first.clients
    reasons = first.labels["secagg.excluded"]
    assert "mallory-sig: secagg/advertise: a peer's advertised keys are not signed" in reasons
    assert "mallory-key: secagg/advertise: a public key of low order" in reasons
    assert "mallory-x: secagg/mask: disputed shares: alice refused its share" in reasons
    assert second.clients["secagg_excluded"] == hostile_ids
    assert (
        "mallory-x: secagg/unmask: its seed share of alice is not the one dealt"
        in (second.labels["secagg.excluded"])
    )
    assert second.clients_completed == 5  # mallory-x's input was masked honestly
    assert third.clients["refused"] == [ids["mallory-key"], ids["mallory-sig"]]
    assert third.clients_completed == 5 and third.test_accuracy > 0.3
    text = log.read_text()
    assert "the unmasked sum is impossible for honest inputs" in text
    assert (
        "round 1: 7 sampled, 4 accepted, 0 rejected, 0 failed" in text
        and "excluded from the secure sum: mallory-key, mallory-sig, mallory-x" in text
    )
    for name in HONEST:  # no honest site is blamed or fails a step
        assert f"failure of {name}" not in text and f"excluded {name}" not in text
