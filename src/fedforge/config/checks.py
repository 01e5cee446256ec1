"""Checks across configuration sections: combinations whose math does not compose are
refused when a configuration loads, each with its reason and the key to change."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

from fedforge.aggregate.gather import BOUNDED_RULES, WHOLE_RECORD_RULES, RobustAggregation, Rule
from fedforge.config.base import changed
from fedforge.config.ignored import ignored_settings
from fedforge.config.lora import lora_problems
from fedforge.config.rl_checks import rl_problems
from fedforge.config.workload import workload_problems
from fedforge.core.errors import ConfigError
from fedforge.secagg.protocol import ROTATION_BLOCK
from fedforge.secagg.ring import frac_bits, rotated_bound

if TYPE_CHECKING:
    from fedforge.config.run import RunConfig

OUTLIERS_UNDER_CENTRAL_DP = (
    "central DP cannot refuse outlying updates (aggregation.outlier_ratio): whether a record "
    "is refused, and the round retried without its client, depends on that record, unnoised "
    "(and under central DP every record is clipped already); set aggregation.outlier_ratio = 0"
)


def num_clients(config: RunConfig) -> int:
    """The simulated population: one client per file of ``data.sites``, the synthetic
    devices, ``lora.clients``, or ``partition.num_clients``; an RL run's ``rl.agents``."""
    if config.lora.enabled:
        return config.lora.clients
    if config.rl is not None:
        return config.rl.agents
    if config.data.sites:
        return len(config.data.sites)
    if config.partition.scheme == "natural" and config.data.builtin:
        return config.data.devices
    return config.partition.num_clients


def clients_drawn(config: RunConfig) -> int:
    """The uniform sampler's draw per round: ``server.clients_per_round``, or with
    over-selection ``ceil(clock.over_selection x clients_per_round)`` (the clock keeps the
    first ``clients_per_round`` to finish)."""
    per_round = config.server.clients_per_round
    if config.clock.over_selection > 1:
        return math.ceil(round(config.clock.over_selection * per_round, 9))
    return per_round


def problems(config: RunConfig) -> list[str]:
    """Every cross-section problem of ``config`` (empty: it composes)."""
    out = general_problems(config) + workload_problems(config) + rl_problems(config)
    out += config.privacy.problems() + privacy_conflicts(config) + secagg_conflicts(config)
    out += privacy_sampling_conflicts(config)
    out += config.clock.problems() + clock_conflicts(config)
    out += lora_problems(config)
    return out + ignored_settings(config)


def general_problems(config: RunConfig) -> list[str]:
    """Data, model, algorithm and robust aggregation."""
    out = []
    builtin_data = config.data.builtin and config.workload is None
    if config.partition.scheme == "natural" and builtin_data and config.data.dataset != "synthetic":
        out.append(
            "partition.scheme 'natural' needs data.dataset = 'synthetic' "
            "(the only dataset with its own devices)"
        )
    clients = num_clients(config)
    server, algorithm, update = config.server, config.algorithm, config.update
    synchronous = config.asynchronous.mode == "off"  # (FedBuff draws no rounds)
    if synchronous and server.sampler == "uniform" and server.clients_per_round > clients:
        natural = config.partition.scheme == "natural"
        where = "data.devices" if natural else "partition.num_clients"
        where = "data.sites" if config.data.sites else where
        out.append(
            f"server.clients_per_round: {server.clients_per_round} exceeds the "
            f"number of clients ({clients}); lower it or raise {where}"
        )
    if algorithm.name == "scaffold" and update.clip_norm is not None:
        out.append(
            "update.clip_norm cannot be combined with algorithm.name = 'scaffold': its "
            "client control variates are updated from the unclipped record"
        )
    kind = config.aggregation.kind
    if algorithm.name == "scaffold" and kind != "mean":
        out.append(
            f"aggregation.kind = {kind!r} cannot run algorithm.name = 'scaffold': its control "
            "variates need every accepted record added (the mean)"
        )
    # (secure aggregation: secagg_conflicts)
    whole = ("mean", "secure_sum", *WHOLE_RECORD_RULES)
    if algorithm.name in ("fednova", "qfedavg") and kind not in whole:
        out.append(
            f"aggregation.kind = {kind!r} cannot run algorithm.name = {algorithm.name!r}: it "
            "separates normalizer and update; use mean, (multi_)krum or geometric_median"
        )
    layers = builtin_layers(config)
    personal_head = algorithm.name in ("fedper", "fedrep")
    if personal_head and layers is not None and algorithm.head_layers >= layers:
        out.append(
            f"algorithm.head_layers: {algorithm.head_layers} leaves no shared body in a "
            f"model of {layers} layer(s); lower it"
        )
    if algorithm.head_epochs is not None and algorithm.name != "fedrep":
        out.append(
            "algorithm.head_epochs applies to algorithm.name = 'fedrep' only: "
            f"{algorithm.name!r} has no head-only phase"
        )
    if algorithm.name in ("fednova", "qfedavg") and (
        update.clip_norm is not None or update.codec != "none"
    ):
        out.append(
            f"algorithm.name = {algorithm.name!r} cannot run with update.clip_norm or "
            "update.codec: its normalizer travels in the record beside the update"
        )
    out += aggregation_problems(config)
    return out


