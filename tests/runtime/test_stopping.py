"""Early stopping (server.stop_when): the right round, the reason recorded, and a resumed run
that had stopped stays stopped."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import fedforge as ff
from fedforge.config import load_config
from fedforge.core.errors import ConfigError
from fedforge.experiment import build_stop_rule
from fedforge.report.history import History, RoundRecord
from fedforge.runtime.stopping import STOPPED, StopRule
from tests.conftest import small_mlp


def history(values: list[float], metric: str = "test_accuracy") -> History:
    out = History([RoundRecord(0, math.nan, math.nan)])
    for i, v in enumerate(values, start=1):
        if metric == "test_accuracy":
            out.append(RoundRecord(i, v, 1.0))
        else:
            out.append(RoundRecord(i, math.nan, math.nan, metrics={metric: v}))
    return out


def test_threshold_and_patience_on_a_history() -> None:
    rule = StopRule("test_accuracy", threshold=0.9)
    assert rule.reason(history([0.5, 0.8])) is None
    assert "test_accuracy reached 0.91 in round 3" in str(rule.reason(history([0.5, 0.8, 0.91])))
    patient = StopRule("fed_eval.loss", patience=2, mode="min", min_delta=0.01)
    losses = [1.0, 0.8, 0.795, 0.79]  # the last two improve by less than min_delta
    assert patient.reason(history(losses[:3], "fed_eval.loss")) is None
    reason = patient.reason(history(losses, "fed_eval.loss"))
    assert reason is not None and "best 0.8 in round 2" in reason
    # Rounds that did not record the metric are skipped, not counted as values.
    sparse = history([0.5, math.nan, 0.95])
    assert "round 3" in str(StopRule("test_accuracy", threshold=0.9).reason(sparse))


def test_a_run_stops_at_the_right_round_and_a_resume_respects_it(
    small_federated: ff.FederatedDataset, tmp_path: Path
) -> None:
    algorithm = ff.FedAvg(local=ff.LocalSGD(lr=0.1, epochs=1, batch_size=10))
    full = ff.simulate(small_mlp, small_federated, algorithm, rounds=8, clients_per_round=5)
    accuracies = [r.test_accuracy for r in full.history[1:]]
    threshold = sorted(accuracies)[len(accuracies) // 2]  # reached partway through
    expected = next(i for i, a in enumerate(accuracies, start=1) if a >= threshold)
    assert expected < 8
    rule = StopRule("test_accuracy", threshold=threshold)
    stopped = ff.simulate(
        small_mlp,
        small_federated,
        algorithm,
        rounds=8,
        clients_per_round=5,
        stop_when=rule,
        state_dir=tmp_path,
    )
    assert stopped.history[-1].round == expected
    assert stopped.stop_reason is not None and f"round {expected}" in stopped.stop_reason
    assert stopped.history[-1].labels[STOPPED] == stopped.stop_reason
    resumed = ff.simulate(
        small_mlp,
        small_federated,
        algorithm,
        rounds=12,
        clients_per_round=5,
        stop_when=rule,
        state_dir=tmp_path,
        resume=True,
    )
    assert [r.round for r in resumed.history] == [r.round for r in stopped.history]
    assert resumed.stop_reason == stopped.stop_reason
    # Without the rule, the resumed run goes on from where it stopped.
    more = ff.simulate(
        small_mlp,
        small_federated,
        algorithm,
        rounds=expected + 1,
        clients_per_round=5,
        state_dir=tmp_path,
        resume=True,
    )
    assert more.history[-1].round == expected + 1 and more.stop_reason is None


def test_stop_when_in_a_configuration() -> None:
    config = load_config(
        None,
        [
            'server.stop_when.metric="fed_eval.loss"',
            "server.stop_when.patience=3",
            "evaluation.fraction=0.5",
        ],
    )
    assert build_stop_rule(config) == StopRule("fed_eval.loss", None, 3, "min", 0.0)
    with pytest.raises(ConfigError, match="needs federated evaluation"):
        load_config(
            None, ['server.stop_when.metric="fed_eval.accuracy"', "server.stop_when.threshold=0.9"]
        )
    with pytest.raises(ConfigError, match="needs a threshold, a patience or both"):
        load_config(None, ['server.stop_when.metric="test_accuracy"'])
    with pytest.raises(ConfigError, match=r"needs server\.stop_when\.metric"):
        load_config(None, ["server.stop_when.patience=2"])
