"""Every backend runs the same algorithm code and gets the same numbers."""

import logging
import os
import signal

import numpy as np
import pytest
import torch

from fedforge.algorithms.fedavg import FedAvg
from fedforge.config import load_config
from fedforge.core.results import ClientResult
from fedforge.experiment import build_algorithm, build_dataset, build_model
from fedforge.runtime.backends import BackendOptions, resolve_backend
from fedforge.runtime.simulation import simulate
from fedforge.train.cohort_mlp import mlp_structure
from fedforge.train.local_sgd import LocalSGD
from tests.conftest import small_mlp

# Ragged on purpose: Dirichlet sizes, a batch size that leaves short last batches, momentum
# and weight decay so every branch of the batched optimizer is compared.
LOCAL = LocalSGD(lr=0.1, epochs=2, batch_size=7, momentum=0.9, weight_decay=1e-3)


def _assert_same(a, b, atol: float = 1e-5) -> None:  # type: ignore[no-untyped-def]
    for name in a.state.params:
        np.testing.assert_allclose(a.state.params[name], b.state.params[name], atol=atol)
    for ra, rb in zip(a.history, b.history, strict=True):
        assert (ra.clients_completed, ra.clients_failed) == (
            rb.clients_completed,
            rb.clients_failed,
        )
        assert ra.train_loss == pytest.approx(rb.train_loss, rel=1e-4)
        assert ra.test_loss == pytest.approx(rb.test_loss, rel=1e-4)


def tanh_net() -> torch.nn.Module:
    """Not a Linear/ReLU stack, so the vectorized backend takes the generic vmap path."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


@pytest.mark.parametrize(
    "local", [LOCAL, LocalSGD(lr=0.2, epochs=1, batch_size=5)], ids=["momentum-wd", "plain-sgd"]
)
@pytest.mark.parametrize("make_model", [small_mlp, tanh_net], ids=["mlp-fused", "tanh-vmap"])
@pytest.mark.parametrize("backend", ["vectorized", "workers"])
def test_backend_equals_sequential_on_ragged_dirichlet(  # type: ignore[no-untyped-def]
    small_federated, backend: str, make_model, local: LocalSGD
) -> None:
    sizes = [small_federated.client_size(c) for c in range(10)]
    assert max(sizes) > 3 * min(sizes)  # really ragged
    kwargs = dict(rounds=3, clients_per_round=6, seed=4)
    seq = simulate(
        make_model(), small_federated, FedAvg(local=local), backend="sequential", **kwargs
    )  # type: ignore[arg-type]
    other = simulate(make_model(), small_federated, FedAvg(local=local), backend=backend, **kwargs)  # type: ignore[arg-type]
    assert other.backend == backend
    _assert_same(seq, other)


def test_mlp_structure_detection() -> None:
    assert mlp_structure(small_mlp()) is not None
    assert mlp_structure(tanh_net()) is None
    relu_last = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    assert mlp_structure(relu_last) is None
    layers = mlp_structure(torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False)))
    assert layers is not None and layers[0].bias is None


def test_vectorized_chunks_do_not_change_results(small_federated) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(rounds=2, clients_per_round=10, seed=1, backend="vectorized")
    whole = simulate(small_mlp(), small_federated, FedAvg(local=LOCAL), **kwargs)  # type: ignore[arg-type]
    tiny = simulate(
        small_mlp(),
        small_federated,
        FedAvg(local=LOCAL),
        options=BackendOptions(memory_budget=1),
        **kwargs,
    )  # type: ignore[arg-type]
    _assert_same(whole, tiny, atol=1e-6)


def test_vectorized_equals_sequential_on_the_default_workload() -> None:
    cfg = load_config(None, ["server.rounds=1", "client.epochs=1"])
    data = build_dataset(cfg)
    runs = [
        simulate(
            build_model(cfg, data),
            data,
            build_algorithm(cfg),
            rounds=1,
            clients_per_round=10,
            seed=cfg.seed,
            backend=b,
        )
        for b in ("sequential", "vectorized")
    ]
    _assert_same(*runs)


class KillsItsWorker(FedAvg):
    """Client 3's process dies mid-round (as an OOM kill or segfault would)."""

    def client_update(self, client_id, model, global_params, data, rng):  # type: ignore[no-untyped-def]
        if client_id == 3 and os.environ.get("FEDFORGE_TEST_KILL") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        return super().client_update(client_id, model, global_params, data, rng)


