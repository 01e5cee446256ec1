"""Export of every round record to TensorBoard and MLflow (optional extras): a real run
read back with each tool's own reader; a clear error before training where one is absent."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedforge.cli import app
from fedforge.report.history import History, RoundRecord
from fedforge.report.trackers import flat_config, record_scalars
from tests.test_cli import SMALL

ROUNDS = 3


def test_record_scalars_names_every_number_and_leaves_out_nan() -> None:
    record = RoundRecord(
        2, 0.5, 1.25, train_loss=math.nan, bytes_up=100, metrics={"clip.clipped": 3.0}
    )
    scalars = record_scalars(record)
    assert scalars["test_accuracy"] == 0.5 and scalars["test_loss"] == 1.25
    assert scalars["bytes_up"] == 100 and scalars["metrics/clip.clipped"] == 3.0
    assert "train_loss" not in scalars and "round" not in scalars


def test_flat_config() -> None:
    assert flat_config({"seed": 1, "server": {"rounds": 5, "lr": None}}) == {
        "seed": "1",
        "server.rounds": "5",
        "server.lr": "None",
    }


@pytest.mark.parametrize("flag", ["--tensorboard", "--mlflow"])
def test_a_missing_tracker_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, package=None: None if name in ("tensorboard", "mlflow") else real(name),
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--out", str(out), flag, "--quiet"])
    assert result.exit_code == 2
    extra = flag.removeprefix("--")
    assert f"pip install 'fedforge[{extra}]'" in result.output
    assert len(result.output.strip().splitlines()) == 1  # one line, no traceback
    assert not out.exists()  # nothing was started


def run_with(tmp_path: Path, *flags: str) -> tuple[Path, History]:
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    out = tmp_path / "run"
    args = ["run", str(cfg), "--set", f"server.rounds={ROUNDS}", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(app, [*args, *flags])
    assert result.exit_code == 0, result.output
    return out, History.load(out / "history.json")


def test_tensorboard_event_file_holds_every_round(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, history = run_with(tmp_path, "--tensorboard")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for name in ("test_accuracy", "test_loss", "bytes_up", "clients_completed"):
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == [r.round for r in history]
        assert [s.value for s in scalars] == pytest.approx(
            [float(getattr(r, name)) for r in history], rel=1e-6
        )
    train = events.Scalars("train_loss")
    assert [s.step for s in train] == list(range(1, ROUNDS + 1))  # round 0 has no train loss


def test_mlflow_logs_into_the_run_directory_unless_told_and_tags_the_provenance(
    tmp_path: Path,
) -> None:
    from fedforge.config import RunConfig
    from fedforge.report.rundir import provenance
    from fedforge.report.trackers import mlflow_tracking_uri, provenance_tags

    run_dir = tmp_path / "run"
    assert mlflow_tracking_uri(run_dir, {}) == f"sqlite:///{run_dir.resolve()}/mlflow.db"
    assert mlflow_tracking_uri(run_dir, {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) is None
    record = provenance(RunConfig(seed=7), backend="auto", device=None, started=datetime.now())
    tags = provenance_tags(record)
    for key in ("version", "torch", "numpy", "python", "platform", "backend_requested"):
        assert tags[f"fedforge.{key}"] == str(record["fedforge" if key == "version" else key])
    assert tags["fedforge.seed"] == "7" and "fedforge.device" not in tags  # not known yet


def test_mlflow_run_holds_the_config_and_every_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()  # a local file store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in
    monkeypatch.setattr(sys, "argv", ["fedforge", "run", "--mlflow"])
    out, history = run_with(tmp_path, "--mlflow")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fedforge")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["server.rounds"] == str(ROUNDS)
    assert run.data.params["data.dataset"] == "digits"
    assert run.data.tags["fedforge.run_dir"] == str(out)
    provenance = json.loads((out / "provenance.json").read_text())
    for key in ("torch", "numpy", "python", "platform", "backend", "device", "seed"):
        assert run.data.tags[f"fedforge.{key}"] == str(provenance[key]), key
    assert run.info.status == "FINISHED"
    accuracy = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert sorted((m.step, m.value) for m in accuracy) == [
        (r.round, pytest.approx(r.test_accuracy)) for r in history
    ]


def test_mlflow_without_a_tracking_uri_logs_into_the_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    out, history = run_with(tmp_path, "--mlflow")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "small.toml"]  # not in cwd
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("fedforge")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert (
        run.data.tags["fedforge.backend"]
        == json.loads((out / "provenance.json").read_text())["backend"]
    )
    assert len(client.get_metric_history(run.info.run_id, "test_accuracy")) == len(history)
