"""How evenly a model serves its clients: the worst decile of per-client accuracy."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

WORST_SHARE = 0.1


def worst_share_mean(values: Sequence[float], share: float = WORST_SHARE) -> float:
    """Mean of the lowest ``share`` of ``values`` (at least one): the q-FFL and Ditto papers'
    "worst 10%" accuracy. NaN for no values."""
    if not len(values):
        return math.nan
    ordered = np.sort(np.asarray(values, np.float64))
    count = max(1, math.floor(share * len(ordered)))
    return float(ordered[:count].mean())


def client_spread(per_client: Mapping[str, Sequence[float]], prefix: str) -> dict[str, float]:
    """``<prefix><metric>.client_mean`` (unweighted over clients), ``.worst10`` and ``.min``
    of each per-client accuracy metric: what no client's claimed example count can move."""
    out: dict[str, float] = {}
    for name, values in per_client.items():
        if not name.endswith("accuracy") or not len(values):
            continue
        out[f"{prefix}{name}.client_mean"] = float(np.mean(values))
        out[f"{prefix}{name}.worst10"] = worst_share_mean(values)
        out[f"{prefix}{name}.min"] = float(np.min(values))
    return out


def fairness_text(metrics: Mapping[str, float]) -> str:
    """``clients: global 81.2% (worst 10% 40.1%), personal ...`` from the latest federated
    evaluation's metrics, else empty."""
    parts = []
    for key, label in (("accuracy", "global"), ("personal_accuracy", "personal")):
        mean = metrics.get(f"fed_eval.{key}.client_mean")
        worst = metrics.get(f"fed_eval.{key}.worst10")
        if mean is not None and worst is not None:
            parts.append(f"{label} {100 * mean:.1f}% (worst 10% {100 * worst:.1f}%)")
    return "per-client accuracy: " + ", ".join(parts) if parts else ""