def test_killed_worker_fails_its_client_and_is_replaced(
    small_federated, caplog, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FEDFORGE_TEST_KILL", "1")
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        result = simulate(
            small_mlp(),
            small_federated,
            KillsItsWorker(local=LOCAL),
            rounds=2,
            clients_per_round=10,
            seed=0,
            backend="workers",
        )
    for rec in result.history:  # client 3 dies every round; the other nine complete
        assert (rec.clients_completed, rec.clients_failed) == (9, 1)
    assert "worker process died" in caplog.text and "replacement" in caplog.text


def test_worker_client_exception_is_reported_with_traceback(small_federated, caplog) -> None:  # type: ignore[no-untyped-def]
    class Raises(FedAvg):
        def client_update(self, client_id, model, global_params, data, rng):  # type: ignore[no-untyped-def]
            if client_id == 0:
                raise ValueError("bad sensor data")
            return super().client_update(client_id, model, global_params, data, rng)

    with caplog.at_level(logging.WARNING, logger="fedforge"):
        result = simulate(
            small_mlp(),
            small_federated,
            Raises(local=LOCAL),
            rounds=1,
            clients_per_round=10,
            backend="workers",
        )
    assert result.history[0].clients_failed == 1
    assert "ValueError: bad sensor data" in caplog.text and "Traceback" in caplog.text


def test_workers_reject_updates_that_do_not_match_the_model(small_federated) -> None:  # type: ignore[no-untyped-def]
    class WrongShape(FedAvg):
        def client_update(self, client_id, model, global_params, data, rng):  # type: ignore[no-untyped-def]
            res = super().client_update(client_id, model, global_params, data, rng)
            upd = {k: np.zeros(3, np.float32) for k in res.update}
            return ClientResult(client_id, res.num_examples, upd, res.train_loss)

    result = simulate(
        small_mlp(),
        small_federated,
        WrongShape(local=LOCAL),
        rounds=1,
        clients_per_round=4,
        backend="workers",
    )
    assert result.history[0].clients_completed == 0


def test_auto_picks_vectorized_when_possible_and_says_why_not(caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO, logger="fedforge"):
        assert resolve_backend("auto", FedAvg(), small_mlp()) == "vectorized"
        dropout = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5))
        assert resolve_backend("auto", FedAvg(), dropout) == "workers"
        assert "dropout" in caplog.text
        batchnorm = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
        assert resolve_backend("auto", FedAvg(), batchnorm) == "workers"
        assert resolve_backend("auto", KillsItsWorker(), small_mlp()) == "workers"
        assert "custom client code" in caplog.text
        custom_loss = FedAvg(local=LocalSGD(loss_fn=torch.nn.functional.nll_loss))
        assert resolve_backend("auto", custom_loss, small_mlp()) == "workers"


def test_ray_backend_end_to_end(small_federated) -> None:  # type: ignore[no-untyped-def]
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'fedforge[ray]')")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"Ray cannot start here: {exc}")
    try:
        kwargs = dict(rounds=2, clients_per_round=5, seed=3)
        seq = simulate(
            small_mlp(), small_federated, FedAvg(local=LOCAL), backend="sequential", **kwargs
        )  # type: ignore[arg-type]
        on_ray = simulate(
            small_mlp(), small_federated, FedAvg(local=LOCAL), backend="ray", **kwargs
        )  # type: ignore[arg-type]
        _assert_same(seq, on_ray)
    finally:
        ray.shutdown()
