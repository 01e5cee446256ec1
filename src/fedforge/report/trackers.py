"""Optional export of every round record to experiment trackers: TensorBoard and MLflow.

Both are extras (``pip install 'fedforge[tensorboard]'``, ``'fedforge[mlflow]'``); asking
for one that is not installed fails before training with the command that installs it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedforge.core.errors import FedforgeError
from fedforge.report.history import RoundRecord
from fedforge.runtime.driver import RoundListener

if TYPE_CHECKING:
    from fedforge.config import RunConfig

_FIELDS = (
    "test_accuracy",
    "test_loss",
    "train_loss",
    "clients_sampled",
    "clients_completed",
    "clients_failed",
    "clients_rejected",
    "bytes_down",
    "bytes_up",
    "train_seconds",
    "aggregate_seconds",
    "eval_seconds",
    "wall_seconds",
)


def record_scalars(record: RoundRecord) -> dict[str, float]:
    """The round's numbers under tracker names (``test_accuracy``, ``metrics/clip.clipped``,
    ...); NaN and infinite values (no accepted client's train loss) are left out."""
    values = {name: float(getattr(record, name)) for name in _FIELDS}
    values.update({f"metrics/{k}": float(v) for k, v in record.metrics.items()})
    return {k: v for k, v in values.items() if math.isfinite(v)}


def flat_config(raw: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"server.rounds": "50", ...}`` from a nested configuration."""
    out: dict[str, str] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def mlflow_tracking_uri(run_dir: Path, environ: Mapping[str, str] = os.environ) -> str | None:
    """Where ``--mlflow`` logs: ``MLFLOW_TRACKING_URI`` when set (None: MLflow reads it),
    else a SQLite store in the run directory, ``RUN_DIR/mlflow.db`` (MLflow's own default
    would be a store in the current directory)."""
    if environ.get("MLFLOW_TRACKING_URI"):
        return None
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def provenance_tags(record: Mapping[str, Any]) -> dict[str, str]:
    """MLflow tags of a run's provenance (``fedforge.torch``, ``fedforge.seed``, ...)."""
    return {
        f"fedforge.{'version' if key == 'fedforge' else key}": (
            " ".join(map(str, value)) if isinstance(value, list) else str(value)
        )
        for key, value in record.items()
        if value is not None and not isinstance(value, dict)
    }


class TensorBoardExport(RoundListener):
    """Writes every round's scalars to a TensorBoard event file in ``log_dir`` (created at
    the first round: the run directory is prepared first)."""

    def __init__(self, log_dir: Path, settings: str = "") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FedforgeError(
                "--tensorboard needs TensorBoard, which is not installed: "
                "pip install 'fedforge[tensorboard]'"
            ) from None
        self._writer_class: Any = SummaryWriter
        self._log_dir = log_dir
        self._settings = settings
        self._writer: Any = None

    def round_finished(self, record: RoundRecord) -> None:
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self._log_dir))
            if self._settings:
                self._writer.add_text("run/settings", self._settings, record.round)
        for name, value in record_scalars(record).items():
            self._writer.add_scalar(name, value, record.round)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class MLflowExport(RoundListener):
    """Logs the configuration as parameters, ``tags`` (provenance; the backend and device
    when the run starts) and every round's scalars (step = round) to an MLflow run.
    ``tracking_uri`` None: MLflow's default (the ``MLFLOW_TRACKING_URI`` environment
    variable, else MLflow's local store); see :func:`mlflow_tracking_uri`."""

    def __init__(
        self,
        params: dict[str, str],
        tags: dict[str, str],
        *,
        tracking_uri: str | None = None,
        experiment: str = "fedforge",
        run_name: str | None = None,
    ) -> None:
        try:
            import mlflow
        except ImportError:
            raise FedforgeError(
                "--mlflow needs MLflow, which is not installed: pip install 'fedforge[mlflow]'"
            ) from None
        self._mlflow = mlflow
        try:
            if tracking_uri:
                mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_experiment(experiment)
            self.run = mlflow.start_run(run_name=run_name, tags=tags)
            mlflow.log_params(params)
        except Exception as exc:  # MLflow raises its own types (bad URI, store refused)
            raise FedforgeError(f"MLflow: {exc}") from None

    def run_started(self, backend: str, device: str) -> None:
        """The backend ``auto`` chose, and the device, once known."""
        self._mlflow.set_tags({"fedforge.backend": backend, "fedforge.device": device})

    def round_finished(self, record: RoundRecord) -> None:
        self._mlflow.log_metrics(record_scalars(record), step=record.round)

    def close(self) -> None:
        self._mlflow.end_run()


def missing_trackers(*, tensorboard: bool, mlflow: bool) -> str | None:
    """Why an asked-for experiment tracker cannot run here (checked before training)."""
    import importlib.util

    for wanted, module, extra in (
        (tensorboard, "tensorboard", "tensorboard"),
        (mlflow, "mlflow", "mlflow"),
    ):
        if wanted and importlib.util.find_spec(module) is None:
            return (
                f"--{extra} needs {module}, which is not installed: pip install 'fedforge[{extra}]'"
            )
    return None


def run_trackers(
    cfg: RunConfig, out_dir: Path, tensorboard: bool, mlflow: bool
) -> list[RoundListener]:
    """The experiment-tracker listeners ``fedforge run --tensorboard --mlflow`` asks for."""
    from datetime import datetime

    from fedforge.report.live import settings_text
    from fedforge.report.rundir import provenance

    raw = cfg.model_dump(mode="json", exclude_none=True)
    raw.pop("deploy", None)
    settings = settings_text(raw)
    trackers: list[RoundListener] = []
    if tensorboard:
        trackers.append(TensorBoardExport(out_dir / "tensorboard", settings))
    if mlflow:
        record = provenance(
            cfg, backend=cfg.runtime.backend, device=None, started=datetime.now().astimezone()
        )
        tags = {
            **provenance_tags(record),
            "fedforge.run_dir": str(out_dir),
            "mlflow.note.content": settings,
        }
        trackers.append(
            MLflowExport(
                flat_config(raw),
                tags,
                tracking_uri=mlflow_tracking_uri(out_dir),
                run_name=out_dir.name,
            )
        )
    return trackers
