"""What central DP refuses before the first round, in the configuration and in the Python API
alike: thinning that breaks the sensitivity of full participation, a Poisson sample thinned
to its fastest clients, aggregations that move the sum by more than the clip, secure
aggregation's rounding past the accounted bound; and the API samples from a secret."""

from __future__ import annotations

import numpy as np
import pytest

from fedforge import simulate
from fedforge.aggregate.gather import RobustAggregation
from fedforge.aggregate.kinds import Aggregation, WeightedMean
from fedforge.algorithms.fedavg import FedAvg
from fedforge.attacks.simulated import Omniscient
from fedforge.config import load_config
from fedforge.core.errors import ConfigError
from fedforge.core.rng import Purpose, RngStreams
from fedforge.data.federated import FederatedDataset
from fedforge.experiment import build_stages
from fedforge.privacy.accounting import SamplingScheme, epsilon
from fedforge.privacy.guards import SECURE_SUM_SLACK, rounding_excess
from fedforge.runtime.clock import ClockSpec
from fedforge.runtime.devices import Devices, Diurnal
from fedforge.runtime.driver import RoundListener
from fedforge.runtime.sampling import PoissonSampler, Sampler, UniformSampler
from fedforge.runtime.stragglers import Stragglers
from fedforge.secagg.aggregation import SecureAggregation
from fedforge.secagg.protocol import SecAggParams
from fedforge.stages.clip import FixedClip
from fedforge.stages.dp_noise import CentralGaussian, DistributedGaussian
from fedforge.train.program import LocalSGD
from tests.conftest import small_mlp

CENTRAL = ["privacy.mode=central", "privacy.noise_multiplier=1", "partition.num_clients=20"]


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "server.clients_per_round=20", "algorithm.stragglers=0.5",
            "algorithm.drop_stragglers=true",
        ],
        ["server.sampler=poisson", "server.sampling_rate=1.0", "algorithm.stragglers=0.5"],
        ["server.clients_per_round=20", "clock.enabled=true", "clock.availability=diurnal"],
        [
            "server.sampler=poisson", "server.sampling_rate=1.0", "clock.enabled=true",
            "clock.availability=random", "clock.slot_s=5",
        ],
        [  # over-selection that draws everyone: full participation too
            "server.clients_per_round=5", "clock.enabled=true", "clock.over_selection=4",
            "clock.availability=diurnal",
        ],
    ],
    ids=["K=N-stragglers", "q=1-stragglers", "K=N-diurnal", "q=1-random", "drawn=N-diurnal"],
)  # fmt: skip
def test_full_participation_refuses_thinning_that_depends_on_other_clients(
    overrides: list[str],
) -> None:
    with pytest.raises(ConfigError, match="full participation"):
        load_config(None, [*CENTRAL, *overrides])


def _diurnal(n: int) -> Devices:
    availability = Diurnal(np.linspace(0, 50, n), 0.5, np.zeros(n, bool), period=100.0)
    return Devices(np.ones(n), np.full(n, 1e9), np.full(n, 1e9), availability)


