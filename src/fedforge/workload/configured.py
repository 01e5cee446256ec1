"""The workload a configuration names: a ``workload`` object, or one assembled from the
``[model]``, ``[data]`` and ``client.train`` keys. The built-in datasets and models are
workloads like any other (:mod:`fedforge.workload.builtin`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from fedforge.config import RunConfig
from fedforge.core.errors import ConfigError
from fedforge.data.federated import ClientData, FederatedDataset
from fedforge.workload.base import Site, TrainFunction, Workload
from fedforge.workload.builtin import builtin_model, builtin_workload
from fedforge.workload.federate import load_test
from fedforge.workload.imports import call_user, load_object
from fedforge.workload.readers import ReadSpec, read_with


def project_dir(config: RunConfig) -> Path:
    """Where the configuration's import paths and relative data paths resolve."""
    return Path(config.project_dir) if config.project_dir else Path.cwd()


def read_spec(config: RunConfig) -> ReadSpec:
    d = config.data
    return ReadSpec(
        d.format,
        d.label,
        tuple(d.labels),
        tuple(d.features),
        tuple(d.categorical),
        d.category_buckets,
        d.scale,
        tuple(d.image_size),
        d.channels,
    )


@dataclass(frozen=True)
class DataShape:
    """The shape of one example and the number of classes of the data at hand."""

    inputs: tuple[int, ...]
    classes: int

    @classmethod
    def of(cls, data: FederatedDataset | ClientData) -> DataShape:
        if isinstance(data, FederatedDataset):
            return cls(tuple(data.train.x.shape[1:]), data.num_classes)
        parts = [data.train] + ([data.holdout] if data.holdout is not None else [])
        return cls(tuple(data.train.x.shape[1:]), max(p.num_classes for p in parts))


def configured_workload(config: RunConfig, shape: DataShape | None = None) -> Workload:
    """The workload ``config`` names. ``shape`` describes the data this process holds (a
    simulation's sites pooled, a deployed client's own): a built-in model takes its input
    shape and classes from ``model.inputs`` and ``model.classes`` (or ``data.labels``) when
    set, else from ``shape``, else from the central test set."""
    root = project_dir(config)
    if config.rl is not None:
        from fedforge.rl.workload import rl_workload

        return rl_workload(config.rl, config.seed)
    if config.workload is not None:
        return _named_workload(config, root)
    if config.lora.enabled:
        from fedforge.llm.workload import configured_lora

        return _with_loop(config, root, configured_lora(config))
    if config.data.builtin:
        base = builtin_workload(config, shape.classes if shape is not None else None)
    else:
        base = _data_workload(config, root)
    if config.model.factory is not None:
        base = replace(base, model=_factory(config, root))
    elif not config.data.builtin:
        base = replace(base, model=_builtin_model(config, _shape_source(base, shape)))
    return _with_loop(config, root, base)


def _with_loop(config: RunConfig, root: Path, base: Workload) -> Workload:
    """``base`` with ``client.train`` as its training function, when set."""
    if config.client.train is None:
        return base
    train = load_object(config.client.train, root, "client.train")
    if not callable(train):
        raise ConfigError(f"client.train = {config.client.train!r} is not a function")
    c = config.client
    return replace(
        base, train=_as_train(train), proximal=c.train_proximal, metrics=tuple(c.train_metrics)
    )


def _named_workload(config: RunConfig, root: Path) -> Workload:
    assert config.workload is not None
    obj = load_object(config.workload, root, "workload")
    if not isinstance(obj, Workload):
        raise ConfigError(
            f"workload = {config.workload!r} is a {type(obj).__name__}, not a fedforge.Workload"
        )
    if config.data.sites:
        obj = replace(obj, sites=list(config.data.sites))
    elif obj.sites == 0 and obj.federation is None:
        obj = replace(obj, sites=config.partition.num_clients)
    return obj


def _data_workload(config: RunConfig, root: Path) -> Workload:
    """Your data: the built-in readers on ``data.sites`` and ``data.test``, or your loader."""
    d = config.data
    if d.loader is not None:
        loader = load_object(d.loader, root, "data.loader")
        if not callable(loader):
            raise ConfigError(f"data.loader = {d.loader!r} is not a function")
        data: Callable[[Site], object] = loader
    else:
        spec = read_spec(config)

        def data(site: Site) -> object:
            if site.path is None:
                raise ConfigError(
                    "this run reads data files: name them in data.sites (simulation) or with "
                    "fedforge client --data PATH"
                )
            return read_with(site.path, spec)

    cached = functools.cache(data)  # a site read for the model's shape is not read again
    test = None
    if d.test is not None:
        test_site = Site(-1, root / d.test, config.seed)
        test = functools.cache(lambda: cached(test_site))
    sites: int | list[str] = list(d.sites) or config.partition.num_clients
    return Workload(
        model=_unset_model,
        data=cached,
        test=test,
        sites=sites,
        schema=d.meaning,
        name="data",
    )


def _unset_model() -> nn.Module:
    raise ConfigError("no model configured")


def _factory(config: RunConfig, root: Path) -> Callable[[], nn.Module]:
    """``model.factory`` called with ``model.options``; it must return a module."""
    m = config.model
    assert m.factory is not None
    factory = load_object(m.factory, root, "model.factory")
    options = dict(m.options)
    what = f"model.factory = {m.factory!r}"

    def build() -> nn.Module:
        module = call_user(lambda: factory(**options), what)  # type: ignore[operator]
        if not isinstance(module, nn.Module):
            raise ConfigError(f"{what} returned {type(module).__name__}, not a torch.nn.Module")
        return module

    return build


def _shape_source(workload: Workload, shape: DataShape | None) -> Callable[[], DataShape]:
    """Where a built-in model's shape comes from: the data at hand, else the test set."""

    def source() -> DataShape:
        if shape is not None:
            return shape
        test = load_test(workload)
        if test is None:
            raise ConfigError(
                "the model's input shape and classes come from no data here (the server has "
                "no data.test): set model.inputs and model.classes"
            )
        return DataShape(tuple(test.x.shape[1:]), test.num_classes)

    return source


def _builtin_model(config: RunConfig, source: Callable[[], DataShape]) -> Callable[[], nn.Module]:
    m, d = config.model, config.data

    def build() -> nn.Module:
        inputs = tuple(m.inputs) if m.inputs is not None else None
        classes = m.classes or (len(d.labels) if d.labels else None)
        if inputs is None or classes is None:
            found = source()
            inputs = inputs or found.inputs
            classes = classes or found.classes
        return builtin_model(m.name, inputs, classes, m.hidden, m.channels, m.dense)

    return build


def _as_train(function: Callable[..., object]) -> TrainFunction:
    return function  # type: ignore[return-value]
