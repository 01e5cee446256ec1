"""Choosing and building the backend that executes client work."""

from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import dataclass
from typing import Literal

import torch

from fedforge.algorithms.base import Algorithm
from fedforge.core.errors import ConfigError
from fedforge.core.rng import RngStreams
from fedforge.data.federated import FederatedDataset
from fedforge.runtime.backend import ClientBackend
from fedforge.runtime.sequential import SequentialBackend
from fedforge.train.cohort import vectorization_blocker
from fedforge.train.local_sgd import LocalSGD
from fedforge.train.torch_model import TorchModel

log = logging.getLogger("fedforge")

BackendName = Literal["auto", "sequential", "vectorized", "workers", "ray"]


@dataclass(frozen=True)
class BackendOptions:
    """Knobs of the non-sequential backends; defaults suit a laptop."""

    num_workers: int = 2
    memory_budget: int | None = None  # vectorized: bytes per chunk (default by device)
    device: str | None = None  # vectorized: "cpu", "cuda", ... (default: cuda if present)
    ray_address: str | None = None


def vectorizable(algorithm: Algorithm, module: torch.nn.Module) -> str | None:
    """Why ``algorithm`` on ``module`` cannot run vectorized, or None if it can."""
    local = getattr(algorithm, "local", None)
    if not isinstance(local, LocalSGD) or not hasattr(algorithm, "finish_client"):
        return f"{type(algorithm).__name__} does not train with LocalSGD + finish_client"
    owner = next(k for k in type(algorithm).__mro__ if "client_update" in vars(k))
    if "finish_client" not in vars(owner):
        return f"{type(algorithm).__name__} overrides client_update with custom client code"
    return vectorization_blocker(module, local)


def resolve_backend(name: BackendName, algorithm: Algorithm, module: torch.nn.Module) -> str:
    """The concrete backend ``name`` stands for; ``auto`` logs what it chose and why."""
    if name != "auto":
        return name
    blocker = vectorizable(algorithm, module)
    if blocker is None:
        log.info("backend auto -> vectorized: the model and local training batch across clients")
        return "vectorized"
    if "fork" in mp.get_all_start_methods():
        log.info("backend auto -> workers: cannot vectorize (%s)", blocker)
        return "workers"
    log.info("backend auto -> sequential: cannot vectorize (%s) and no fork here", blocker)
    return "sequential"


def make_backend(
    name: str,
    algorithm: Algorithm,
    module: torch.nn.Module,
    data: FederatedDataset,
    streams: RngStreams,
    options: BackendOptions,
) -> ClientBackend:
    if name == "sequential":
        return SequentialBackend(algorithm, TorchModel(module), data, streams)
    if name == "vectorized":
        from fedforge.runtime.vectorized import VectorizedBackend

        blocker = vectorizable(algorithm, module)
        if blocker:
            raise ConfigError(f"runtime.backend 'vectorized' is not possible: {blocker}")
        return VectorizedBackend(
            algorithm,  # type: ignore[arg-type]
            module,
            data,
            streams,
            device=torch.device(options.device) if options.device else None,
            memory_budget=options.memory_budget,
        )
    if name == "workers":
        from fedforge.runtime.workers import WorkerPoolBackend

        return WorkerPoolBackend(algorithm, module, data, streams, num_workers=options.num_workers)
    if name == "ray":
        try:
            from fedforge.runtime.ray_backend import RayBackend
        except ImportError as exc:
            raise ConfigError(
                "runtime.backend 'ray' needs Ray: pip install 'fedforge[ray]'"
            ) from exc
        return RayBackend(
            algorithm,
            module,
            data,
            streams,
            num_actors=options.num_workers,
            address=options.ray_address,
        )
    raise ConfigError(
        f"unknown backend {name!r}; allowed: auto, sequential, vectorized, workers, ray"
    )
