"""The live log a dashboard reads: events as a run emits them, folded into one state."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import fedforge
from fedforge.data.federated import FederatedDataset
from fedforge.report.history import History, RoundRecord
from fedforge.report.live import LIVE, LiveLog, LiveState, finite, settings_text
from fedforge.runtime.driver import ACCEPTED, FAILED, REJECTED, RoundListener
from tests.conftest import small_mlp
from tests.runtime.test_outcomes import BAD_LABEL, NAN, poisoned


def test_events_fold_into_the_dashboard_state(tmp_path: Path) -> None:
    log = LiveLog(tmp_path / LIVE, every=0.0)
    live = LiveState(tmp_path)
    assert live.state()["rounds"] == [] and live.state()["status"] == "waiting"
    log.round_finished(RoundRecord(0, 0.1, 2.3))
    log.round_started(1, [4, 5, 6])
    log.client_done(4, ACCEPTED)
    log.client_reported(4, ACCEPTED, "", {"train_loss": 1.5})
    log.client_done(5, REJECTED)
    log.client_reported(5, REJECTED, "update: NaN or infinite", {})
    mid = live.state()
    assert [r["round"] for r in mid["rounds"]] == [0]
    assert mid["current"] == {"round": 1, "sampled": 3, "counts": {ACCEPTED: 1, REJECTED: 1}}
    assert mid["problems"] == [
        {"round": 1, "client": 5, "status": REJECTED, "reason": "update: NaN or infinite"}
    ]
    assert mid["rounds"][0]["train_loss"] is None  # NaN travels as null
    log.client_done(6, FAILED)
    log.client_reported(6, FAILED, "ValueError: bad label", {})
    log.round_finished(RoundRecord(1, 0.5, 1.2, train_loss=1.5, clients_sampled=3))
    end = live.state()
    assert [r["round"] for r in end["rounds"]] == [0, 1] and end["current"] is None
    assert end["rounds"][1]["test_accuracy"] == 0.5
    assert end["client_metrics"] == {"round": 1, "clients": [{"client": 4, "train_loss": 1.5}]}
    assert [p["reason"] for p in end["problems"]][-1] == "ValueError: bad label"
    json.dumps(end, allow_nan=False)  # valid JSON for a browser


def test_a_partial_line_waits_and_a_rerun_round_replaces_the_first(tmp_path: Path) -> None:
    path = tmp_path / LIVE
    first = {"event": "round", "record": RoundRecord(1, 0.5, 1.0).to_dict(), "client_metrics": []}
    line = json.dumps(first)
    path.write_text(line[:20])
    live = LiveState(tmp_path)
    assert live.state()["rounds"] == []
    path.write_text(line + "\n")
    assert live.state()["rounds"][0]["test_accuracy"] == 0.5
    again = {**first, "record": RoundRecord(1, 0.7, 0.9).to_dict()}  # a resumed run
    with path.open("a") as f:
        f.write(json.dumps(again) + "\n")
    assert [r["test_accuracy"] for r in live.state()["rounds"]] == [0.7]


def test_a_run_without_live_log_shows_its_history(tmp_path: Path) -> None:
    History([RoundRecord(0, 0.1, 2.0), RoundRecord(1, 0.6, 1.0)]).save(tmp_path / "history.json")
    (tmp_path / "config.toml").write_text("seed = 3\n")
    (tmp_path / "provenance.json").write_text('{"finished": "2024-01-01T00:00:00"}')
    state = LiveState(tmp_path).state()
    assert [r["test_accuracy"] for r in state["rounds"]] == [0.1, 0.6]
    assert state["status"] == "finished" and "seed 3" in state["title"]


def test_finite_and_settings_text() -> None:
    assert finite({"a": [math.nan, 1.0, math.inf], "b": "x"}) == {"a": [None, 1.0, None], "b": "x"}
    text = settings_text({"privacy": {"mode": "central", "noise_multiplier": 1.0}})
    assert text.startswith("fedavg (sgd server) on mnist5k, dirichlet over 100 clients")
    assert "10 per round, E=5, B=10" in text and text.endswith("central DP")
    assert "B=full" in settings_text({"client": {"batch_size": 0}})


class Recorder(RoundListener):
    def __init__(self) -> None:
        self.done: list[tuple[int, str]] = []
        self.reported: list[tuple[int, str, str, dict[str, float]]] = []

    def client_done(self, client_id: int, status: str) -> None:
        self.done.append((client_id, status))

    def client_reported(
        self, client_id: int, status: str, reason: str, metrics: dict[str, float]
    ) -> None:
        self.reported.append((client_id, status, reason, metrics))


@pytest.mark.parametrize("backend", ["sequential", "vectorized"])
def test_listeners_hear_every_client_with_its_reason_and_metrics(
    small_federated: FederatedDataset, backend: str
) -> None:
    data = poisoned(small_federated, (NAN, BAD_LABEL))
    recorder = Recorder()
    fedforge.simulate(
        small_mlp(),
        data,
        fedforge.FedAvg(local=fedforge.LocalSGD(lr=0.1, epochs=1, batch_size=8)),
        rounds=1,
        clients_per_round=data.num_clients,
        backend=backend,  # type: ignore[arg-type]
        options=fedforge.BackendOptions(memory_budget=1) if backend == "vectorized" else None,
        listener=recorder,
    )
    # One reply per client, whether it came alone or in a vectorized chunk's batch.
    assert sorted(c for c, _ in recorder.done) == list(range(data.num_clients))
    assert [(c, s) for c, s, _, _ in recorder.reported] == recorder.done
    by_client = {c: (s, r, m) for c, s, r, m in recorder.reported}
    assert by_client[NAN][:2] == (REJECTED, "0.weight: NaN or infinite")
    assert by_client[BAD_LABEL][0] == FAILED and "out of bounds" in by_client[BAD_LABEL][1]
    accepted = [m for s, _, m in by_client.values() if s == ACCEPTED]
    assert len(accepted) == data.num_clients - 2
    assert all(math.isfinite(m["train_loss"]) for m in accepted)
