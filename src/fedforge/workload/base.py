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


# train(model, loader, config) -> metrics (e.g. {"train_loss": 0.3}) or None.
TrainFunction = Callable[[nn.Module, Any, TrainConfig], Mapping[str, float] | None]


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

    def site_list(self, root: Path | None = None, seed: int = 0) -> list[Site]:
        """The sites a simulation federates, relative paths resolved against ``root``."""
        if isinstance(self.sites, int):
            return [Site(i, None, seed) for i in range(self.sites)]
        base = root or Path.cwd()
        return [Site(i, base / Path(p), seed) for i, p in enumerate(self.sites)]
