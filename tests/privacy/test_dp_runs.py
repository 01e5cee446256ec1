"""DP end to end: every runtime releases the same noised model (seeded noise), the budget
stops a run, retries and resumed runs are accounted, and configurations are checked."""

from __future__ import annotations

import numpy as np
import pytest

from fedforge import simulate
from fedforge.algorithms.fedavg import FedAvg
from fedforge.config import load_config
from fedforge.core.errors import ConfigError
from fedforge.core.params import spec_of
from fedforge.core.rng import Purpose, RngStreams
from fedforge.data.federated import FederatedDataset
from fedforge.experiment import build_stages
from fedforge.privacy.accounting import SamplingScheme
from fedforge.privacy.noise import NoiseSource
from fedforge.report.history import History
from fedforge.runtime.client_app import ClientApp
from fedforge.runtime.client_state import MemoryStateStore
from fedforge.runtime.driver import Driver
from fedforge.runtime.sampling import UniformSampler
from fedforge.runtime.sequential import SequentialTransport
from fedforge.stages.base import Stage, StageChain
from fedforge.stages.clip import AdaptiveClip, FixedClip
from fedforge.stages.dp_noise import CentralGaussian, LocalGaussian
from fedforge.train.program import LocalSGD
from fedforge.train.torch_model import TorchModel
from tests.conftest import small_mlp
from tests.runtime.test_driver import failing_data

LOCAL = LocalSGD(lr=0.1, epochs=1, batch_size=8)
SCHEME = SamplingScheme.fixed_size(4, 10)


def central_stages(adaptive: bool = False, target: float | None = None) -> list[Stage]:
    clip = AdaptiveClip(0.5, expected_clients=4.0) if adaptive else FixedClip(0.5)
    noise = CentralGaussian(
        0.8,
        SCHEME,
        1e-5,
        denominator=4.0,
        count_stddev=4.0 / 20 * 10 if adaptive else None,
        target_epsilon=target,
        source=NoiseSource(seed=5),
    )
    return [clip, noise]


def local_stages() -> list[Stage]:
    return [FixedClip(0.5, report_clipped=False), LocalGaussian(0.3, 1e-5, source=NoiseSource(5))]


@pytest.mark.parametrize("stages", [central_stages, lambda: central_stages(True), local_stages])
def test_every_runtime_releases_the_same_model_with_seeded_noise(
    small_federated: FederatedDataset, stages
) -> None:  # type: ignore[no-untyped-def]
    results = {
        backend: simulate(
            small_mlp(),
            small_federated,
            FedAvg(local=LOCAL),
            rounds=3,
            clients_per_round=4,
            backend=backend,
            stages=stages(),
        )
        for backend in ("sequential", "vectorized", "workers")
    }
    reference = results["sequential"]
    for backend, result in results.items():
        for name, value in reference.state.params.items():
            np.testing.assert_allclose(
                result.state.params[name], value, rtol=1e-4, atol=1e-5, err_msg=backend
            )
        assert (
            result.history[-1].metrics["dp.epsilon"] == reference.history[-1].metrics["dp.epsilon"]
        )
    last = reference.history[-1]
    assert last.metrics["dp.epsilon"] > 0
    assert "SEEDED" in last.labels["dp.noise"]


def test_unseeded_noise_differs_between_identical_runs(small_federated: FederatedDataset) -> None:
    def run() -> dict[str, np.ndarray]:
        noise = CentralGaussian(0.8, SCHEME, 1e-5, denominator=4.0)
        return simulate(
            small_mlp(),
            small_federated,
            rounds=1,
            clients_per_round=4,
            stages=[FixedClip(0.5), noise],
        ).state.params

    first, second = run(), run()
    assert any(not np.array_equal(first[k], second[k]) for k in first)


def test_the_budget_stops_the_run_before_it_is_exceeded(small_federated: FederatedDataset) -> None:
    target = central_stages()[1].epsilon_after(3)  # type: ignore[attr-defined]
    result = simulate(
        small_mlp(),
        small_federated,
        rounds=6,
        clients_per_round=4,
        stages=central_stages(target=target),
    )
    assert result.history[-1].round == 3
    assert result.stop_reason is not None and "privacy budget reached" in result.stop_reason
    assert result.history[-1].metrics["dp.epsilon"] <= target


