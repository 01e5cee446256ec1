"""The contract every algorithm fulfils, whatever runtime executes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedforge.core.params import Params
from fedforge.core.results import ClientResult
from fedforge.data.datasets import ArrayDataset
from fedforge.train.torch_model import TorchModel


@dataclass(frozen=True)
class ServerState:
    """Everything the server needs to continue a run: save it and you can resume."""

    round: int
    params: Params
    optimizer_state: Params


class Aggregator(Protocol):
    """Accumulates validated client updates, then yields one aggregate."""

    count: int

    def add(self, update: Params, weight: float) -> None: ...

    def result(self) -> Params: ...


class Algorithm(Protocol):
    """Client side: ``client_update``. Server side: ``init``, ``aggregator``, ``server_update``.

    Algorithms never import a runtime; runtimes only call these methods.
    """

    def init(self, params: Params) -> ServerState: ...

    def client_update(
        self,
        client_id: int,
        model: TorchModel,
        global_params: Params,
        data: ArrayDataset,
        rng: np.random.Generator,
    ) -> ClientResult: ...

    def aggregation_weight(self, result: ClientResult) -> float: ...

    def aggregator(self) -> Aggregator: ...

    def server_update(self, state: ServerState, aggregate: Params) -> ServerState: ...
