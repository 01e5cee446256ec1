"""Per-round records of a run, serializable to JSON and loaded back without loss.

JSON has no NaN or infinity: they are written as ``null`` (a round in which no client was
accepted has no training loss) and read back as NaN where the record holds a float.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fedforge.core.errors import FedforgeError


@dataclass(frozen=True)
class RoundRecord:
    """What happened in one round (round 0 is the initial model's evaluation).

    Accuracy and loss are on the central test set after the round's update; ``train_loss`` is
    the example-weighted mean over accepted clients (NaN when none was accepted). Seconds are
    split into client work (``train_seconds``: the fit exchange, less the server's share),
    server validation and aggregation (``aggregate_seconds``), and evaluation (central and
    federated, ``eval_seconds``). ``metrics`` holds named per-stage and per-aggregator values
    (``clip.clipped``, ``fed_eval.accuracy``, ...); ``clients`` named lists of client ids
    (``excluded``, ``downweighted``, ``failed``, ``rejected``); ``labels`` named descriptions
    from the stages (``dp.mode``, ``dp.sampling``, ``dp.noise``: how privacy was accounted).
    """

    round: int
    test_accuracy: float
    test_loss: float
    train_loss: float = math.nan
    clients_sampled: int = 0
    clients_completed: int = 0
    clients_failed: int = 0
    clients_rejected: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    train_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    clients: dict[str, list[int]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, object]) -> RoundRecord:
        """The record ``to_dict`` (or its JSON, nulls for NaN) describes."""
        names = {f.name for f in fields(cls)}
        unknown = set(row) - names
        if unknown:
            raise FedforgeError(f"round record has unknown fields {sorted(unknown)}")
        values = dict(row)
        for f in fields(cls):
            if f.type == "float" and values.get(f.name, 0.0) is None:
                values[f.name] = math.nan
        metrics = values.get("metrics")
        if isinstance(metrics, dict):
            values["metrics"] = {k: math.nan if v is None else v for k, v in metrics.items()}
        return cls(**values)  # type: ignore[arg-type]


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity (in nested dicts and lists) replaced by None:
    what JSON can hold."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def to_json(value: Any, indent: int | None = None) -> str:
    """Strict JSON of ``value``, NaN and infinities written as null."""
    return json.dumps(finite(value), indent=indent, allow_nan=False)


DP_SGD_MAX = "dp_sgd.epsilon.max_so_far"  # the largest epsilon any DP-SGD client reported


def privacy_text(record: RoundRecord) -> str:
    """``eps 1.23 (delta 1e-05, add/remove one client)`` when the round recorded a DP
    epsilon (for DP-SGD: the largest any client has reported so far), with the neighbouring
    relation it is for; else empty."""
    m = record.metrics
    adjacency = record.labels.get("dp.adjacency", "").split(" (")[0]
    relation = f", {adjacency}" if adjacency else ""
    if "dp.epsilon" in m:
        return f"eps {m['dp.epsilon']:.3g} (delta {m.get('dp.delta', math.nan):g}{relation})"
    largest = m.get(DP_SGD_MAX, m.get("dp_sgd.epsilon.max"))
    if largest is not None:
        delta = record.labels.get("dp.delta")
        detail = f"delta {delta}{relation}" if delta else "DP-SGD"
        return f"eps <= {largest:.3g} per client ({detail})"
    return ""


def accuracy_text(record: RoundRecord) -> str:
    """``test accuracy 95.61%, test loss 0.1769``; without a central test set, the federated
    evaluation's accuracy (or that there was no evaluation). A workload's own evaluation
    (``Workload.evaluate``): its central ``test_<name>`` metrics, else its federated ones."""
    if not math.isnan(record.test_accuracy):
        return f"test accuracy {100 * record.test_accuracy:.2f}%, test loss {record.test_loss:.4f}"
    own = workload_scores(record)
    if own:
        return own
    federated = record.metrics.get("fed_eval.accuracy", math.nan)
    if not math.isnan(federated):
        return f"federated evaluation accuracy {100 * federated:.2f}% (no central test set)"
    return "no central test set and no federated evaluation"


STANDARD_FED_EVAL = ("fed_eval.accuracy", "fed_eval.loss", "fed_eval.clients")


def workload_scores(record: RoundRecord) -> str:
    """``test episode_return 187.4`` (a workload's central evaluation), else ``federated
    evaluation episode_return 180.2``; empty when the round has neither."""
    central = {k[5:]: v for k, v in record.metrics.items() if k.startswith("test_")}
    if central:
        return ", ".join(f"test {k} {v:.4g}" for k, v in sorted(central.items()))
    federated = {
        k[9:]: v
        for k, v in record.metrics.items()
        if k.startswith("fed_eval.") and k not in STANDARD_FED_EVAL and k.count(".") == 1
    }
    if federated and math.isnan(record.metrics.get("fed_eval.accuracy", math.nan)):
        return ", ".join(f"federated evaluation {k} {v:.4g}" for k, v in sorted(federated.items()))
    return ""


class History(list[RoundRecord]):
    """The list of round records, with JSON round-tripping."""

    def to_json(self) -> str:
        return to_json([r.to_dict() for r in self], indent=2)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> History:
        return cls(RoundRecord.from_dict(row) for row in json.loads(path.read_text()))

    def metric(self, name: str) -> list[tuple[int, float]]:
        """(round, value) of a named metric, in the rounds that recorded it."""
        return [(r.round, r.metrics[name]) for r in self if name in r.metrics]
