"""The seam's types: a :class:`Workload` (your model, your data, optionally your training
loop), the :class:`Site` a data function is called with, and the :class:`TrainConfig` a
training function is called with."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedforge.core.errors import ConfigError

if TYPE_CHECKING:
    from fedforge.data.federated import FederatedDataset


@dataclass(frozen=True)
class Site:
    """Where one site's data is: ``path``, its file or directory (``data.sites[index]`` in
    simulation, ``fedforge client --data PATH`` in deployment), or None; ``index``, its client
    id in simulation (0..sites-1; -1 for the central test set and for a deployed site, which
    is known by its path); ``seed``, the run seed (for anything the function draws)."""

    index: int
    path: Path | None = None
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """What a training function ``train(model, loader, config)`` gets beside the model (the
    global model's weights, to be trained in place) and the loader (the site's training data,
    shuffled from the client's seed this round, ``batch_size`` examples a batch).

    The local settings are the run's ``[client]`` keys; ``round`` and ``seed`` say which task
    this is (torch's RNG is already seeded from ``seed``, so dropout follows the run seed);
    ``mu`` is FedProx's proximal coefficient (0 under FedAvg): a loop that declares
    ``Workload(proximal=True)`` adds ``config.proximal(model)`` to its loss.
    """

    epochs: int
    lr: float
    batch_size: int
    momentum: float
    weight_decay: float
    round: int
    seed: int
    mu: float
    global_params: Mapping[str, torch.Tensor]

    def proximal(self, model: nn.Module) -> torch.Tensor:
        """FedProx's ``mu / 2 * ||w - w_global||^2`` over the model's trainable parameters."""
        total = torch.zeros(())
        for name, param in model.named_parameters():
            if param.requires_grad and name in self.global_params:
                anchor = self.global_params[name].to(param.device)
                total = total.to(param.device) + ((param - anchor) ** 2).sum()
        return 0.5 * self.mu * total

    def sgd(self, model: nn.Module) -> torch.optim.SGD:
        """``torch.optim.SGD`` with the run's learning rate, momentum and weight decay."""
        return torch.optim.SGD(
            (p for p in model.parameters() if p.requires_grad),
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )


# train(model, loader, config) -> metrics (e.g. {"train_loss": 0.3}) or None; with
# Workload(opaque=True), train(model, site_data, config): the data function's object itself.
TrainFunction = Callable[[nn.Module, Any, TrainConfig], Mapping[str, float] | None]
# train_cohort(model, sites, configs) -> [(trained parameters, metrics)], one per site.
CohortFunction = Callable[
    [nn.Module, list[Any], list[TrainConfig]],
    Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, float]]],
]
# evaluate(model, site_data) -> metrics (every name in Workload.evaluate_metrics).
EvaluateFunction = Callable[[nn.Module, Any], Mapping[str, float]]


@dataclass(frozen=True)
class Workload:
    """Your model, your data and optionally your training loop, as one object that
    ``fedforge run``, :func:`fedforge.simulate`, ``fedforge server`` and ``fedforge client``
    all accept (``workload = "module:NAME"`` in a configuration).

    ``model()`` builds the architecture (fedforge seeds torch's RNG from the run seed around
    the call). ``data(site)`` returns one site's data: arrays ``(x, y)``, an
    :class:`~fedforge.ArrayDataset`, a torch map-style ``Dataset`` of ``(x, y)`` pairs (read
    once into arrays) or a :class:`~fedforge.ClientData` with a held-out split of its own.
    ``train(model, loader, config)``, when given, replaces the built-in local SGD: any PyTorch
    loop (see :class:`TrainConfig`); it may report the metrics named in ``metrics`` beside
    ``train_loss``. ``test()`` returns the server's central test set (None: no central
    evaluation). ``sites`` is what a simulation federates: a number of sites (their
    ``Site.path`` is None) or their paths. ``schema`` names the settings that give the data its
    meaning (label order, feature columns): server and clients compare them with the
    architecture. ``federation`` (simulation only) builds every site at once; the built-in
    datasets use it to keep one pooled array and index arrays.

    ``opaque=True`` says a site's data is not examples: ``data(site)`` returns any object (an
    RL agent's environment and its physics) that fedforge holds without reading and hands
    unchanged to ``train(model, site_data, config)`` (required) and ``evaluate``; ``test()``
    returns such an object too. Each site then weighs 1 in the aggregate. ``evaluate(model,
    site_data)``, when given, scores the global model instead of the built-in loss and
    accuracy: federated evaluation calls it on each evaluating site's data (an opaque site's
    object, else its held-out examples as an ``ArrayDataset``) and records
    ``fed_eval.<name>``; central evaluation calls it on ``test()``'s result and records
    ``test_<name>``. It returns a number for every name in ``evaluate_metrics``.
    ``train_cohort(model, sites, configs)`` (opaque workloads) trains a whole cohort at once
    and is what the vectorized runtime runs: per site, the parameters and metrics ``train``
    would have given (``fedforge.train.site_cohort``).
    """

    model: Callable[[], nn.Module]
    data: Callable[[Site], object]
    train: TrainFunction | None = None
    test: Callable[[], object] | None = None
    sites: int | Sequence[str | Path] = 0
    metrics: tuple[str, ...] = ()
    proximal: bool = False
    schema: Mapping[str, str] = field(default_factory=dict)
    federation: Callable[[], FederatedDataset] | None = None
    name: str = "workload"
    opaque: bool = False
    evaluate: EvaluateFunction | None = None
    evaluate_metrics: tuple[str, ...] = ()
    train_cohort: CohortFunction | None = None

    def __post_init__(self) -> None:
        problem = workload_problem(self)
        if problem is not None:
            raise ConfigError(problem)

    def site_list(self, root: Path | None = None, seed: int = 0) -> list[Site]:
        """The sites a simulation federates, relative paths resolved against ``root``."""
        if isinstance(self.sites, int):
            return [Site(i, None, seed) for i in range(self.sites)]
        base = root or Path.cwd()
        return [Site(i, base / Path(p), seed) for i, p in enumerate(self.sites)]


MAX_EVALUATE_METRICS = 64


def workload_problem(workload: Workload) -> str | None:
    """What makes ``workload`` inconsistent (one line), or None."""
    if workload.opaque and workload.train is None:
        return (
            "Workload(opaque=True): fedforge cannot train on an opaque site object itself: "
            "give train(model, site_data, config)"
        )
    if workload.train_cohort is not None and not (workload.opaque and workload.train):
        return "Workload.train_cohort trains opaque sites: give opaque=True and train too"
    if workload.opaque and workload.federation is not None:
        return "Workload(opaque=True) federates data(site) results: give no federation"
    if workload.evaluate is not None and not callable(workload.evaluate):
        return f"Workload.evaluate is a {type(workload.evaluate).__name__}, not a function"
    names = workload.evaluate_metrics
    if workload.evaluate is not None and not names:
        return "Workload.evaluate needs evaluate_metrics: the names of the metrics it returns"
    if names and workload.evaluate is None:
        return "Workload.evaluate_metrics names metrics of no evaluate function"
    if len(names) > MAX_EVALUATE_METRICS or len(set(names)) != len(names):
        return f"Workload.evaluate_metrics: at most {MAX_EVALUATE_METRICS} distinct names"
    bad = [n for n in names if not isinstance(n, str) or not n.isidentifier()]
    if bad:
        return f"Workload.evaluate_metrics: {str(bad[0])[:40]!r} is not a plain name"
    return None
