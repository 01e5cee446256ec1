"""Typed run configuration: TOML file + ``--set key=value`` overrides, validated up front.

One module per concern: ``task`` (data, partition, model), ``training`` (algorithm, local
training, rounds, federated evaluation), ``updates`` (stages, privacy, aggregation, secure
aggregation, attacks), ``system`` (runtimes, clock, asynchronous training, deployment),
``checks`` (combinations across sections), ``load`` (reading and writing)."""

from fedforge.config.checks import num_clients
from fedforge.config.load import apply_override, load_config, runtime_problems, to_toml
from fedforge.config.run import RunConfig
from fedforge.config.system import (
    AsyncConfig,
    ClockConfig,
    DeployConfig,
    RuntimeConfig,
    device_problem,
    ray_installed,
)
from fedforge.config.task import DataConfig, ModelConfig, PartitionConfig
from fedforge.config.training import (
    AlgorithmConfig,
    ClientConfig,
    EvaluationConfig,
    ServerConfig,
)
from fedforge.config.updates import (
    AggregationConfig,
    AttackConfig,
    PrivacyConfig,
    SecAggConfig,
    UpdateConfig,
)

__all__ = [
    "AggregationConfig",
    "AlgorithmConfig",
    "AsyncConfig",
    "AttackConfig",
    "ClientConfig",
    "ClockConfig",
    "DataConfig",
    "DeployConfig",
    "EvaluationConfig",
    "ModelConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "RunConfig",
    "RuntimeConfig",
    "SecAggConfig",
    "ServerConfig",
    "UpdateConfig",
    "apply_override",
    "device_problem",
    "load_config",
    "num_clients",
    "ray_installed",
    "runtime_problems",
    "to_toml",
]
