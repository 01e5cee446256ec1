"""From a workload's sites to what the runtimes hold: one site's checked data (a deployed
client), or every site pooled into a :class:`~fedforge.FederatedDataset` (a simulation: one
array of examples and an index array per site, so the vectorized runtime batches them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedforge.core.errors import ConfigError, DataError
from fedforge.core.rng import Purpose, RngStreams
from fedforge.data.datasets import ArrayDataset
from fedforge.data.federated import ClientData, FederatedDataset
from fedforge.workload.base import Site, Workload
from fedforge.workload.imports import call_user
from fedforge.workload.sitedata import as_arrays, as_client_data, output_classes

HOLDOUT_STREAM = 2  # the site's held-out split: Purpose.PARTITION, 2, client id


def describe(site: Site) -> str:
    """How errors name a site: its path, else its index."""
    if site.path is not None:
        return str(site.path)
    return "the central test set" if site.index < 0 else f"site {site.index}"


def load_site(workload: Workload, site: Site) -> ClientData:
    """``workload.data(site)``, converted and checked (one DataError line if it is bad); an
    opaque workload's object is kept as it is, with one held-out slot for evaluation."""
    value = call_user(
        workload.data, f"the data function for {describe(site)}", site, error=DataError
    )
    if workload.opaque:
        if value is None:
            raise DataError(f"the data function for {describe(site)} returned None")
        return ClientData.of_object(value)
    return as_client_data(value, describe(site))


def load_test_object(workload: Workload) -> object | None:
    """An opaque workload's central test object (None: no central evaluation)."""
    if workload.test is None:
        return None
    return call_user(workload.test, "the workload's test function", error=DataError)


def load_test(workload: Workload) -> ArrayDataset | None:
    """The central test set (None when the workload has none)."""
    if workload.test is None:
        return None
    value = call_user(workload.test, "the workload's test function", error=DataError)
    return None if value is None else as_arrays(value, "the central test set")


def split_holdout(data: ClientData, fraction: float, seed: int, client_id: int) -> ClientData:
    """``data`` with a random ``fraction`` of its examples held out for federated evaluation
    (at least one when it has two or more; the rule of ``FederatedDataset.with_holdout``),
    drawn from the client's own stream so simulation and deployment hold out the same rows.
    A site that brought its own held-out split keeps it."""
    if data.holdout is not None:
        return data
    n = len(data.train)
    rng = RngStreams(seed).generator(Purpose.PARTITION, HOLDOUT_STREAM, client_id)
    perm = rng.permutation(n)
    k = min(n - 1, max(1, round(fraction * n))) if n > 1 else 0
    held, kept = np.sort(perm[:k]), np.sort(perm[k:])
    x, y = data.train.x, data.train.y
    return ClientData(ArrayDataset(x[kept], y[kept]), ArrayDataset(x[held], y[held]))


def federate(
    workload: Workload,
    *,
    root: Path | None = None,
    seed: int = 0,
    holdout: float | None = None,
) -> FederatedDataset:
    """Every site of ``workload`` (relative paths resolved against ``root``) pooled into one
    federated dataset, each site split for federated evaluation when ``holdout`` is given."""
    if workload.opaque:
        objects = [load_site(workload, site).site for site in _sites(workload, root, seed)]
        return FederatedDataset.of_objects(objects, load_test_object(workload), holdout is not None)
    if workload.federation is not None:
        data = workload.federation()
        if holdout is not None:
            data = data.with_holdout(holdout, RngStreams(seed).generator(Purpose.PARTITION, 1))
        return data
    sites = _sites(workload, root, seed)
    parts = [load_site(workload, site) for site in sites]
    if holdout is not None:
        parts = [
            split_holdout(p, holdout, seed, s.index) for p, s in zip(parts, sites, strict=True)
        ]
    return pool(parts, sites, load_test(workload))


def _sites(workload: Workload, root: Path | None, seed: int) -> list[Site]:
    sites = workload.site_list(root, seed)
    if not sites:
        raise ConfigError(
            "the workload has no sites to simulate: give Workload(sites=...) a number of sites "
            "or their paths (data.sites in a configuration)"
        )
    return sites


def check_federation(data: FederatedDataset, module: torch.nn.Module, names: Sequence[str]) -> None:
    """Stop a simulation whose examples the model cannot take or whose labels it cannot
    predict, naming the first bad site (``names[i]``: how errors name client ``i``): one
    forward pass (the sites share one pooled array, so one feature shape), then every label."""
    first = names[0] if names else "site 0"
    classes = output_classes(module, data.train, first)
    for where, part in (("", data.train), (" (the central test set)", data.test)):
        bad = np.flatnonzero((part.y < 0) | (part.y >= classes))
        if not len(bad):
            continue
        row, owner = int(bad[0]), "the central test set"
        if not where:
            parts = [*enumerate(data.partition), *enumerate(data.holdout or [])]
            cid = next(c for c, rows in parts if (rows == row).any())
            owner = names[cid] if cid < len(names) else f"site {cid}"
        raise DataError(
            f"{owner}: label {int(part.y[row])} is outside the model's {classes} classes"
        )


def pool(
    parts: Sequence[ClientData], sites: Sequence[Site], test: ArrayDataset | None
) -> FederatedDataset:
    """One array of every site's examples (training, then held out), index arrays per site."""
    first = parts[0].train
    for part, site in zip(parts, sites, strict=True):
        for piece in (part.train, part.holdout):
            if piece is not None and piece.x.shape[1:] != first.x.shape[1:]:
                raise DataError(
                    f"{describe(site)}: examples of shape {list(piece.x.shape[1:])}, but "
                    f"{describe(sites[0])} has {list(first.x.shape[1:])}"
                )
    if test is not None and test.x.shape[1:] != first.x.shape[1:]:
        raise DataError(
            f"the central test set has examples of shape {list(test.x.shape[1:])}, the sites "
            f"{list(first.x.shape[1:])}"
        )
    xs, ys = [], []
    train_idx: list[np.ndarray] = []
    held_idx: list[np.ndarray] = []
    offset = 0
    for part in parts:
        for piece, out in ((part.train, train_idx), (part.holdout, held_idx)):
            size = 0 if piece is None else len(piece)
            out.append(np.arange(offset, offset + size))
            if piece is not None:
                xs.append(piece.x)
                ys.append(piece.y)
            offset += size
    dtype = np.result_type(*[x.dtype for x in xs])
    train = ArrayDataset(np.concatenate(xs).astype(dtype), np.concatenate(ys))
    if test is None:
        test = ArrayDataset(np.empty((0, *first.x.shape[1:]), dtype), np.empty(0, np.int64))
    held = held_idx if any(p.holdout is not None for p in parts) else None
    return FederatedDataset(train, test, train_idx, held)
