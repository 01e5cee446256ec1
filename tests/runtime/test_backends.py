"""Every backend runs the same client app and gets the same numbers."""

import logging
import os
import signal

import numpy as np
import pytest
import torch

import fedforge
from fedforge.config import load_config
from fedforge.core.errors import FedforgeError
from fedforge.core.records import FIT, ClientFailure, Record, Task
from fedforge.experiment import build_algorithm, build_dataset, build_model
from fedforge.runtime import workers as workers_module
from fedforge.runtime.backends import BackendOptions, resolve_backend
from fedforge.runtime.client_app import ClientApp
from fedforge.runtime.client_state import MemoryStateStore
from fedforge.runtime.driver import FederatedEvaluation, RoundListener
from fedforge.runtime.sequential import SequentialTransport
from fedforge.runtime.workers import WorkerPoolTransport
from fedforge.train.cohort_mlp import mlp_structure
from fedforge.train.torch_model import TorchModel
from tests.conftest import small_mlp

# Ragged on purpose: Dirichlet sizes, a batch size that leaves short last batches, momentum
# and weight decay so every branch of the batched optimizer is compared.
LOCAL = fedforge.LocalSGD(lr=0.1, epochs=2, batch_size=7, momentum=0.9, weight_decay=1e-3)


def assert_same(a, b, atol: float = 1e-5) -> None:  # type: ignore[no-untyped-def]
    for name in a.state.params:
        np.testing.assert_allclose(a.state.params[name], b.state.params[name], atol=atol)
    for ra, rb in zip(a.history, b.history, strict=True):
        assert (ra.clients_completed, ra.clients_failed, ra.clients_rejected) == (
            rb.clients_completed,
            rb.clients_failed,
            rb.clients_rejected,
        )
        assert ra.train_loss == pytest.approx(rb.train_loss, rel=1e-4, nan_ok=True)
        assert ra.test_loss == pytest.approx(rb.test_loss, rel=1e-4)