def builtin_layers(config: RunConfig) -> int | None:
    """Layers with parameters of the configured built-in model (None: your model)."""
    model = config.model
    if model.factory is not None or config.workload is not None:
        return None
    if model.name == "logistic":
        return 1
    if model.name == "mlp":
        return len(model.hidden) + 1
    if model.name == "cnn":
        return 4
    widths = len(model.channels) if model.channels is not None else 2
    return 2 + 4 * widths  # stem, per width a block (conv, norm, conv) and a stride, output


def aggregation_problems(config: RunConfig) -> list[str]:
    """The aggregation kind's own keys and the robust rules' bounds."""
    agg, out = config.aggregation, []
    if agg.kind != "mean" and agg.max_weight is not None:
        out.append(f"aggregation.max_weight applies to the weighted mean, not to {agg.kind!r}")
    if agg.kind == "norm_bound" and (agg.max_norm is None) == (agg.norm_quantile is None):
        out.append(
            "aggregation.kind = 'norm_bound' needs exactly one of aggregation.max_norm "
            "and aggregation.norm_quantile"
        )
    if agg.outlier_ratio is not None and 0 < agg.outlier_ratio < 1:
        out.append(
            f"aggregation.outlier_ratio = {agg.outlier_ratio} would refuse every update above "
            "the median: use a ratio of at least 1 (or 0 to turn it off)"
        )
    if agg.kind == "secure_sum" and agg.outlier_ratio:
        out.append(
            "aggregation.outlier_ratio cannot apply to aggregation.kind = 'secure_sum': the "
            "server never sees a record (each is clipped to secagg.clip_norm, and the "
            "unmasked sum is checked against that bound)"
        )
    if agg.kind != "mean" and agg.kind in BOUNDED_RULES:
        if config.server.sampler != "uniform":
            out.append(
                f"aggregation.kind = {agg.kind!r} needs a fixed number of clients per round "
                "for its bound: use server.sampler = 'uniform'"
            )
        else:
            try:
                RobustAggregation(
                    cast(Rule, agg.kind), agg.byzantine, agg.trim, agg.multi_krum
                ).check(config.server.clients_per_round)
            except ConfigError as exc:
                out.append(f"aggregation.kind = {agg.kind!r}: {exc}")
    return out


