"""FedPer and Ditto: personal state that never leaves the client, evaluated beside the
global model; all runtimes agree."""

import numpy as np
import pytest

from fedforge.algorithms.base import Algorithm
from fedforge.algorithms.ditto import PERSONAL, Ditto
from fedforge.algorithms.fedavg import FedAvg
from fedforge.algorithms.fednova import FedNova
from fedforge.algorithms.fedper import HEAD, FedPer, head_names
from fedforge.algorithms.fedrep import FedRep
from fedforge.algorithms.qfedavg import QFedAvg
from fedforge.core.records import FIT, Task
from fedforge.data.federated import FederatedDataset
from fedforge.runtime.client_app import LATEST, ClientApp
from fedforge.runtime.client_state import MemoryStateStore
from fedforge.runtime.driver import FederatedEvaluation
from fedforge.runtime.simulation import simulate
from fedforge.runtime.stragglers import Stragglers
from fedforge.train.program import LocalSGD
from tests.conftest import small_mlp

LOCAL = LocalSGD(lr=0.1, epochs=2, batch_size=7)
NAMES = [n for n, _ in small_mlp().named_parameters()]
HEAD_NAMES = head_names(NAMES, 1)  # ("2.weight", "2.bias")


@pytest.fixture
def with_holdout(small_federated: FederatedDataset) -> FederatedDataset:
    return small_federated.with_holdout(0.3, np.random.default_rng(0))


def global_params() -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in small_mlp().named_parameters()}


def fit(algo: Algorithm, data: FederatedDataset, state: dict | None, lr: float = 0.1):  # type: ignore[no-untyped-def,type-arg]
    app = ClientApp(algo, small_mlp())
    task = Task(FIT, 1, 0, 123, global_params())
    return app.fit(task, data.client_data(0), state)


def test_head_names_are_the_last_layers() -> None:
    assert HEAD_NAMES == ("2.weight", "2.bias")
    assert head_names(NAMES, 1) == head_names(["0.weight", "0.bias", *HEAD_NAMES], 1)
    with pytest.raises(ValueError, match="layers"):
        head_names(NAMES, 2)


def test_fedper_head_never_leaves_the_client(with_holdout: FederatedDataset) -> None:
    algo = FedPer(local=LOCAL, head=HEAD_NAMES)
    record, state = fit(algo, with_holdout, None)
    assert set(record.arrays) == {"0.weight", "0.bias"}  # the body only
    assert state is not None and set(state) == {HEAD + n for n in HEAD_NAMES}
    start = global_params()
    assert not np.allclose(state[HEAD + "2.weight"], start["2.weight"])  # trained locally
    spec = algo.record_spec({n: None for n in NAMES}, NAMES)  # type: ignore[misc]
    assert set(spec.arrays) == {"0.weight", "0.bias"}


def test_fedper_training_starts_from_the_clients_own_head(with_holdout: FederatedDataset) -> None:
    """With lr 0 nothing moves: the head that comes back is the one the client kept."""
    algo = FedPer(local=LocalSGD(lr=0.0, epochs=1, batch_size=7), head=HEAD_NAMES)
    rng = np.random.default_rng(1)
    own = {
        HEAD + n: rng.normal(size=global_params()[n].shape).astype(np.float32) for n in HEAD_NAMES
    }
    _, state = fit(algo, with_holdout, own)
    assert state is not None
    for key, value in own.items():
        np.testing.assert_allclose(state[key], value, atol=1e-6)


def test_fedper_head_persists_across_rounds(with_holdout: FederatedDataset) -> None:
    store = MemoryStateStore()
    algo = FedPer(local=LOCAL, head=HEAD_NAMES)
    result = simulate(
        small_mlp(), with_holdout, algo, rounds=3, clients_per_round=10, client_states=store
    )
    start = global_params()
    for name in HEAD_NAMES:  # the server's head never moves
        np.testing.assert_array_equal(result.state.params[name], start[name])
    heads = [store.get(c, LATEST) for c in range(10)]
    assert all(h is not None for h in heads)
    # Every client kept its own head, different from the others' and from the global one.
    w = [h[HEAD + "2.weight"] for h in heads]  # type: ignore[index]
    assert not np.allclose(w[0], w[1]) and not np.allclose(w[0], start["2.weight"])


def test_ditto_large_lambda_keeps_the_personal_model_at_the_global_one(
    with_holdout: FederatedDataset,
) -> None:
    record, state = fit(Ditto(local=LOCAL, lam=1e9), with_holdout, None)
    avg, _ = fit(FedAvg(local=LOCAL), with_holdout, None)
    assert set(record.arrays) == set(NAMES)  # the global copy's change only
    for name in NAMES:  # the global copy trains exactly as FedAvg's
        np.testing.assert_allclose(record.arrays[name], avg.arrays[name], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(state[PERSONAL + name], global_params()[name], atol=1e-6)  # type: ignore[index]


def test_ditto_zero_lambda_is_local_training(with_holdout: FederatedDataset) -> None:
    """lambda = 0: the personal copy, started at the global model, is FedAvg's local model."""
    record, state = fit(Ditto(local=LOCAL, lam=0.0), with_holdout, None)
    start = global_params()
    for name in NAMES:
        local = start[name] + record.arrays[name]
        np.testing.assert_allclose(state[PERSONAL + name], local, rtol=1e-5, atol=1e-6)  # type: ignore[index]


@pytest.mark.parametrize("personal", [FedPer, FedRep])
def test_personalized_evaluation_reports_global_and_personal_accuracy(
    with_holdout: FederatedDataset, personal: type[FedPer]
) -> None:
    result = simulate(
        small_mlp(),
        with_holdout,
        personal(local=LOCAL, head=HEAD_NAMES),
        rounds=4,
        clients_per_round=10,
        federated_eval=FederatedEvaluation(1.0),
    )
    m = result.history[-1].metrics
    for key in ("accuracy", "personal_accuracy"):
        assert 0 <= m[f"fed_eval.{key}.worst10"] <= m[f"fed_eval.{key}.client_mean"] <= 1
    # The global model keeps its untrained head; each client's own head fits its labels.
    assert m["fed_eval.personal_accuracy"] > m["fed_eval.accuracy"]


ALGORITHMS = {
    "fednova": FedNova(local=LOCAL),
    "qfedavg": QFedAvg(local=LOCAL, q=1.0),
    "fedper": FedPer(local=LOCAL, head=HEAD_NAMES),
    "ditto": Ditto(local=LOCAL, lam=0.5),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_sequential_and_vectorized_agree(with_holdout: FederatedDataset, name: str) -> None:
    """With partial work for half the clients, too (different step counts per client)."""
    results = [
        simulate(
            small_mlp(),
            with_holdout,
            ALGORITHMS[name],
            rounds=2,
            clients_per_round=6,
            seed=4,
            backend=backend,  # type: ignore[arg-type]
            federated_eval=FederatedEvaluation(1.0),
            stragglers=Stragglers(0.5, LOCAL.epochs),
        )
        for backend in ("sequential", "vectorized")
    ]
    seq, vec = results
    for param, value in seq.state.params.items():
        np.testing.assert_allclose(vec.state.params[param], value, rtol=1e-4, atol=1e-5)
    for key, value in seq.history[-1].metrics.items():
        assert vec.history[-1].metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
