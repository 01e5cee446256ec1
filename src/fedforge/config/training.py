"""The federated algorithm, local training, the round loop and federated evaluation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fedforge.config.base import Section
from fedforge.config.task import check_import_path


class AlgorithmConfig(Section):
    """The federated algorithm (client program and server update)."""

    name: Literal[
        "fedavg", "fedprox", "scaffold", "fednova", "qfedavg", "fedper", "fedrep", "ditto"
    ] = "fedavg"
    mu: float = Field(0.01, ge=0, description="fedprox: proximal coefficient")
    q: float = Field(1.0, ge=0, description="qfedavg: fairness exponent (0 = uniform FedAvg)")
    lam: float = Field(0.1, ge=0, description="ditto: pull of each personal model to the global")
    head_layers: int = Field(1, ge=1, description="fedper/fedrep: last layers kept on each client")
    head_epochs: int | None = Field(
        None, ge=1, description="fedrep: head-only epochs before the body's (default client.epochs)"
    )
    stragglers: float = Field(
        0.0, ge=0, le=1, description="share of each round's clients running 1..E epochs (sim)"
    )
    drop_stragglers: bool = Field(False, description="drop stragglers, not keep partial work")


class ClientConfig(Section):
    """Local training on each client."""

    epochs: int = Field(5, ge=1)
    batch_size: int = Field(10, ge=0, description="0 = the client's whole data (FedSGD)")
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    train: str | None = Field(
        None,
        description="your training loop: 'module:function' called as train(model, loader, "
        "config) instead of the built-in local SGD",
    )
    train_proximal: bool = Field(
        False,
        description="client.train adds config.proximal(model) to its loss (needed by fedprox)",
    )
    train_metrics: list[str] = Field(
        default_factory=list,
        description="metrics client.train may return beside train_loss (recorded per round)",
    )

    @field_validator("train")
    @classmethod
    def _train_path(cls, value: str | None) -> str | None:
        return check_import_path(value)


class StopConfig(Section):
    """Early stopping: end the run once ``metric`` reaches ``threshold``, or once it has not
    improved for ``patience`` rounds (either, when both are set). Off without a metric."""

    metric: str | None = Field(
        None,
        description="test_accuracy, test_loss (central evaluation), fed_eval.accuracy, "
        "fed_eval.loss (federated evaluation), train_loss, or another recorded metric",
    )
    threshold: float | None = Field(None, description="stop once the metric reaches this")
    patience: int | None = Field(
        None, ge=1, description="stop after this many rounds without a new best"
    )
    mode: Literal["auto", "max", "min"] = Field(
        "auto", description="whether larger is better (auto: min for losses, else max)"
    )
    min_delta: float = Field(0.0, ge=0, description="patience: the least change that improves")

    @property
    def enabled(self) -> bool:
        return self.metric is not None

    def problems(self) -> list[str]:
        if self.metric is None:
            unset = [k for k in ("threshold", "patience") if getattr(self, k) is not None]
            return [f"server.stop_when.{k} needs server.stop_when.metric" for k in unset]
        if self.threshold is None and self.patience is None:
            return ["server.stop_when needs a threshold, a patience or both"]
        return []


class ServerConfig(Section):
    """The round loop and the server optimizer."""

    rounds: int = Field(50, ge=1)
    clients_per_round: int = Field(10, ge=1, description="uniform sampler: clients per round")
    sampler: Literal["uniform", "poisson"] = "uniform"
    sampling_rate: float = Field(0.1, gt=0, le=1, description="poisson: inclusion probability")
    optimizer: Literal["sgd", "adam", "yogi", "adagrad"] = "sgd"
    lr: float | None = Field(None, gt=0, description="server lr (default 1.0 for sgd, 0.01 else)")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd: server momentum (FedAvgM)")
    beta1: float = Field(0.9, ge=0, lt=1, description="adaptive: first-moment decay")
    beta2: float = Field(0.99, ge=0, lt=1, description="adam/yogi: second-moment decay")
    tau: float = Field(1e-3, gt=0, description="adaptive: adaptivity (epsilon)")
    stop_when: StopConfig = StopConfig()


class EvaluationConfig(Section):
    """Federated evaluation: clients score the global model on their own held-out split."""

    fraction: float = Field(0.0, ge=0, le=1, description="clients evaluating per round (0: off)")
    holdout: float = Field(0.2, gt=0, lt=1, description="share of each client's data held out")
    every: int = Field(1, ge=1, description="rounds between federated evaluations")