def test_a_resumed_run_continues_the_accountant(
    small_federated: FederatedDataset, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    common = {"clients_per_round": 4, "state_dir": tmp_path}
    simulate(small_mlp(), small_federated, rounds=2, stages=central_stages(), **common)
    resumed = simulate(
        small_mlp(), small_federated, rounds=4, stages=central_stages(), resume=True, **common
    )
    last = resumed.history[-1]
    assert last.round == 4 and last.metrics["dp.releases"] == 4.0
    noise = central_stages()[1]
    assert last.metrics["dp.epsilon"] == noise.epsilon_after(4)  # type: ignore[attr-defined]
    assert resumed.state.stage_states["dp"]["releases"] == 4.0


def test_discarded_attempts_that_released_a_sum_are_accounted() -> None:
    """Clients 0 and 1 always fail; a round needs 2 results, so attempts that sampled a bad
    client are re-sampled, but their noised sum was computed: each is a release."""
    scheme = SamplingScheme.fixed_size(2, 4)
    # (seeded noise: clients are sampled from the run seed, which sampled_attempts replays)
    stages = [FixedClip(0.5), CentralGaussian(1.0, scheme, 1e-5, 2.0, source=NoiseSource(0))]
    final = run_failing_federation(StageChain(stages))
    releases = len(sampled_attempts())  # every attempt releases noise, even one with no good client
    assert releases > 3  # the seed does produce discarded attempts
    assert final.stage_states["dp"]["releases"] == releases


def run_failing_federation(
    stages: StageChain | None = None,
    sample_dp: object = None,
    store: MemoryStateStore | None = None,
):  # type: ignore[no-untyped-def]
    """Three rounds over ``failing_data`` (clients 0 and 1 always fail) that need both good
    clients: attempts that sampled a bad client are re-sampled. Returns the final state."""
    data = failing_data()
    model = small_mlp()
    algorithm = FedAvg(local=LOCAL)
    app = ClientApp(algorithm, model, stages, sample_dp)  # type: ignore[arg-type]
    store = store if store is not None else MemoryStateStore()
    params = TorchModel(model).get_params()
    driver = Driver(
        algorithm=algorithm,
        transport=SequentialTransport(app, data, store),
        sampler=UniformSampler(2),
        streams=RngStreams(0),
        model_spec=spec_of(params),
        trainable=app.trainable,
        population=lambda: range(4),
        population_size=lambda: 4,
        example_cap=lambda cid, stage: data.client_size(cid),
        stages=stages or StageChain(),
        client_states=store,
        client_metrics=app.extra_metrics,
    )
    return driver.run(algorithm.init(params), 3, History(), min_completed=2, max_retries=50)


def sampled_attempts() -> list[list[int]]:
    """The clients of every attempt ``run_failing_federation`` makes, drawn as the driver
    draws them."""
    attempts, streams = [], RngStreams(0)
    for round_number in (1, 2, 3):
        for attempt in range(51):
            coords = (round_number,) if attempt == 0 else (round_number, attempt)
            sampled = UniformSampler(2)(range(4), streams.generator(Purpose.SAMPLING, *coords))
            attempts.append(sampled)
            if set(sampled) == {2, 3}:
                break
    return attempts


def config(*overrides: str):  # type: ignore[no-untyped-def]
    return load_config(None, list(overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.mode='central'"], "exactly one of"),
        (
            ["privacy.mode='central'", "privacy.noise_multiplier=1", "privacy.target_epsilon=2"],
            "exactly one of",
        ),
        (
            ["privacy.mode='central'", "privacy.noise_multiplier=1", "algorithm.name='scaffold'"],
            "scaffold",
        ),
        (
            ["privacy.mode='central'", "privacy.noise_multiplier=1", "aggregation.kind='median'"],
            "aggregation.kind = 'mean'",
        ),
        (
            ["privacy.mode='central'", "privacy.noise_multiplier=1", "aggregation.max_weight=5"],
            "aggregation.kind = 'mean'",
        ),
        (
            ["privacy.mode='central'", "privacy.noise_multiplier=1", "update.clip_norm=1"],
            "update.clip_norm",
        ),
        (
            ["privacy.mode='central'", "privacy.noise_multiplier=1", "privacy.weighting='capped'"],
            "weight_cap",
        ),
        (
            ["privacy.mode='local'", "privacy.noise_multiplier=1", "privacy.adaptive_clip=true"],
            "central' only",
        ),
        (
            ["privacy.mode='sample'", "privacy.noise_multiplier=1", "algorithm.name='fedprox'"],
            "fedavg",
        ),
    ],
)
def test_impossible_privacy_configurations_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(*overrides)


def test_adaptive_clipping_that_cannot_reach_z_is_refused() -> None:
    cfg = config(
        "privacy.mode='central'",
        "privacy.noise_multiplier=1",
        "privacy.adaptive_clip=true",
        "server.clients_per_round=5",
        "partition.num_clients=10",
    )
    with pytest.raises(ConfigError, match="clipped-count noise"):
        build_stages(cfg, 10)  # sigma_b = 5 / 20: 2 sigma_b < z


def test_target_epsilon_is_calibrated_and_a_loose_run_warned(caplog) -> None:  # type: ignore[no-untyped-def]
    cfg = config(
        "privacy.mode='central'",
        "privacy.target_epsilon=3",
        "server.rounds=20",
        "server.sampler='poisson'",
        "server.sampling_rate=0.05",
        "partition.num_clients=200",
    )
    noise = build_stages(cfg, 200)[1]
    assert isinstance(noise, CentralGaussian)
    assert noise.epsilon_after(20) == pytest.approx(3.0, rel=2e-3)
    assert noise.epsilon_after(20) <= 3.0
    loose = config("privacy.mode='central'", "privacy.noise_multiplier=0.3", "server.rounds=50")
    with caplog.at_level("WARNING", logger="fedforge"):
        build_stages(loose, 100)
    assert "above 10" in caplog.text


def test_dp_sgd_reports_each_clients_epsilon(small_federated: FederatedDataset) -> None:
    from fedforge.privacy.dp_sgd import SampleDP

    dp = SampleDP(1.0, 1.0, 1e-5, seeded=True)
    kwargs = {"rounds": 2, "clients_per_round": 10, "sample_dp": dp}
    result = simulate(small_mlp(), small_federated, FedAvg(local=LOCAL), **kwargs)  # type: ignore[arg-type]
    again = simulate(
        small_mlp(),
        small_federated,
        FedAvg(local=LOCAL),
        backend="workers",
        **kwargs,  # type: ignore[arg-type]
    )
    first, second = result.history[1].metrics, result.history[2].metrics
    assert 0 < first["dp_sgd.epsilon"] <= first["dp_sgd.epsilon.max"]
    assert second["dp_sgd.epsilon.max"] > first["dp_sgd.epsilon.max"]  # the ledger carries over
    for name, value in result.state.params.items():
        np.testing.assert_allclose(again.state.params[name], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="DP-SGD"):
        simulate(small_mlp(), small_federated, backend="vectorized", **kwargs)  # type: ignore[arg-type]


def test_a_round_with_no_record_still_releases_noise(small_federated: FederatedDataset) -> None:
    """Poisson sampling at a low rate samples nobody in some rounds; central DP must release
    noise anyway (an unchanged model would say that nobody took part)."""
    from fedforge.runtime.sampling import PoissonSampler

    scheme = SamplingScheme("poisson", 10, rate=0.1)
    noise = CentralGaussian(1.0, scheme, 1e-5, denominator=1.0, source=NoiseSource(0))
    result = simulate(
        small_mlp(), small_federated, rounds=6, sampler=PoissonSampler(0.1),
        stages=[FixedClip(0.5), noise],
    )  # fmt: skip
    empty = [r for r in result.history[1:] if r.clients_sampled == 0]
    assert empty, "the seed should produce a round without clients"
    assert result.history[-1].metrics["dp.releases"] == 6.0
    assert all("dp.epsilon" in r.metrics for r in empty)


def test_the_dp_sgd_ledger_counts_every_attempt_that_trained() -> None:
    """A retried round must add to the client's newest step count, not to the one the round
    started from: those steps were trained and their record was sent."""
    from fedforge.privacy.dp_sgd import SampleDP, num_steps
    from fedforge.runtime.client_app import DP_SGD_STEPS, LATEST

    data = failing_data()
    store = MemoryStateStore()
    run_failing_federation(sample_dp=SampleDP(1.0, 1.0, 1e-5, seeded=True), store=store)
    trained = {2: 0, 3: 0}
    for sampled in sampled_attempts():
        for cid in set(sampled) & {2, 3}:
            trained[cid] += 1
    for cid, times in trained.items():
        steps = store.get(cid, LATEST)[DP_SGD_STEPS]  # type: ignore[index]
        assert int(steps[0]) == times * num_steps(LOCAL, data.client_size(cid))
    assert max(trained.values()) > 3  # retries happened


def test_central_dp_samples_from_a_secret_unless_seeded() -> None:
    from fedforge.privacy.setup import secret_sampling_seed

    central = config("privacy.mode='central'", "privacy.noise_multiplier=1")
    first, second = secret_sampling_seed(central), secret_sampling_seed(central)
    assert first is not None and second is not None and first != second
    seeded = config(
        "privacy.mode='central'", "privacy.noise_multiplier=1", "privacy.seeded_noise=true"
    )
    assert secret_sampling_seed(seeded) is None
