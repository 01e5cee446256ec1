"""Simulated stragglers: an exact, seeded share of each round runs partial work or is dropped."""

import numpy as np

from fedforge.algorithms.fedavg import FedAvg
from fedforge.algorithms.fednova import FedNova
from fedforge.core.records import FIT, Task
from fedforge.core.rng import RngStreams
from fedforge.runtime.client_app import ClientApp
from fedforge.runtime.clock import ClockSpec, VirtualClock
from fedforge.runtime.devices import Devices
from fedforge.runtime.simulation import simulate
from fedforge.runtime.stragglers import Stragglers
from fedforge.train.program import WORK_EPOCHS, LocalSGD
from tests.conftest import small_mlp

LOCAL = LocalSGD(lr=0.1, epochs=4, batch_size=5)


def tasks(round_number: int = 1, count: int = 10) -> list[Task]:
    return [Task(FIT, round_number, c, c, {}) for c in range(count)]


def test_an_exact_seeded_share_runs_one_to_e_epochs() -> None:
    plan = Stragglers(0.5, epochs=4)
    out, ids = plan.assign(tasks(), RngStreams(0))
    assert len(ids) == 5 and len(out) == 10
    work = {t.client_id: t.scalars[WORK_EPOCHS] for t in out if WORK_EPOCHS in t.scalars}
    assert sorted(work) == ids and all(1 <= e <= 4 for e in work.values())
    again, again_ids = plan.assign(tasks(), RngStreams(0))
    assert again == out and again_ids == ids  # deterministic from the run seed
    assert plan.assign(tasks(round_number=2), RngStreams(0))[1] != ids  # a new draw per round


def test_drop_leaves_the_stragglers_out() -> None:
    out, ids = Stragglers(0.9, epochs=4, drop=True).assign(tasks(), RngStreams(0))
    assert len(ids) == 9 and [t.client_id for t in out] == sorted(set(range(10)) - set(ids))


def test_a_straggler_takes_fewer_local_steps(small_federated) -> None:  # type: ignore[no-untyped-def]
    """FedNova's record carries the steps taken: a 1-epoch straggler takes a quarter."""
    app = ClientApp(FedNova(local=LOCAL), small_mlp())
    shared = {n: p.detach().numpy() for n, p in small_mlp().named_parameters()}
    data = small_federated.client_data(0)
    full, _ = app.fit(Task(FIT, 1, 0, 7, shared), data, None)
    part, _ = app.fit(Task(FIT, 1, 0, 7, shared, {WORK_EPOCHS: 1.0}), data, None)
    assert full.arrays["fednova/steps"][0] == 4 * part.arrays["fednova/steps"][0]


def test_rounds_record_stragglers_and_drops(small_federated) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(rounds=2, clients_per_round=10, seed=0)
    dropped = simulate(
        small_mlp(),
        small_federated,
        FedAvg(local=LOCAL),
        stragglers=Stragglers(0.5, 4, drop=True),
        **kwargs,
    )  # type: ignore[arg-type]
    partial = simulate(
        small_mlp(), small_federated, FedAvg(local=LOCAL), stragglers=Stragglers(0.5, 4), **kwargs
    )  # type: ignore[arg-type]
    none = simulate(
        small_mlp(), small_federated, FedAvg(local=LOCAL), stragglers=Stragglers(0.0, 4), **kwargs
    )  # type: ignore[arg-type]
    plain = simulate(small_mlp(), small_federated, FedAvg(local=LOCAL), **kwargs)  # type: ignore[arg-type]
    r = dropped.history[1]
    assert len(r.clients["dropped_stragglers"]) == 5 and r.clients_completed == 5
    assert len(partial.history[1].clients["stragglers"]) == 5
    assert partial.history[1].clients_completed == 10
    for name, value in plain.state.params.items():
        np.testing.assert_array_equal(none.state.params[name], value)
        assert not np.allclose(partial.state.params[name], value)


def test_the_clock_times_a_straggler_by_its_partial_work(small_federated) -> None:  # type: ignore[no-untyped-def]
    """Full work (5 epochs) takes 10 simulated seconds on every device, one epoch 2: with a
    2.5 s deadline exactly the stragglers that drew one epoch make it; everyone else,
    full-work clients included, is too slow."""
    local = LocalSGD(lr=0.1, epochs=5, batch_size=5)
    n = small_federated.num_clients
    full_steps = np.array([local.num_steps(small_federated.client_size(c)) for c in range(n)])
    fast_link = np.full(n, 1e15)  # transfers take no time
    devices = Devices(full_steps / 10.0, fast_link, fast_link)
    plan, seed, rounds = Stragglers(0.5, 5), 3, 4
    result = simulate(
        small_mlp(),
        small_federated,
        FedAvg(local=local),
        rounds=rounds,
        clients_per_round=n,
        seed=seed,
        stragglers=plan,
        clock=ClockSpec(devices, deadline=2.5),
    )
    kept_stragglers = 0
    for record in result.history[1:]:
        work, _ = plan.assign(tasks(record.round, n), RngStreams(seed))
        one_epoch = {t.client_id for t in work if t.scalars.get(WORK_EPOCHS) == 1.0}
        assert set(record.clients["too_slow"]) == set(range(n)) - one_epoch
        assert record.clients_completed == len(one_epoch)
        kept_stragglers += len(one_epoch)
    assert kept_stragglers > 0  # (the seed draws one-epoch stragglers)
    clock = VirtualClock(
        devices,
        lambda c, e: FedAvg(local=local).program().num_steps(small_federated.client_size(c), e),
    )
    np.testing.assert_allclose(clock.durations([3, 3], 0, 0, epochs=[1, None]), [2.0, 10.0])


def test_a_dp_sgd_straggler_runs_and_accounts_its_partial_work(small_federated) -> None:  # type: ignore[no-untyped-def]
    """DP-SGD honours a straggler's epochs: a quarter of the steps, in its ledger too."""
    from fedforge.privacy.dp_sgd import SampleDP
    from fedforge.runtime.client_app import DP_SGD_STEPS

    app = ClientApp(FedAvg(local=LOCAL), small_mlp(), sample_dp=SampleDP(1.0, 1.0, 1e-5))
    shared = {n: p.detach().numpy() for n, p in small_mlp().named_parameters()}
    data = small_federated.client_data(0)
    _, full = app.fit(Task(FIT, 1, 0, 7, shared), data, None)
    _, part = app.fit(Task(FIT, 1, 0, 7, shared, {WORK_EPOCHS: 1.0}), data, None)
    assert full is not None and part is not None
    assert int(full[DP_SGD_STEPS][0]) == 4 * int(part[DP_SGD_STEPS][0]) > 0
