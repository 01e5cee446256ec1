"""What the driver and its listeners share: the listener hooks, an exchange's outcome, and
the federated-evaluation settings and record."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedforge.core.params import Params
from fedforge.core.records import RecordBatch
from fedforge.report.fairness import client_spread
from fedforge.report.history import RoundRecord
from fedforge.runtime.client_app import PERSONAL_ACCURACY, PERSONAL_LOSS
from fedforge.train.evaluate import Evaluation

Evaluator = Callable[[Params], Evaluation]
ACCEPTED, REJECTED, FAILED = "accepted", "rejected", "failed"
Check = Callable[[RecordBatch], tuple[np.ndarray, list[str | None]]]
# Takes validated records; may refuse rows whose values it checks itself (why, per row).
Accept = Callable[[RecordBatch], list[str | None] | None]


class RoundListener:
    """Hooks for progress display; override what you need."""

    def run_started(self, backend: str, device: str) -> None:
        """Called once before the first round with the backend that runs the clients (the
        one ``auto`` chose) and its torch device."""

    def round_started(self, round_number: int, client_ids: list[int]) -> None:
        """Called after sampling, before any client runs."""

    def round_expects(self, results: int) -> None:
        """Asynchronous training (FedBuff) only, after ``round_started`` (whose sample is
        empty: nobody is sampled): the accepted results the server update waits for (the
        buffer). Each result is then reported through ``client_done`` when it enters the
        buffer, a failed or rejected task when it arrives."""

    def client_done(self, client_id: int, status: str) -> None:
        """Called once per client reply of the fit exchange: accepted, rejected or failed."""

    def client_reported(
        self, client_id: int, status: str, reason: str, metrics: dict[str, float]
    ) -> None:
        """Called after ``client_done`` with why a reply was rejected or failed (empty when
        accepted) and, when accepted, the metrics the client reported."""

    def round_finished(self, record: RoundRecord) -> None:
        """Called with the completed round's record (round 0: the initial evaluation)."""


@dataclass(frozen=True)
class FederatedEvaluation:
    """Every ``every`` rounds, a ``fraction`` of the clients that hold out data (those
    without held-out examples are never asked) evaluates the new global model on its own
    held-out split; the example-weighted loss and accuracy are recorded."""

    fraction: float
    every: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1 or self.every < 1:
            raise ValueError("federated evaluation needs 0 < fraction <= 1 and every >= 1")


@dataclass
class Exchanged:
    """What came back from one exchange."""

    accepted: int = 0
    accepted_ids: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    bytes_up: int = 0
    server_seconds: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)  # example-weighted metric sums
    maxima: dict[str, float] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)  # per accepted client
    examples: float = 0.0
    clamped: list[int] = field(default_factory=list)  # counted fewer examples than claimed
    why: str = ""  # the last rejection: whose, and why

    def mean(self, metric: str) -> float:
        if not self.examples or metric not in self.sums:  # (withheld under distributed DP)
            return math.nan
        return self.sums[metric] / self.examples


def federated_metrics(
    exchange: Exchanged, personalized: bool, names: tuple[str, ...] = ()
) -> dict[str, float]:
    """A federated evaluation's metrics: the example-weighted means (counts clamped to each
    client's cap), and beside them the unweighted spread over clients (``client_mean``,
    ``worst10``, ``min``), which no client's claimed count can move. ``names``: a workload's
    own evaluation metrics instead of loss and accuracy (their means)."""
    if names:
        own = {f"fed_eval.{n}": exchange.mean(n) for n in names}
        return {**own, "fed_eval.clients": float(exchange.accepted)}
    metrics = {
        "fed_eval.accuracy": exchange.mean("accuracy"),
        "fed_eval.loss": exchange.mean("loss"),
        "fed_eval.clients": float(exchange.accepted),
    }
    if personalized:
        metrics[f"fed_eval.{PERSONAL_ACCURACY}"] = exchange.mean(PERSONAL_ACCURACY)
        metrics[f"fed_eval.{PERSONAL_LOSS}"] = exchange.mean(PERSONAL_LOSS)
    metrics.update(client_spread(exchange.values, "fed_eval."))
    return metrics