def clock_conflicts(config: RunConfig) -> list[str]:
    """The virtual clock and asynchronous training (``runtime/clock.py``,
    ``runtime/async_driver.py``)."""
    out = []
    clock, fedbuff = config.clock, config.asynchronous
    if clock.enabled and config.aggregation.kind == "secure_sum":
        out.append("clock.enabled cannot time secure aggregation's extra exchanges")
    if clock.over_selection > 1 and config.server.sampler != "uniform":
        out.append("clock.over_selection needs server.sampler = 'uniform'")
    if fedbuff.mode == "off":
        unset = changed(fedbuff, "mode")
        if unset:
            out.append(f"asynchronous.{unset[0]} needs asynchronous.mode = 'fedbuff'")
        return out
    if clock.deadline_s is not None or clock.over_selection > 1:
        out.append("clock.deadline_s and clock.over_selection apply to synchronous rounds only")
    if fedbuff.buffer > fedbuff.concurrency:
        out.append("asynchronous.buffer cannot exceed asynchronous.concurrency")
    clients = num_clients(config)
    if fedbuff.concurrency > clients:
        out.append(
            f"asynchronous.concurrency ({fedbuff.concurrency}) exceeds the number of "
            f"clients ({clients})"
        )
    name = config.algorithm.name
    conflicts = {
        "aggregation.kind": (config.aggregation.kind != "mean", "the buffer is a weighted mean"),
        "algorithm.name": (
            name in ("scaffold", "fedper", "fedrep", "ditto", "fednova", "qfedavg"),
            "it needs an algorithm without client state whose record is the update alone",
        ),
        "algorithm.stragglers": (
            config.algorithm.stragglers > 0,
            "a slow client arrives late (stale) rather than doing partial work",
        ),
        "privacy.mode": (config.privacy.mode != "off", "privacy is accounted per round"),
        "evaluation.fraction": (config.evaluation.fraction > 0, "no rounds to evaluate in"),
        "attack.kind": (
            config.attack.kind in ("alie", "ipm"),
            "this attack reads a round's honest updates",
        ),
    }
    for key, (bad, why) in conflicts.items():
        if bad:
            out.append(f"asynchronous.mode = 'fedbuff' cannot run with this {key}: {why}")
    return out


def secagg_conflicts(config: RunConfig) -> list[str]:
    """Secure aggregation needs every record to be summable as it is."""
    if config.aggregation.kind != "secure_sum":
        return []
    out = []
    update, p = config.update, config.privacy
    if update.codec != "none":
        out.append(
            f"aggregation.kind = 'secure_sum' cannot follow update.codec = "
            f"{update.codec!r}: a codec is decoded record by record, and the server "
            "sees only the sum (secure aggregation quantizes records itself)"
        )
    if p.mode == "local":
        out.append(
            "aggregation.kind = 'secure_sum' with privacy.mode = 'local': the server sees "
            "only the sum, so noise each client adds need not be local; use "
            "privacy.mode = 'central'"
        )
    if config.attack.kind in ("alie", "ipm"):
        out.append(
            f"attack.kind = {config.attack.kind!r} reads the honest clients' updates, which "
            "secure aggregation hides from the server"
        )
    if config.algorithm.name in ("fednova", "qfedavg"):
        out.append(
            f"aggregation.kind = 'secure_sum' cannot run algorithm.name = "
            f"{config.algorithm.name!r}: secure aggregation clips the record, and its "
            "normalizer travels in the record beside the update"
        )
    clients = num_clients(config)
    cohort = clients if config.server.sampler == "poisson" else config.server.clients_per_round
    secagg = config.secagg
    bound = secagg.clip_norm
    if p.mode == "distributed" or (p.mode == "central" and not p.adaptive_clip):
        bound = min(bound, p.clip_norm)
    elif update.clip_norm is not None:
        bound = min(bound, update.clip_norm)
    if secagg.rotation:  # each rotated coordinate is far below the norm (w.h.p.)
        bound = rotated_bound(bound, ROTATION_BLOCK)
    if p.mode == "distributed" and p.noise_multiplier is not None:
        bound += 10 * p.noise_multiplier * p.clip_norm / math.sqrt(cohort)  # noise tails
    try:
        frac_bits(secagg.ring_bits, bound, cohort, secagg.params().min_frac_bits)
    except ConfigError as exc:
        out.append(str(exc))
    return out