def tanh_net() -> torch.nn.Module:
    """Not a Linear/ReLU chain, so the vectorized backend takes the generic vmap path."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


@pytest.mark.parametrize(
    "local",
    [LOCAL, fedforge.LocalSGD(lr=0.2, epochs=1, batch_size=5)],
    ids=["momentum-wd", "plain-sgd"],
)
@pytest.mark.parametrize("make_model", [small_mlp, tanh_net], ids=["mlp-fused", "tanh-vmap"])
@pytest.mark.parametrize("backend", ["vectorized", "workers"])
def test_backend_equals_sequential_on_ragged_dirichlet(  # type: ignore[no-untyped-def]
    small_federated, backend, make_model, local
) -> None:
    sizes = [small_federated.client_size(c) for c in range(10)]
    assert max(sizes) > 3 * min(sizes)  # really ragged
    kwargs = dict(rounds=3, clients_per_round=6, seed=4)
    seq = fedforge.simulate(
        make_model(), small_federated, fedforge.FedAvg(local=local), backend="sequential", **kwargs
    )
    other = fedforge.simulate(
        make_model(), small_federated, fedforge.FedAvg(local=local), backend=backend, **kwargs
    )
    assert other.backend == backend
    assert_same(seq, other)


class TwoLayer(torch.nn.Module):
    """A custom module (not nn.Sequential) whose forward is fc1 -> relu -> fc2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Residual(TwoLayer):
    """Same parameters, but a skip connection: not a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.fc2 = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + h


def test_mlp_structure_detection() -> None:
    assert mlp_structure(small_mlp()) is not None
    assert mlp_structure(tanh_net()) is None
    relu_last = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    assert mlp_structure(relu_last) is None
    layers = mlp_structure(torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False)))
    assert layers is not None and layers[0].bias is None


def test_mlp_structure_is_read_from_an_fx_trace_of_custom_modules() -> None:
    layers = mlp_structure(TwoLayer())
    assert layers is not None
    assert [(layer.weight, layer.bias, layer.relu) for layer in layers] == [
        ("fc1.weight", "fc1.bias", True),
        ("fc2.weight", "fc2.bias", False),
    ]
    assert mlp_structure(Residual()) is None


def test_custom_mlp_module_trains_fused_and_equals_sequential(small_federated) -> None:  # type: ignore[no-untyped-def]
    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return TwoLayer()

    kwargs = dict(rounds=2, clients_per_round=5, seed=2)
    runs = [
        fedforge.simulate(
            make(), small_federated, fedforge.FedAvg(local=LOCAL), backend=b, **kwargs
        )
        for b in ("sequential", "vectorized")
    ]
    assert_same(*runs)


def test_vectorized_chunks_do_not_change_results(small_federated) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(rounds=2, clients_per_round=10, seed=1, backend="vectorized")
    whole = fedforge.simulate(small_mlp(), small_federated, fedforge.FedAvg(local=LOCAL), **kwargs)
    tiny = fedforge.simulate(
        small_mlp(),
        small_federated,
        fedforge.FedAvg(local=LOCAL),
        options=BackendOptions(memory_budget=1),
        **kwargs,
    )
    assert_same(whole, tiny, atol=1e-6)


def test_vectorized_equals_sequential_on_the_default_workload() -> None:
    cfg = load_config(None, ["server.rounds=1", "client.epochs=1"])
    data = build_dataset(cfg)
    runs = [
        fedforge.simulate(
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
    assert_same(*runs)


# Worker pool ----------------------------------------------------------------------------------
PARENT = os.getpid()
_fit = ClientApp.fit


def _in_worker() -> bool:
    return os.getpid() != PARENT


def test_killed_worker_fails_its_client_and_is_replaced(  # type: ignore[no-untyped-def]
    small_federated, caplog, monkeypatch
) -> None:
    def fit(self, task, data, state):  # type: ignore[no-untyped-def]
        if task.client_id == 3 and _in_worker():  # as an OOM kill or a segfault would
            os.kill(os.getpid(), signal.SIGKILL)
        return _fit(self, task, data, state)

    monkeypatch.setattr(ClientApp, "fit", fit)  # the workers fork after this
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        result = fedforge.simulate(
            small_mlp(),
            small_federated,
            fedforge.FedAvg(local=LOCAL),
            rounds=2,
            clients_per_round=10,
            seed=0,
            backend="workers",
        )
    for rec in result.history[1:]:  # client 3 dies every round; the other nine complete
        assert (rec.clients_completed, rec.clients_failed) == (9, 1)
        assert rec.clients == {"failed": [3]}
    assert "worker process died" in caplog.text and "replacement" in caplog.text


def test_worker_client_exception_is_reported_with_traceback(  # type: ignore[no-untyped-def]
    small_federated, caplog, monkeypatch
) -> None:
    def fit(self, task, data, state):  # type: ignore[no-untyped-def]
        if task.client_id == 0 and _in_worker():
            raise ValueError("bad sensor data")
        return _fit(self, task, data, state)

    monkeypatch.setattr(ClientApp, "fit", fit)
    with caplog.at_level(logging.WARNING, logger="fedforge"):
        result = fedforge.simulate(
            small_mlp(),
            small_federated,
            fedforge.FedAvg(local=LOCAL),
            rounds=1,
            clients_per_round=10,
            backend="workers",
        )
    assert result.history[1].clients_failed == 1
    assert result.history[1].clients_rejected == 0
    assert "ValueError: bad sensor data" in caplog.text and "Traceback" in caplog.text


class WrongShape(fedforge.FedAvg):
    def finish(self, local, shared, own, steps):  # type: ignore[no-untyped-def]
        arrays, new_own = super().finish(local, shared, own, steps)
        return {k: torch.zeros(3) for k in arrays}, new_own


@pytest.mark.parametrize("backend", ["sequential", "vectorized", "workers"])
def test_records_that_do_not_match_the_model_are_rejected(small_federated, backend) -> None:  # type: ignore[no-untyped-def]
    """Every backend rejects them (not failed); a round whose every record is rejected is
    refused, and after aggregation.max_refused retries the run stops with the reason."""
    statuses: list[str] = []

    class Statuses(RoundListener):
        def client_done(self, client_id: int, status: str) -> None:
            statuses.append(status)

    with pytest.raises(FedforgeError, match=r"every record was rejected .*expected"):
        fedforge.simulate(
            small_mlp(),
            small_federated,
            WrongShape(local=LOCAL),
            rounds=1,
            clients_per_round=4,
            backend=backend,
            listener=Statuses(),
            max_refused=1,
        )
    assert statuses == ["rejected"] * 8  # two attempts of four clients


def _pool_setup(data):  # type: ignore[no-untyped-def]
    app = ClientApp(fedforge.FedAvg(local=LOCAL), small_mlp())
    shared = TorchModel(small_mlp()).get_params()
    tasks = [Task(FIT, 1, cid, 1000 + cid, shared) for cid in range(10)]
    return app, tasks


def _by_client(replies) -> dict[int, Record]:  # type: ignore[no-untyped-def]
    out = {}
    for reply in replies:
        assert isinstance(reply, Record), reply
        out[reply.client_id] = reply
    return out


def test_shared_arrays_go_to_each_worker_once_per_exchange(  # type: ignore[no-untyped-def]
    small_federated, monkeypatch
) -> None:
    app, tasks = _pool_setup(small_federated)
    expected = _by_client(
        SequentialTransport(app, small_federated, MemoryStateStore()).exchange(tasks)
    )
    sent: list[bool] = []
    encode = workers_module.encode_task

    def counting(task, *, include_shared, state=None):  # type: ignore[no-untyped-def]
        sent.append(include_shared)
        return encode(task, include_shared=include_shared, state=state)

    monkeypatch.setattr(workers_module, "encode_task", counting)
    pool = WorkerPoolTransport(app, small_federated, MemoryStateStore(), num_workers=2)
    try:
        for _ in range(2):  # warm workers, fresh shared arrays per exchange
            sent.clear()
            got = _by_client(pool.exchange(tasks))
            assert len(sent) == 10 and sum(sent) == 2
            for cid, rec in expected.items():
                for name in rec.arrays:
                    np.testing.assert_array_equal(got[cid].arrays[name], rec.arrays[name])
                assert got[cid].metrics == rec.metrics
    finally:
        pool.close()


def test_an_abandoned_exchange_does_not_leak_into_the_next(small_federated) -> None:  # type: ignore[no-untyped-def]
    app, tasks = _pool_setup(small_federated)
    pool = WorkerPoolTransport(app, small_federated, MemoryStateStore(), num_workers=2)
    try:
        replies = pool.exchange(tasks)
        next(replies)
        replies.close()  # the driver stopped reading (e.g. it raised)
        got = _by_client(pool.exchange(tasks[:4]))
        assert sorted(got) == [0, 1, 2, 3]
        assert len(pool.workers) == 2
    finally:
        pool.close()


def test_a_worker_killed_between_exchanges_is_replaced_silently(small_federated) -> None:  # type: ignore[no-untyped-def]
    app, tasks = _pool_setup(small_federated)
    pool = WorkerPoolTransport(app, small_federated, MemoryStateStore(), num_workers=2)
    try:
        os.kill(pool.workers[0].process.pid or 0, signal.SIGKILL)
        pool.workers[0].process.join(timeout=5)
        replies = list(pool.exchange(tasks[:3]))
        assert not any(isinstance(r, ClientFailure) for r in replies)
    finally:
        pool.close()


# Choosing a backend ---------------------------------------------------------------------------
def test_auto_picks_vectorized_when_possible_and_says_why_not(caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.INFO, logger="fedforge"):
        assert resolve_backend("auto", fedforge.FedAvg().program(), small_mlp()) == "vectorized"
        assert resolve_backend("auto", fedforge.Scaffold().program(), small_mlp()) == "vectorized"
        dropout = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5))
        assert resolve_backend("auto", fedforge.FedAvg().program(), dropout) == "workers"
        assert "dropout" in caplog.text
        batchnorm = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
        assert resolve_backend("auto", fedforge.FedAvg().program(), batchnorm) == "workers"
        assert "buffers" in caplog.text
        nll = fedforge.LocalSGD(loss_fn=torch.nn.functional.nll_loss)
        assert resolve_backend("auto", fedforge.FedAvg(local=nll).program(), small_mlp()) == (
            "workers"
        )
        assert "custom loss" in caplog.text


def test_simulate_auto_reports_its_choice(small_federated) -> None:  # type: ignore[no-untyped-def]
    result = fedforge.simulate(
        small_mlp(), small_federated, rounds=1, clients_per_round=2, backend="auto"
    )
    assert result.backend == "vectorized"


# Ray ------------------------------------------------------------------------------------------
def test_ray_backend_equals_sequential(small_federated, ray_cluster) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(rounds=2, clients_per_round=5, seed=3)
    seq = fedforge.simulate(
        small_mlp(), small_federated, fedforge.Scaffold(local=LOCAL), backend="sequential", **kwargs
    )
    on_ray = fedforge.simulate(
        small_mlp(), small_federated, fedforge.Scaffold(local=LOCAL), backend="ray", **kwargs
    )
    assert_same(seq, on_ray)


def test_ray_backend_runs_fedreps_two_phases_as_sequential(small_federated, ray_cluster) -> None:  # type: ignore[no-untyped-def]
    """FedRep's head-first schedule and personal heads (client state) on Ray actors."""
    from fedforge.algorithms.fedper import head_names
    from fedforge.algorithms.fedrep import FedRep

    names = [n for n, _ in small_mlp().named_parameters()]
    algo = FedRep(local=LOCAL, head=head_names(names, 1), head_epochs=1)
    data = small_federated.with_holdout(0.3, np.random.default_rng(0))
    kwargs = dict(rounds=2, clients_per_round=4, seed=3, federated_eval=FederatedEvaluation(1.0))
    seq = fedforge.simulate(small_mlp(), data, algo, backend="sequential", **kwargs)
    on_ray = fedforge.simulate(small_mlp(), data, algo, backend="ray", **kwargs)
    assert_same(seq, on_ray)
    for key, value in seq.history[-1].metrics.items():  # personal accuracy included
        assert on_ray.history[-1].metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.usefixtures("isolated_imports")
