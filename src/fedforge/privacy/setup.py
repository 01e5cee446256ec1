"""Turn ``[privacy]`` into update stages: the clip stage and the Gaussian mechanism.

The sampling scheme the accountant uses is read from ``[server]`` (the sampler that actually
draws the clients), the population from the run (clients of the partition in simulation,
registered clients in deployment). A target epsilon is turned into a noise multiplier here,
before the first round, and a configuration that ends above epsilon 10 is warned about.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from fedforge.config import RunConfig
from fedforge.config.checks import clients_drawn
from fedforge.core.errors import ConfigError
from fedforge.privacy.accounting import (
    AccountantKind,
    SamplingScheme,
    calibrate_noise_multiplier,
)
from fedforge.privacy.guards import SECURE_SUM_SLACK
from fedforge.privacy.noise import NoiseSource
from fedforge.stages.base import Stage
from fedforge.stages.clip import AdaptiveClip, FixedClip
from fedforge.stages.dp_noise import (
    CentralGaussian,
    DistributedGaussian,
    LocalGaussian,
    capped_weights,
)

log = logging.getLogger("fedforge")

WARN_EPSILON = 10.0


def secret_sampling_seed(config: RunConfig) -> int | None:
    """Central DP accounts amplification by sampling, which holds only if nobody can predict
    who is sampled: the run seed travels to every deployed client, so the server samples from
    a fresh secret instead (None: sample from the run seed, as seeded research runs do)."""
    if config.privacy.mode != "central" or config.privacy.seeded_noise:
        return None
    return secrets.randbits(128)


def sampling_scheme(config: RunConfig, population: int) -> SamplingScheme:
    """The scheme of the configured sampler over ``population`` clients: with over-selection
    the clients drawn (each of them may be among the first to finish), the first
    ``clients_per_round`` to finish kept."""
    server = config.server
    if server.sampler == "poisson":
        if server.sampling_rate >= 1:
            return SamplingScheme("full", population)
        return SamplingScheme("poisson", population, rate=server.sampling_rate)
    keep = server.clients_per_round if config.clock.over_selection > 1 else 0
    return SamplingScheme.fixed_size(clients_drawn(config), population, keep)


def record_bound(config: RunConfig) -> float:
    """The norm one record can have in central DP's sum, in clip norms: the clip, plus what
    secure aggregation's rounding may add (refused before the first round if more:
    ``privacy/guards.py``)."""
    return 1 + SECURE_SUM_SLACK if config.aggregation.kind == "secure_sum" else 1.0


@lru_cache(maxsize=16)
def _calibrated(
    target: float, delta: float, scheme: SamplingScheme, rounds: int, kind: AccountantKind
) -> float:
    return calibrate_noise_multiplier(target, delta, scheme, rounds, kind)


def privacy_stages(
    config: RunConfig, population: int | None, client_sizes: Sequence[int] | None = None
) -> list[Stage]:
    """The DP stages of ``config`` (none unless ``privacy.mode`` is central or local).

    ``population`` None builds a deployed client's chain: only stages with a client side.
    ``client_sizes`` (examples per client) sets the fixed denominator of capped weighting;
    without them (clients that bring their own data) capped weighting is refused."""
    p = config.privacy
    if p.mode not in ("central", "local", "distributed"):
        return []
    source = NoiseSource(config.seed if p.seeded_noise else None)
    if p.mode == "distributed":  # noise added by the clients inside secure aggregation
        assert p.noise_multiplier is not None
        # No clipped count: it would reach the server un-noised.
        bound = FixedClip(p.clip_norm, report_clipped=False)
        if population is None:
            return [bound]
        expected = sampling_scheme(config, population).expected_clients
        return [bound, DistributedGaussian(p.noise_multiplier, p.clip_norm, p.delta, expected)]
    if p.mode == "local":
        assert p.noise_multiplier is not None
        bound = FixedClip(p.clip_norm, report_clipped=False, recheck=False)
        local = LocalGaussian(
            p.noise_multiplier, p.delta, clip=bound.name, accountant=p.accountant, source=source
        )
        _warn_if_loose(local.epsilon_after(config.server.rounds), "a client in every round")
        return [bound, local]

    if population is None:  # a client: it clips; the noise is the server's
        return [AdaptiveClip(p.clip_norm) if p.adaptive_clip else FixedClip(p.clip_norm)]
    scheme = sampling_scheme(config, population)
    rounds = config.server.rounds
    z = p.noise_multiplier
    record_norms = record_bound(config)
    if z is None:
        assert p.target_epsilon is not None
        z = record_norms * _calibrated(p.target_epsilon, p.delta, scheme, rounds, p.accountant)
        log.info(
            "privacy: noise multiplier %.4f reaches epsilon %g at delta %g after %d rounds (%s)",
            z,
            p.target_epsilon,
            p.delta,
            rounds,
            scheme.describe(),
        )
    expected = scheme.expected_clients
    count_stddev = None
    clip: FixedClip
    if p.adaptive_clip:
        count_stddev = p.count_stddev or expected / 20
        clip = AdaptiveClip(
            p.clip_norm,
            target_quantile=p.target_quantile,
            learning_rate=p.clip_learning_rate,
            expected_clients=expected,
        )
    else:
        clip = FixedClip(p.clip_norm)
    denominator = expected
    if p.weighting == "capped":
        assert p.weight_cap is not None
        if client_sizes is None:
            raise ConfigError(
                "privacy.weighting = 'capped' needs the clients' example counts (built-in "
                "data); with clients that bring their own data use 'uniform'"
            )
        mean_weight = float(capped_weights(np.asarray(client_sizes), p.weight_cap).mean())
        denominator = expected * mean_weight
    noise = CentralGaussian(
        z,
        scheme,
        p.delta,
        denominator,
        clip=clip.name,
        count_stddev=count_stddev,
        weighting=p.weighting,
        weight_cap=p.weight_cap,
        accountant=p.accountant,
        target_epsilon=p.target_epsilon,
        source=source,
        expected_clients=expected,
        record_bound=record_norms,
    )
    if noise.accountant_used != p.accountant:
        log.info(
            "privacy: %s is accounted with RDP under replace-one adjacency (the only "
            "without-replacement accountant in dp-accounting)",
            scheme.describe(),
        )
    _warn_if_loose(noise.epsilon_after(rounds), scheme.describe())
    return [clip, noise]


def _warn_if_loose(final_epsilon: float, who: str) -> None:
    if final_epsilon > WARN_EPSILON:
        log.warning(
            "privacy: this configuration ends at epsilon %.3g (%s), above %g: a weak "
            "guarantee; raise privacy.noise_multiplier, lower the sampling rate or rounds",
            final_epsilon,
            who,
            WARN_EPSILON,
        )