def privacy_sampling_conflicts(config: RunConfig) -> list[str]:
    """Central DP's amplification by sampling against who is actually summed (the rules of
    ``privacy/amplification.py``, derived in the README; traces are checked when read)."""
    p, server, clock = config.privacy, config.server, config.clock
    if p.mode != "central":
        return []
    poisson = server.sampler == "poisson" and server.sampling_rate < 1
    fixed = server.sampler == "uniform" and clients_drawn(config) < num_clients(config)
    # Otherwise full participation: K = N, rate 1, or over-selection that draws everyone
    # (accounted with sensitivity 2C: a client can displace another of the first K).
    partial = clock.enabled and clock.availability != "always" and clock.always_on < 1
    out = []
    if fixed and partial:
        out.append(
            f"privacy.mode = 'central' with server.sampler = 'uniform' cannot run on "
            f"clock.availability = {clock.availability!r}: K clients drawn from those online "
            "are each summed far more often than the K/N the accountant assumes; use "
            "server.sampler = 'poisson' with clock.deadline_s"
        )
    who = "Poisson sampling" if poisson else "full participation (every client drawn)"
    if not fixed and partial and clock.deadline_s is None:
        out.append(
            f"privacy.mode = 'central' with {who} among the online clients needs "
            "clock.deadline_s: every round then lasts the deadline, so who is online in a "
            "later round does not depend on who took part in an earlier one"
        )
    if not fixed and config.algorithm.stragglers > 0:
        out.append(
            f"algorithm.stragglers cannot run with privacy.mode = 'central' and {who}: the "
            "stragglers are a share of the round's clients, so one client's presence changes "
            "who else does partial work or is dropped (use K < N clients per round with "
            "server.sampler = 'uniform')"
        )
    return out


def privacy_conflicts(config: RunConfig) -> list[str]:
    """Differential privacy against the algorithm, the clip stage and the aggregation."""
    mode, algorithm = config.privacy.mode, config.algorithm.name
    if mode == "sample" and algorithm != "fedavg":
        return [
            "privacy.mode = 'sample' (DP-SGD through Opacus) runs plain local SGD; "
            f"it cannot run the objective of algorithm.name = {algorithm!r}: use 'fedavg'"
        ]
    if mode == "distributed" and config.aggregation.kind != "secure_sum":
        return [
            "privacy.mode = 'distributed' adds its noise inside secure aggregation: "
            "set aggregation.kind = 'secure_sum' (or use privacy.mode = 'central')"
        ]
    if mode not in ("central", "local", "distributed"):
        return []
    out = []
    if config.update.clip_norm is not None:
        out.append(
            f"update.clip_norm cannot be set with privacy.mode = {mode!r}: "
            "privacy.clip_norm is the clip norm"
        )
    if algorithm == "scaffold":
        out.append(
            f"privacy.mode = {mode!r} cannot run algorithm.name = 'scaffold': its control "
            "variates are computed from the update before it is clipped and noised"
        )
    if algorithm in ("fednova", "qfedavg"):
        out.append(
            f"privacy.mode = {mode!r} cannot run algorithm.name = "
            f"{algorithm!r}: its normalizer travels in the record"
        )
    if mode == "central" and config.aggregation.outlier_ratio:
        out.append(OUTLIERS_UNDER_CENTRAL_DP)
    if mode == "central" and config.attack.kind in ("alie", "ipm"):
        out.append(
            f"attack.kind = {config.attack.kind!r} cannot run with privacy.mode = 'central': "
            "it rewrites the attackers' records from the honest ones after the server's "
            "re-clip, so one client moves the noised sum by more than the clip norm"
        )
    agg = config.aggregation
    if mode == "central" and (agg.kind not in ("mean", "secure_sum") or agg.max_weight is not None):
        out.append(
            "privacy.mode = 'central' needs aggregation.kind = 'mean' or 'secure_sum' without "
            "aggregation.max_weight: it bounds weights itself (privacy.weighting)"
        )
    return out
