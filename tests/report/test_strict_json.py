"""history.json, live.jsonl and the checkpoint's records are strict JSON: NaN and infinities
are written as null and read back as NaN where the record holds a float (issue 21)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedforge.report.history import History, RoundRecord
from fedforge.report.live import LiveLog, LiveState


def strict(text: str) -> object:
    def refuse(name: str) -> None:
        raise AssertionError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


def nan_round() -> RoundRecord:
    return RoundRecord(
        1, 0.5, math.inf, train_loss=math.nan, metrics={"fed_eval.loss": math.nan, "x": 2.0}
    )


def test_history_json_has_null_for_nan_and_loads_it_back_as_nan(tmp_path: Path) -> None:
    path = tmp_path / "history.json"
    History([RoundRecord(0, 0.1, 2.0), nan_round()]).save(path)
    rows = strict(path.read_text())
    assert isinstance(rows, list) and rows[1]["train_loss"] is None
    assert rows[1]["test_loss"] is None and rows[1]["metrics"]["fed_eval.loss"] is None
    back = History.load(path)
    assert math.isnan(back[1].train_loss) and math.isnan(back[1].test_loss)
    assert math.isnan(back[1].metrics["fed_eval.loss"]) and back[1].metrics["x"] == 2.0
    assert back[0] == RoundRecord(0, 0.1, 2.0)
    # A history written before (bare NaN) still loads.
    path.write_text('[{"round": 1, "test_accuracy": 0.5, "test_loss": NaN}]')
    assert math.isnan(History.load(path)[0].test_loss)


def test_live_log_lines_are_strict_json_and_the_dashboard_reads_them(tmp_path: Path) -> None:
    live = LiveLog(tmp_path / "live.jsonl")
    live.round_started(1, [0, 1])
    live.client_reported(0, "accepted", "", {"train_loss": math.nan})
    live.round_finished(nan_round())
    for line in (tmp_path / "live.jsonl").read_text().splitlines():
        strict(line)
    state = LiveState(tmp_path).state()
    assert state["rounds"][0]["train_loss"] is None
    assert state["client_metrics"]["clients"] == [{"client": 0, "train_loss": None}]


def test_checkpoint_records_are_strict_json(tmp_path: Path) -> None:
    import numpy as np

    from fedforge.algorithms.base import ServerState
    from fedforge.runtime.checkpoint import CheckpointStore

    store = CheckpointStore(tmp_path)
    state = ServerState(1, {"w": np.zeros(2, np.float32)}, {})
    run_id, _, _ = store.open_run(0, state)
    store.save(run_id, state, History([nan_round()]))
    (text,) = store.db.execute("SELECT record FROM rounds").fetchone()
    strict(text)
    loaded = store.load()
    assert loaded is not None and math.isnan(loaded.history[0].train_loss)
    store.close()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_non_finite_float_becomes_null(value: float) -> None:
    from fedforge.report.history import to_json

    assert strict(to_json({"a": [value, {"b": value}], "c": 1.5})) == {
        "a": [None, {"b": None}],
        "c": 1.5,
    }
