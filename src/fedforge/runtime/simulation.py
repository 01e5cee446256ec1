"""Simulation entry point for the Python API: a model, a federated dataset, an algorithm."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from fedforge.algorithms.base import Algorithm, ServerState
from fedforge.algorithms.fedavg import FedAvg
from fedforge.core.rng import RngStreams
from fedforge.data.federated import FederatedDataset
from fedforge.report.history import History
from fedforge.runtime.backends import BackendName, BackendOptions, make_backend, resolve_backend
from fedforge.runtime.loop import RoundListener, RoundLoop
from fedforge.train.evaluate import Evaluation, evaluate
from fedforge.train.torch_model import TorchModel


@dataclass
class SimulationResult:
    """The run's history, final server state, and the model holding the final parameters."""

    history: History
    state: ServerState
    model: torch.nn.Module
    backend: str


def simulate(
    model: torch.nn.Module,
    data: FederatedDataset,
    algorithm: Algorithm | None = None,
    *,
    rounds: int,
    clients_per_round: int,
    seed: int = 0,
    backend: BackendName = "sequential",
    options: BackendOptions | None = None,
    threads: int | None = None,
    listener: RoundListener | None = None,
) -> SimulationResult:
    """Run ``rounds`` of federated training and return the result.

    ``model``'s current weights are the initial global model; it is not modified (the
    returned ``result.model`` is a trained copy). ``backend`` picks how clients execute:
    ``sequential`` (reference), ``vectorized`` (one batched program per cohort, CUDA when
    present), ``workers`` (persistent forked processes), ``ray``, or ``auto``. ``threads``
    sets torch's intra-op threads in this process; by default 1 (fastest for one small
    client at a time) except for ``vectorized``, which uses every core.
    """
    algorithm = algorithm or FedAvg()
    chosen = resolve_backend(backend, algorithm, model)
    default_threads = (os.cpu_count() or 1) if chosen == "vectorized" else 1
    torch.set_num_threads(threads or default_threads)
    streams = RngStreams(seed)
    eval_model = TorchModel(copy.deepcopy(model))

    def evaluator(params: dict) -> Evaluation:  # type: ignore[type-arg]
        eval_model.set_params(params)
        return evaluate(eval_model, data.test)

    runner = make_backend(
        chosen, algorithm, copy.deepcopy(model), data, streams, options or BackendOptions()
    )
    loop = RoundLoop(
        algorithm=algorithm,
        backend=runner,
        population=lambda: range(data.num_clients),
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
        runner.close()
    eval_model.set_params(state.params)
    return SimulationResult(history=history, state=state, model=eval_model.module, backend=chosen)
