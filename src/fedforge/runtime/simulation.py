"""Simulation entry point for the Python API: a model, a federated dataset, an algorithm."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from fedforge.algorithms.base import Algorithm, ServerState
from fedforge.algorithms.fedavg import FedAvg
from fedforge.core.rng import RngStreams
from fedforge.data.federated import FederatedDataset
from fedforge.report.history import History
from fedforge.runtime.loop import RoundListener, RoundLoop
from fedforge.runtime.sequential import SequentialBackend
from fedforge.train.evaluate import Evaluation, evaluate
from fedforge.train.torch_model import TorchModel


@dataclass
class SimulationResult:
    """The run's history, final server state, and the model holding the final parameters."""

    history: History
    state: ServerState
    model: torch.nn.Module


def simulate(
    model: torch.nn.Module,
    data: FederatedDataset,
    algorithm: Algorithm | None = None,
    *,
    rounds: int,
    clients_per_round: int,
    seed: int = 0,
    threads: int | None = 1,
    listener: RoundListener | None = None,
) -> SimulationResult:
    """Run ``rounds`` of federated training in this process and return the result.

    ``model``'s current weights are the initial global model; it is not modified (the
    returned ``result.model`` is a trained copy). ``threads`` sets torch's intra-op thread
    count for the run (1 is fastest for small per-client models; ``None`` leaves it alone).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    algorithm = algorithm or FedAvg()
    streams = RngStreams(seed)
    client_model = TorchModel(copy.deepcopy(model))
    eval_model = TorchModel(copy.deepcopy(model))

    def evaluator(params: dict) -> Evaluation:  # type: ignore[type-arg]
        eval_model.set_params(params)
        return evaluate(eval_model, data.test)

    backend = SequentialBackend(algorithm, client_model, data, streams)
    loop = RoundLoop(
        algorithm=algorithm,
        backend=backend,
        num_clients=data.num_clients,
        clients_per_round=clients_per_round,
        streams=streams,
        example_cap=data.client_size,
        evaluator=evaluator,
        listener=listener or RoundListener(),
    )
    state = algorithm.init(eval_model.get_params())
    history = History()
    try:
        for _ in range(rounds):
            state, record = loop.run_round(state)
            history.append(record)
    finally:
        backend.close()
    eval_model.set_params(state.params)
    return SimulationResult(history=history, state=state, model=eval_model.module)
