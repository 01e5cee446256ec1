"""The built-in datasets (``mnist5k``, ``digits``, ``synthetic``) partitioned over clients,
and the built-in models on them, as a :class:`~fedforge.workload.base.Workload`."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from torch import nn

from fedforge.config import RunConfig
from fedforge.core.errors import ConfigError
from fedforge.core.rng import Purpose, RngStreams
from fedforge.data import partition as part
from fedforge.data.datasets import load_digits, load_mnist5k, make_synthetic
from fedforge.data.federated import FederatedDataset
from fedforge.train.models import fedavg_cnn, flat_features, logistic, mlp, residual_cnn
from fedforge.workload.base import Site, Workload

# The shape of one example of each built-in dataset (stored flat: image models reshape).
EXAMPLE_SHAPES: dict[str, tuple[int, ...]] = {
    "mnist5k": (1, 28, 28),
    "digits": (1, 8, 8),
    "synthetic": (60,),
}


def partitioned(config: RunConfig) -> FederatedDataset:
    """The configured built-in dataset split over ``partition.num_clients`` clients (or the
    synthetic devices), without held-out splits."""
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


def example_shape(config: RunConfig) -> tuple[int, ...]:
    """The shape of one example the model takes: ``model.inputs``, else the dataset's."""
    if config.model.inputs is not None:
        return tuple(config.model.inputs)
    return EXAMPLE_SHAPES[config.data.dataset]


def builtin_workload(config: RunConfig, classes: int | None = None) -> Workload:
    """The configured built-in dataset and model as a workload (the federation is built
    once, on first use; ``classes`` when the caller holds it already)."""
    federation = functools.cache(lambda: partitioned(config))

    def model() -> nn.Module:
        m = config.model
        count = m.classes or classes or federation().num_classes
        shape = example_shape(config)
        if m.name in ("mlp", "logistic"):  # the arrays are flat: so is the model's input
            shape = (flat_features(shape),)
        return builtin_model(m.name, shape, count, m.hidden, m.channels, m.dense)

    def data(site: Site) -> object:
        return federation().client_data(site.index)

    return Workload(
        model=model,
        data=data,
        test=lambda: federation().test,
        sites=_count(config),
        schema=config.data.meaning,
        federation=federation,
        name=config.data.dataset,
    )


def _count(config: RunConfig) -> int:
    if config.partition.scheme == "natural" and config.data.dataset == "synthetic":
        return config.data.devices
    return config.partition.num_clients


def builtin_model(
    name: str,
    inputs: Sequence[int],
    classes: int,
    hidden: Sequence[int] = (200, 200),
    channels: Sequence[int] | None = None,
    dense: int = 512,
) -> nn.Module:
    """A built-in architecture for examples of shape ``inputs`` and ``classes`` classes."""
    if classes < 2:
        raise ConfigError(f"the model needs at least 2 classes, the data has {classes}")
    if name in ("mlp", "logistic"):
        features = flat_features(inputs)
        layers = (
            logistic(features, classes) if name == "logistic" else mlp(features, classes, hidden)
        )
        return nn.Sequential(nn.Flatten(), *layers.children()) if len(inputs) > 1 else layers
    if len(inputs) != 3 and math.isqrt(flat_features(inputs)) ** 2 != flat_features(inputs):
        raise ConfigError(
            f"model.name = {name!r} takes images (C, H, W); examples of shape {list(inputs)}: "
            "set model.inputs"
        )
    shape = tuple(inputs) if len(inputs) == 3 else (1, *[math.isqrt(flat_features(inputs))] * 2)
    try:
        if name == "cnn":
            return fedavg_cnn(shape, classes, tuple(channels or (32, 64)), dense)
        return residual_cnn(shape, classes, tuple(channels or (16, 32)))
    except ValueError as exc:
        raise ConfigError(f"model.name = {name!r}: {exc}") from None
