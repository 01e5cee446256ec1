"""The contract every algorithm fulfils, whatever runtime executes it.

An algorithm is data plus pure functions. The client side is a :class:`LocalProgram`
(objective terms and gradient transforms) and ``finish``, which turns a client's trained
parameters into the arrays of its record and its new persistent state; both are torch
functions on one client's tensors, so the vectorized runtime ``vmap``s them. The server side
is ``init``, ``broadcast`` (arrays sent down beside the model) and ``server_update``.
``finish`` receives the trained change ``local - global`` rather than the local weights: the
vectorized runtime's fused kernels produce it directly for one-step clients.
Algorithms never import a runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

import numpy as np
import torch

from fedforge.aggregate.kinds import Aggregate
from fedforge.core.params import Params, ParamSpec
from fedforge.core.records import RecordSpec
from fedforge.train.program import LocalProgram, LocalSGD, Tensors
from fedforge.train.torch_model import FROZEN

Weighting = Literal["examples", "uniform"]


@dataclass(frozen=True)
class ServerState:
    """Everything the server needs to continue a run: save it and you can resume.

    ``extras`` is the algorithm's own server state (SCAFFOLD's control variate);
    ``stage_states`` the update stages' states (an adaptive clip norm), by stage name.
    """

    round: int
    params: Params
    optimizer_state: Params
    extras: Params = field(default_factory=dict)
    stage_states: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundContext:
    """What the server knows about the round when it updates the model."""

    round: int
    population_size: int  # clients that could have been sampled (SCAFFOLD's N)
    sampled: int


class Algorithm(Protocol):
    """Client side: ``program`` and ``finish``. Server side: ``init``, ``broadcast``,
    ``record_spec``, ``server_update``."""

    # Why a training function cannot replace the local program (None: it can).
    loop_refusal: ClassVar[str | None]

    @property
    def local(self) -> LocalSGD: ...

    @property
    def weighting(self) -> Weighting: ...

    @property
    def accepts_stages(self) -> bool:
        """False when the client state depends on the record before the stages ran."""
        ...

    @property
    def personalized(self) -> bool:
        """True when each client keeps a personal model (evaluated beside the global one)."""
        ...

    def personalize(self, params: Params, state: Params) -> Params:
        """The client's personal model from the global ``params`` and its ``state``."""
        ...

    def program(self) -> LocalProgram: ...

    def init(self, params: Params) -> ServerState: ...

    def broadcast(self, state: ServerState) -> Params: ...

    def init_client_state(self, trainable: Params) -> Params: ...

    def finish(
        self, delta: Tensors, shared: Tensors, own: Tensors, steps: torch.Tensor
    ) -> tuple[Tensors, Tensors]:
        """(record arrays, new client state) from the client's trained change ``delta``
        (local - global, every model array) after ``steps`` local steps; may overwrite
        ``delta`` and ``own``, the runtime's own copies."""
        ...

    def record_spec(self, model: ParamSpec, trainable: list[str]) -> RecordSpec: ...

    def server_update(
        self, state: ServerState, aggregate: Aggregate, context: RoundContext
    ) -> ServerState: ...


def model_view(algorithm: Algorithm, state: ServerState) -> Params:
    """The global model as evaluated and sent to evaluate: the parameters and the offsets
    the algorithm broadcasts for frozen parameters (``frozen/<name>``: exact LoRA's folded
    residual); nothing else of the broadcast."""
    offsets = {k: v for k, v in algorithm.broadcast(state).items() if k.startswith(FROZEN)}
    return {**state.params, **offsets} if offsets else state.params


METRIC = "metric/"  # server-state extras the round records as metrics (scalars)


def state_metrics(state: ServerState) -> dict[str, float]:
    """The scalars an algorithm keeps in its extras as ``metric/<name>`` (exact LoRA's
    residual norm), recorded with the round."""
    return {
        k[len(METRIC) :]: float(np.asarray(v).reshape(-1)[0])
        for k, v in state.extras.items()
        if k.startswith(METRIC)
    }
