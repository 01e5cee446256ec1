"""FedPer (Arivazhagan et al. 2019): a shared body, averaged as in FedAvg, and a personal
head that each client keeps in its state and never sends.

Local training starts the head from the client's state (``head/<name>``, the global model's
initial head before the client's first round) and the body from the global model; the record
carries the body's change only, and the trained head goes back into the client's state. The
server's head never moves: the global model is the body plus the initial head, and a client's
personal model is the body plus its own head.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from fedforge.aggregate.kinds import Aggregate
from fedforge.algorithms.base import RoundContext, ServerState
from fedforge.algorithms.fedavg import FedAvg
from fedforge.core.params import Params, ParamSpec
from fedforge.core.records import RecordSpec
from fedforge.train.program import LocalProgram, Tensors

HEAD = "head/"


def head_names(trainable: list[str], layers: int) -> tuple[str, ...]:
    """The parameters of the last ``layers`` modules that own parameters (``2.weight`` and
    ``2.bias`` of a ``Sequential``'s last ``Linear``)."""
    owners: list[str] = []
    for name in trainable:
        owner = name.rpartition(".")[0]
        if not owners or owners[-1] != owner:
            owners.append(owner)
    if not 1 <= layers < len(owners):
        raise ValueError(f"a head of {layers} layer(s) needs 1 <= layers < {len(owners)}")
    kept = set(owners[-layers:])
    return tuple(n for n in trainable if n.rpartition(".")[0] in kept)


@dataclass(frozen=True)
class FedPer(FedAvg):
    head: tuple[str, ...] = ()
    personalized: bool = True

    def __post_init__(self) -> None:
        if not self.head:
            raise ValueError("FedPer needs the names of its head parameters (head_names())")

    def program(self) -> LocalProgram:
        return replace(super().program(), own_start=HEAD)

    def init_client_state(self, trainable: Params) -> Params:
        return {HEAD + n: np.array(trainable[n], copy=True) for n in self.head}

    def personalize(self, params: Params, state: Params) -> Params:
        return {**params, **{n: state[HEAD + n] for n in self.head}}

    def finish(
        self, delta: Tensors, shared: Tensors, own: Tensors, steps: torch.Tensor
    ) -> tuple[Tensors, Tensors]:
        arrays = {n: d for n, d in delta.items() if n not in self.head}
        return arrays, {HEAD + n: shared[n] + delta[n] for n in self.head}

    def record_spec(self, model: ParamSpec, trainable: list[str]) -> RecordSpec:
        missing = set(self.head) - set(trainable)
        if missing:
            raise ValueError(f"FedPer head parameters not in the model: {sorted(missing)}")
        body = {n: spec for n, spec in model.items() if n not in self.head}
        return RecordSpec(body, metrics=("train_loss",))

    def server_update(
        self, state: ServerState, aggregate: Aggregate, context: RoundContext
    ) -> ServerState:
        # The head is never sent: it has no change to apply.
        arrays = {n: aggregate.arrays.get(n, np.zeros_like(p)) for n, p in state.params.items()}
        return super().server_update(state, replace(aggregate, arrays=arrays), context)
