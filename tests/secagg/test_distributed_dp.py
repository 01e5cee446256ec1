"""Distributed DP: discrete Gaussian noise added by each client inside secure aggregation,
accounted in zCDP with dp-accounting."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from scipy.stats import chisquare

import fedforge
from fedforge.core.errors import ConfigError
from fedforge.privacy import discrete_gaussian
from fedforge.privacy.accounting import zcdp_epsilon
from fedforge.secagg.protocol import MASK, SecAggParams
from tests.secagg.harness import records, run_session


def test_discrete_gaussian_matches_its_pmf() -> None:
    sigma = 2.0
    draws = discrete_gaussian.sample(sigma, 200_000, os.urandom(32))
    assert draws.dtype == np.int64
    support = np.arange(-8, 9)
    pmf = np.exp(-(support**2) / (2 * sigma**2))
    pmf /= pmf.sum()
    counts = np.array([(draws == k).sum() for k in support])
    assert chisquare(counts, pmf * counts.sum()).pvalue > 1e-4
    big = discrete_gaussian.sample(5e4, 100_000, os.urandom(32))
    assert abs(big.std() / 5e4 - 1) < 0.01 and abs(big.mean()) < 5e4 * 0.02


def test_sum_distance_is_negligible_at_ring_scales() -> None:
    assert discrete_gaussian.sum_distance(1.0, 100) < 1e-3
    assert discrete_gaussian.sum_distance(1000.0, 100) == 0.0


def test_the_secure_sum_carries_the_configured_noise_and_its_cost() -> None:
    n, d, z, clip = 20, 20_000, 0.5, 1.0
    inputs = records(n, d, scalars=False)
    for record in inputs.values():
        record.arrays["w"] *= 0.001  # norms far below the clip norm: nothing is clipped
    out = run_session(inputs, SecAggParams(clip_norm=clip), noise_std=z * clip)
    assert out.result.clipped == 0
    truth = np.sum([r.astype(np.float64) for r in out.inputs.values()], axis=0)
    noise = out.result.arrays["w"] - truth
    assert abs(noise.std() / (z * clip) - 1) < 0.03  # 20 clients' shares add up to z C
    assert abs(noise.mean()) < 0.03 * z * clip
    # zCDP of one release: Delta^2 / (2 sigma^2), Delta = 2 (C plus rounding, tiny at 2^-f):
    # replace one client's record, whose participation the server sees.
    assert out.result.rho == pytest.approx((2 * clip) ** 2 / (2 * (z * clip) ** 2), rel=1e-3)
    assert out.result.tau < 1e-30


def test_fewer_contributors_cost_more_privacy() -> None:
    n, z = 20, 1.0
    out = run_session(
        records(n, 100, scalars=False), SecAggParams(), noise_std=z, drop={MASK: {0, 1, 2, 3}}
    )
    # Each client added (z C)^2 / 20 of variance; only 16 did: rho grows by 20 / 16.
    assert out.result.rho == pytest.approx((2 * 10.0) ** 2 / (2 * z**2) * 20 / 16, rel=1e-3)


def test_distributed_dp_run_reports_epsilon_from_the_summed_rho() -> None:
    z = 2.0
    config = fedforge.load_config(
        None,
        [
            'aggregation.kind="secure_sum"',
            'privacy.mode="distributed"',
            f"privacy.noise_multiplier={z}",
            "partition.num_clients=30",
            "server.clients_per_round=10",
            "server.rounds=3",
            "client.epochs=1",
            'data.dataset="digits"',
        ],
    )
    from fedforge.experiment import build_dataset, simulate_config

    result = simulate_config(config, build_dataset(config), backend="vectorized")
    last = result.history[-1]
    rho = last.metrics["dp.rho"]
    assert rho == pytest.approx(3 * 2**2 / (2 * z**2), rel=1e-3)  # replace-one: Delta = 2C
    assert last.metrics["dp.epsilon"] == pytest.approx(zcdp_epsilon(rho, 1e-5), rel=1e-6)
    assert "distributed" in last.labels["dp.mode"]
    # Nothing un-noised reaches the server: no clipped count, no loss, no example count.
    assert "clip.clipped" not in last.metrics and "secagg.clipped" not in last.metrics
    assert math.isnan(last.train_loss)
    assert math.isfinite(last.test_accuracy)


def test_distributed_dp_needs_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match=r"aggregation\.kind = 'secure_sum'"):
        fedforge.load_config(None, ['privacy.mode="distributed"', "privacy.noise_multiplier=1"])
