"""Central DP's amplification by sampling on the virtual clock: over many rounds, how often
each client is actually summed never exceeds the inclusion rate the accountant assumes, and
the combinations where it would are refused (README, Differential privacy, Accounting)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from fedforge.algorithms.fedavg import FedAvg
from fedforge.config import load_config
from fedforge.core.errors import ConfigError
from fedforge.experiment import build_dataset, build_stages, simulate_config
from fedforge.privacy.accounting import SamplingScheme, epsilon
from fedforge.report.history import RoundRecord
from fedforge.runtime.clock import ClockSpec
from fedforge.runtime.devices import Devices, Diurnal
from fedforge.runtime.driver import ACCEPTED, RoundListener
from fedforge.runtime.sampling import PoissonSampler, UniformSampler
from fedforge.runtime.simulation import simulate
from fedforge.runtime.stragglers import Stragglers
from fedforge.stages.clip import FixedClip
from fedforge.stages.dp_noise import CentralGaussian
from fedforge.train.program import LocalSGD
from tests.conftest import small_mlp

ROUNDS = 100
CLIENTS = 20
TINY = [
    "data.dataset=digits",
    "partition.scheme=iid",
    f"partition.num_clients={CLIENTS}",
    "model.name=logistic",
    "client.epochs=1",
    "client.batch_size=0",
    f"server.rounds={ROUNDS}",
    "runtime.backend=sequential",
    "privacy.mode=central",
    "privacy.noise_multiplier=1.0",
    "privacy.seeded_noise=true",
    "privacy.accountant=rdp",
    "clock.enabled=true",
    "clock.speed_sigma=1.5",
]


class Summed(RoundListener):
    """Counts, per client, the rounds whose noised sum took its record."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.rounds: list[RoundRecord] = []

    def client_done(self, client_id: int, status: str) -> None:
        if status == ACCEPTED:
            self.counts[client_id] += 1

    def round_finished(self, record: RoundRecord) -> None:
        if record.round:
            self.rounds.append(record)


def inclusion_rate(scheme: SamplingScheme) -> float:
    """The per-client inclusion probability the accountant assumes."""
    if scheme.kind == "poisson":
        return scheme.rate
    if scheme.kind == "fixed":
        return scheme.sample_size / scheme.population
    return 1.0


@pytest.mark.parametrize(
    "overrides",
    [
        # K = 2 kept of 8 drawn (over-selection 4): the fastest client is kept whenever drawn
        ["server.clients_per_round=2", "clock.over_selection=4"],
        # K of N thinned by a deadline and by stragglers' partial work (timed as partial)
        [
            "server.clients_per_round=4",
            "clock.deadline_s=2.0",
            "algorithm.stragglers=0.5",
            "client.epochs=3",
        ],
        # Poisson among always-online clients, thinned by a deadline
        ["server.sampler=poisson", "server.sampling_rate=0.2", "clock.deadline_s=2.0"],
        # Poisson among the clients online at the round's start: rounds of a fixed length
        [
            "server.sampler=poisson",
            "server.sampling_rate=0.2",
            "clock.deadline_s=3000",
            "clock.availability=diurnal",
            "clock.online_fraction=0.5",
            "clock.always_on=0.2",
            "clock.period_s=100000",
        ],
    ],
    ids=["over-selection", "uniform-deadline-stragglers", "poisson-deadline", "poisson-diurnal"],
)
def test_no_client_is_summed_more_often_than_the_accountant_assumes(overrides: list[str]) -> None:
    config = load_config(None, [*TINY, *overrides])
    data = build_dataset(config)
    noise = build_stages(config, data.num_clients, data.client_sizes())[-1]
    assert isinstance(noise, CentralGaussian)
    q = inclusion_rate(noise.scheme)
    seen = Summed()
    simulate_config(config, data, listener=seen)
    assert len(seen.rounds) == ROUNDS
    # Each client's count is Binomial(ROUNDS, p_i) with p_i <= q: allow 4 standard deviations.
    slack = 4 * math.sqrt(q * (1 - q) / ROUNDS)
    observed = {c: n / ROUNDS for c, n in seen.counts.items()}
    assert max(observed.values()) <= q + slack, (observed, q)
    assert sum(observed.values()) > 0
    if config.clock.deadline_s and config.clock.availability != "always":
        # The clock's time cannot depend on who took part: every round lasts the deadline.
        assert {r.metrics["clock.seconds"] for r in seen.rounds} == {config.clock.deadline_s}


