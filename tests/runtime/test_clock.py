"""The virtual clock: durations, deadlines, over-selection, availability, traces."""

from pathlib import Path

import numpy as np
import pytest

from fedforge.algorithms.fedavg import FedAvg
from fedforge.core.errors import ConfigError
from fedforge.data.federated import FederatedDataset
from fedforge.runtime.clock import ClockSpec, schedule_round
from fedforge.runtime.devices import (
    Devices,
    Diurnal,
    Intervals,
    RandomOnOff,
    draw_devices,
    read_trace,
)
from fedforge.runtime.driver import RoundListener
from fedforge.runtime.simulation import simulate
from fedforge.train.program import LocalSGD
from tests.conftest import small_mlp

LOCAL = LocalSGD(lr=0.1, epochs=1, batch_size=8)


def test_durations_match_the_formula_for_hand_set_devices() -> None:
    devices = Devices(
        speed=np.array([2.0, 4.0, 0.5]),
        down=np.array([8e6, 16e6, 1e6]),  # bits per second
        up=np.array([1e6, 2e6, 4e6]),
    )
    seconds = devices.durations([0, 2], np.array([10, 3]), bytes_down=1_000_000, bytes_up=250_000)
    # client 0: 10/2 + 8e6/8e6 + 2e6/1e6 = 5 + 1 + 2; client 2: 3/0.5 + 8e6/1e6 + 2e6/4e6
    np.testing.assert_allclose(seconds, [8.0, 6.0 + 8.0 + 0.5])


def test_schedule_round_deadline_and_over_selection() -> None:
    ids = [3, 5, 7, 9]
    durations = np.array([4.0, 1.0, 9.0, 2.0])
    s = schedule_round(ids, durations, deadline=4.0)
    assert s.kept == [3, 5, 9] and s.dropped == [7] and s.seconds == 4.0
    s = schedule_round(ids, durations, deadline=10.0)
    assert s.dropped == [] and s.seconds == 9.0
    s = schedule_round(ids, durations, keep=2)  # the two fastest; the round ends at the 2nd
    assert s.kept == [5, 9] and s.dropped == [3, 7] and s.seconds == 2.0
    s = schedule_round(ids, durations, deadline=1.5, keep=2)  # too few in time: wait it out
    assert s.kept == [5] and s.seconds == 1.5
    assert schedule_round(ids, durations, deadline=0.5).seconds == 0.5


def _devices_for(data: FederatedDataset, speed: np.ndarray) -> Devices:
    n = data.num_clients
    return Devices(speed, np.full(n, 8e5), np.full(n, 4e5))  # 100 kB/s down, 50 kB/s up


def _expected_seconds(data: FederatedDataset, devices: Devices, down: int, up: int) -> np.ndarray:
    steps = np.array([LOCAL.num_steps(data.client_size(c)) for c in range(data.num_clients)])
    return steps / devices.speed + 8 * down / devices.down + 8 * up / devices.up


def test_deadline_drops_exactly_the_clients_slower_than_it(small_federated) -> None:  # type: ignore[no-untyped-def]
    data = small_federated
    devices = _devices_for(data, np.random.default_rng(0).lognormal(0, 1, data.num_clients))
    # bytes from a run without the clock: the model down, the record up, per client
    plain = simulate(small_mlp(), data, FedAvg(local=LOCAL), rounds=1, clients_per_round=10)
    r = plain.history[1]
    down, up = r.bytes_down // r.clients_sampled, r.bytes_up // r.clients_completed
    expected = _expected_seconds(data, devices, down, up)
    deadline = float(np.median(expected))
    slow = sorted(int(c) for c in np.flatnonzero(expected > deadline))
    assert 0 < len(slow) < 10
    result = simulate(
        small_mlp(),
        data,
        FedAvg(local=LOCAL),
        rounds=2,
        clients_per_round=10,
        clock=ClockSpec(devices, deadline=deadline),
    )
    for i, r in enumerate(result.history[1:], start=1):
        assert r.clients["too_slow"] == slow
        assert r.clients_completed == 10 - len(slow)
        assert r.bytes_up == r.clients_completed * up  # the real record size is the one timed
        assert r.metrics["clock.seconds"] == deadline
        assert r.metrics["clock.time"] == pytest.approx(i * deadline)
    # without a deadline a round lasts as long as its slowest client
    result = simulate(
        small_mlp(),
        data,
        FedAvg(local=LOCAL),
        rounds=1,
        clients_per_round=10,
        clock=ClockSpec(devices),
    )
    assert result.history[1].metrics["clock.seconds"] == pytest.approx(expected.max())
    assert "too_slow" not in result.history[1].clients


