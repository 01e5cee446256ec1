"""A whole run's configuration: every section, checked across sections when it loads."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from fedforge.config.base import Section
from fedforge.config.checks import problems
from fedforge.config.lora import LoraConfig
from fedforge.config.rl import RLConfig
from fedforge.config.system import AsyncConfig, ClockConfig, DeployConfig, RuntimeConfig
from fedforge.config.task import DataConfig, ModelConfig, PartitionConfig, check_import_path
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


class RunConfig(Section):
    """A whole run. Every key has a default, so an empty file is the embedded default."""

    seed: int = 0
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    client: ClientConfig = ClientConfig()
    server: ServerConfig = ServerConfig()
    update: UpdateConfig = UpdateConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    aggregation: AggregationConfig = AggregationConfig()
    secagg: SecAggConfig = SecAggConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    attack: AttackConfig = AttackConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    deploy: DeployConfig = DeployConfig()
    clock: ClockConfig = ClockConfig()
    asynchronous: AsyncConfig = AsyncConfig()
    lora: LoraConfig = LoraConfig()
    rl: RLConfig | None = Field(
        None, description="federated reinforcement learning: agents and their environments"
    )
    project_dir: str | None = Field(
        None,
        description="where import paths and relative data paths resolve (default: the "
        "configuration file's directory)",
    )
    workload: str | None = Field(
        None,
        description="your whole workload: 'module:attribute' naming a fedforge.Workload "
        "(model, data and optionally a training loop) instead of [model]/[data] keys",
    )

    @field_validator("workload")
    @classmethod
    def _workload_path(cls, value: str | None) -> str | None:
        return check_import_path(value)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        found = problems(self)
        if found:
            raise ValueError("; ".join(found))
        return self
