"""SCAFFOLD (Karimireddy et al. 2020), option II control update.

Server state: the global model ``x`` and the server control variate ``c`` (broadcast with the
model). Client state: its control variate ``c_i`` (zero at first). Locally every gradient is
corrected to ``g - c_i + c``; after ``K`` steps with learning rate ``lr`` the client sets
``c_i+ = c_i - c + (x - y_i) / (K lr)`` and reports ``dy = y_i - x`` and ``dc = c_i+ - c_i``.
The server applies its optimizer to the mean ``dy`` (plain: ``x += lr_g * mean dy``) and sets
``c += |S| / N * mean dc``. Means are unweighted, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from fedforge.aggregate.kinds import Aggregate
from fedforge.algorithms.base import RoundContext, ServerState, Weighting
from fedforge.algorithms.fedavg import FedAvg
from fedforge.core.params import ArraySpec, Params, ParamSpec
from fedforge.core.records import RecordSpec
from fedforge.train.program import ControlCorrection, LocalProgram, Tensors

CONTROL = "control/"


@dataclass(frozen=True)
class Scaffold(FedAvg):
    weighting: Weighting = "uniform"
    # The client updates its control variate from the control delta *before* the update
    # stages run; a stage that changes the record (clipping) would break c = mean(c_i).
    accepts_stages: bool = False
    loop_refusal: ClassVar[str | None] = (
        "it corrects every local gradient step with control variates"
    )

    def program(self) -> LocalProgram:
        return LocalProgram(self.local, corrections=(ControlCorrection(CONTROL),))

    def init(self, params: Params) -> ServerState:
        state = super().init(params)
        return replace(state, extras={CONTROL + n: np.zeros_like(p) for n, p in params.items()})

    def broadcast(self, state: ServerState) -> Params:
        return state.extras

    def init_client_state(self, trainable: Params) -> Params:
        return {CONTROL + n: np.zeros_like(p) for n, p in trainable.items()}

    def finish(
        self, delta: Tensors, shared: Tensors, own: Tensors, steps: torch.Tensor
    ) -> tuple[Tensors, Tensors]:
        arrays = dict(delta)  # dy = y_i - x
        scale = -1.0 / (steps.clamp(min=1.0) * self.local.lr)
        new_own: Tensors = {}
        for key, c_i in own.items():
            # c_i+ = c_i - c + (x - y_i) / (K lr), so dc = c_i+ - c_i = -c - dy / (K lr).
            dc = (arrays[key[len(CONTROL) :]] * scale).sub_(shared[key])
            arrays[key] = dc
            new_own[key] = c_i.add_(dc)  # in the runtime's copy of the state
        return arrays, new_own

    def record_spec(self, model: ParamSpec, trainable: list[str]) -> RecordSpec:
        arrays: dict[str, ArraySpec] = dict(model)
        arrays.update({CONTROL + n: model[n] for n in trainable})
        return RecordSpec(arrays, metrics=("train_loss",))

    def server_update(
        self, state: ServerState, aggregate: Aggregate, context: RoundContext
    ) -> ServerState:
        state = super().server_update(state, aggregate, context)
        fraction = aggregate.count / max(context.population_size, 1)
        extras = dict(state.extras)
        for key, c in state.extras.items():
            if key in aggregate.arrays:  # trainable parameters (buffers have no control)
                extras[key] = (c + fraction * aggregate.arrays[key]).astype(c.dtype)
        return replace(state, extras=extras)
