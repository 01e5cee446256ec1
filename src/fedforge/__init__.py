"""fedforge: federated learning with one algorithm code path for every runtime."""

from fedforge.aggregate.gather import CoordinateMedian, RobustAggregation
from fedforge.aggregate.kinds import (
    Aggregate,
    StreamingMean,
    WeightedMean,
    weighted_mean,
)
from fedforge.aggregate.server_opt import FedAdagrad, FedAdam, FedYogi, ServerSGD
from fedforge.algorithms.base import RoundContext, ServerState
from fedforge.algorithms.fedavg import FedAvg
from fedforge.algorithms.fedprox import FedProx
from fedforge.algorithms.scaffold import Scaffold
from fedforge.config import RunConfig, load_config
from fedforge.core.errors import ConfigError, DataError, FedforgeError, InvalidUpdateError
from fedforge.core.params import Params
from fedforge.core.records import ClientFailure, Record, RecordBatch, RecordSpec, Task
from fedforge.data import partition
from fedforge.data.datasets import ArrayDataset, load_digits, load_mnist5k, make_synthetic
from fedforge.data.federated import ClientData, FederatedDataset
from fedforge.report.history import History, RoundRecord
from fedforge.runtime.backends import BackendOptions
from fedforge.runtime.client_app import ClientApp
from fedforge.runtime.client_state import DiskStateStore, MemoryStateStore
from fedforge.runtime.driver import FederatedEvaluation, RoundListener
from fedforge.runtime.sampling import PoissonSampler, Sampler, UniformSampler
from fedforge.runtime.simulation import SimulationResult, simulate
from fedforge.runtime.state_slots import ClientStates
from fedforge.stages.base import Stage, StageChain
from fedforge.stages.clip import FixedClip
from fedforge.train.program import LocalProgram, LocalSGD, Proximal
from fedforge.train.torch_model import TorchModel

__version__ = "0.1.0"

__all__ = [
    "Aggregate",
    "ArrayDataset",
    "BackendOptions",
    "ClientApp",
    "ClientData",
    "ClientFailure",
    "ClientStates",
    "ConfigError",
    "CoordinateMedian",
    "DataError",
    "DiskStateStore",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FedYogi",
    "FederatedDataset",
    "FederatedEvaluation",
    "FedforgeError",
    "FixedClip",
    "History",
    "InvalidUpdateError",
    "LocalProgram",
    "LocalSGD",
    "MemoryStateStore",
    "Params",
    "PoissonSampler",
    "Proximal",
    "Record",
    "RecordBatch",
    "RecordSpec",
    "RobustAggregation",
    "RoundContext",
    "RoundListener",
    "RoundRecord",
    "RunConfig",
    "Sampler",
    "Scaffold",
    "ServerSGD",
    "ServerState",
    "SimulationResult",
    "Stage",
    "StageChain",
    "StreamingMean",
    "Task",
    "TorchModel",
    "UniformSampler",
    "WeightedMean",
    "load_config",
    "load_digits",
    "load_mnist5k",
    "make_synthetic",
    "partition",
    "simulate",
    "weighted_mean",
]
