"""Choosing and building the transport that executes client work in simulation."""

from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import dataclass
from typing import Literal

import torch

from fedforge.core.errors import ConfigError
from fedforge.data.datasets import ArrayDataset
from fedforge.data.federated import FederatedDataset
from fedforge.runtime.client_app import ClientApp
from fedforge.runtime.client_state import ClientStateStore
from fedforge.runtime.sequential import SequentialTransport
from fedforge.runtime.transport import Transport
from fedforge.train.cohort import vectorization_blocker, vmap_problem
from fedforge.train.program import LocalProgram

log = logging.getLogger("fedforge")

BackendName = Literal["auto", "sequential", "vectorized", "workers", "ray"]


@dataclass(frozen=True)
class BackendOptions:
    """Knobs of the non-sequential backends; defaults suit a laptop."""

    num_workers: int = 2
    memory_budget: int | None = None  # vectorized: bytes per chunk (default by device)
    device: str | None = None  # vectorized: "cpu", "cuda", ... (default: cuda if present)
    ray_address: str | None = None
    threads: int | None = None  # vectorized: torch threads (default: chosen from the load)


def resolve_backend(
    name: BackendName,
    program: LocalProgram,
    module: torch.nn.Module,
    blocker: str | None = None,
    sample: ArrayDataset | None = None,
    device: str | None = None,
) -> str:
    """The concrete backend ``name`` stands for; ``auto`` logs what it chose and why.
    ``blocker`` is a reason the run cannot be vectorized beyond the model and program's;
    with ``sample`` (training examples), a model ``vmap`` cannot batch is one too. On the
    CPU (``device``, default: cuda when present), ``auto`` leaves convolutional models to one
    client at a time, which is faster there."""
    if name == "vectorized" and blocker:
        raise ConfigError(f"runtime.backend 'vectorized' is not possible: {blocker}")
    if name not in ("auto", "vectorized"):
        return name
    blocker = blocker or vectorization_blocker(module, program)
    if blocker is None and sample is not None:
        blocker = vmap_problem(module, sample.x)
    if name == "vectorized":
        if blocker:
            raise ConfigError(f"runtime.backend 'vectorized' is not possible: {blocker}")
        log.info("backend vectorized: %s", type(module).__name__)
        return name
    blocker = blocker or slower_batched(module, device)
    if blocker is None:
        log.info("backend auto -> vectorized: the model and local training batch across clients")
        return "vectorized"
    if "fork" in mp.get_all_start_methods():
        log.info("backend auto -> workers: cannot vectorize (%s)", blocker)
        return "workers"
    log.info("backend auto -> sequential: cannot vectorize (%s) and no fork here", blocker)
    return "sequential"


def slower_batched(module: torch.nn.Module, device: str | None) -> str | None:
    """Why batching ``module`` on ``device`` would be slower than training one client at a
    time, or None: on the CPU, vmap runs a batch of convolutions with per-client weights as
    one grouped convolution, measured slower than the clients one by one (bench/README.md,
    section 15: the FedAvg CNN, 1.4x the CPU time on one thread)."""
    from fedforge.runtime.vectorized import default_device

    where = torch.device(device) if device else default_device()
    if where.type != "cpu":
        return None
    if any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in module.modules()):
        return (
            "on the CPU, vmap runs the clients' convolutions as one grouped convolution, "
            "slower than one client at a time (runtime.backend = 'vectorized' forces it)"
        )
    return None


def backend_device(name: str, options: BackendOptions) -> str:
    """The torch device the clients of backend ``name`` train on: the vectorized backend's
    (``options.device``, else cuda when present); every other backend trains on the CPU."""
    if name != "vectorized":
        return "cpu"
    if options.device:
        return str(torch.device(options.device))
    from fedforge.runtime.vectorized import default_device

    return str(default_device())


def make_transport(
    name: str,
    app: ClientApp,
    data: FederatedDataset,
    store: ClientStateStore,
    options: BackendOptions,
) -> Transport:
    if name == "sequential":
        return SequentialTransport(app, data, store)
    if name == "vectorized" and app.loop is not None and app.loop.cohort is not None:
        from fedforge.runtime.site_cohort import SiteCohortTransport

        return SiteCohortTransport(app, data, store)
    if name == "vectorized":
        from fedforge.runtime.vectorized import VectorizedTransport

        blocker = vectorization_blocker(app.module, app.program)
        if app.loop is not None:
            blocker = "a training function (your own loop) trains one client at a time"
        if blocker:
            raise ConfigError(f"runtime.backend 'vectorized' is not possible: {blocker}")
        return VectorizedTransport(
            app,
            data,
            store,
            device=torch.device(options.device) if options.device else None,
            memory_budget=options.memory_budget,
            threads=options.threads,
        )
    if name == "workers":
        from fedforge.runtime.workers import WorkerPoolTransport

        return WorkerPoolTransport(app, data, store, num_workers=options.num_workers)
    if name == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError(
                "runtime.backend 'ray' needs Ray: pip install 'fedforge[ray]'"
            ) from None
        from fedforge.runtime.ray_transport import RayTransport

        return RayTransport(
            app, data, store, num_actors=options.num_workers, address=options.ray_address
        )
    raise ConfigError(
        f"unknown backend {name!r}; allowed: auto, sequential, vectorized, workers, ray"
    )