def test_over_selection_is_accounted_for_the_clients_drawn() -> None:
    """Drawing 8 and keeping the first 2 to finish: each of the 8 may be kept, so epsilon is
    that of 8 of 20 (the sum still divides by the 2 kept)."""
    config = load_config(None, [*TINY, "server.clients_per_round=2", "clock.over_selection=4"])
    noise = build_stages(config, CLIENTS, [10] * CLIENTS)[-1]
    assert isinstance(noise, CentralGaussian)
    assert noise.scheme == SamplingScheme.fixed_size(8, CLIENTS, keep=2)
    assert noise.epsilon_after(5) == epsilon(SamplingScheme.fixed_size(8, CLIENTS), 1.0, 5, 1e-5)
    assert noise.denominator == 2.0 and noise.expected_summed == 2.0


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["clock.availability=diurnal"],
            "server.sampler = 'uniform' cannot run on clock.availability = 'diurnal'",
        ),
        (
            ["clock.availability=random", "clock.deadline_s=5"],
            "server.sampler = 'uniform' cannot run on clock.availability = 'random'",
        ),
        (
            ["server.sampler=poisson", "clock.availability=diurnal"],
            "Poisson sampling among the online clients needs clock.deadline_s",
        ),
        (
            ["server.sampler=poisson", "algorithm.stragglers=0.5"],
            "algorithm.stragglers cannot run with privacy.mode = 'central' and Poisson",
        ),
    ],
)
def test_sampling_the_accountant_cannot_bound_is_refused_at_load(
    overrides: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*TINY, *overrides])
    assert expected in str(info.value)


def test_what_stays_valid_loads() -> None:
    for overrides in (
        ["server.sampler=poisson", "clock.availability=diurnal", "clock.deadline_s=5"],
        ["clock.availability=diurnal", "clock.always_on=1.0"],  # everyone always online
        # full participation on a clock of fixed-length rounds
        ["server.clients_per_round=20", "clock.availability=diurnal", "clock.deadline_s=5"],
        ["algorithm.stragglers=0.5", "algorithm.drop_stragglers=true"],  # K of N, thinned
        ["privacy.mode=local", "clock.availability=diurnal"],  # no amplification counted
    ):
        load_config(None, [*TINY, *overrides])


def _diurnal(n: int) -> Devices:
    always = np.zeros(n, bool)
    availability = Diurnal(np.linspace(0, 50, n), 0.5, always, period=100.0)
    return Devices(np.ones(n), np.full(n, 1e9), np.full(n, 1e9), availability)


def test_the_python_api_refuses_what_the_configuration_refuses(small_federated) -> None:  # type: ignore[no-untyped-def]
    n = small_federated.num_clients
    poisson = SamplingScheme("poisson", n, rate=0.3)
    fixed = SamplingScheme.fixed_size(4, n)

    def run(scheme: SamplingScheme, **kwargs: object) -> None:
        noise = CentralGaussian(1.0, scheme, 1e-5, scheme.expected_clients)
        simulate(
            small_mlp(),
            small_federated,
            FedAvg(local=LocalSGD(lr=0.1, epochs=1, batch_size=0)),
            rounds=1,
            stages=[FixedClip(1.0), noise],
            **kwargs,  # type: ignore[arg-type]
        )

    diurnal = ClockSpec(_diurnal(n), deadline=10.0)
    cases = [
        ({"sampler": UniformSampler(4), "clock": diurnal}, fixed, "partial availability"),
        ({"sampler": PoissonSampler(0.3), "clock": diurnal}, poisson, "fixed length"),
        ({"sampler": PoissonSampler(0.3), "stragglers": Stragglers(0.5, 1)}, poisson, "stragglers"),
        ({"sampler": UniformSampler(5)}, fixed, "the sampler draws 5 of 10"),
        ({"sampler": lambda ids, rng: list(ids)[:4]}, fixed, "UniformSampler and Poisson"),
    ]
    for kwargs, scheme, expected in cases:
        with pytest.raises(ConfigError, match=expected):
            run(scheme, **kwargs)
    fixed_rounds = ClockSpec(_diurnal(n), deadline=10.0, fixed_rounds=True)
    run(poisson, sampler=PoissonSampler(0.3), clock=fixed_rounds)  # valid: it runs


def test_a_deployed_central_dp_server_samples_from_every_registered_client() -> None:
    """The accountant's population is the registered clients: the sampler must draw from all
    of them, not from those connected at that moment (a disconnected one fails its task)."""
    from fedforge.net.hub import Hub
    from fedforge.net.server import sampling_population

    hub = Hub("run")  # nobody connected
    central = load_config(None, ["privacy.mode=central", "privacy.noise_multiplier=1"])
    assert list(sampling_population(central, hub, 3)()) == [0, 1, 2]
    assert list(sampling_population(load_config(), hub, 3)()) == []
