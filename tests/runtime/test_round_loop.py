import copy
import logging
from dataclasses import asdict

import numpy as np
import pytest

from fedforge.algorithms.fedavg import FedAvg
from fedforge.core.params import params_equal
from fedforge.core.results import ClientResult
from fedforge.core.rng import Purpose, RngStreams
from fedforge.runtime.sampling import sample_clients
from fedforge.runtime.simulation import simulate
from fedforge.train.local_sgd import LocalSGD
from fedforge.train.torch_model import TorchModel
from tests.conftest import small_mlp

LOCAL = LocalSGD(lr=0.1, epochs=1, batch_size=8)


class MisbehavingFedAvg(FedAvg):
    """Clients 0-6 misbehave in a different way each; 7-9 are honest."""

    def client_update(self, client_id, model, global_params, data, rng):  # type: ignore[no-untyped-def]
        res = super().client_update(client_id, model, global_params, data, rng)
        upd = dict(res.update)
        n = res.num_examples
        name = next(iter(upd))
        if client_id == 0:
            upd[name] = np.full_like(upd[name], np.nan)
        elif client_id == 1:
            upd[name] = np.zeros((1, 1), np.float32)
        elif client_id == 2:
            n = -1
        elif client_id == 3:
            n = len(data) + 1  # claims more examples than it holds
        elif client_id == 4:
            raise RuntimeError("disk on fire")
        elif client_id == 5:
            upd[name] = upd[name].astype(np.float64)
        elif client_id == 6:
            del upd[name]
        return ClientResult(client_id, n, upd, res.train_loss)


def test_bad_results_are_rejected_and_the_round_completes(small_federated, caplog) -> None:  # type: ignore[no-untyped-def]
    model = small_mlp()
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        result = simulate(
            model,
            small_federated,
            MisbehavingFedAvg(local=LOCAL),
            rounds=1,
            clients_per_round=10,
            seed=2,
        )
    rec = result.history[0]
    assert (rec.clients_sampled, rec.clients_completed) == (10, 3)
    assert (rec.clients_failed, rec.clients_rejected) == (1, 6)
    assert "disk on fire" in caplog.text and "Traceback" in caplog.text
    for reason in ["NaN", "shape", "outside", "dtype", "missing"]:
        assert reason in caplog.text

    # The new model is FedAvg over the three honest clients only.
    start = TorchModel(copy.deepcopy(model))
    g = start.get_params()
    honest = FedAvg(local=LOCAL)
    streams = RngStreams(2)
    total = {k: np.zeros(v.shape) for k, v in g.items()}
    weight = 0
    for cid in (7, 8, 9):
        res = honest.client_update(
            cid, start, g, small_federated.client(cid), streams.generator(Purpose.CLIENT, 1, cid)
        )
        for k in total:
            total[k] += res.num_examples * res.update[k]
        weight += res.num_examples
    for k in g:
        np.testing.assert_allclose(result.state.params[k], g[k] + total[k] / weight, atol=1e-6)


def test_a_round_with_no_accepted_update_keeps_the_model(small_federated) -> None:  # type: ignore[no-untyped-def]
    class AllNaN(FedAvg):
        def client_update(self, client_id, model, global_params, data, rng):  # type: ignore[no-untyped-def]
            res = super().client_update(client_id, model, global_params, data, rng)
            return ClientResult(
                client_id,
                res.num_examples,
                {k: np.full_like(v, np.nan) for k, v in res.update.items()},
                0.0,
            )

    model = small_mlp()
    result = simulate(model, small_federated, AllNaN(local=LOCAL), rounds=2, clients_per_round=3)
    assert params_equal(result.state.params, TorchModel(model).get_params())
    assert [r.clients_rejected for r in result.history] == [3, 3]
    assert result.state.round == 2


def _run(data, seed: int):  # type: ignore[no-untyped-def]
    return simulate(
        small_mlp(), data, FedAvg(local=LOCAL), rounds=3, clients_per_round=4, seed=seed
    )


def _without_time(history) -> list[dict]:  # type: ignore[no-untyped-def, type-arg]
    return [{k: v for k, v in asdict(r).items() if k != "wall_seconds"} for r in history]


def test_same_seed_is_bit_identical_and_other_seed_differs(small_federated) -> None:  # type: ignore[no-untyped-def]
    a, b, c = _run(small_federated, 7), _run(small_federated, 7), _run(small_federated, 8)
    assert _without_time(a.history) == _without_time(b.history)
    assert params_equal(a.state.params, b.state.params)
    assert not params_equal(a.state.params, c.state.params)


def test_sampling_is_uniform_without_replacement() -> None:
    rng = np.random.default_rng(0)
    counts = np.zeros(20)
    for _ in range(2000):
        ids = sample_clients(range(20), 5, rng)
        assert len(set(ids)) == 5 and ids == sorted(ids)
        counts[ids] += 1
    np.testing.assert_allclose(counts / 2000, 0.25, atol=0.04)


def test_bytes_are_counted_per_sampled_client(small_federated) -> None:  # type: ignore[no-untyped-def]
    model = small_mlp()
    size = sum(p.numel() * 4 for p in model.state_dict().values())
    rec = simulate(
        model, small_federated, FedAvg(local=LOCAL), rounds=1, clients_per_round=4
    ).history[0]
    assert rec.bytes_down == 4 * size and rec.bytes_up == 4 * size


def test_clients_per_round_larger_than_population_is_rejected(small_federated) -> None:  # type: ignore[no-untyped-def]
    from fedforge.core.errors import ConfigError

    with pytest.raises(ConfigError, match="clients_per_round"):
        simulate(small_mlp(), small_federated, rounds=1, clients_per_round=11)


class FailsMostClients(FedAvg):
    """Only clients 8 and 9 work; the rest raise."""

    def client_update(self, client_id, model, global_params, data, rng):  # type: ignore[no-untyped-def]
        if client_id < 8:
            raise RuntimeError("offline")
        return super().client_update(client_id, model, global_params, data, rng)


def _loop(data, algorithm, per_round: int):  # type: ignore[no-untyped-def]
    from fedforge.runtime.loop import RoundLoop
    from fedforge.runtime.sequential import SequentialBackend

    model = TorchModel(small_mlp())
    streams = RngStreams(0)
    backend = SequentialBackend(algorithm, model, data, streams)
    loop = RoundLoop(algorithm, backend, lambda: range(10), per_round, streams, data.client_size)
    return loop, algorithm.init(model.get_params())


def test_round_is_resampled_until_enough_results(small_federated) -> None:  # type: ignore[no-untyped-def]
    loop, state = _loop(small_federated, FailsMostClients(local=LOCAL), per_round=3)
    attempts = []
    new_state, record = loop.run_round_with_retries(state, 1, 20, lambda: attempts.append(1))
    assert record.clients_completed >= 1 and new_state.round == 1
    assert len(attempts) > 1  # the first samples held no working client (seed 0)


def test_round_fails_cleanly_after_max_retries(small_federated) -> None:  # type: ignore[no-untyped-def]
    from fedforge.core.errors import FedforgeError

    loop, state = _loop(small_federated, FailsMostClients(local=LOCAL), per_round=3)
    with pytest.raises(FedforgeError, match="fewer than 3 accepted results in 3 attempts"):
        loop.run_round_with_retries(state, 3, 2)
