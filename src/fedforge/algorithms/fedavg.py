"""FedAvg (McMahan et al. 2017): local SGD, example-weighted mean of deltas, server step."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from fedforge.aggregate.kinds import Aggregate
from fedforge.aggregate.server_opt import ServerOptimizer, ServerSGD
from fedforge.algorithms.base import RoundContext, ServerState, Weighting
from fedforge.core.params import Params, ParamSpec
from fedforge.core.records import RecordSpec
from fedforge.train.program import LocalProgram, LocalSGD, Tensors


@dataclass(frozen=True)
class FedAvg:
    """Federated averaging with a pluggable server optimizer.

    With the default ``ServerSGD(lr=1.0)`` the new global model is the example-weighted
    mean of the client models. Swapping the server optimizer (FedAvgM, FedAdam, FedYogi,
    FedAdagrad) gives the FedOpt family without touching the client side.
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    server_optimizer: ServerOptimizer = field(default_factory=ServerSGD)
    weighting: Weighting = "examples"
    accepts_stages: bool = True
    personalized: bool = False
    # Why a training function (``client.train``) cannot replace the local program: None when
    # the algorithm needs only the trained weights (the record is ``local - global``).
    loop_refusal: ClassVar[str | None] = None

    def program(self) -> LocalProgram:
        return LocalProgram(self.local)

    def init(self, params: Params) -> ServerState:
        return ServerState(
            round=0, params=params, optimizer_state=self.server_optimizer.init(params)
        )

    def broadcast(self, state: ServerState) -> Params:
        return {}

    def init_client_state(self, trainable: Params) -> Params:
        return {}

    def personalize(self, params: Params, state: Params) -> Params:
        """No personal model: the global one."""
        return params

    def finish(
        self, delta: Tensors, shared: Tensors, own: Tensors, steps: torch.Tensor
    ) -> tuple[Tensors, Tensors]:
        """The record is the delta ``local - global`` of every model array."""
        return dict(delta), {}

    def record_spec(self, model: ParamSpec, trainable: list[str]) -> RecordSpec:
        return RecordSpec(dict(model), metrics=("train_loss",))

    def server_update(
        self, state: ServerState, aggregate: Aggregate, context: RoundContext
    ) -> ServerState:
        delta = {n: aggregate.arrays[n] for n in state.params}
        params, opt_state = self.server_optimizer.step(state.params, delta, state.optimizer_state)
        return replace(state, params=params, optimizer_state=opt_state)
