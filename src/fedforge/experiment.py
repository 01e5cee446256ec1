"""Turn a validated :class:`RunConfig` into data, model and algorithm, and run it."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fedforge.aggregate.server_opt import ServerSGD
from fedforge.algorithms.fedavg import FedAvg
from fedforge.config import RunConfig
from fedforge.core.rng import Purpose, RngStreams
from fedforge.data import partition as part
from fedforge.data.datasets import load_digits, load_mnist5k, make_synthetic
from fedforge.data.federated import FederatedDataset
from fedforge.report.rundir import write_run_dir
from fedforge.runtime.backends import BackendOptions
from fedforge.runtime.loop import RoundListener
from fedforge.runtime.simulation import SimulationResult, simulate
from fedforge.train.local_sgd import LocalSGD
from fedforge.train.models import logistic, mlp, seeded


def build_dataset(config: RunConfig) -> FederatedDataset:
    data_cfg, p = config.data, config.partition
    rng = RngStreams(config.seed).generator(Purpose.PARTITION)
    if data_cfg.dataset == "synthetic":
        synth = make_synthetic(data_cfg.alpha, data_cfg.beta, data_cfg.devices, seed=config.seed)
        train, test = synth.train, synth.test
        if p.scheme == "natural":
            return FederatedDataset(train, test, synth.device_indices)
    else:
        train, test = load_mnist5k() if data_cfg.dataset == "mnist5k" else load_digits()
    if p.scheme == "iid":
        indices = part.iid(len(train), p.num_clients, rng)
    elif p.scheme == "dirichlet":
        indices = part.dirichlet(train.y, p.num_clients, p.alpha, rng)
    elif p.scheme == "shards":
        indices = part.shards(train.y, p.num_clients, p.shards_per_client, rng)
    else:
        indices = part.quantity_skew(len(train), p.num_clients, p.exponent, rng)
    return FederatedDataset(train, test, indices)


def build_model(config: RunConfig, data: FederatedDataset) -> nn.Module:
    in_features, classes = data.train.x.shape[1], data.num_classes
    seed = RngStreams(config.seed).int_seed(Purpose.INIT)
    if config.model.name == "logistic":
        return seeded(lambda: logistic(in_features, classes), seed)
    return seeded(lambda: mlp(in_features, classes, config.model.hidden), seed)


def build_algorithm(config: RunConfig) -> FedAvg:
    c, s = config.client, config.server
    return FedAvg(
        local=LocalSGD(
            lr=c.lr,
            epochs=c.epochs,
            batch_size=c.batch_size,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
        ),
        server_optimizer=ServerSGD(lr=s.lr, momentum=s.momentum),
    )


def backend_options(config: RunConfig) -> BackendOptions:
    rt = config.runtime
    return BackendOptions(
        num_workers=rt.num_workers,
        memory_budget=rt.memory_budget_mb << 20 if rt.memory_budget_mb else None,
        device=rt.device,
        ray_address=rt.ray_address,
    )


def run_experiment(
    config: RunConfig, out_dir: Path, listener: RoundListener | None = None
) -> SimulationResult:
    """Run the configured simulation and write the run directory."""
    data = build_dataset(config)
    result = simulate(
        build_model(config, data),
        data,
        build_algorithm(config),
        rounds=config.server.rounds,
        clients_per_round=config.server.clients_per_round,
        seed=config.seed,
        backend=config.runtime.backend,
        options=backend_options(config),
        threads=config.runtime.threads,
        listener=listener,
    )
    write_run_dir(out_dir, config, result, data)
    return result