def run_api(
    data: FederatedDataset,
    scheme: SamplingScheme,
    sampler: Sampler,
    aggregation: Aggregation | None = None,
    **kwargs: object,
):  # type: ignore[no-untyped-def]
    noise = kwargs.pop("noise", None) or CentralGaussian(1.0, scheme, 1e-5, scheme.expected_clients)
    kwargs.setdefault("rounds", 1)
    return simulate(
        small_mlp(), data, FedAvg(local=LocalSGD(lr=0.1, epochs=1, batch_size=0)),
        sampler=sampler, stages=[FixedClip(1.0), noise], aggregation=aggregation or WeightedMean(),
        verbose=0, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


def test_the_python_api_refuses_the_same_thinning(small_federated: FederatedDataset) -> None:
    n = small_federated.num_clients
    full, poisson = SamplingScheme("full", n), SamplingScheme("poisson", n, rate=0.5)
    devices = Devices(np.ones(n), np.full(n, 1e9), np.full(n, 1e9))
    cases = [
        (full, PoissonSampler(1.0), {"stragglers": Stragglers(0.5, 1, drop=True)}, "stragglers"),
        (full, UniformSampler(n), {"clock": ClockSpec(_diurnal(n))}, "fixed length"),
        # Keeping the fastest of a Poisson sample: one client more can evict another.
        (poisson, PoissonSampler(0.5), {"clock": ClockSpec(devices, keep=2)}, "Poisson sample"),
        # A scheme that does not say the clock keeps only the first 2: a wrong denominator.
        (full, UniformSampler(n), {"clock": ClockSpec(devices, keep=2)}, "the first 2"),
    ]
    for scheme, sampler, kwargs, expected in cases:
        with pytest.raises(ConfigError, match=expected):
            run_api(small_federated, scheme, sampler, **kwargs)
    kept = SamplingScheme("full", n, keep=2)  # accounted at 2C: it runs
    result = run_api(small_federated, kept, UniformSampler(n), clock=ClockSpec(devices, keep=2))
    assert result.history[-1].metrics["dp.epsilon"] == epsilon(kept, 1.0, 1, 1e-5)


@pytest.mark.parametrize(
    "aggregation",
    [
        RobustAggregation("median"),
        RobustAggregation("trimmed_mean", beta=0.2),
        WeightedMean(max_weight=0.5),
        Omniscient(WeightedMean(), frozenset({0, 1}), "ipm", epsilon=10.0),
    ],
    ids=["median", "trimmed_mean", "max_weight", "ipm"],
)
def test_central_dp_refuses_aggregations_that_move_the_sum_further(
    small_federated: FederatedDataset, aggregation: Aggregation
) -> None:
    scheme = SamplingScheme.fixed_size(5, small_federated.num_clients)
    with pytest.raises(ConfigError, match="central DP cannot follow the aggregation"):
        run_api(small_federated, scheme, UniformSampler(5), aggregation)


@pytest.mark.parametrize("attack", ["alie", "ipm"])
def test_attacks_that_rewrite_records_after_the_clip_are_refused_with_central_dp(
    attack: str,
) -> None:
    with pytest.raises(ConfigError, match=r"cannot run with privacy\.mode = 'central'"):
        load_config(None, [*CENTRAL, f"attack.kind={attack}", "attack.fraction=0.2"])


def test_distributed_dp_needs_secure_aggregation_in_the_api(
    small_federated: FederatedDataset,
) -> None:
    with pytest.raises(ConfigError, match="inside secure aggregation"):
        simulate(
            small_mlp(), small_federated, rounds=1, verbose=0,
            stages=[FixedClip(1.0, report_clipped=False), DistributedGaussian(1.0, 1.0, 1e-5, 5)],
        )  # fmt: skip


def test_the_python_api_samples_central_dp_from_a_secret(
    small_federated: FederatedDataset,
) -> None:
    """Without seeded noise, nobody who knows the run seed can predict the cohorts."""

    class Cohorts(RoundListener):
        def __init__(self) -> None:
            self.drawn: list[list[int]] = []

        def round_started(self, round_number: int, client_ids: list[int]) -> None:
            self.drawn.append(list(client_ids))

    n, seen = small_federated.num_clients, Cohorts()
    scheme = SamplingScheme.fixed_size(3, n)
    noise = CentralGaussian(1.0, scheme, 1e-5, 3.0)
    run_api(small_federated, scheme, UniformSampler(3), noise=noise, rounds=4, listener=seen)
    streams = RngStreams(0)
    predicted = [
        UniformSampler(3)(range(n), streams.generator(Purpose.SAMPLING, r)) for r in range(1, 5)
    ]
    assert len(seen.drawn) == 4 and seen.drawn != predicted


def test_secure_aggregation_rounding_is_bounded_and_accounted() -> None:
    """The reviewer's worst cases: a 16-bit ring with rotation, the default MLP (199,210
    coordinates), K = 50 / 200 / 800 leave 12 / 10 / 8 fractional bits, so rounding can add
    0.109 / 0.438 / 1.75 clip norms; a 32-bit ring of 100 adds 2.7e-5."""
    ring16 = SecAggParams(ring_bits=16, rotation=True)
    for clients, extra in ((50, 0.1094), (200, 0.4375), (800, 1.75)):
        assert rounding_excess(ring16, 199_210, clients, 1.0) == pytest.approx(extra, abs=1e-4)
    assert rounding_excess(SecAggParams(), 199_210, 100, 1.0) < 1e-4
    # A configured run accounts each record at 1 + SECURE_SUM_SLACK clip norms.
    config = load_config(
        None, [*CENTRAL, "aggregation.kind=secure_sum", "server.clients_per_round=5"]
    )
    noise = build_stages(config, 20, [10] * 20)[-1]
    assert isinstance(noise, CentralGaussian) and noise.record_bound == 1 + SECURE_SUM_SLACK
    scheme = SamplingScheme.fixed_size(5, 20)
    assert noise.epsilon_after(3) == epsilon(scheme, 1 / (1 + SECURE_SUM_SLACK), 3, 1e-5)
    assert noise.epsilon_after(3) > epsilon(scheme, 1.0, 3, 1e-5)


def test_the_api_refuses_rounding_past_the_record_bound(small_federated: FederatedDataset) -> None:
    n = small_federated.num_clients  # 10 clients; the MLP has 195 coordinates
    scheme = SamplingScheme.fixed_size(8, n)
    ring16 = SecureAggregation(SecAggParams(ring_bits=16, rotation=True, clip_norm=1.0))
    with pytest.raises(ConfigError, match="stochastic rounding"):
        run_api(small_federated, scheme, UniformSampler(8), ring16)
    bound = CentralGaussian(1.0, scheme, 1e-5, 8.0, record_bound=1.2)
    result = run_api(small_federated, scheme, UniformSampler(8), ring16, noise=bound)
    assert result.history[-1].metrics["dp.epsilon"] == epsilon(scheme, 1 / 1.2, 1, 1e-5)


def test_central_dp_refuses_outlier_refusals(small_federated: FederatedDataset) -> None:
    """Retrying a round without a client because of its record's norm is an unnoised decision
    on that record: refused at load, off by default in deployment, refused in the API."""
    from fedforge.aggregate.guard import OutlierBound
    from fedforge.experiment import build_outliers

    with pytest.raises(ConfigError, match="cannot refuse outlying updates"):
        load_config(None, [*CENTRAL, "aggregation.outlier_ratio=10"])
    assert build_outliers(load_config(None, CENTRAL), deployed=True) is None
    assert build_outliers(load_config(), deployed=True) is not None  # (on without DP)
    scheme = SamplingScheme.fixed_size(5, small_federated.num_clients)
    with pytest.raises(ConfigError, match="cannot refuse outlying updates"):
        run_api(small_federated, scheme, UniformSampler(5), outliers=OutlierBound(10.0))