def test_over_selection_keeps_the_first_to_finish(small_federated) -> None:  # type: ignore[no-untyped-def]
    data = small_federated
    speed = np.linspace(0.5, 5.0, data.num_clients)[::-1].copy()  # client 0 fastest
    devices = _devices_for(data, speed)
    result = simulate(
        small_mlp(),
        data,
        FedAvg(local=LOCAL),
        rounds=1,
        clients_per_round=10,
        clock=ClockSpec(devices, keep=7),
    )
    r = result.history[1]
    expected = _expected_seconds(data, devices, r.bytes_down // 10, r.bytes_up // 7)
    order = np.argsort(expected, kind="stable")
    assert r.clients_completed == 7
    assert r.clients["too_slow"] == sorted(int(c) for c in order[7:])
    assert r.metrics["clock.seconds"] == pytest.approx(expected[order[6]])


class _Seen(RoundListener):
    def __init__(self) -> None:
        self.clients: set[int] = set()

    def client_done(self, client_id: int, status: str) -> None:
        self.clients.add(client_id)


def test_offline_clients_are_never_sampled(small_federated, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = small_federated
    rows = ["client,speed,down_mbps,up_mbps,online"]
    for c in range(data.num_clients):
        online = "1e9-2e9" if c < 5 else ""  # clients 0-4: online only far in the future
        rows.append(f"{c},{1 + c},1,0.5,{online}")
    trace = tmp_path / "trace.csv"
    trace.write_text("\n".join(rows) + "\n")
    devices = read_trace(trace, data.num_clients, period_seconds=0)
    assert devices.speed[3] == 4.0 and devices.down[3] == 1e6 and devices.up[3] == 5e5
    seen = _Seen()
    result = simulate(
        small_mlp(),
        data,
        FedAvg(local=LOCAL),
        rounds=4,
        clients_per_round=3,
        clock=ClockSpec(devices),
        listener=seen,
    )
    assert seen.clients and seen.clients <= {5, 6, 7, 8, 9}
    assert all(r.clients_sampled == 3 for r in result.history[1:])


def test_a_round_with_nobody_online_lets_time_pass(small_federated) -> None:  # type: ignore[no-untyped-def]
    """Everybody is offline until t = 150 s: the empty rounds last the availability's
    resolution (60 s) instead of zero, so the clock reaches the clients."""
    n = small_federated.num_clients
    later = Intervals(np.arange(n), np.full(n, 150.0), np.full(n, 1e9), np.zeros(n, bool), 0.0)
    devices = Devices(np.ones(n), np.full(n, 1e12), np.full(n, 1e12), later)
    result = simulate(
        small_mlp(),
        small_federated,
        FedAvg(local=LOCAL),
        rounds=4,
        clients_per_round=3,
        clock=ClockSpec(devices),
    )
    h = result.history[1:]
    assert [r.clients_sampled for r in h] == [0, 0, 0, 3]
    assert [r.metrics["clock.seconds"] for r in h[:3]] == [60.0, 60.0, 60.0]


def test_trace_errors_name_the_line(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("client,speed,down_mbps,up_mbps,online\n0,1,1,1,\n0,1,1,1,\n")
    with pytest.raises(ConfigError, match=r"line 3: client 0 .* repeated"):
        read_trace(trace, 2)
    trace.write_text("client,speed,down_mbps,up_mbps,online\n0,1,1,1,5-2\n1,1,1,1,\n")
    with pytest.raises(ConfigError, match="line 2: bad interval '5-2'"):
        read_trace(trace, 2)
    trace.write_text("client,speed,down_mbps,up_mbps,online\n0,1,1,1,\n")
    with pytest.raises(ConfigError, match=r"no row for client\(s\) \[1\]"):
        read_trace(trace, 2)
    trace.write_text("client,speed,up_mbps,online\n0,1,1,\n")
    with pytest.raises(ConfigError, match="missing column"):
        read_trace(trace, 1)


@pytest.mark.parametrize("pattern", ["diurnal", "random"])
def test_drawn_availability_has_the_configured_share(pattern: str) -> None:
    rng = np.random.default_rng(1)
    devices = draw_devices(
        4000, rng, pattern=pattern, online_fraction=0.3, always_on=0.1, speed_sigma=1.0
    )
    assert isinstance(devices.availability, Diurnal | RandomOnOff)
    ids = np.arange(4000)
    shares = [devices.online(ids, t).mean() for t in np.linspace(0, 86_400, 7)]
    # 10% always on, the other 90% online 30% of the time
    assert np.allclose(shares, 0.1 + 0.9 * 0.3, atol=0.03)
    assert np.log(devices.speed).std() == pytest.approx(1.0, abs=0.05)
    again = draw_devices(4000, np.random.default_rng(1), pattern=pattern, online_fraction=0.3)
    assert (again.online(ids, 5000.0) == again.online(ids, 5000.0)).all()


def test_a_resumed_run_continues_the_clock(small_federated, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = small_federated
    speeds = np.random.default_rng(2).lognormal(0, 1, data.num_clients)
    devices = Devices(
        speeds,
        np.full(data.num_clients, 1e6),
        np.full(data.num_clients, 1e6),
        RandomOnOff(seed=5, fraction=0.6, always=np.zeros(data.num_clients, bool), slot=2.0),
    )
    kwargs = {"clients_per_round": 3, "clock": ClockSpec(devices, deadline=3.0)}
    whole = simulate(small_mlp(), data, FedAvg(local=LOCAL), rounds=4, **kwargs)  # type: ignore[arg-type]
    simulate(small_mlp(), data, FedAvg(local=LOCAL), rounds=2, state_dir=tmp_path, **kwargs)  # type: ignore[arg-type]
    resumed = simulate(
        small_mlp(),
        data,
        FedAvg(local=LOCAL),
        rounds=4,
        state_dir=tmp_path,
        resume=True,
        **kwargs,  # type: ignore[arg-type]
    )
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert a.metrics.get("clock.time") == b.metrics.get("clock.time")
        assert a.clients == b.clients