def test_ray_runs_a_training_function_from_a_project_directory(tmp_path, ray_cluster) -> None:  # type: ignore[no-untyped-def]
    """The training function and the model class live in a project directory the actors
    cannot import: they travel by value, and the run equals the sequential one."""
    (tmp_path / "loop.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(64, 10)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x)\n"
        "def make():\n"
        "    return Net()\n"
        "def train(model, loader, config):\n"
        "    opt = config.sgd(model)\n"
        "    for x, y in loader:\n"
        "        opt.zero_grad()\n"
        "        torch.nn.functional.cross_entropy(model(x), y).backward()\n"
        "        opt.step()\n"
    )
    from fedforge.config import load_config
    from fedforge.experiment import build_dataset, simulate_config

    config = load_config(
        None,
        [
            f'project_dir="{tmp_path}"',
            'model.factory="loop:make"',
            'client.train="loop:train"',
            'data.dataset="digits"',
            "partition.num_clients=4",
            "server.clients_per_round=4",
            "server.rounds=2",
            "client.epochs=1",
        ],
    )
    seq = simulate_config(config, build_dataset(config), backend="sequential")
    on_ray = simulate_config(config, build_dataset(config), backend="ray")
    assert on_ray.backend == "ray" and on_ray.history[-1].clients_completed == 4
    assert_same(seq, on_ray)


