"""FedBuff on the virtual clock: staleness, equivalence with synchronous FedAvg, refusals."""

import numpy as np
import pytest

from fedforge.aggregate.kinds import WeightedMean
from fedforge.algorithms.fedavg import FedAvg
from fedforge.algorithms.scaffold import Scaffold
from fedforge.core.errors import ConfigError
from fedforge.data import partition
from fedforge.data.federated import FederatedDataset
from fedforge.runtime import async_driver
from fedforge.runtime.async_driver import Arrival, FedBuff, staleness_weight
from fedforge.runtime.clock import ClockSpec
from fedforge.runtime.devices import Devices, Intervals
from fedforge.runtime.simulation import SimulationResult, simulate
from fedforge.train.program import LocalSGD
from tests.conftest import make_blobs, small_mlp

LOCAL = LocalSGD(lr=0.1, epochs=1, batch_size=8)
FAST_LINK = 1e12  # bits per second: transfers take ~1e-8 s


def _federation(clients: int) -> FederatedDataset:
    train, test = make_blobs(40 * clients, seed=0), make_blobs(100, seed=1)
    parts = partition.iid(len(train), clients, np.random.default_rng(0))
    return FederatedDataset(train, test, parts)


def _devices(data: FederatedDataset, seconds: list[float]) -> Devices:
    """Devices whose compute takes ``seconds[i]`` for client i's real step count."""
    steps = np.array([LOCAL.num_steps(data.client_size(c)) for c in range(data.num_clients)])
    n = data.num_clients
    return Devices(steps / np.array(seconds), np.full(n, FAST_LINK), np.full(n, FAST_LINK))


def test_staleness_weight() -> None:
    np.testing.assert_allclose(staleness_weight(np.array([0, 3, 8])), [1.0, 0.5, 1 / 3])
    np.testing.assert_allclose(staleness_weight(np.array([0, 5]), 0.0), [1.0, 1.0])
    np.testing.assert_allclose(staleness_weight(1, 1.0), 0.5)


