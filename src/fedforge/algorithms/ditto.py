"""Ditto (Li et al. 2021, "Fair and Robust Federated Learning Through Personalization").

The global model is trained as in FedAvg. Each client also keeps a personal model ``v_k``
(``personal/<name>`` in its state, the global model before its first round) and, on the same
batches, trains it on ``F_k(v) + lam / 2 ||v - w||^2`` toward the global model ``w`` it
received (by proximal SGD, see :class:`~fedforge.train.program.PersonalCopy`). The record is
the global copy's change only: the personal model never leaves the client. ``lam = 0`` is
local training; ``lam -> inf`` keeps the personal model at the global one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from fedforge.algorithms.fedavg import FedAvg
from fedforge.core.params import Params
from fedforge.train.program import LocalProgram, PersonalCopy, Tensors

PERSONAL = "personal/"


@dataclass(frozen=True)
class Ditto(FedAvg):
    lam: float = 0.1
    personalized: bool = True
    loop_refusal: ClassVar[str | None] = (
        "it trains a personal copy beside the model on the same batches"
    )

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"Ditto lambda must be >= 0, got {self.lam}")

    def program(self) -> LocalProgram:
        return replace(super().program(), personal=PersonalCopy(self.lam, PERSONAL))

    def init_client_state(self, trainable: Params) -> Params:
        return {PERSONAL + n: np.array(p, copy=True) for n, p in trainable.items()}

    def personalize(self, params: Params, state: Params) -> Params:
        personal = {n[len(PERSONAL) :]: v for n, v in state.items() if n.startswith(PERSONAL)}
        return {**params, **personal}

    def finish(
        self, delta: Tensors, shared: Tensors, own: Tensors, steps: torch.Tensor
    ) -> tuple[Tensors, Tensors]:
        arrays = {n: d for n, d in delta.items() if not n.startswith(PERSONAL)}
        new_own = {n: shared[n[len(PERSONAL) :]] + d for n, d in delta.items() if n in own}
        return arrays, new_own
