"""Early stopping (``server.stop_when``): a pure function of the run's history, so a resumed
run reaches the same decision from its checkpointed history.

A rule watches one metric of the trained rounds (round 1 on; rounds that did not record it are
skipped): it stops when the last recorded value reaches ``threshold``, or when the best value
is ``patience`` rounds old (a value improves on the best by more than ``min_delta``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fedforge.report.history import History, RoundRecord

STOPPED = "stopped"  # the label of the round after which the rule stopped the run
TOP_LEVEL = ("test_accuracy", "test_loss", "train_loss")


@dataclass(frozen=True)
class StopRule:
    """Stop on ``metric`` (a round record field such as ``test_accuracy`` or a metric such
    as ``fed_eval.accuracy``): at ``threshold``, after ``patience`` rounds without a new
    best, or either. ``mode`` ``max``: larger is better; ``min``: smaller is."""

    metric: str
    threshold: float | None = None
    patience: int | None = None
    mode: Literal["max", "min"] = "max"
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.threshold is None and self.patience is None:
            raise ValueError("a stop rule needs a threshold, a patience or both")
        if self.patience is not None and self.patience < 1:
            raise ValueError("patience must be at least 1 round")

    @staticmethod
    def default_mode(metric: str) -> Literal["max", "min"]:
        return "min" if metric.endswith("loss") else "max"

    def value(self, record: RoundRecord) -> float | None:
        """The metric in ``record`` (None when not recorded, or NaN)."""
        if self.metric in TOP_LEVEL:
            value = float(getattr(record, self.metric))
        else:
            value = record.metrics.get(self.metric, math.nan)
        return None if math.isnan(value) else value

    def better(self, value: float, best: float, margin: float = 0.0) -> bool:
        return value > best + margin if self.mode == "max" else value < best - margin

    def reason(self, history: History) -> str | None:
        """Why the run stops after the last round of ``history``, or None to go on."""
        seen = [(r.round, v) for r in history if r.round > 0 and (v := self.value(r)) is not None]
        if not seen:
            return None
        last_round, last = seen[-1]
        if self.threshold is not None and (
            last == self.threshold or self.better(last, self.threshold)
        ):
            return (
                f"{self.metric} reached {last:.4g} in round {last_round} "
                f"(server.stop_when.threshold = {self.threshold:g})"
            )
        if self.patience is None:
            return None
        best_round, best = seen[0]
        for round_number, value in seen[1:]:
            if self.better(value, best, self.min_delta):
                best_round, best = round_number, value
        if history[-1].round - best_round >= self.patience:
            return (
                f"{self.metric} has not improved for {history[-1].round - best_round} rounds "
                f"(best {best:.4g} in round {best_round}; server.stop_when.patience = "
                f"{self.patience})"
            )
        return None
