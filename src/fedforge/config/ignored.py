"""Settings nothing would read: a key set away from its default where the rest of the
configuration never uses it (``algorithm.mu`` under FedAvg, a Krum key under the median,
``secagg.*`` without secure aggregation) is refused when the configuration loads, naming the
key and where it applies, instead of being silently ignored.

Keys checked elsewhere keep their own messages: ``clock.*`` needs ``clock.enabled``,
``asynchronous.*`` needs FedBuff, the central-only privacy keys, ``aggregation.max_weight``
and ``algorithm.head_epochs`` (``checks.py`` and the sections' ``problems``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel

if TYPE_CHECKING:
    from fedforge.config.run import RunConfig

ROBUST_F = ("trimmed_mean", "krum", "multi_krum", "bulyan")  # rules that read byzantine


@dataclass(frozen=True)
class Scope:
    """``keys`` (``section.key``) are read only where ``applies``; ``where`` says so."""

    keys: tuple[str, ...]
    applies: Callable[[RunConfig], bool]
    where: str


PRIVACY_KEYS = (
    "noise_multiplier",
    "target_epsilon",
    "delta",
    "clip_norm",
    "adaptive_clip",
    "target_quantile",
    "clip_learning_rate",
    "count_stddev",
    "accountant",
    "weighting",
    "weight_cap",
    "seeded_noise",
)
SECAGG_KEYS = (
    "ring_bits",
    "rotation",
    "security",
    "complete_graph",
    "threshold",
    "clip_norm",
    "scalar_bound",
)
DRAWN_DEVICE_KEYS = (
    "speed_median",
    "speed_sigma",
    "down_mbps",
    "up_mbps",
    "bandwidth_sigma",
    "availability",
    "online_fraction",
    "always_on",
    "slot_s",
)


def _keys(section: str, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{section}.{name}" for name in names)


# In order: a key outside several scopes is reported for the first.
SCOPES = (
    # algorithm
    Scope(("algorithm.mu",), lambda c: c.algorithm.name == "fedprox", "algorithm.name = 'fedprox'"),
    Scope(("algorithm.q",), lambda c: c.algorithm.name == "qfedavg", "algorithm.name = 'qfedavg'"),
    Scope(("algorithm.lam",), lambda c: c.algorithm.name == "ditto", "algorithm.name = 'ditto'"),
    Scope(
        ("algorithm.head_layers",),
        lambda c: c.algorithm.name in ("fedper", "fedrep"),
        "algorithm.name = 'fedper' or 'fedrep'",
    ),
    Scope(
        ("algorithm.drop_stragglers",),
        lambda c: c.algorithm.stragglers > 0,
        "algorithm.stragglers > 0 (there are no stragglers to drop)",
    ),
    # server: FedBuff dispatches idle clients up to asynchronous.concurrency, no sampler
    Scope(
        ("server.sampler", "server.sampling_rate", "server.clients_per_round"),
        lambda c: c.asynchronous.mode == "off",
        "synchronous rounds (FedBuff dispatches up to asynchronous.concurrency clients)",
    ),
    Scope(
        ("server.sampling_rate",),
        lambda c: c.server.sampler == "poisson",
        "server.sampler = 'poisson'",
    ),
    Scope(
        ("server.clients_per_round",),
        lambda c: c.server.sampler == "uniform",
        "server.sampler = 'uniform' (Poisson sampling draws server.sampling_rate)",
    ),
    Scope(("server.momentum",), lambda c: c.server.optimizer == "sgd", "server.optimizer = 'sgd'"),
    Scope(
        ("server.beta1", "server.tau"),
        lambda c: c.server.optimizer != "sgd",
        "server.optimizer = 'adam', 'yogi' or 'adagrad'",
    ),
    Scope(
        ("server.beta2",),
        lambda c: c.server.optimizer in ("adam", "yogi"),
        "server.optimizer = 'adam' or 'yogi'",
    ),
    # update
    Scope(
        ("update.codec_block",),
        lambda c: c.update.codec in ("q8", "q4"),
        "update.codec = 'q8' or 'q4'",
    ),
    Scope(("update.topk_fraction",), lambda c: c.update.codec == "topk", "update.codec = 'topk'"),
    Scope(
        ("update.error_feedback",),
        lambda c: c.update.codec != "none",
        "an update.codec (it keeps what the codec lost)",
    ),
    # privacy
    Scope(
        _keys("privacy", PRIVACY_KEYS),
        lambda c: c.privacy.mode != "off",
        "a privacy.mode other than 'off'",
    ),
    Scope(
        ("privacy.target_quantile", "privacy.clip_learning_rate", "privacy.count_stddev"),
        lambda c: c.privacy.adaptive_clip,
        "privacy.adaptive_clip = true",
    ),
    Scope(  # (outside central DP: PrivacyConfig.problems says so)
        ("privacy.weight_cap",),
        lambda c: c.privacy.mode != "central" or c.privacy.weighting == "capped",
        "privacy.weighting = 'capped'",
    ),
    Scope(
        ("privacy.accountant", "privacy.seeded_noise"),
        lambda c: c.privacy.mode != "distributed",
        "privacy.mode 'central', 'local' or 'sample' (not distributed: zCDP, client noise)",
    ),
    # aggregation
    Scope(
        ("aggregation.byzantine",),
        lambda c: c.aggregation.kind in ROBUST_F,
        "aggregation.kind = 'trimmed_mean', 'krum', 'multi_krum' or 'bulyan'",
    ),
    Scope(
        ("aggregation.trim",),
        lambda c: c.aggregation.kind == "trimmed_mean",
        "aggregation.kind = 'trimmed_mean'",
    ),
    Scope(
        ("aggregation.multi_krum",),
        lambda c: c.aggregation.kind == "multi_krum",
        "aggregation.kind = 'multi_krum'",
    ),
    Scope(
        ("aggregation.max_norm", "aggregation.norm_quantile"),
        lambda c: c.aggregation.kind == "norm_bound",
        "aggregation.kind = 'norm_bound'",
    ),
    Scope(
        ("aggregation.tau", "aggregation.iterations"),
        lambda c: c.aggregation.kind == "centered_clipping",
        "aggregation.kind = 'centered_clipping'",
    ),
    Scope(
        ("aggregation.sigma", "aggregation.delta", "aggregation.alpha"),
        lambda c: c.aggregation.kind == "fedpg_br",
        "aggregation.kind = 'fedpg_br'",
    ),
    Scope(
        _keys("secagg", SECAGG_KEYS),
        lambda c: c.aggregation.kind == "secure_sum",
        "aggregation.kind = 'secure_sum'",
    ),
    # federated evaluation
    Scope(
        ("evaluation.holdout", "evaluation.every"),
        lambda c: c.evaluation.fraction > 0,
        "evaluation.fraction > 0 (federated evaluation is off)",
    ),
    # attacks
    Scope(
        ("attack.fraction", "attack.overclaim"),
        lambda c: c.attack.kind != "none",
        "an attack.kind (no client attacks)",
    ),
    Scope(
        ("attack.scale",),
        lambda c: c.attack.kind in ("sign_flip", "scaled"),
        "attack.kind = 'sign_flip' or 'scaled'",
    ),
    Scope(("attack.std",), lambda c: c.attack.kind == "gaussian", "attack.kind = 'gaussian'"),
    Scope(("attack.epsilon",), lambda c: c.attack.kind == "ipm", "attack.kind = 'ipm'"),
    Scope(
        ("attack.target_label", "attack.poison_fraction"),
        lambda c: c.attack.kind == "backdoor",
        "attack.kind = 'backdoor'",
    ),
    # the virtual clock (its keys need clock.enabled: ClockConfig.problems)
    Scope(
        _keys("clock", DRAWN_DEVICE_KEYS),
        lambda c: not c.clock.enabled or c.clock.trace is None,
        "drawn devices (clock.trace replaces them)",
    ),
    Scope(
        ("clock.online_fraction", "clock.always_on"),
        lambda c: not c.clock.enabled or c.clock.availability in ("diurnal", "random"),
        "clock.availability = 'diurnal' or 'random'",
    ),
    Scope(
        ("clock.slot_s",),
        lambda c: not c.clock.enabled or c.clock.availability == "random",
        "clock.availability = 'random'",
    ),
    Scope(
        ("clock.period_s",),
        lambda c: (
            not c.clock.enabled or c.clock.availability == "diurnal" or c.clock.trace is not None
        ),
        "clock.availability = 'diurnal' or a clock.trace",
    ),
    # data, partition, model
    Scope(
        ("data.alpha", "data.beta", "data.devices"),
        lambda c: c.data.dataset == "synthetic",
        "data.dataset = 'synthetic'",
    ),
    Scope(
        ("partition.num_clients",),
        lambda c: c.partition.scheme != "natural",
        "a partition.scheme other than 'natural' (natural: one client per data.devices)",
    ),
    Scope(
        ("partition.alpha",),
        lambda c: c.partition.scheme == "dirichlet",
        "partition.scheme = 'dirichlet'",
    ),
    Scope(
        ("partition.shards_per_client",),
        lambda c: c.partition.scheme == "shards",
        "partition.scheme = 'shards'",
    ),
    Scope(
        ("partition.exponent",),
        lambda c: c.partition.scheme == "quantity",
        "partition.scheme = 'quantity'",
    ),
    Scope(("model.hidden",), lambda c: c.model.name == "mlp", "model.name = 'mlp'"),
    # simulation runtimes
    Scope(
        ("runtime.num_workers",),
        lambda c: c.runtime.backend in ("auto", "workers", "ray"),
        "runtime.backend = 'workers', 'ray' or 'auto'",
    ),
    Scope(
        ("runtime.memory_budget_mb", "runtime.device"),
        lambda c: c.runtime.backend in ("auto", "vectorized"),
        "runtime.backend = 'vectorized' or 'auto'",
    ),
    Scope(
        ("runtime.ray_address",), lambda c: c.runtime.backend == "ray", "runtime.backend = 'ray'"
    ),
)


def is_set(config: RunConfig, key: str) -> bool:
    """Whether ``section.key`` differs from its default."""
    section_name, name = key.split(".")
    section: BaseModel = getattr(config, section_name)
    info = type(section).model_fields[name]
    return bool(getattr(section, name) != info.get_default(call_default_factory=True))


def ignored_settings(config: RunConfig) -> list[str]:
    """One line per key set where nothing reads it."""
    out, reported = [], set()
    for scope in SCOPES:
        if scope.applies(config):
            continue
        for key in scope.keys:
            if key not in reported and is_set(config, key):
                reported.add(key)
                out.append(f"{key} applies only with {scope.where}; here it would be ignored")
    return out
