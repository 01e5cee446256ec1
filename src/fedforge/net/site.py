"""What a deployed client trains on: its own workload and data, or the run's built-in ones.

A site with its own configuration (``fedforge client CONFIG --data PATH``) builds its model
and reads its data from that configuration *before it connects*, so bad data stops it with one
line before the server ever sees it. A site without one uses the run's configuration from the
Welcome, which may name no code: a server never makes a client import anything. Either way the
data is checked against the model (feature shape, labels within its classes) before the client
declares its sizes, and the model's fingerprint travels with that declaration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fedforge.config import RunConfig
from fedforge.config.workload import user_code
from fedforge.core.errors import FedforgeError
from fedforge.core.rng import Purpose, RngStreams
from fedforge.data.federated import ClientData, FederatedDataset
from fedforge.experiment import build_dataset, build_model, build_workload
from fedforge.train.models import seeded
from fedforge.workload.base import Site, Workload
from fedforge.workload.configured import DataShape, configured_workload, read_spec
from fedforge.workload.federate import load_site, split_holdout
from fedforge.workload.readers import read_with
from fedforge.workload.sitedata import check_against_model


class SiteRefused(FedforgeError):
    """This site cannot take part in the run as configured (no retry can change it)."""


@dataclass(frozen=True)
class LocalSite:
    """A client's own part: its workload (None: the run's) and its data (a path, data
    already read, or None: its share of the run's built-in dataset)."""

    workload: Workload | None = None
    data: Path | ClientData | None = None


@dataclass(frozen=True)
class Joined:
    """What the client trains with in one run."""

    workload: Workload
    model: nn.Module
    data: ClientData


def prepare(config: RunConfig, path: Path | None) -> LocalSite:
    """A site from its own configuration: the workload, and its data read and checked
    against the model (raises a one-line error before the client connects)."""
    workload = configured_workload(config)
    if path is None:
        return LocalSite(workload)
    data = load_site(workload, Site(-1, path, config.seed))
    workload = configured_workload(config, DataShape.of(data))  # a built-in model sized to it
    inputs = tuple(config.model.inputs) if config.model.inputs is not None else None
    check_against_model(data, workload.model(), str(path), inputs)
    return LocalSite(workload, data)


def ready(site: LocalSite) -> LocalSite:
    """``site`` with its workload's data read and checked (a path read before connecting)."""
    if site.workload is None or site.data is None:
        return site
    data = site.data
    if isinstance(data, Path):
        data = load_site(site.workload, Site(-1, data))
    check_against_model(data, site.workload.model(), _where(site))
    return LocalSite(site.workload, data)


def join(site: LocalSite, config: RunConfig, client_id: int) -> Joined:
    """The workload, model and data of ``site`` in the run configured by ``config``."""
    seed = RngStreams(config.seed).int_seed(Purpose.INIT)
    workload, data = site.workload, site.data
    own = data is not None
    if workload is None and config.rl is not None:  # an agent of the run's own [rl]
        workload = build_workload(config)
    if workload is None:
        named = user_code(config)
        if named:
            key, value = next(iter(named.items()))
            raise SiteRefused(
                f"the run names code ({key} = {value!r}), and a client imports only code its "
                "own configuration names: start it with the project's configuration "
                "(fedforge client CONFIG --server ...)"
            )
        if config.data.builtin:
            federated = build_dataset(config)
            model = build_model(config, federated)
            workload = build_workload(config, federated)
            if data is None:
                data = _share(federated, client_id)
            elif isinstance(data, Path):  # the run's built-in model on this site's own file
                data = ClientData(read_with(data, read_spec(config)))
        elif data is None:
            raise SiteRefused(
                "this run reads each site's own data: start the client with --data PATH"
            )
        else:
            first = configured_workload(config)
            if isinstance(data, Path):
                data = load_site(first, Site(client_id, data, config.seed))
            workload = configured_workload(config, DataShape.of(data))
            model = seeded(workload.model, seed)
    else:
        if data is None or isinstance(data, Path):
            data = load_site(workload, Site(client_id, data, config.seed))
        model = seeded(workload.model, seed)
    if own and config.evaluation.fraction > 0:
        data = split_holdout(data, config.evaluation.holdout, config.seed, client_id)
    inputs = tuple(config.model.inputs) if config.model.inputs is not None else None
    check_against_model(data, model, _where(site), inputs)
    return Joined(workload, model, data)


def _share(federated: FederatedDataset, client_id: int) -> ClientData:
    """The client's share of the run's built-in dataset, with the simulation's held-out
    split when federated evaluation is configured."""
    if client_id >= federated.num_clients:
        raise SiteRefused(
            f"client id {client_id} has no share of the built-in dataset "
            f"({federated.num_clients} exist)"
        )
    return federated.client_data(client_id)


def _where(site: LocalSite) -> str:
    return str(site.data) if isinstance(site.data, Path) else "this client's data"
