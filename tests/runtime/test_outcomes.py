"""Every runtime classifies every outcome identically: accepted, rejected (a NaN update) and
failed (the client raised), in the fit exchange and in federated evaluation.

Client ``NAN`` holds NaN features, so its update and loss are NaN: the driver rejects it.
Client ``BAD_LABEL`` holds labels outside the model's classes, so cross-entropy raises: the
client failed. The vectorized runtime trains a chunk as one program, so an exception fails
the whole chunk; it is run with ``memory_budget=1`` (one client per chunk), which puts the
failing client alone in its chunk, and with the default budget on the NaN case only.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fedforge
from fedforge.data.datasets import ArrayDataset
from fedforge.data.federated import FederatedDataset
from fedforge.report.history import RoundRecord
from fedforge.runtime.simulation import SimulationResult
from tests.conftest import small_mlp

NAN, BAD_LABEL = 2, 7
OWNS_EXAMPLE_0 = 5  # the client that holds training example 0
LOCAL = fedforge.LocalSGD(lr=0.1, epochs=1, batch_size=8)
RUNTIMES = {
    "sequential": ("sequential", None),
    "workers": ("workers", None),
    "vectorized-one-per-chunk": ("vectorized", fedforge.BackendOptions(memory_budget=1)),
}


def poisoned(
    data: FederatedDataset, clients: tuple[int, ...], nan: int = NAN, bad_label: int = BAD_LABEL
) -> FederatedDataset:
    x, y = data.train.x.copy(), data.train.y.copy()
    if bad_label in clients:
        y[data.partition[bad_label]] = 99
    out = FederatedDataset(ArrayDataset(x, y), data.test, data.partition)
    if nan in clients:  # after the dataset's checks, which refuse NaN features up front
        out.train.x[data.partition[nan]] = np.nan
    return out.with_holdout(0.25, np.random.default_rng(0))


def run(data: FederatedDataset, runtime: str, algorithm: str = "fedavg") -> SimulationResult:
    backend, options = RUNTIMES.get(runtime, (runtime, None))
    algo = (fedforge.Scaffold if algorithm == "scaffold" else fedforge.FedAvg)(local=LOCAL)
    return fedforge.simulate(
        small_mlp(),
        data,
        algo,
        rounds=2,
        clients_per_round=data.num_clients,
        seed=3,
        backend=backend,  # type: ignore[arg-type]
        options=options,
        federated_eval=fedforge.FederatedEvaluation(fraction=1.0),
    )


def comparable(record: RoundRecord) -> dict[str, object]:
    return {k: v for k, v in record.to_dict().items() if not k.endswith("_seconds")}


def assert_same_records(a: SimulationResult, b: SimulationResult) -> None:
    assert len(a.history) == len(b.history)
    for ra, rb in zip(a.history, b.history, strict=True):
        da, db = comparable(ra), comparable(rb)
        assert da.keys() == db.keys()
        for key, va in da.items():
            vb = db[key]
            if key == "metrics":
                assert va.keys() == vb.keys()  # type: ignore[attr-defined]
                for m in va:  # type: ignore[attr-defined]
                    assert vb[m] == pytest.approx(va[m], rel=1e-4, nan_ok=True)  # type: ignore[index]
            elif isinstance(va, float):
                assert vb == pytest.approx(va, rel=1e-4, nan_ok=True), key
            else:
                assert vb == va, key
    for name, value in a.state.params.items():
        np.testing.assert_allclose(b.state.params[name], value, atol=1e-5)


_reference: dict[tuple[tuple[int, ...], str], SimulationResult] = {}


def reference(data: FederatedDataset, clients: tuple[int, ...], algorithm: str) -> SimulationResult:
    key = (clients, algorithm)
    if key not in _reference:
        _reference[key] = run(poisoned(data, clients), "sequential", algorithm)
    return _reference[key]


def test_the_reference_classifies_as_intended(small_federated: FederatedDataset) -> None:
    seq = reference(small_federated, (NAN, BAD_LABEL), "fedavg")
    for rec in seq.history[1:]:
        assert rec.clients == {
            "failed": [BAD_LABEL],
            "rejected": [NAN],
            "fed_eval_failed": [NAN, BAD_LABEL],
        }
        assert (rec.clients_completed, rec.clients_failed, rec.clients_rejected) == (8, 1, 1)
        assert math.isfinite(rec.train_loss)
        assert rec.metrics["fed_eval.clients"] == 8


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
@pytest.mark.parametrize("runtime", ["workers", "vectorized", "vectorized-one-per-chunk", "ray"])
def test_good_rejected_and_failing_clients_are_classified_alike(
    small_federated: FederatedDataset, runtime: str, algorithm: str, request: pytest.FixtureRequest
) -> None:
    if runtime == "ray":
        request.getfixturevalue("ray_cluster")
    clients = (NAN, BAD_LABEL)
    seq = reference(small_federated, clients, algorithm)
    assert_same_records(seq, run(poisoned(small_federated, clients), runtime, algorithm))


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_vectorized_chunks_reject_only_the_nan_client(
    small_federated: FederatedDataset, algorithm: str
) -> None:
    seq = reference(small_federated, (NAN,), algorithm)
    assert seq.history[-1].clients == {"rejected": [NAN], "fed_eval_failed": [NAN]}
    assert_same_records(seq, run(poisoned(small_federated, (NAN,)), "vectorized", algorithm))


def test_vectorized_padding_does_not_read_other_clients_examples(
    small_federated: FederatedDataset,
) -> None:
    bad = OWNS_EXAMPLE_0
    assert 0 in small_federated.partition[bad]
    data = poisoned(small_federated, (bad,), bad_label=bad)
    seq, vec = (run(data, rt) for rt in ("sequential", "vectorized-one-per-chunk"))
    assert seq.history[-1].clients["failed"] == [bad]
    assert_same_records(seq, vec)
