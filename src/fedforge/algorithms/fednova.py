"""FedNova (Wang et al. 2020): normalized averaging for clients that ran different numbers of
local steps.

Client ``i`` runs ``tau_i`` local steps and reports its normalized update ``d_i = dy_i / a_i``
where ``a_i`` is the norm of its step-weight vector: ``tau_i`` for plain SGD, and
``(tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)`` with momentum ``rho``. Beside it the
record carries ``a_i`` as a one-element array averaged with the same weights ``p_i`` as the
updates, so the server reads ``tau_eff = sum p_i a_i`` and moves the model by
``tau_eff * sum p_i d_i``. With equal step counts this is FedAvg exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from fedforge.aggregate.kinds import Aggregate
from fedforge.algorithms.base import RoundContext, ServerState
from fedforge.algorithms.fedavg import FedAvg
from fedforge.core.params import ArraySpec, ParamSpec
from fedforge.core.records import RecordSpec
from fedforge.train.program import Tensors

STEPS = "fednova/steps"  # the client's a_i, averaged like its update


def step_norm(steps: torch.Tensor, momentum: float) -> torch.Tensor:
    """``a_i`` of ``steps`` local SGD steps with heavy-ball ``momentum`` (FedNova, Sec. 4)."""
    if momentum == 0:
        return steps
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


@dataclass(frozen=True)
class FedNova(FedAvg):
    # The normalizer travels beside the update: a stage that scaled the record (clipping)
    # would scale tau_eff with it.
    accepts_stages: bool = False
    loop_refusal: ClassVar[str | None] = (
        "it normalizes the update by the local steps of plain SGD (with momentum)"
    )

    def finish(
        self, delta: Tensors, shared: Tensors, own: Tensors, steps: torch.Tensor
    ) -> tuple[Tensors, Tensors]:
        a = step_norm(steps.clamp(min=1.0), self.local.momentum)
        arrays = {n: d / a.to(d.dtype) for n, d in delta.items()}
        arrays[STEPS] = a.to(torch.float32).reshape(1)
        return arrays, {}

    def record_spec(self, model: ParamSpec, trainable: list[str]) -> RecordSpec:
        arrays = {**model, STEPS: ArraySpec((1,), np.dtype(np.float32))}
        return RecordSpec(arrays, metrics=("train_loss",))

    def server_update(
        self, state: ServerState, aggregate: Aggregate, context: RoundContext
    ) -> ServerState:
        tau_eff = float(aggregate.arrays[STEPS][0])
        arrays = {
            n: (tau_eff * aggregate.arrays[n]).astype(p.dtype) for n, p in state.params.items()
        }
        return super().server_update(state, replace(aggregate, arrays=arrays), context)
