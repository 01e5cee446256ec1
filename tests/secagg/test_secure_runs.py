"""Secure aggregation through the driver, on every runtime: the same model as the plain
weighted mean, dropouts at every step recovered, too many dropouts abort with the model
unchanged, and impossible configurations refused when they load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fedforge
from fedforge.aggregate.kinds import Aggregation, WeightedMean
from fedforge.algorithms.fedavg import FedAvg
from fedforge.core.errors import ConfigError
from fedforge.core.params import Params, spec_of
from fedforge.core.records import FIT, Record, Task
from fedforge.core.rng import RngStreams
from fedforge.data.federated import ClientData, FederatedDataset
from fedforge.report.history import History
from fedforge.runtime.backends import BackendOptions
from fedforge.runtime.client_app import ClientApp
from fedforge.runtime.client_state import MemoryStateStore
from fedforge.runtime.driver import Driver
from fedforge.runtime.sampling import UniformSampler
from fedforge.runtime.sequential import SequentialTransport
from fedforge.secagg.aggregation import SecureAggregation
from fedforge.secagg.client import Answer, SecAggClient
from fedforge.secagg.protocol import ADVERTISE, MASK, SHARE, STEPS, UNMASK, SecAggParams
from fedforge.secagg.session import Session
from fedforge.train.program import LocalSGD
from fedforge.train.torch_model import TorchModel
from tests.conftest import small_mlp

LOCAL = LocalSGD(lr=0.1, epochs=1, batch_size=8)
ATOL = 1e-5  # fixed-point rounding of 10 records at 20+ fractional bits, and float32


def run(data: FederatedDataset, aggregation: Aggregation, backend: str, rounds: int = 3):  # type: ignore[no-untyped-def]
    return fedforge.simulate(
        small_mlp(),
        data,
        FedAvg(local=LOCAL, server_optimizer=fedforge.FedAdam(lr=0.01)),
        rounds=rounds,
        clients_per_round=8,
        seed=3,
        backend=backend,  # type: ignore[arg-type]
        aggregation=aggregation,
    )


@pytest.mark.parametrize("backend", ["sequential", "vectorized", "workers"])
def test_secure_sum_gives_the_weighted_mean_on_every_runtime(
    small_federated: FederatedDataset, backend: str
) -> None:
    plain = run(small_federated, WeightedMean(), "sequential")
    secure = run(small_federated, SecureAggregation(), backend)
    for name, value in plain.state.params.items():
        np.testing.assert_allclose(secure.state.params[name], value, atol=ATOL)
    last = secure.history[-1]
    assert last.clients_completed == 8 and last.metrics["secagg.threshold"] >= 5
    assert last.labels == plain.history[-1].labels
    # Masked uint32 words replace float32 ones, plus keys and shares, both ways.
    assert last.bytes_up > plain.history[-1].bytes_up
    assert last.bytes_down > plain.history[-1].bytes_down


class Vanishing(ClientApp):
    """Clients that vanish at one step of the round (their task raises, like a crash)."""

    def __init__(self, step: str, clients: set[int], **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.step, self.clients = step, clients

    def handle(
        self, task: Task, data: ClientData, state: Params | None
    ) -> tuple[Record, Params | None]:
        if task.stage == self.step and task.client_id in self.clients:
            raise ConnectionError(f"client {task.client_id} vanished at {task.stage}")
        return super().handle(task, data, state)


def one_round(data: FederatedDataset, step: str, gone: set[int], secure: bool):  # type: ignore[no-untyped-def]
    algorithm = FedAvg(local=LOCAL)
    module = small_mlp()
    params = TorchModel(module).get_params()
    app = Vanishing(
        step,
        gone,
        algorithm=algorithm,
        module=module,
        secure=SecAggClient() if secure else None,
    )
    store = MemoryStateStore()
    driver = Driver(
        algorithm=algorithm,
        transport=SequentialTransport(app, data, store),
        sampler=UniformSampler(10),
        streams=RngStreams(0),
        model_spec=spec_of(params),
        trainable=app.trainable,
        population=lambda: range(data.num_clients),
        population_size=lambda: data.num_clients,
        example_cap=lambda cid, stage: data.client_size(cid),
        client_states=store,
        aggregation=SecureAggregation(SecAggParams(complete=True)) if secure else WeightedMean(),
    )
    history = History()
    state = driver.run(algorithm.init(params), 1, history)
    return state, history[-1], params, store


@pytest.mark.parametrize("step", [FIT, *STEPS])
def test_dropouts_at_each_step_leave_the_survivors_mean(
    small_federated: FederatedDataset, step: str
) -> None:
    gone = {2, 5}
    state, record, _, store = one_round(small_federated, step, gone, secure=True)
    survivors = sorted(set(range(10)) - gone) if step != UNMASK else list(range(10))
    assert record.clients_completed == len(survivors)
    # The same survivors' records averaged in the clear: the same model.
    in_sum = set(range(10)) - set(survivors)
    plain_state, _, _, _ = one_round(small_federated, FIT, in_sum, secure=False)
    for name, value in plain_state.params.items():
        np.testing.assert_allclose(state.params[name], value, atol=ATOL)
    if step != FIT:
        assert record.clients["secagg_failed"] == sorted(gone)
        assert record.clients.get("secagg_dropped", []) == sorted(in_sum)
    # No record is left behind in any client's state once the round is over (a client that
    # vanished after masking keeps only its spent session keys, dropped at its next fit).
    for cid in range(10):
        left = store.get(cid, 99) or {}
        assert not any(k.startswith("secagg/record/") for k in left)
        assert cid in gone or not left


def test_too_many_dropouts_abort_and_leave_the_model_unchanged(
    small_federated: FederatedDataset,
) -> None:
    state, record, initial, _ = one_round(small_federated, SHARE, set(range(5)), secure=True)
    assert record.clients_completed == 0 and record.clients["secagg_dropped"] == list(range(10))
    for name, value in initial.items():
        np.testing.assert_array_equal(state.params[name], value)
    assert np.isnan(record.train_loss) or record.train_loss > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (['update.codec="q8"'], "cannot follow update.codec"),
        (['privacy.mode="local"', "privacy.noise_multiplier=1.0"], "privacy.mode = 'central'"),
        (['attack.kind="alie"'], "hides from the server"),
        (
            ["secagg.clip_norm=1000.0", "partition.num_clients=10000", 'server.sampler="poisson"'],
            "ring_bits = 64",
        ),
    ],
)
def test_impossible_secure_configurations_are_refused_at_load(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        fedforge.load_config(None, ['aggregation.kind="secure_sum"', *overrides])


def test_secure_sum_config_runs_with_central_dp() -> None:
    config = fedforge.load_config(
        None,
        [
            'aggregation.kind="secure_sum"',
            'privacy.mode="central"',
            "privacy.noise_multiplier=1.0",
            "partition.num_clients=40",
            "server.clients_per_round=10",
            "server.rounds=2",
            "client.epochs=1",
            'data.dataset="digits"',
        ],
    )
    from fedforge.experiment import build_dataset, simulate_config

    result = simulate_config(config, build_dataset(config), backend="sequential")
    last = result.history[-1]
    assert last.metrics["dp.releases"] == 2 and last.metrics["secagg.threshold"] >= 5
    assert last.clients_completed == 10


def test_no_session_secret_is_written_to_a_simulation_state_dir(
    small_federated: FederatedDataset, tmp_path: Path
) -> None:
    fedforge.simulate(
        small_mlp(),
        small_federated,
        FedAvg(local=LOCAL),
        rounds=2,
        clients_per_round=5,
        aggregation=SecureAggregation(),
        state_dir=tmp_path,
    )
    files = [f for f in (tmp_path / "clients").rglob("*") if f.is_file()]
    assert files  # client state was written (the slot file and its layout) ...
    assert not any(b"secagg/" in f.read_bytes() for f in files)  # ... but no session


def test_the_vectorized_runtime_runs_each_step_once_per_chunk(
    small_federated: FederatedDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each secure-aggregation step is one chunk of the round's clients; the mask step's
    chunks hold their masked inputs within the memory budget; the mean is unchanged."""
    chunks: dict[str, list[int]] = {}
    real = SecAggClient.handle_chunk

    def spy(self: SecAggClient, tasks: list[Task], sessions: list[Session | None]) -> list[Answer]:
        chunks.setdefault(tasks[0].stage, []).append(len(tasks))
        return real(self, tasks, sessions)

    monkeypatch.setattr(SecAggClient, "handle_chunk", spy)
    record_bytes = 4 * sum(p.numel() for p in small_mlp().parameters())
    secure = fedforge.simulate(
        small_mlp(),
        small_federated,
        FedAvg(local=LOCAL, server_optimizer=fedforge.FedAdam(lr=0.01)),
        rounds=1,
        clients_per_round=8,
        seed=3,
        backend="vectorized",
        options=BackendOptions(memory_budget=3 * 2 * record_bytes),  # 3 masked inputs
        aggregation=SecureAggregation(),
    )
    assert chunks == {ADVERTISE: [8], SHARE: [8], MASK: [3, 3, 2], UNMASK: [8]}
    plain = run(small_federated, WeightedMean(), "sequential", rounds=1)
    for name, value in plain.state.params.items():
        np.testing.assert_allclose(secure.state.params[name], value, atol=ATOL)
