"""The server's memory, planned before it serves: an estimate of its peak from the model,
the algorithm's server state, the aggregation's buffers, the broadcast and the replies in
flight, refused at start when it exceeds ``deploy.memory_budget_mb``.

Pure functions of sizes; the estimate is printed as one line either way, so an operator sees
what a larger model, more concurrent uploads or a robust aggregator costs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedforge.core.errors import ConfigError
from fedforge.core.params import ParamSpec

# The interpreter, torch, gRPC and the server's own bookkeeping, measured at about 0.5 GB
# resident for a small model (bench/bench_large_model.py).
RUNTIME_BYTES = 500 * 10**6


def spec_bytes(spec: ParamSpec, itemsize: int | None = None) -> int:
    """Bytes of arrays matching ``spec`` (each element ``itemsize`` bytes if given)."""
    return sum(
        int(np.prod(a.shape, dtype=np.int64)) * (itemsize or np.dtype(a.dtype).itemsize)
        for a in spec.values()
    )


@dataclass(frozen=True)
class MemoryPlan:
    """The server's estimated peak, part by part (bytes)."""

    parts: Mapping[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def line(self) -> str:
        detail = ", ".join(f"{name} {gb(size)}" for name, size in self.parts.items())
        return f"estimated peak server memory {gb(self.total)} ({detail})"


def gb(size: int) -> str:
    """A size in GB (in MB below one GB)."""
    return f"{size / 1e9:.2f} GB" if size >= 10**9 else f"{size / 1e6:.1f} MB"


def server_plan(
    *,
    model_bytes: int,
    state_bytes: int,
    broadcast_bytes: int,
    update: ParamSpec,
    kind: str,
    per_round: int,
    uploads: int,
    evaluation_copy: bool = False,
) -> MemoryPlan:
    """The estimate for a server whose global model takes ``model_bytes``, its algorithm's
    other server state (optimizer moments, control variates) ``state_bytes``, the arrays
    broadcast to every client (encoded once) ``broadcast_bytes``; records of
    spec ``update``, aggregated by ``kind`` over up to ``per_round`` records a round, with
    up to ``uploads`` replies received at once (0: every record of the round at once) while
    the driver folds the one received before them into the aggregate; ``evaluation_copy``:
    the model is evaluated on a copy (a workload's own evaluation code), not in place."""
    record = spec_bytes(update)
    # Replies being received, and the record the driver is folding in meanwhile.
    in_flight = (min(uploads, per_round) if uploads else per_round) + 1
    if kind == "mean":
        aggregation = spec_bytes(update, 8) + record  # the float64 running sum, the mean
    elif kind == "gather":
        aggregation = per_round * record + record  # every record of the round, the estimate
    else:  # secure_sum: the ring sum of 64-bit words, the decoded mean
        aggregation = spec_bytes(update, 8) + record
    return MemoryPlan(
        {
            "model": model_bytes,
            **({"evaluation copy": model_bytes} if evaluation_copy else {}),
            "server state": state_bytes,
            "new model": model_bytes,
            "broadcast": broadcast_bytes,
            f"aggregation ({kind})": aggregation,
            f"replies in flight ({in_flight})": in_flight * record,
            "runtime": RUNTIME_BYTES,
        }
    )


def check_budget(plan: MemoryPlan, budget_mb: int) -> None:
    """Refuse (ConfigError, one line with the estimate) a plan above ``budget_mb`` MB
    (0: no budget)."""
    if budget_mb and plan.total > budget_mb * 10**6:
        raise ConfigError(
            f"{plan.line()} exceeds deploy.memory_budget_mb = {budget_mb}: lower "
            "deploy.max_concurrent_uploads, use a mean (not a robust) aggregation, a smaller "
            "model, or raise the budget"
        )
