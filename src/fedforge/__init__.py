"""fedforge: federated learning with one algorithm code path for every runtime."""

from fedforge.aggregate.server_opt import ServerSGD
from fedforge.aggregate.weighted_mean import StreamingMean, weighted_mean
from fedforge.algorithms.base import ServerState
from fedforge.algorithms.fedavg import FedAvg
from fedforge.config import RunConfig, load_config
from fedforge.core.errors import ConfigError, DataError, FedforgeError, InvalidUpdateError
from fedforge.core.params import Params
from fedforge.core.results import ClientFailure, ClientResult
from fedforge.data import partition
from fedforge.data.datasets import ArrayDataset, load_digits, load_mnist5k, make_synthetic
from fedforge.data.federated import FederatedDataset
from fedforge.report.history import History, RoundRecord
from fedforge.runtime.backends import BackendOptions
from fedforge.runtime.loop import RoundListener
from fedforge.runtime.simulation import SimulationResult, simulate
from fedforge.train.local_sgd import LocalSGD
from fedforge.train.torch_model import TorchModel

__version__ = "0.1.0"

__all__ = [
    "ArrayDataset",
    "BackendOptions",
    "ClientFailure",
    "ClientResult",
    "ConfigError",
    "DataError",
    "FedAvg",
    "FederatedDataset",
    "FedforgeError",
    "History",
    "InvalidUpdateError",
    "LocalSGD",
    "Params",
    "RoundListener",
    "RoundRecord",
    "RunConfig",
    "ServerSGD",
    "ServerState",
    "SimulationResult",
    "StreamingMean",
    "TorchModel",
    "load_config",
    "load_digits",
    "load_mnist5k",
    "make_synthetic",
    "partition",
    "simulate",
    "weighted_mean",
]