def test_dead_ray_actor_fails_one_client_and_is_replaced(small_federated, ray_cluster) -> None:  # type: ignore[no-untyped-def]
    from fedforge.runtime.ray_transport import RayTransport

    app, tasks = _pool_setup(small_federated)
    transport = RayTransport(app, small_federated, MemoryStateStore(), num_actors=2)
    try:
        assert len(_by_client(transport.exchange(tasks[:2]))) == 2
        ray_cluster.kill(transport.actors[0])
        replies = list(transport.exchange(tasks[:4]))
        failed = [r for r in replies if isinstance(r, ClientFailure)]
        assert len(failed) == 1 and "actor died" in failed[0].error
        assert len(_by_client(transport.exchange(tasks[:4]))) == 4  # the replacement works
    finally:
        transport.close()


@pytest.mark.parametrize(
    "algorithm",
    [
        fedforge.FedAvg(local=fedforge.LocalSGD(lr=0.3, epochs=1, batch_size=0)),
        fedforge.FedAvg(local=fedforge.LocalSGD(lr=0.3, epochs=1, batch_size=0, weight_decay=0.1)),
        fedforge.FedProx(local=fedforge.LocalSGD(lr=0.3, epochs=1, batch_size=0), mu=0.5),
        fedforge.Scaffold(local=fedforge.LocalSGD(lr=0.3, epochs=1, batch_size=0)),
    ],
    ids=["fedavg", "fedavg-wd", "fedprox", "scaffold"],
)
def test_one_step_clients_take_the_direct_delta_kernel(small_federated, algorithm) -> None:  # type: ignore[no-untyped-def]
    """Full batch, one epoch: every client's only step is written as a delta by the fused
    first-step kernel; it must equal the sequential runtime's step."""
    kwargs = dict(rounds=3, clients_per_round=10, seed=3)
    seq = fedforge.simulate(small_mlp(), small_federated, algorithm, backend="sequential", **kwargs)  # type: ignore[arg-type]
    vec = fedforge.simulate(small_mlp(), small_federated, algorithm, backend="vectorized", **kwargs)  # type: ignore[arg-type]
    assert_same(seq, vec)
    for key in seq.state.extras:
        np.testing.assert_allclose(seq.state.extras[key], vec.state.extras[key], atol=1e-5)


