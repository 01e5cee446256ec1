"""FedAvg (McMahan et al. 2017): local SGD, example-weighted mean of deltas, server step."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedforge.aggregate.server_opt import ServerOptimizer, ServerSGD
from fedforge.aggregate.weighted_mean import StreamingMean
from fedforge.algorithms.base import ServerState
from fedforge.core.params import Params, subtract
from fedforge.core.results import ClientResult
from fedforge.data.datasets import ArrayDataset
from fedforge.train.local_sgd import LocalSGD
from fedforge.train.torch_model import TorchModel


@dataclass(frozen=True)
class FedAvg:
    """Federated averaging with a pluggable server optimizer.

    With the default ``ServerSGD(lr=1.0)`` the new global model is the example-weighted
    mean of the client models. Swapping the server optimizer (momentum, Adam, Yogi) gives
    the FedOpt family without touching the client side.
    """

    local: LocalSGD = field(default_factory=LocalSGD)
    server_optimizer: ServerOptimizer = field(default_factory=ServerSGD)

    def init(self, params: Params) -> ServerState:
        return ServerState(
            round=0, params=params, optimizer_state=self.server_optimizer.init(params)
        )

    def client_update(
        self,
        client_id: int,
        model: TorchModel,
        global_params: Params,
        data: ArrayDataset,
        rng: np.random.Generator,
    ) -> ClientResult:
        model.set_params(global_params)
        loss = self.local.train(model, data, rng)
        return self.finish_client(client_id, global_params, model.get_params(), len(data), loss)

    def finish_client(
        self,
        client_id: int,
        global_params: Params,
        local_params: Params,
        num_examples: int,
        train_loss: float,
    ) -> ClientResult:
        """Turn locally trained parameters into the update sent to the server.

        Runtimes that train many clients at once (vectorized) call this per client, so the
        update pipeline is shared by every runtime.
        """
        return ClientResult(
            client_id=client_id,
            num_examples=num_examples,
            update=subtract(local_params, global_params),
            train_loss=train_loss,
        )

    def aggregation_weight(self, result: ClientResult) -> float:
        return float(result.num_examples)

    def aggregator(self) -> StreamingMean:
        return StreamingMean()

    def server_update(self, state: ServerState, aggregate: Params) -> ServerState:
        params, opt_state = self.server_optimizer.step(
            state.params, aggregate, state.optimizer_state
        )
        return ServerState(round=state.round, params=params, optimizer_state=opt_state)
