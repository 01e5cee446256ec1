"""fedforge: federated learning with one algorithm code path for every runtime.

The public API is imported lazily (PEP 562): ``import fedforge`` costs nothing, and a name
such as ``fedforge.simulate`` imports its module (and torch) the first time it is used, so
commands that need neither (``fedforge --version``, ``fedforge keys``) start at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it (the module itself for ``partition``).
_EXPORTS: dict[str, str] = {
    # algorithms (one file each) and the protocol a new one implements
    "Algorithm": "fedforge.algorithms.base",
    "RoundContext": "fedforge.algorithms.base",
    "ServerState": "fedforge.algorithms.base",
    "Ditto": "fedforge.algorithms.ditto",
    "FedAvg": "fedforge.algorithms.fedavg",
    "FedNova": "fedforge.algorithms.fednova",
    "FedPer": "fedforge.algorithms.fedper",
    "head_names": "fedforge.algorithms.fedper",
    "FedProx": "fedforge.algorithms.fedprox",
    "FedRep": "fedforge.algorithms.fedrep",
    "QFedAvg": "fedforge.algorithms.qfedavg",
    "Scaffold": "fedforge.algorithms.scaffold",
    # aggregation and server optimizers
    "Aggregate": "fedforge.aggregate.kinds",
    "Aggregation": "fedforge.aggregate.kinds",
    "StreamingMean": "fedforge.aggregate.kinds",
    "WeightedMean": "fedforge.aggregate.kinds",
    "weighted_mean": "fedforge.aggregate.kinds",
    "CoordinateMedian": "fedforge.aggregate.gather",
    "RobustAggregation": "fedforge.aggregate.gather",
    "FedAdagrad": "fedforge.aggregate.server_opt",
    "FedAdam": "fedforge.aggregate.server_opt",
    "FedYogi": "fedforge.aggregate.server_opt",
    "ServerOptimizer": "fedforge.aggregate.server_opt",
    "ServerSGD": "fedforge.aggregate.server_opt",
    "SecureAggregation": "fedforge.secagg.aggregation",
    # update stages, codecs and privacy
    "Stage": "fedforge.stages.base",
    "StageChain": "fedforge.stages.base",
    "AdaptiveClip": "fedforge.stages.clip",
    "FixedClip": "fedforge.stages.clip",
    "Compress": "fedforge.stages.compress",
    "CentralGaussian": "fedforge.stages.dp_noise",
    "LocalGaussian": "fedforge.stages.dp_noise",
    "BFloat16": "fedforge.compress.codecs",
    "Float16": "fedforge.compress.codecs",
    "StochasticQuantizer": "fedforge.compress.codecs",
    "TopK": "fedforge.compress.codecs",
    "Rotated": "fedforge.compress.rotation",
    "SamplingScheme": "fedforge.privacy.accounting",
    "SampleDP": "fedforge.privacy.dp_sgd",
    # configuration and errors
    "RunConfig": "fedforge.config",
    "load_config": "fedforge.config",
    "ConfigError": "fedforge.core.errors",
    "DataError": "fedforge.core.errors",
    "FedforgeError": "fedforge.core.errors",
    "InvalidUpdateError": "fedforge.core.errors",
    # parameters, tasks and records
    "Params": "fedforge.core.params",
    "ClientFailure": "fedforge.core.records",
    "Record": "fedforge.core.records",
    "RecordBatch": "fedforge.core.records",
    "RecordSpec": "fedforge.core.records",
    "Task": "fedforge.core.records",
    # data
    "partition": "fedforge.data.partition",
    "ArrayDataset": "fedforge.data.datasets",
    "load_digits": "fedforge.data.datasets",
    "load_mnist5k": "fedforge.data.datasets",
    "make_synthetic": "fedforge.data.datasets",
    "ClientData": "fedforge.data.federated",
    "FederatedDataset": "fedforge.data.federated",
    # reports
    "History": "fedforge.report.history",
    "RoundRecord": "fedforge.report.history",
    # runtimes: simulation, sampling, client state, the virtual clock, FedBuff
    "BackendOptions": "fedforge.runtime.backends",
    "ClientApp": "fedforge.runtime.client_app",
    "DiskStateStore": "fedforge.runtime.client_state",
    "ClientStates": "fedforge.runtime.state_slots",
    "MemoryStateStore": "fedforge.runtime.client_state",
    "FederatedEvaluation": "fedforge.runtime.driver",
    "RoundListener": "fedforge.runtime.driver",
    "PoissonSampler": "fedforge.runtime.sampling",
    "Sampler": "fedforge.runtime.sampling",
    "UniformSampler": "fedforge.runtime.sampling",
    "SimulationResult": "fedforge.runtime.simulation",
    "simulate": "fedforge.runtime.simulation",
    "Stragglers": "fedforge.runtime.stragglers",
    "ClockSpec": "fedforge.runtime.clock",
    "Devices": "fedforge.runtime.devices",
    "draw_devices": "fedforge.runtime.devices",
    "read_trace": "fedforge.runtime.devices",
    "FedBuff": "fedforge.runtime.async_driver",
    # local training
    "LocalProgram": "fedforge.train.program",
    "LocalSGD": "fedforge.train.program",
    "Proximal": "fedforge.train.program",
    "TorchModel": "fedforge.train.torch_model",
    # your model, data and training loop
    "Site": "fedforge.workload.base",
    "TrainConfig": "fedforge.workload.base",
    "Workload": "fedforge.workload.base",
    "read_data": "fedforge.workload.readers",
}

__all__ = [
    "AdaptiveClip",
    "Aggregate",
    "Aggregation",
    "Algorithm",
    "ArrayDataset",
    "BFloat16",
    "BackendOptions",
    "CentralGaussian",
    "ClientApp",
    "ClientData",
    "ClientFailure",
    "ClientStates",
    "ClockSpec",
    "Compress",
    "ConfigError",
    "CoordinateMedian",
    "DataError",
    "Devices",
    "DiskStateStore",
    "Ditto",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedBuff",
    "FedNova",
    "FedPer",
    "FedProx",
    "FedRep",
    "FedYogi",
    "FederatedDataset",
    "FederatedEvaluation",
    "FedforgeError",
    "FixedClip",
    "Float16",
    "History",
    "InvalidUpdateError",
    "LocalGaussian",
    "LocalProgram",
    "LocalSGD",
    "MemoryStateStore",
    "Params",
    "PoissonSampler",
    "Proximal",
    "QFedAvg",
    "Record",
    "RecordBatch",
    "RecordSpec",
    "RobustAggregation",
    "Rotated",
    "RoundContext",
    "RoundListener",
    "RoundRecord",
    "RunConfig",
    "SampleDP",
    "Sampler",
    "SamplingScheme",
    "Scaffold",
    "SecureAggregation",
    "ServerOptimizer",
    "ServerSGD",
    "ServerState",
    "SimulationResult",
    "Site",
    "Stage",
    "StageChain",
    "StochasticQuantizer",
    "Stragglers",
    "StreamingMean",
    "Task",
    "TopK",
    "TorchModel",
    "TrainConfig",
    "UniformSampler",
    "WeightedMean",
    "Workload",
    "draw_devices",
    "head_names",
    "load_config",
    "load_digits",
    "load_mnist5k",
    "make_synthetic",
    "partition",
    "read_data",
    "read_trace",
    "simulate",
    "weighted_mean",
]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fedforge' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if name == "partition" else getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # what type checkers and IDEs see
    from fedforge.aggregate.gather import CoordinateMedian, RobustAggregation
    from fedforge.aggregate.kinds import (
        Aggregate,
        Aggregation,
        StreamingMean,
        WeightedMean,
        weighted_mean,
    )
    from fedforge.aggregate.server_opt import (
        FedAdagrad,
        FedAdam,
        FedYogi,
        ServerOptimizer,
        ServerSGD,
    )
    from fedforge.algorithms.base import Algorithm, RoundContext, ServerState
    from fedforge.algorithms.ditto import Ditto
    from fedforge.algorithms.fedavg import FedAvg
    from fedforge.algorithms.fednova import FedNova
    from fedforge.algorithms.fedper import FedPer, head_names
    from fedforge.algorithms.fedprox import FedProx
    from fedforge.algorithms.fedrep import FedRep
    from fedforge.algorithms.qfedavg import QFedAvg
    from fedforge.algorithms.scaffold import Scaffold
    from fedforge.compress.codecs import BFloat16, Float16, StochasticQuantizer, TopK
    from fedforge.compress.rotation import Rotated
    from fedforge.config import RunConfig, load_config
    from fedforge.core.errors import ConfigError, DataError, FedforgeError, InvalidUpdateError
    from fedforge.core.params import Params
    from fedforge.core.records import ClientFailure, Record, RecordBatch, RecordSpec, Task
    from fedforge.data import partition
    from fedforge.data.datasets import ArrayDataset, load_digits, load_mnist5k, make_synthetic
    from fedforge.data.federated import ClientData, FederatedDataset
    from fedforge.privacy.accounting import SamplingScheme
    from fedforge.privacy.dp_sgd import SampleDP
    from fedforge.report.history import History, RoundRecord
    from fedforge.runtime.async_driver import FedBuff
    from fedforge.runtime.backends import BackendOptions
    from fedforge.runtime.client_app import ClientApp
    from fedforge.runtime.client_state import DiskStateStore, MemoryStateStore
    from fedforge.runtime.clock import ClockSpec
    from fedforge.runtime.devices import Devices, draw_devices, read_trace
    from fedforge.runtime.driver import FederatedEvaluation, RoundListener
    from fedforge.runtime.sampling import PoissonSampler, Sampler, UniformSampler
    from fedforge.runtime.simulation import SimulationResult, simulate
    from fedforge.runtime.state_slots import ClientStates
    from fedforge.runtime.stragglers import Stragglers
    from fedforge.secagg.aggregation import SecureAggregation
    from fedforge.stages.base import Stage, StageChain
    from fedforge.stages.clip import AdaptiveClip, FixedClip
    from fedforge.stages.compress import Compress
    from fedforge.stages.dp_noise import CentralGaussian, LocalGaussian
    from fedforge.train.program import LocalProgram, LocalSGD, Proximal
    from fedforge.train.torch_model import TorchModel
    from fedforge.workload.base import Site, TrainConfig, Workload
    from fedforge.workload.readers import read_data
