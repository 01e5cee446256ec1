"""Typed run configuration: TOML file + ``--set key=value`` overrides, validated up front."""

from __future__ import annotations

import importlib.util
import math
import tomllib
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from fedforge.aggregate.gather import BOUNDED_RULES, RobustAggregation, Rule
from fedforge.core.errors import ConfigError
from fedforge.secagg.protocol import ROTATION_BLOCK, SecAggParams
from fedforge.secagg.ring import frac_bits, rotated_bound


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Which built-in dataset to use (all offline)."""

    dataset: Literal["mnist5k", "digits", "synthetic"] = "mnist5k"
    alpha: float = Field(1.0, ge=0, description="synthetic only: model heterogeneity")
    beta: float = Field(1.0, ge=0, description="synthetic only: feature heterogeneity")
    devices: int = Field(30, ge=1, description="synthetic only: number of devices")


class PartitionConfig(_Section):
    """How training examples are split across clients."""

    scheme: Literal["iid", "dirichlet", "shards", "quantity", "natural"] = "dirichlet"
    num_clients: int = Field(100, ge=1)
    alpha: float = Field(0.5, gt=0, description="dirichlet: concentration")
    shards_per_client: int = Field(2, ge=1, description="shards: label shards per client")
    exponent: float = Field(1.5, gt=0, description="quantity: Pareto tail exponent")


class ModelConfig(_Section):
    name: Literal["mlp", "logistic"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [200, 200], description="mlp widths")


class AlgorithmConfig(_Section):
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


class ClientConfig(_Section):
    """Local training on each client."""

    epochs: int = Field(5, ge=1)
    batch_size: int = Field(10, ge=0, description="0 = the client's whole data (FedSGD)")
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class ServerConfig(_Section):
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


class UpdateConfig(_Section):
    """Client-side update stages, and the compression of what travels each way."""

    clip_norm: float | None = Field(None, gt=0, description="clip each record to this L2 norm")
    codec: Literal[
        "none", "float16", "bfloat16", "q8", "q4", "rotated_q4", "rotated_q2", "topk"
    ] = Field("none", description="compress each update on the client (bytes up are encoded)")
    codec_block: int = Field(256, ge=1, description="q8, q4: coordinates sharing one scale")
    topk_fraction: float = Field(0.01, gt=0, le=1, description="topk: share of coordinates sent")
    error_feedback: bool | None = Field(
        None, description="keep what the codec lost in client state (default: on for topk)"
    )
    downlink: Literal["none", "float16", "bfloat16"] = Field(
        "none", description="compress the broadcast model (bytes down are the encoded ones)"
    )

    @property
    def uses_error_feedback(self) -> bool:
        if self.error_feedback is None:
            return self.codec == "topk"
        return self.error_feedback


class PrivacyConfig(_Section):
    """Differential privacy (off by default). ``central``: clients clip, the server noises the
    sum (DP-FedAvg); ``local``: each client clips and noises its own update; ``sample``:
    DP-SGD inside each client through Opacus (per-example privacy of each client's data);
    ``distributed``: with secure aggregation, each client adds discrete Gaussian noise in the
    ring, so the server only sees a noised sum."""

    mode: Literal["off", "central", "local", "sample", "distributed"] = "off"
    noise_multiplier: float | None = Field(None, gt=0, description="noise stddev / clip norm")
    target_epsilon: float | None = Field(
        None, gt=0, description="central: calibrate the noise so the run ends at this epsilon"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta epsilon is reported at")
    clip_norm: float = Field(
        1.0, gt=0, description="update L2 bound (initial one when adaptive); sample: per example"
    )
    adaptive_clip: bool = Field(False, description="central: adapt the clip norm to a quantile")
    target_quantile: float = Field(0.5, ge=0, le=1, description="adaptive: unclipped share")
    clip_learning_rate: float = Field(0.2, gt=0, description="adaptive: geometric step")
    count_stddev: float | None = Field(
        None, gt=0, description="adaptive: clipped-count noise (default expected clients / 20)"
    )
    accountant: Literal["pld", "rdp"] = "pld"
    weighting: Literal["uniform", "capped"] = Field(
        "uniform", description="central: every client weight 1, or min(examples / cap, 1)"
    )
    weight_cap: float | None = Field(None, gt=0, description="capped: examples for weight 1")
    seeded_noise: bool = Field(
        False, description="reproducible noise from the run seed (research only, predictable)"
    )

    def problems(self) -> list[str]:
        """Cross-key errors within this section."""
        if self.mode == "off":
            return []
        out = []
        calibrated = self.mode == "central" and self.target_epsilon is not None
        if (self.noise_multiplier is None) == (not calibrated):
            out.append(
                "privacy: set exactly one of privacy.noise_multiplier and "
                "privacy.target_epsilon (target_epsilon calibrates central DP only)"
                if self.mode == "central"
                else f"privacy.noise_multiplier is required with privacy.mode = {self.mode!r}"
            )
        if self.mode != "central":
            for key in ("adaptive_clip", "target_epsilon", "weight_cap"):
                if getattr(self, key) not in (None, False):
                    out.append(f"privacy.{key} applies to privacy.mode = 'central' only")
            if self.weighting != "uniform":
                out.append("privacy.weighting applies to privacy.mode = 'central' only")
        if self.weighting == "capped" and self.weight_cap is None:
            out.append("privacy.weighting = 'capped' needs privacy.weight_cap (examples)")
        return out


class AggregationConfig(_Section):
    """How accepted records are combined: the weighted mean, secure aggregation
    (``secure_sum``: the server learns only the sum, see ``[secagg]``), or a Byzantine-robust
    rule."""

    kind: Literal["mean", "secure_sum", Rule] = "mean"
    max_weight: float | None = Field(None, gt=0, description="mean: cap on one client's weight")
    byzantine: int = Field(0, ge=0, description="krum, multi_krum, bulyan: attackers tolerated")
    trim: float = Field(0.1, ge=0, lt=0.5, description="trimmed_mean: share cut at each end")
    multi_krum: int = Field(2, ge=1, description="multi_krum: updates averaged")
    max_norm: float | None = Field(None, gt=0, description="norm_bound: fixed L2 bound")
    norm_quantile: float | None = Field(
        None, gt=0, le=1, description="norm_bound: bound at this quantile of the round's norms"
    )
    tau: float = Field(1.0, gt=0, description="centered_clipping: clipping radius")
    iterations: int = Field(3, ge=1, description="centered_clipping: iterations")


class SecAggConfig(_Section):
    """Secure aggregation (SecAgg+), used when ``aggregation.kind = 'secure_sum'``."""

    ring_bits: Literal[16, 32, 64] = Field(32, description="the ring the masked sum lives in")
    rotation: bool = Field(
        False, description="rotate records first (randomized Hadamard): 16-bit rings need it"
    )
    security: float = Field(3.0, gt=0, description="graph degree = security * log2(clients)")
    complete_graph: bool = Field(False, description="every client shares with every client")
    threshold: float = Field(
        0.5, ge=0.5, lt=1, description="shares needed: floor(threshold * neighbourhood) + 1"
    )
    clip_norm: float = Field(
        10.0, gt=0, description="records are clipped to this L2 norm (or the clip stage's)"
    )
    scalar_bound: float = Field(65536.0, ge=1, description="largest summed scalar (a count)")

    def params(self) -> SecAggParams:
        return SecAggParams(
            ring_bits=self.ring_bits,
            security=self.security,
            complete=self.complete_graph,
            threshold=self.threshold,
            clip_norm=self.clip_norm,
            scalar_bound=self.scalar_bound,
            rotation=self.rotation,
        )


class AttackConfig(_Section):
    """A simulated attack (simulation only): a seeded ``fraction`` of the clients attacks."""

    kind: Literal[
        "none", "label_flip", "backdoor", "sign_flip", "scaled", "gaussian", "alie", "ipm"
    ] = "none"
    fraction: float = Field(0.2, ge=0, lt=1, description="share of clients that attack")
    scale: float = Field(10.0, gt=0, description="sign_flip, scaled: factor on the update")
    std: float = Field(1.0, gt=0, description="gaussian: stddev of the noise update")
    epsilon: float = Field(0.5, gt=0, description="ipm: -epsilon x the honest mean")
    target_label: int = Field(0, ge=0, description="backdoor: label the trigger maps to")
    poison_fraction: float = Field(
        0.5, gt=0, le=1, description="backdoor: share of an attacker's examples poisoned"
    )
    overclaim: float = Field(
        1.0, ge=1, description="attackers claim this many times their example count"
    )


class EvaluationConfig(_Section):
    """Federated evaluation: clients score the global model on their own held-out split."""

    fraction: float = Field(0.0, ge=0, le=1, description="clients evaluating per round (0: off)")
    holdout: float = Field(0.2, gt=0, lt=1, description="share of each client's data held out")
    every: int = Field(1, ge=1, description="rounds between federated evaluations")


def _changed(section: _Section, switch: str) -> list[str]:
    """The keys of ``section`` other than ``switch`` that differ from their defaults."""
    return [
        name
        for name, info in type(section).model_fields.items()
        if name != switch and getattr(section, name) != info.default
    ]


class ClockConfig(_Section):
    """Simulated heterogeneous devices on a virtual clock (simulation only): each client's
    speed and bandwidths are drawn log-normally around the medians (or read from ``trace``);
    a task takes ``steps / speed + bytes down / down + bytes up / up`` simulated seconds."""

    enabled: bool = False
    speed_median: float = Field(1.0, gt=0, description="local SGD steps per second (median)")
    speed_sigma: float = Field(1.0, ge=0, description="log-normal sigma of the speeds")
    down_mbps: float = Field(20.0, gt=0, description="download bandwidth, Mbit/s (median)")
    up_mbps: float = Field(5.0, gt=0, description="upload bandwidth, Mbit/s (median)")
    bandwidth_sigma: float = Field(0.5, ge=0, description="log-normal sigma of bandwidths")
    availability: Literal["always", "diurnal", "random"] = Field(
        "always", description="diurnal: a daily window; random: on/off per slot"
    )
    online_fraction: float = Field(
        0.5, gt=0, le=1, description="diurnal, random: share of time a client is online"
    )
    always_on: float = Field(0.0, ge=0, le=1, description="share of clients always online")
    slot_s: float = Field(600.0, gt=0, description="random: seconds of one on/off slot")
    period_s: float = Field(
        86_400.0, ge=0, description="diurnal and trace: seconds before availability repeats"
    )
    trace: str | None = Field(None, description="CSV of devices (see README), replaces draws")
    deadline_s: float | None = Field(None, gt=0, description="drop clients slower than this")
    over_selection: float = Field(
        1.0, ge=1, description="sample ceil(f x clients_per_round), keep the first to finish"
    )

    def problems(self) -> list[str]:
        set_keys = _changed(self, "enabled")
        if not self.enabled and set_keys:
            return [f"clock.{set_keys[0]} needs clock.enabled = true"]
        if self.availability == "diurnal" and self.period_s == 0:
            return ["clock.availability = 'diurnal' needs clock.period_s > 0"]
        return []


class AsyncConfig(_Section):
    """Asynchronous training: on the virtual clock in simulation (``clock.enabled``), in real
    time on a deployment's server. ``fedbuff``: a server update every ``buffer`` arrivals, at
    most ``concurrency`` clients training, stale records weighted
    ``(1 + staleness) ** -staleness_exponent``; ``server.rounds`` counts updates."""

    mode: Literal["off", "fedbuff"] = "off"
    buffer: int = Field(10, ge=1, description="arrivals per server update (K)")
    concurrency: int = Field(100, ge=1, description="clients training at once")
    staleness_exponent: float = Field(
        0.5, ge=0, description="weight (1 + staleness)^-x: 0.5 = 1/sqrt, 0 = none"
    )
    eval_every: int = Field(1, ge=1, description="server updates between central evaluations")


class RuntimeConfig(_Section):
    """How clients execute in simulation."""

    backend: Literal["auto", "sequential", "vectorized", "workers", "ray"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch threads (default: per backend)")
    num_workers: int = Field(2, ge=1, description="workers / ray: processes or actors")
    memory_budget_mb: int | None = Field(None, ge=1, description="vectorized: MiB per chunk")
    device: str | None = Field(
        None, description="vectorized: torch device (default: cuda if present)"
    )
    ray_address: str | None = Field(None, description="ray: cluster address (default: local)")


def ray_installed() -> bool:
    """Whether Ray can be imported (looked up without importing it)."""
    return importlib.util.find_spec("ray") is not None


def device_problem(name: str) -> str | None:
    """Why torch device ``name`` cannot be used on this machine, or None if it can."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        return f"{name!r} is not a torch device name; use e.g. 'cpu', 'cuda' or 'cuda:0'"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return (
                f"{name!r} needs CUDA, which is not available on this machine; "
                "use 'cpu' or leave it unset"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            return (
                f"{name!r} but this machine has {torch.cuda.device_count()} CUDA "
                "device(s); use a lower index or leave it unset"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return f"{name!r} needs MPS, which is not available; use 'cpu' or leave it unset"
    return None


class DeployConfig(_Section):
    """The network server (``fedforge server``); ignored by simulations."""

    address: str = Field("127.0.0.1:8443", description="host:port to listen on")
    keys: str = Field("keys", description="keys directory from `fedforge keys init`")
    state_dir: str = Field("server-state", description="checkpoints (SQLite + safetensors)")
    min_clients: int = Field(2, ge=1, description="connected clients needed to start a round")
    min_completed: int = Field(1, ge=1, description="accepted results for a round to count")
    round_timeout_s: float = Field(120.0, gt=0, description="deadline for a client's result")
    max_retries: int = Field(3, ge=0, description="re-sampled attempts of a failed round")
    heartbeat_s: float = Field(5.0, gt=0, description="idle heartbeat interval")
    max_message_mb: int = Field(16, ge=2, description="gRPC message size limit")
    chunk_kb: int = Field(1024, ge=1, description="size of one streamed chunk")
    max_payload_mb: int = Field(4096, ge=1, description="largest model or update accepted")
    max_examples: int = Field(10_000_000, ge=1, description="hard cap on a claimed sample count")
    site_examples: dict[str, int] = Field(
        default_factory=dict,
        description="the operator's training-set size per client name: a client listed here "
        "never counts more examples, whatever it declares",
    )
    max_size_ratio: float = Field(
        10.0,
        ge=0,
        description="a client not in site_examples counts at most this many times the median "
        "size the other connected clients declare (outlier claims are logged, larger counts "
        "rejected); 0: no such cap",
    )
    hello_timeout_s: float = Field(
        10.0, gt=0, description="a connection that sends no Hello within this is closed"
    )
    silent_heartbeats: float = Field(
        2.5,
        gt=1,
        description="a client silent (no heartbeat) for this many heartbeat intervals is "
        "disconnected and not sampled",
    )
    linger_s: float = Field(
        30.0,
        ge=0,
        description="after the last round, keep answering late clients that the run is "
        "complete for this long",
    )
    client_data: Literal["builtin", "own"] = Field(
        "builtin",
        description="builtin: clients train on their share of the run's dataset and are held "
        "to its size; own: clients bring their own data (--data) and declare its size",
    )


class RunConfig(_Section):
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

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.partition.scheme == "natural" and self.data.dataset != "synthetic":
            raise ValueError(
                "partition.scheme 'natural' needs data.dataset = 'synthetic' "
                "(the only dataset with its own devices)"
            )
        clients = (
            self.data.devices if self.partition.scheme == "natural" else self.partition.num_clients
        )
        if self.server.sampler == "uniform" and self.server.clients_per_round > clients:
            natural = self.partition.scheme == "natural"
            where = "data.devices" if natural else "partition.num_clients"
            raise ValueError(
                f"server.clients_per_round: {self.server.clients_per_round} exceeds the "
                f"number of clients ({clients}); lower it or raise {where}"
            )
        if self.algorithm.name == "scaffold" and self.update.clip_norm is not None:
            raise ValueError(
                "update.clip_norm cannot be combined with algorithm.name = 'scaffold': its "
                "client control variates are updated from the unclipped record"
            )
        layers = 1 if self.model.name == "logistic" else len(self.model.hidden) + 1
        personal_head = self.algorithm.name in ("fedper", "fedrep")
        if personal_head and self.algorithm.head_layers >= layers:
            raise ValueError(
                f"algorithm.head_layers: {self.algorithm.head_layers} leaves no shared body in a "
                f"model of {layers} layer(s); lower it ({self.algorithm.name} needs "
                "model.name = 'mlp')"
            )
        if self.algorithm.head_epochs is not None and self.algorithm.name != "fedrep":
            raise ValueError(
                "algorithm.head_epochs applies to algorithm.name = 'fedrep' only: "
                f"{self.algorithm.name!r} has no head-only phase"
            )
        if self.algorithm.name in ("fednova", "qfedavg") and (
            self.update.clip_norm is not None or self.update.codec != "none"
        ):
            raise ValueError(
                f"algorithm.name = {self.algorithm.name!r} cannot run with update.clip_norm or "
                "update.codec: its normalizer travels in the record beside the update"
            )
        agg = self.aggregation
        if agg.kind != "mean" and agg.max_weight is not None:
            raise ValueError(
                f"aggregation.max_weight applies to the weighted mean, not to {agg.kind!r}"
            )
        if agg.kind == "norm_bound" and (agg.max_norm is None) == (agg.norm_quantile is None):
            raise ValueError(
                "aggregation.kind = 'norm_bound' needs exactly one of aggregation.max_norm "
                "and aggregation.norm_quantile"
            )
        if agg.kind != "mean" and agg.kind in BOUNDED_RULES:
            if self.server.sampler != "uniform":
                raise ValueError(
                    f"aggregation.kind = {agg.kind!r} needs a fixed number of clients per round "
                    "for its bound: use server.sampler = 'uniform'"
                )
            try:
                RobustAggregation(
                    cast(Rule, agg.kind), agg.byzantine, agg.trim, agg.multi_krum
                ).check(self.server.clients_per_round)
            except ConfigError as exc:
                raise ValueError(f"aggregation.kind = {agg.kind!r}: {exc}") from None
        if self.attack.kind == "backdoor" and self.data.dataset == "synthetic":
            raise ValueError("attack.kind = 'backdoor' needs image data (mnist5k or digits)")
        problems = self.privacy.problems() + self._privacy_conflicts() + self._secagg_conflicts()
        problems += self.clock.problems() + self._clock_conflicts(clients)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _clock_conflicts(self, clients: int) -> list[str]:
        """The virtual clock and asynchronous training (``runtime/clock.py``,
        ``runtime/async_driver.py``)."""
        out = []
        clock, fedbuff = self.clock, self.asynchronous
        if clock.enabled and self.aggregation.kind == "secure_sum":
            out.append("clock.enabled cannot time secure aggregation's extra exchanges")
        if clock.over_selection > 1 and self.server.sampler != "uniform":
            out.append("clock.over_selection needs server.sampler = 'uniform'")
        if fedbuff.mode == "off":
            unset = _changed(fedbuff, "mode")
            if unset:
                out.append(f"asynchronous.{unset[0]} needs asynchronous.mode = 'fedbuff'")
            return out
        if clock.deadline_s is not None or clock.over_selection > 1:
            out.append("clock.deadline_s and clock.over_selection apply to synchronous rounds only")
        if fedbuff.buffer > fedbuff.concurrency:
            out.append("asynchronous.buffer cannot exceed asynchronous.concurrency")
        if fedbuff.concurrency > clients:
            out.append(
                f"asynchronous.concurrency ({fedbuff.concurrency}) exceeds the number of "
                f"clients ({clients})"
            )
        conflicts = {
            "aggregation.kind": (self.aggregation.kind != "mean", "the buffer is a weighted mean"),
            "algorithm.name": (
                self.algorithm.name in ("scaffold", "fedper", "fedrep", "ditto"),
                "asynchronous training runs algorithms without client state (control "
                "variates, personal heads or models)",
            ),
            "privacy.mode": (self.privacy.mode != "off", "privacy is accounted per round"),
            "evaluation.fraction": (self.evaluation.fraction > 0, "no rounds to evaluate in"),
            "attack.kind": (
                self.attack.kind in ("alie", "ipm"),
                "this attack reads a round's honest updates",
            ),
        }
        for key, (bad, why) in conflicts.items():
            if bad:
                out.append(f"asynchronous.mode = 'fedbuff' cannot run with this {key}: {why}")
        return out

    def _secagg_conflicts(self) -> list[str]:
        """Secure aggregation needs every record to be summable as it is."""
        if self.aggregation.kind != "secure_sum":
            return []
        out = []
        if self.update.codec != "none":
            out.append(
                f"aggregation.kind = 'secure_sum' cannot follow update.codec = "
                f"{self.update.codec!r}: a codec is decoded record by record, and the server "
                "sees only the sum (secure aggregation quantizes records itself)"
            )
        if self.privacy.mode == "local":
            out.append(
                "aggregation.kind = 'secure_sum' with privacy.mode = 'local': the server sees "
                "only the sum, so noise each client adds need not be local; use "
                "privacy.mode = 'central'"
            )
        if self.attack.kind in ("alie", "ipm"):
            out.append(
                f"attack.kind = {self.attack.kind!r} reads the honest clients' updates, which "
                "secure aggregation hides from the server"
            )
        if self.algorithm.name in ("fednova", "qfedavg"):
            out.append(
                f"aggregation.kind = 'secure_sum' cannot run algorithm.name = "
                f"{self.algorithm.name!r}: secure aggregation clips the record, and its "
                "normalizer travels in the record beside the update"
            )
        clients = (
            self.partition.num_clients
            if self.partition.scheme != "natural"
            else (self.data.devices)
        )
        cohort = clients if self.server.sampler == "poisson" else self.server.clients_per_round
        p, bound = self.privacy, self.secagg.clip_norm
        if p.mode == "distributed" or (p.mode == "central" and not p.adaptive_clip):
            bound = min(bound, p.clip_norm)
        elif self.update.clip_norm is not None:
            bound = min(bound, self.update.clip_norm)
        if self.secagg.rotation:  # each rotated coordinate is far below the norm (w.h.p.)
            bound = rotated_bound(bound, ROTATION_BLOCK)
        if p.mode == "distributed" and p.noise_multiplier is not None:
            bound += 10 * p.noise_multiplier * p.clip_norm / math.sqrt(cohort)  # noise tails
        try:
            frac_bits(self.secagg.ring_bits, bound, cohort, self.secagg.params().min_frac_bits)
        except ConfigError as exc:
            out.append(str(exc))
        return out

    def _privacy_conflicts(self) -> list[str]:
        mode = self.privacy.mode
        if mode == "sample" and self.algorithm.name != "fedavg":
            return [
                "privacy.mode = 'sample' (DP-SGD through Opacus) runs plain local SGD; "
                "it cannot run the objective of algorithm.name = "
                f"{self.algorithm.name!r}: use 'fedavg'"
            ]
        if mode == "distributed" and self.aggregation.kind != "secure_sum":
            return [
                "privacy.mode = 'distributed' adds its noise inside secure aggregation: "
                "set aggregation.kind = 'secure_sum' (or use privacy.mode = 'central')"
            ]
        if mode not in ("central", "local", "distributed"):
            return []
        out = []
        if self.update.clip_norm is not None:
            out.append(
                f"update.clip_norm cannot be set with privacy.mode = {mode!r}: "
                "privacy.clip_norm is the clip norm"
            )
        if self.algorithm.name == "scaffold":
            out.append(
                f"privacy.mode = {mode!r} cannot run algorithm.name = 'scaffold': its control "
                "variates are computed from the update before it is clipped and noised"
            )
        if self.algorithm.name in ("fednova", "qfedavg"):
            out.append(
                f"privacy.mode = {mode!r} cannot run algorithm.name = "
                f"{self.algorithm.name!r}: its normalizer travels in the record"
            )
        if mode == "central" and (
            self.aggregation.kind not in ("mean", "secure_sum")
            or self.aggregation.max_weight is not None
        ):
            out.append(
                "privacy.mode = 'central' needs aggregation.kind = 'mean' or 'secure_sum' without "
                "aggregation.max_weight: it bounds weights itself (privacy.weighting)"
            )
        return out


def _describe(exc: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<config>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            section: Any = model
            for part in err["loc"][:-1]:
                section = section.model_fields[str(part)].annotation
            allowed = ", ".join(section.model_fields)
            msg = f"unknown key; allowed keys here: {allowed}"
        elif err["type"] == "value_error":
            # Our own validators' messages name the key and the fix; a cross-field
            # (model-level) error's input is the whole raw configuration: never print it.
            text = str(err.get("ctx", {}).get("error", msg))
            if text.startswith(key) or not err["loc"] or isinstance(err.get("input"), dict):
                lines.append(f"  {text}")
                continue
            msg = text
        elif "input" in err and err["type"] not in ("missing",):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"  {key}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is read as TOML."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    *sections, leaf = key.strip().split(".")
    node = raw
    for part in sections:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[leaf] = _parse_value(value.strip())


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (or the defaults), apply ``overrides``, validate; raise ConfigError."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, RunConfig)) from None
    problems = runtime_problems(config.runtime)
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))
    return config


def runtime_problems(runtime: RuntimeConfig) -> list[str]:
    """What this machine cannot do of ``runtime`` (checked where a run is configured, not when
    a configuration is parsed: a deployed client parses the server's)."""
    problems = []
    if runtime.backend == "ray" and not ray_installed():
        problems.append(
            "runtime.backend: 'ray' needs Ray, which is not installed; "
            "pip install 'fedforge[ray]' or pick another backend"
        )
    if runtime.device is not None:
        problem = device_problem(runtime.device)
        if problem:
            problems.append(f"runtime.device: {problem}")
    return problems


def to_toml(config: RunConfig) -> str:
    import tomli_w

    # TOML has no null: keys left at None ("decide automatically") are omitted.
    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))