def test_staleness_under_a_constructed_arrival_order(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _federation(3)
    devices = _devices(data, [1.0, 2.5, 4.2])
    drivers: list[async_driver.AsyncDriver] = []
    original = async_driver.AsyncDriver.__init__

    def keep(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, **kwargs)
        drivers.append(self)

    monkeypatch.setattr(async_driver.AsyncDriver, "__init__", keep)
    result = simulate(
        small_mlp(),
        data,
        FedAvg(local=LOCAL),
        rounds=6,
        clock=ClockSpec(devices),
        fedbuff=FedBuff(buffer=1, concurrency=3),
    )
    # Every client trains at once; a finished client restarts on the current model.
    # t=1: c0 (v0) -> v1; t=2: c0 (v1) -> v2; t=2.5: c1 (v0, 2 updates stale) -> v3;
    # t=3: c0 (v2) -> v4; t=4: c0 (v4) -> v5; t=4.2: c2 (v0, 5 updates stale) -> v6.
    expected = [(0, 0, 0), (0, 1, 1), (1, 0, 2), (0, 2, 3), (0, 4, 4), (2, 0, 5)]
    arrivals = drivers[0].arrivals
    assert [(a.client_id, a.started, a.arrived) for a in arrivals] == expected
    assert [a.staleness for a in arrivals] == [0, 0, 2, 1, 0, 5]
    np.testing.assert_allclose([a.time for a in arrivals], [1, 2, 2.5, 3, 4, 4.2], atol=1e-6)
    h = result.history
    assert [r.metrics["async.staleness.max"] for r in h[1:]] == [0, 0, 2, 1, 0, 5]
    np.testing.assert_allclose([r.metrics["clock.time"] for r in h[1:]], [1, 2, 2.5, 3, 4, 4.2])
    assert result.state.round == 6


def test_fedbuff_with_the_cohort_as_buffer_and_no_staleness_is_fedavg() -> None:
    data = _federation(5)
    devices = _devices(data, [2.0] * 5)  # everyone arrives together: no staleness
    kwargs = {"rounds": 3, "clients_per_round": 5, "seed": 3, "clock": ClockSpec(devices)}
    sync = simulate(small_mlp(), data, FedAvg(local=LOCAL), **kwargs)  # type: ignore[arg-type]
    fedbuff = simulate(
        small_mlp(),
        data,
        FedAvg(local=LOCAL),
        fedbuff=FedBuff(buffer=5, concurrency=5),
        **kwargs,  # type: ignore[arg-type]
    )
    for name, value in sync.state.params.items():
        np.testing.assert_allclose(fedbuff.state.params[name], value, rtol=1e-5, atol=1e-6)
    for a, b in zip(sync.history, fedbuff.history, strict=True):
        assert a.test_accuracy == pytest.approx(b.test_accuracy)
        assert a.train_loss == pytest.approx(b.train_loss, nan_ok=True)
        assert a.metrics.get("clock.time") == pytest.approx(b.metrics.get("clock.time"))
    assert all(r.metrics["async.staleness.max"] == 0 for r in fedbuff.history[1:])


def test_with_a_weight_cap_an_update_of_the_whole_cohort_is_still_a_fedavg_round() -> None:
    """The cap applies to a record's weight before its staleness discount (a capped stale
    record is discounted, and the buffer's mean is over the capped weights)."""
    train, test = make_blobs(200, seed=0), make_blobs(100, seed=1)
    sizes = np.cumsum([20, 30, 40, 50])  # clients of 20..60 examples
    data = FederatedDataset(train, test, np.split(np.arange(200), sizes))
    devices = _devices(data, [2.0] * 5)
    capped = WeightedMean(max_weight=35)
    kwargs = {"rounds": 2, "clients_per_round": 5, "seed": 3, "clock": ClockSpec(devices)}
    sync = simulate(small_mlp(), data, FedAvg(local=LOCAL), aggregation=capped, **kwargs)  # type: ignore[arg-type]
    fedbuff = simulate(
        small_mlp(),
        data,
        FedAvg(local=LOCAL),
        aggregation=capped,
        fedbuff=FedBuff(buffer=5, concurrency=5),
        **kwargs,  # type: ignore[arg-type]
    )
    uncapped = simulate(small_mlp(), data, FedAvg(local=LOCAL), **kwargs)  # type: ignore[arg-type]
    assert not np.allclose(uncapped.state.params["0.weight"], sync.state.params["0.weight"])
    for name, value in sync.state.params.items():
        np.testing.assert_allclose(fedbuff.state.params[name], value, rtol=1e-5, atol=1e-6)


def test_stale_records_count_less_and_vectorized_matches_sequential(small_federated) -> None:  # type: ignore[no-untyped-def]
    speeds = np.random.default_rng(0).lognormal(0, 1, small_federated.num_clients)
    devices = Devices(speeds, np.full(10, FAST_LINK), np.full(10, FAST_LINK))
    runs = {
        backend: simulate(
            small_mlp(),
            small_federated,
            FedAvg(local=LOCAL),
            rounds=8,
            backend=backend,  # type: ignore[arg-type]
            clock=ClockSpec(devices),
            fedbuff=FedBuff(buffer=2, concurrency=5),
        )
        for backend in ("sequential", "vectorized")
    }
    seq, vec = runs["sequential"], runs["vectorized"]
    assert max(r.metrics["async.staleness.max"] for r in seq.history[1:]) > 0
    for name, value in seq.state.params.items():
        np.testing.assert_allclose(vec.state.params[name], value, rtol=1e-4, atol=1e-5)
    # the staleness weighting changes the model, not the schedule
    flat = simulate(
        small_mlp(),
        small_federated,
        FedAvg(local=LOCAL),
        rounds=8,
        clock=ClockSpec(devices),
        fedbuff=FedBuff(buffer=2, concurrency=5, staleness_exponent=0.0),
    )
    assert [r.clients["arrived"] for r in flat.history[1:]] == [
        r.clients["arrived"] for r in seq.history[1:]
    ]
    assert not np.allclose(flat.state.params["0.weight"], seq.state.params["0.weight"])


def test_arrival_staleness_is_the_updates_in_between() -> None:
    assert Arrival(client_id=4, started=2, arrived=7, time=1.0).staleness == 5


def test_fedbuff_refuses_what_it_cannot_run(small_federated) -> None:  # type: ignore[no-untyped-def]
    devices = Devices(np.ones(10), np.ones(10), np.ones(10))
    with pytest.raises(ConfigError, match="virtual clock"):
        simulate(small_mlp(), small_federated, rounds=1, fedbuff=FedBuff(2, 4))
    with pytest.raises(ConfigError, match="client state"):
        simulate(
            small_mlp(),
            small_federated,
            Scaffold(local=LOCAL),
            rounds=1,
            clock=ClockSpec(devices),
            fedbuff=FedBuff(2, 4),
        )
    with pytest.raises(ConfigError, match="synchronous rounds only"):
        simulate(
            small_mlp(),
            small_federated,
            rounds=1,
            clock=ClockSpec(devices, deadline=5.0),
            fedbuff=FedBuff(2, 4),
        )
    with pytest.raises(ConfigError, match="buffer <= concurrency"):
        FedBuff(buffer=5, concurrency=4)


def test_fedbuff_never_dispatches_offline_clients(small_federated) -> None:  # type: ignore[no-untyped-def]
    n = small_federated.num_clients
    offline = Intervals(
        client=np.arange(5),  # clients 0-4 online only from t = 1e9
        start=np.full(5, 1e9),
        end=np.full(5, 2e9),
        always=np.arange(n) >= 5,
        period=0.0,
    )
    devices = Devices(np.random.default_rng(1).lognormal(0, 1, n), np.ones(n), np.ones(n), offline)
    result = simulate(
        small_mlp(),
        small_federated,
        FedAvg(local=LOCAL),
        rounds=6,
        clock=ClockSpec(devices),
        fedbuff=FedBuff(buffer=2, concurrency=4),
    )
    arrived = {c for r in result.history[1:] for c in r.clients["arrived"]}
    assert arrived and arrived <= set(range(5, n))


def test_a_resumed_fedbuff_run_continues_its_clock_and_history(small_federated, tmp_path) -> None:  # type: ignore[no-untyped-def]
    speeds = np.random.default_rng(0).lognormal(0, 1, small_federated.num_clients)
    devices = Devices(speeds, np.full(10, FAST_LINK), np.full(10, FAST_LINK))

    def run(rounds: int, resume: bool = False) -> SimulationResult:
        return simulate(
            small_mlp(),
            small_federated,
            FedAvg(local=LOCAL),
            rounds=rounds,
            clock=ClockSpec(devices),
            fedbuff=FedBuff(buffer=2, concurrency=5),
            state_dir=tmp_path,
            resume=resume,
        )

    first, resumed = run(3), run(6, resume=True)
    h = resumed.history
    assert [r.round for r in h] == list(range(7))  # one initial record, updates 1..6
    assert [r.test_accuracy for r in h[:4]] == [r.test_accuracy for r in first.history]
    times = [r.metrics["clock.time"] for r in h[1:]]
    assert times == sorted(times) and times[2] == first.history[-1].metrics["clock.time"]
    assert resumed.state.round == 6


def test_fedbuff_refuses_what_the_configuration_refuses(small_federated) -> None:  # type: ignore[no-untyped-def]
    """FedNova and q-FedAvg carry a normalizer the staleness discount would scale (FedNova's
    twice); stragglers, differential privacy and a sampler would be silently ignored."""
    from fedforge.algorithms.fednova import FedNova
    from fedforge.algorithms.qfedavg import QFedAvg
    from fedforge.privacy.dp_sgd import SampleDP
    from fedforge.runtime.sampling import UniformSampler
    from fedforge.runtime.stragglers import Stragglers
    from fedforge.stages.clip import FixedClip
    from fedforge.stages.dp_noise import LocalGaussian

    devices = Devices(np.ones(10), np.ones(10), np.ones(10))
    common = {"rounds": 1, "clock": ClockSpec(devices), "fedbuff": FedBuff(2, 4)}
    cases = [
        ({"algorithm": FedNova(local=LOCAL)}, "normalizer"),
        ({"algorithm": QFedAvg(local=LOCAL)}, "normalizer"),
        ({"stragglers": Stragglers(0.5, 1)}, "stragglers"),
        ({"stages": [FixedClip(1.0, report_clipped=False), LocalGaussian(1.0, 1e-5)]}, "privacy"),
        ({"sample_dp": SampleDP(1.0, 1.0, 1e-5)}, "DP-SGD"),
        ({"sampler": UniformSampler(4)}, "pass no sampler"),
    ]
    for kwargs, reason in cases:
        with pytest.raises(ConfigError, match=reason):
            simulate(small_mlp(), small_federated, **common, **kwargs)  # type: ignore[arg-type]


def test_fedbuff_progress_counts_the_buffer() -> None:
    """The progress column counts the results in the buffer of the K an update waits for."""
    import io

    from rich.console import Console

    from fedforge.report.listeners import ListenerGroup
    from fedforge.report.progress import ProgressListener
    from tests.report.test_progress import Columns

    data = _federation(6)
    devices = _devices(data, [1.0, 1.3, 1.7, 2.2, 2.9, 3.1])
    progress = ProgressListener(ProgressListener.make_progress(Console(file=io.StringIO())), 4)
    columns = Columns(progress)
    simulate(
        small_mlp(),
        data,
        FedAvg(local=LOCAL),
        rounds=4,
        clock=ClockSpec(devices),
        fedbuff=FedBuff(buffer=3, concurrency=5),
        listener=ListenerGroup([progress, columns]),
    )
    assert columns.seen == ["3/3"] * 4


def test_fedbuff_drops_an_outlying_record_from_its_buffer() -> None:
    """Client 0 sends Gaussian noise of stddev 1e30 every time: with the outlier bound its
    records never reach the model, which trains on the others'."""
    from fedforge.aggregate.guard import OutlierBound
    from fedforge.attacks.simulated import ModelPoisoning

    data = _federation(3)
    result = simulate(
        small_mlp(),
        data,
        FedAvg(local=LOCAL),
        rounds=4,
        clock=ClockSpec(_devices(data, [1.0, 1.5, 2.2])),
        fedbuff=FedBuff(buffer=3, concurrency=3),
        stages=[ModelPoisoning(frozenset({0}), "gaussian", std=1e30)],
        outliers=OutlierBound(10.0),
    )
    assert all(r.clients["refused"] == [0] for r in result.history[1:])
    assert all(np.abs(v).max() < 100 for v in result.state.params.values())  # (finite too)
