"""The accountant: published values, agreement with dp-accounting's own accountants, and
calibration that lands on its target."""

from __future__ import annotations

import math

import pytest
from dp_accounting import dp_event, privacy_accountant
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedforge.core.errors import ConfigError
from fedforge.privacy.accounting import (
    PLD_DISCRETIZATION,
    SamplingScheme,
    accountant_for,
    adaptive_value_multiplier,
    calibrate_noise_multiplier,
    epsilon,
    round_event,
)


def test_published_poisson_values_rdp() -> None:
    """Abadi et al. / TF Privacy reference points."""
    assert epsilon(SamplingScheme("poisson", 10**6, rate=0.01), 4.0, 10_000, 1e-5, "rdp") == (
        pytest.approx(1.035, abs=0.01)
    )
    assert epsilon(SamplingScheme("poisson", 10**6, rate=0.1), 1.0, 100, 1e-5, "rdp") == (
        pytest.approx(7.90, abs=0.05)
    )


@pytest.mark.parametrize(
    "scheme",
    [
        SamplingScheme("poisson", 1000, rate=0.02),
        SamplingScheme("fixed", 100, sample_size=10),
        SamplingScheme("full", 10),
    ],
)
def test_cached_rdp_equals_a_fresh_rdp_accountant(scheme: SamplingScheme) -> None:
    relation = (
        privacy_accountant.NeighboringRelation.REPLACE_ONE
        if scheme.kind == "fixed"
        else privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    for releases in (1, 7, 60):
        accountant = rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
        accountant.compose(round_event(scheme, 1.3), releases)
        expected = accountant.get_epsilon(1e-5)
        assert epsilon(scheme, 1.3, releases, 1e-5, "rdp") == pytest.approx(expected, rel=1e-12)


def test_pld_equals_the_pld_accountant_at_the_same_discretization() -> None:
    scheme = SamplingScheme("poisson", 1000, rate=0.02)
    accountant = pld_privacy_accountant.PLDAccountant(
        value_discretization_interval=PLD_DISCRETIZATION
    )
    accountant.compose(round_event(scheme, 1.1), 200)
    assert epsilon(scheme, 1.1, 200, 1e-5, "pld") == pytest.approx(
        accountant.get_epsilon(1e-5), rel=1e-9
    )
    # PLD is tighter than RDP for the same mechanism.
    assert epsilon(scheme, 1.1, 200, 1e-5, "pld") < epsilon(scheme, 1.1, 200, 1e-5, "rdp")


def test_sampling_schemes_map_to_their_events() -> None:
    assert SamplingScheme.fixed_size(10, 10).kind == "full"
    assert isinstance(round_event(SamplingScheme("full", 5), 1.0), dp_event.GaussianDpEvent)
    fixed = SamplingScheme.fixed_size(10, 100)
    assert isinstance(round_event(fixed, 1.0), dp_event.SampledWithoutReplacementDpEvent)
    assert accountant_for(fixed, "pld") == "rdp"  # the only without-replacement accountant
    # Amplification: sampling 10 of 100 costs far less than every client every round.
    assert epsilon(fixed, 1.0, 50, 1e-5) < epsilon(SamplingScheme("full", 100), 1.0, 50, 1e-5)
    assert epsilon(fixed, 1.0, 0, 1e-5) == 0.0


def test_epsilon_grows_with_releases_and_falls_with_noise() -> None:
    scheme = SamplingScheme("poisson", 1000, rate=0.02)
    values = [epsilon(scheme, 1.0, r, 1e-5) for r in (10, 100, 1000)]
    assert values == sorted(values) and values[0] > 0
    assert epsilon(scheme, 2.0, 100, 1e-5) < epsilon(scheme, 1.0, 100, 1e-5)


@pytest.mark.parametrize("target", [1.0, 4.0])
@pytest.mark.parametrize(
    "scheme", [SamplingScheme("poisson", 1000, rate=0.02), SamplingScheme("full", 10)]
)
def test_calibration_ends_at_the_target(target: float, scheme: SamplingScheme) -> None:
    z = calibrate_noise_multiplier(target, 1e-5, scheme, 50)
    reached = epsilon(scheme, z, 50, 1e-5)
    assert reached <= target
    assert reached == pytest.approx(target, rel=2e-3)
    assert epsilon(scheme, z * 0.99, 50, 1e-5) > target


def test_calibration_refuses_impossible_targets() -> None:
    with pytest.raises(ConfigError, match="target_epsilon"):
        calibrate_noise_multiplier(-1.0, 1e-5, SamplingScheme("full", 10), 10)


def test_adaptive_value_multiplier_preserves_the_total_cost() -> None:
    z, sigma_b = 1.0, 2.5  # e.g. 50 expected clients / 20
    z_v = adaptive_value_multiplier(z, sigma_b)
    assert z_v > z
    assert (z_v**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
    # The composed pair costs exactly what one Gaussian of multiplier z costs.
    scheme = SamplingScheme("poisson", 1000, rate=0.05)
    pair = rdp_privacy_accountant.RdpAccountant()
    pair.compose(
        dp_event.PoissonSampledDpEvent(
            0.05,
            dp_event.ComposedDpEvent(
                [dp_event.GaussianDpEvent(z_v), dp_event.GaussianDpEvent(2 * sigma_b)]
            ),
        ),
        100,
    )
    assert pair.get_epsilon(1e-5) == pytest.approx(epsilon(scheme, z, 100, 1e-5, "rdp"))
    with pytest.raises(ConfigError, match="clipped-count noise"):
        adaptive_value_multiplier(1.0, 0.4)  # 2 * 0.4 < 1: the count alone costs more
    assert math.isinf(epsilon(scheme, 0.0, 3, 1e-5))
