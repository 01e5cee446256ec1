"""FedRep: head-only steps, then body-only steps, in the one local program; the head stays on
the client; every runtime runs the same schedule."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedforge.algorithms.fedper import HEAD, head_names
from fedforge.algorithms.fedrep import FedRep
from fedforge.config import load_config, to_toml
from fedforge.core.errors import ConfigError
from fedforge.core.records import FIT, Task
from fedforge.data.federated import FederatedDataset
from fedforge.experiment import build_algorithm
from fedforge.privacy.dp_sgd import SampleDP
from fedforge.runtime.client_app import LATEST, ClientApp
from fedforge.runtime.client_state import MemoryStateStore
from fedforge.runtime.clock import ClockSpec
from fedforge.runtime.devices import Devices
from fedforge.runtime.driver import FederatedEvaluation
from fedforge.runtime.simulation import simulate
from fedforge.runtime.stragglers import Stragglers
from fedforge.runtime.vectorized import VectorizedTransport
from fedforge.train.program import LocalSGD, batch_order
from tests.conftest import small_mlp

NAMES = [n for n, _ in small_mlp().named_parameters()]
HEAD_NAMES = head_names(NAMES, 1)  # ("2.weight", "2.bias")
BODY = [n for n in NAMES if n not in HEAD_NAMES]
# Momentum and weight decay: a frozen tensor's momentum must not move or leak across phases.
LOCAL = LocalSGD(lr=0.1, epochs=2, batch_size=7, momentum=0.9, weight_decay=1e-3)
SEED = 123


@pytest.fixture
def with_holdout(small_federated: FederatedDataset) -> FederatedDataset:
    return small_federated.with_holdout(0.3, np.random.default_rng(0))


def global_params() -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in small_mlp().named_parameters()}


def own_head() -> dict[str, np.ndarray]:
    """A client head unlike the global one (as after earlier rounds)."""
    rng = np.random.default_rng(7)
    return {
        HEAD + n: rng.normal(size=global_params()[n].shape).astype(np.float32) for n in HEAD_NAMES
    }


def reference(x: np.ndarray, y: np.ndarray, head_epochs: int) -> dict[str, np.ndarray]:
    """Algorithm 1 by hand in plain torch: torch.optim.SGD on the head alone for
    ``head_epochs`` passes, then a fresh torch.optim.SGD on the body alone for the local
    epochs, on the batches every runtime draws (batch_order with the task's seed)."""
    model = small_mlp()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in HEAD_NAMES:
            params[n].copy_(torch.from_numpy(own_head()[HEAD + n]))
    batches = batch_order(len(x), LOCAL.batch_size, head_epochs + LOCAL.epochs, SEED)
    head_steps = head_epochs * -(-len(x) // LOCAL.batch_size)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    phases = [(HEAD_NAMES, batches[:head_steps]), (BODY, batches[head_steps:])]
    for trained, phase in phases:
        before = {n: p.detach().clone() for n, p in params.items()}
        opt = torch.optim.SGD(
            [params[n] for n in trained],
            lr=LOCAL.lr,
            momentum=LOCAL.momentum,
            weight_decay=LOCAL.weight_decay,
        )
        for batch in phase:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            opt.step()
        for n, p in params.items():  # the other part did not move
            assert torch.equal(p, before[n]) != (n in trained), n
    return {n: p.detach().numpy() for n, p in params.items()}


@pytest.mark.parametrize("runtime", ["sequential", "vectorized"])
def test_one_round_is_the_two_phases_of_algorithm_1(
    small_federated: FederatedDataset, runtime: str
) -> None:
    algo = FedRep(local=LOCAL, head=HEAD_NAMES, head_epochs=3)
    app = ClientApp(algo, small_mlp())
    task = Task(FIT, 1, 0, SEED, global_params())
    if runtime == "sequential":
        record, state = app.fit(task, small_federated.client_data(0), own_head())
    else:
        store = MemoryStateStore()
        store.put(0, own_head(), 0)
        (batch,) = VectorizedTransport(app, small_federated, store).exchange([task])
        record, state = batch.row(0), store.get(0, LATEST)  # type: ignore[union-attr]
    data = small_federated.client_data(0).train
    expected = reference(data.x, data.y, head_epochs=3)
    start = global_params()
    assert set(record.arrays) == set(BODY)  # the body's change from the global body only
    for n in BODY:
        np.testing.assert_allclose(start[n] + record.arrays[n], expected[n], atol=2e-6)
    assert state is not None and set(state) == {HEAD + n for n in HEAD_NAMES}
    for n in HEAD_NAMES:
        np.testing.assert_allclose(state[HEAD + n], expected[n], atol=2e-6)
    steps = 5 * -(-len(data.x) // LOCAL.batch_size)  # 3 head + 2 body epochs
    assert algo.program().num_steps(len(data.x)) == steps


def test_a_step_moves_only_the_tensors_of_its_phase() -> None:
    """The functional step (vmap's) and the eager step freeze the other part exactly,
    momentum state included."""
    program = FedRep(local=LOCAL, head=HEAD_NAMES, head_epochs=1).program()
    module = small_mlp()
    x, y = torch.randn(7, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    # Momentum's buffers mid-round (non-zero), weight decay's empty state.
    state = tuple({n: torch.randn_like(t) for n, t in s.items()} for s in program.init(params))
    assert [len(s) for s in state] == [0, len(NAMES)]
    for phase in (True, False):
        trained = HEAD_NAMES if phase else BODY
        new, new_state, _ = program.step(
            module, params, state, params, {}, x, y, torch.ones(7), torch.tensor(phase)
        )
        eager_state = tuple({n: t.clone() for n, t in s.items()} for s in state)
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(params[n])
        eager_params = dict(module.named_parameters())
        eager_state, _ = program.eager_step(
            module, eager_params, eager_state, params, {}, x, y, phase
        )
        for n in NAMES:
            moved = not torch.equal(new[n], params[n])
            assert moved == (n in trained), (phase, n)
            assert torch.equal(new_state[1][n], state[1][n]) != (n in trained)
            torch.testing.assert_close(eager_params[n].detach(), new[n])
            torch.testing.assert_close(eager_state[1][n], new_state[1][n])


def test_head_stays_on_the_client_and_persists_across_rounds(
    with_holdout: FederatedDataset,
) -> None:
    algo = FedRep(local=LOCAL, head=HEAD_NAMES)
    spec = algo.record_spec({n: None for n in NAMES}, NAMES)  # type: ignore[misc]
    assert set(spec.arrays) == set(BODY)
    store = MemoryStateStore()
    result = simulate(
        small_mlp(), with_holdout, algo, rounds=3, clients_per_round=10, client_states=store
    )
    start = global_params()
    for name in HEAD_NAMES:  # the server's head never moves
        np.testing.assert_array_equal(result.state.params[name], start[name])
    heads = [store.get(c, LATEST) for c in range(10)]
    w = [h[HEAD + "2.weight"] for h in heads]  # type: ignore[index]
    assert not np.allclose(w[0], w[1]) and not np.allclose(w[0], start["2.weight"])


def test_the_virtual_clock_counts_head_and_body_steps(small_federated: FederatedDataset) -> None:
    n = small_federated.num_clients
    devices = Devices(np.ones(n), np.full(n, 1e15), np.full(n, 1e15))  # compute time only
    local = LocalSGD(lr=0.1, epochs=1, batch_size=8)
    algo = FedRep(local=local, head=HEAD_NAMES, head_epochs=3)
    result = simulate(
        small_mlp(), small_federated, algo, rounds=1, clients_per_round=n, clock=ClockSpec(devices)
    )
    slowest = max(4 * -(-small_federated.client_size(c) // 8) for c in range(n))  # 3 + 1 epochs
    assert result.history[1].metrics["clock.seconds"] == pytest.approx(slowest, rel=1e-6)


@pytest.mark.parametrize("backend", ["vectorized", "workers"])
def test_runtimes_agree_with_sequential(with_holdout: FederatedDataset, backend: str) -> None:
    """Partial work for half the clients: different head and body step counts per client, so
    the cohort holds clients in different phases at one step index."""
    runs = [
        simulate(
            small_mlp(),
            with_holdout,
            FedRep(local=LOCAL, head=HEAD_NAMES, head_epochs=1),
            rounds=2,
            clients_per_round=6,
            seed=4,
            backend=b,  # type: ignore[arg-type]
            federated_eval=FederatedEvaluation(1.0),
            stragglers=Stragglers(0.5, LOCAL.epochs),
        )
        for b in ("sequential", backend)
    ]
    seq, other = runs
    assert other.backend == backend
    for param, value in seq.state.params.items():
        np.testing.assert_allclose(other.state.params[param], value, rtol=1e-4, atol=1e-5)
    for key, value in seq.history[-1].metrics.items():
        assert other.history[-1].metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_config_keys_and_refusals(tmp_path: Path) -> None:
    cfg = load_config(None, ["algorithm.name=fedrep", "algorithm.head_epochs=3"])
    assert cfg.algorithm.head_epochs == 3
    (tmp_path / "run.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "run.toml") == cfg
    algo = build_algorithm(cfg)
    assert isinstance(algo, FedRep) and algo.head == ("4.weight", "4.bias")  # the 2NN
    assert algo.program().head_first.epochs == 3  # type: ignore[union-attr]
    default = build_algorithm(load_config(None, ["algorithm.name=fedrep", "client.epochs=4"]))
    assert default.program().head_first.epochs == 4  # type: ignore[union-attr]
    for bad, message in (
        (["algorithm.name=fedrep", "model.name=logistic"], "head_layers"),
        (["algorithm.name=fedrep", "algorithm.head_epochs=0"], "head_epochs"),
        (["algorithm.name=fedper", "algorithm.head_epochs=2"], "head_epochs"),
        (["algorithm.name=fedrep", "privacy.mode=sample"], "fedrep"),
        (
            [
                "algorithm.name=fedrep",
                "clock.enabled=true",
                "asynchronous.mode=fedbuff",
                "asynchronous.buffer=2",
                "asynchronous.concurrency=4",
            ],
            "client state",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, bad)
    with pytest.raises(ValueError, match="head_epochs"):
        FedRep(head=HEAD_NAMES, head_epochs=0)
    # (the Python API: DP-SGD would train every parameter at once, dropping the schedule)
    dp = SampleDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    with pytest.raises(ConfigError, match="DP-SGD"):
        ClientApp(FedRep(head=HEAD_NAMES), small_mlp(), sample_dp=dp)
