"""What is trained on what: the dataset, its partition over clients, the model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedforge.config.base import Section


class DataConfig(Section):
    """Which built-in dataset to use (all offline)."""

    dataset: Literal["mnist5k", "digits", "synthetic"] = "mnist5k"
    alpha: float = Field(1.0, ge=0, description="synthetic only: model heterogeneity")
    beta: float = Field(1.0, ge=0, description="synthetic only: feature heterogeneity")
    devices: int = Field(30, ge=1, description="synthetic only: number of devices")


class PartitionConfig(Section):
    """How training examples are split across clients."""

    scheme: Literal["iid", "dirichlet", "shards", "quantity", "natural"] = "dirichlet"
    num_clients: int = Field(100, ge=1)
    alpha: float = Field(0.5, gt=0, description="dirichlet: concentration")
    shards_per_client: int = Field(2, ge=1, description="shards: label shards per client")
    exponent: float = Field(1.5, gt=0, description="quantity: Pareto tail exponent")


class ModelConfig(Section):
    name: Literal["mlp", "logistic"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [200, 200], description="mlp widths")