@pytest.mark.parametrize(
    "algorithm",
    [
        fedforge.FedAvg(local=fedforge.LocalSGD(lr=0.1, epochs=2, batch_size=7, weight_decay=0.05)),
        fedforge.FedProx(local=fedforge.LocalSGD(lr=0.1, epochs=2, batch_size=7), mu=0.5),
        fedforge.Scaffold(local=fedforge.LocalSGD(lr=0.1, epochs=2, batch_size=7)),
    ],
    ids=["fedavg-wd", "fedprox", "scaffold"],
)
def test_affine_chains_fused_into_the_update_equal_sequential(small_federated, algorithm) -> None:  # type: ignore[no-untyped-def]
    """No momentum: weight decay, the proximal term and the control correction are applied
    analytically inside the fused update over several local steps and small chunks."""
    kwargs = dict(rounds=3, clients_per_round=10, seed=5)
    seq = fedforge.simulate(small_mlp(), small_federated, algorithm, backend="sequential", **kwargs)  # type: ignore[arg-type]
    vec = fedforge.simulate(
        small_mlp(),
        small_federated,
        algorithm,
        backend="vectorized",
        options=fedforge.BackendOptions(memory_budget=30_000),
        **kwargs,  # type: ignore[arg-type]
    )
    assert_same(seq, vec)
    for key in seq.state.extras:
        np.testing.assert_allclose(seq.state.extras[key], vec.state.extras[key], atol=1e-5)


def test_full_batch_chunks_like_a_batch_size_beyond_every_client(
    small_federated: fedforge.FederatedDataset,
) -> None:
    """FedSGD (batch_size 0: the client's whole data) and a batch size larger than any
    client's data take the same steps, so they get the same chunks and the same model: the
    memory estimate is sized to the widest real batch, never to the nominal batch size."""
    from fedforge.runtime.vectorized import VectorizedTransport
    from fedforge.stages.base import StageChain

    largest = max(small_federated.client_sizes())
    results, chunks = [], []
    for batch_size in (0, 10**6):
        algorithm = fedforge.FedAvg(
            local=fedforge.LocalSGD(lr=0.3, epochs=1, batch_size=batch_size)
        )
        app = ClientApp(algorithm, small_mlp(), StageChain([]))
        transport = VectorizedTransport(
            app, small_federated, MemoryStateStore(), memory_budget=1 << 20
        )
        shared = {n: p.detach().numpy() for n, p in small_mlp().named_parameters()}
        chunks.append(transport.chunk_size(shared, largest))
        results.append(
            fedforge.simulate(
                small_mlp(),
                small_federated,
                algorithm,
                rounds=2,
                clients_per_round=6,
                backend="vectorized",
                options=fedforge.BackendOptions(memory_budget=1 << 20),
            )
        )
    assert chunks[0] == chunks[1] > 1
    for name, value in results[0].state.params.items():
        np.testing.assert_array_equal(results[1].state.params[name], value)
