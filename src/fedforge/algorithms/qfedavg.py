"""q-FedAvg (Li et al. 2020, "Fair Resource Allocation in Federated Learning").

q-FFL minimizes ``sum_k p_k F_k^(q+1) / (q+1)``: clients with a larger loss weigh more, which
evens out accuracy across clients. With ``L = 1 / lr`` (the paper's Lipschitz estimate),
client ``k`` trains locally to ``w_k``, sets ``dw_k = L (w - w_k)`` and reports
``Delta_k = F_k^q dw_k`` and ``h_k = q F_k^(q-1) ||dw_k||^2 + L F_k^q``, where ``F_k`` is
the global model's loss on its training data before it trains. The server steps
``w <- w - sum Delta_k / sum h_k``; ``h_k`` travels as a one-element array averaged with the
same (uniform) weights as ``Delta_k``, so the ratio of the two means is exact. ``q = 0``
gives ``Delta_k = -L dy_k``, ``h_k = L``: FedAvg with uniform weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from fedforge.aggregate.kinds import Aggregate
from fedforge.algorithms.base import RoundContext, ServerState, Weighting
from fedforge.algorithms.fedavg import FedAvg
from fedforge.core.params import ArraySpec, ParamSpec
from fedforge.core.records import RecordSpec
from fedforge.train.program import INITIAL_LOSS, LocalProgram, Tensors

H = "qffl/h"  # the client's h_k, averaged like Delta_k


@dataclass(frozen=True)
class QFedAvg(FedAvg):
    q: float = 1.0
    weighting: Weighting = "uniform"
    # h_k travels beside the update: a stage that scaled the record would scale h_k with it.
    accepts_stages: bool = False
    loop_refusal: ClassVar[str | None] = (
        "it takes 1 / client.lr as the Lipschitz constant of plain local SGD"
    )

    def __post_init__(self) -> None:
        if self.q < 0:
            raise ValueError(f"q-FedAvg q must be >= 0, got {self.q}")

    def program(self) -> LocalProgram:
        return replace(super().program(), initial_loss=True)

    def finish(
        self, delta: Tensors, shared: Tensors, own: Tensors, steps: torch.Tensor
    ) -> tuple[Tensors, Tensors]:
        lipschitz = 1.0 / self.local.lr
        loss = own[INITIAL_LOSS].double().clamp(min=1e-10)
        sq_norm = sum((d.double() ** 2).sum() for d in delta.values())
        scale = loss**self.q  # F_k^q
        arrays = {n: (-lipschitz * scale).to(d.dtype) * d for n, d in delta.items()}
        h = self.q * loss ** (self.q - 1) * lipschitz**2 * sq_norm + lipschitz * scale
        arrays[H] = h.to(torch.float32).reshape(1)
        return arrays, {}

    def record_spec(self, model: ParamSpec, trainable: list[str]) -> RecordSpec:
        arrays = {**model, H: ArraySpec((1,), np.dtype(np.float32))}
        return RecordSpec(arrays, metrics=("train_loss",))

    def server_update(
        self, state: ServerState, aggregate: Aggregate, context: RoundContext
    ) -> ServerState:
        h = float(aggregate.arrays[H][0])
        arrays = {n: (-aggregate.arrays[n] / h).astype(p.dtype) for n, p in state.params.items()}
        return super().server_update(state, replace(aggregate, arrays=arrays), context)
