"""Your model, data and training loop as one Workload: by import path from files beside the
configuration, through simulate, with every stage; refusals where the math cannot compose."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

import fedforge as ff
from fedforge.config import load_config
from fedforge.core.errors import ConfigError, FedforgeError
from fedforge.experiment import build_dataset, simulate_config
from fedforge.secagg.aggregation import SecureAggregation
from fedforge.secagg.protocol import SecAggParams
from tests.conftest import make_blobs

SITES = 3


BLOBS = make_blobs(300, dim=4, classes=3, seed=0)


def blob_site(site: ff.Site) -> ff.ArrayDataset:
    """Site i holds 40 + 20 i examples of one blob problem."""
    start = sum(40 + 20 * i for i in range(site.index))
    part = slice(start, start + 40 + 20 * site.index)
    return ff.ArrayDataset(BLOBS.x[part], BLOBS.y[part])


def small_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def shift_by_label_mean(
    model: torch.nn.Module, loader: object, config: ff.TrainConfig
) -> Mapping[str, float]:
    """A 'training loop' whose result is known: every weight moves by the mean label of the
    site's data, so FedAvg's new model is the initial one plus the example-weighted mean."""
    labels = torch.cat([y for _, y in loader])  # type: ignore[attr-defined]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(labels.double().mean().float())
    return {"train_loss": 0.5, "seen": float(len(labels))}


def expected_shift() -> float:
    sizes = [40 + 20 * i for i in range(SITES)]
    means = [blob_site(ff.Site(i)).y.mean() for i in range(SITES)]
    return float(np.average(means, weights=sizes))


WORKLOAD = ff.Workload(
    model=small_model,
    data=blob_site,
    train=shift_by_label_mean,
    test=lambda: make_blobs(30, dim=4, classes=3, seed=9),
    sites=SITES,
    metrics=("seen",),
)


def _initial(seed: int = 0) -> dict[str, np.ndarray]:
    from fedforge.core.rng import Purpose, RngStreams
    from fedforge.train.models import seeded

    module = seeded(small_model, RngStreams(seed).int_seed(Purpose.INIT))
    return {n: t.detach().numpy().copy() for n, t in module.state_dict().items()}


def test_a_training_function_is_fedavgs_client_under_secure_aggregation_and_dp() -> None:
    plain = ff.simulate(WORKLOAD, rounds=1, clients_per_round=SITES, seed=0)
    initial, shift = _initial(), expected_shift()
    for name, value in plain.state.params.items():
        np.testing.assert_allclose(value, initial[name] + shift, rtol=0, atol=1e-6)
    assert plain.history[-1].metrics["seen"] == pytest.approx(
        np.average([40, 60, 80], weights=[40, 60, 80])
    )
    secure = ff.simulate(
        WORKLOAD,
        rounds=1,
        clients_per_round=SITES,
        seed=0,
        aggregation=SecureAggregation(SecAggParams(clip_norm=100.0, complete=True)),
    )
    for name, value in secure.state.params.items():
        np.testing.assert_allclose(value, initial[name] + shift, rtol=0, atol=1e-3)


def test_a_training_function_under_central_dp_and_secure_aggregation_from_a_config(
    tmp_path: Path,
) -> None:
    (tmp_path / "task.py").write_text(
        textwrap.dedent("""
        import fedforge as ff
        from tests.workload.test_workload import WORKLOAD
        TASK = WORKLOAD
    """)
    )
    config = load_config(
        None,
        [
            f'project_dir="{tmp_path}"',
            'workload="task:TASK"',
            "server.rounds=2",
            "server.clients_per_round=3",
            'aggregation.kind="secure_sum"',
            'privacy.mode="central"',
            "privacy.noise_multiplier=0.5",
            "privacy.clip_norm=5.0",
            "secagg.complete_graph=true",
        ],
    )
    result = simulate_config(config, build_dataset(config))
    last = result.history[-1]
    assert result.backend == "workers" and last.clients_completed == 3
    assert last.metrics["dp.epsilon"] > 0 and last.labels["dp.mode"] == "central"


LABEL_MEANS = np.array([blob_site(ff.Site(i)).y.mean() for i in range(SITES)])
SIZES = np.array([40 + 20 * i for i in range(SITES)])
DIM = sum(p.size for p in _initial().values())  # every coordinate moves by a site's label mean
DP = ["privacy.noise_multiplier=0.01", "privacy.clip_norm=10.0"]  # 10 > every update's norm
UNIFORM_NOISE = 0.01 * 10.0 / SITES  # the noised mean's stddev, each client weighing 1
LOCAL_NOISE = 0.01 * 10.0 * float(np.sqrt((SIZES**2).sum()) / SIZES.sum())  # weighted mean


@pytest.mark.parametrize(
    ("overrides", "expected", "noise"),
    [
        (['aggregation.kind="median"'], float(np.median(LABEL_MEANS)), 0.0),
        (
            ['aggregation.kind="trimmed_mean"', "aggregation.trim=0.34"],
            float(np.median(LABEL_MEANS)),
            0.0,
        ),
        (['aggregation.kind="geometric_median"'], float(np.median(LABEL_MEANS)), 0.0),
        (['aggregation.kind="krum"'], None, 0.0),  # one whole record
        (["update.clip_norm=5.0"], 5.0 / np.sqrt(DIM), 0.0),  # every update is clipped
        (['update.codec="float16"'], float(np.average(LABEL_MEANS, weights=SIZES)), 1e-3),
        (['update.codec="q8"'], float(np.average(LABEL_MEANS, weights=SIZES)), 1e-5),
        (  # RDP: PLD accounting of so small a multiplier takes a minute
            ['privacy.mode="central"', 'privacy.accountant="rdp"', *DP],
            float(LABEL_MEANS.mean()),
            UNIFORM_NOISE,
        ),
        (['privacy.mode="local"', *DP], float(np.average(LABEL_MEANS, weights=SIZES)), LOCAL_NOISE),
        (
            [
                'privacy.mode="distributed"',
                'aggregation.kind="secure_sum"',
                "secagg.complete_graph=true",
                *DP,
            ],
            float(LABEL_MEANS.mean()),
            UNIFORM_NOISE,
        ),
    ],
    ids=[
        "median",
        "trimmed_mean",
        "geometric_median",
        "krum",
        "clip",
        "float16",
        "q8",
        "central_dp",
        "local_dp",
        "distributed_dp",
    ],
)
def test_a_training_function_runs_with_every_aggregation_kind_and_stage(
    overrides: list[str], expected: float | None, noise: float
) -> None:
    """Every site's loop moves every weight by its mean label, so each rule and stage has a
    known aggregate: robust rules pick the median site (krum one site's record), clipping
    shrinks each update to its bound, codecs round it, DP adds noise of the configured size."""
    config = load_config(
        None,
        [
            'workload="tests.workload.test_workload:WORKLOAD"',
            "server.rounds=1",
            f"server.clients_per_round={SITES}",
            *overrides,
        ],
    )
    result = simulate_config(config, build_dataset(config), backend="sequential")
    assert result.history[-1].clients_completed == SITES
    initial = _initial()
    moved = np.concatenate([(result.state.params[n] - initial[n]).ravel() for n in initial])
    if expected is None:
        assert np.abs(LABEL_MEANS - moved.mean()).min() < 1e-5 and moved.std() < 1e-5
    elif noise <= 1e-3:
        np.testing.assert_allclose(moved, expected, rtol=0, atol=max(noise, 1e-5))
    else:  # the noise has its configured size, around the right mean
        assert abs(moved.mean() - expected) < 6 * noise / np.sqrt(DIM)
        assert 0.6 * noise < moved.std() < 1.5 * noise
        assert result.history[-1].metrics["dp.epsilon"] > 0


def test_a_factory_and_a_loader_beside_the_configuration_run_in_simulation(
    tmp_path: Path,
) -> None:
    (tmp_path / "models.py").write_text(
        textwrap.dedent("""
        from torch import nn
        def make(width=8, classes=3):
            return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, classes))
    """)
    )
    (tmp_path / "data.py").write_text(
        textwrap.dedent("""
        from tests.conftest import make_blobs
        def load(site):
            blobs = make_blobs(200, dim=4, classes=3, seed=0)
            rows = slice(50 * site.index, 50 * site.index + 50)
            return blobs.x[rows], blobs.y[rows]
    """)
    )
    (tmp_path / "fedforge.toml").write_text(
        textwrap.dedent("""
        [model]
        factory = "models:make"
        options = { width = 6 }
        [data]
        loader = "data:load"
        [partition]
        num_clients = 4
        [server]
        rounds = 2
        clients_per_round = 4
        [evaluation]
        fraction = 1.0
    """)
    )
    config = load_config(tmp_path / "fedforge.toml")
    assert config.project_dir == str(tmp_path.resolve())
    result = simulate_config(config, build_dataset(config))
    assert result.backend == "vectorized"
    assert result.state.params["0.weight"].shape == (6, 4)
    assert result.history[-1].metrics["fed_eval.accuracy"] > 0.5


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ('model.factory="nowhere:make"', "model.factory = 'nowhere:make': no module 'nowhere'"),
        ('model.factory="fedforge:nothing"', "has no 'nothing'"),
        ('model.factory="fedforge.train.models:mlp"', "models:mlp' failed: TypeError"),
        ('model.factory="fedforge"', "is not a 'module:attribute' import path"),
    ],
)
def test_bad_import_paths_are_one_line(override: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        config = load_config(None, [override, "partition.num_clients=10"])
        build_dataset(config)
        from fedforge.experiment import build_workload

        build_workload(config, build_dataset(config)).model()
    assert problem in str(info.value)
    assert "Traceback" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (['algorithm.name="scaffold"'], "cannot run algorithm.name = 'scaffold': it corrects"),
        (['algorithm.name="fednova"'], "cannot run algorithm.name = 'fednova'"),
        (['privacy.mode="sample"', "privacy.noise_multiplier=1.0"], "DP-SGD clips"),
        (['runtime.backend="vectorized"'], "a training function runs its own loop"),
        (['algorithm.name="fedprox"'], "unless it adds config.proximal.*client.train_proximal"),
    ],
)
def test_a_training_function_refuses_what_it_cannot_run(overrides: list[str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_config(
            None, ['client.train="tests.workload.test_workload:shift_by_label_mean"', *overrides]
        )


def test_a_configured_training_function_declares_its_metrics_and_proximal_term() -> None:
    with pytest.raises(ConfigError, match=r"client\.train_metrics describes client\.train"):
        load_config(None, ['client.train_metrics=["seen"]'])
    config = load_config(
        None,
        [
            'client.train="tests.workload.test_workload:shift_by_label_mean"',
            'client.train_metrics=["seen"]',
            "client.train_proximal=true",
            'algorithm.name="fedprox"',
            'data.dataset="synthetic"',
            "partition.num_clients=3",
            "server.rounds=1",
            "server.clients_per_round=3",
        ],
    )
    result = simulate_config(config, build_dataset(config), backend="sequential")
    last = result.history[-1]
    assert last.clients_completed == 3 and last.metrics["seen"] > 0


def test_fedprox_runs_a_loop_that_adds_the_proximal_term_and_refuses_one_that_does_not() -> None:
    seen: list[float] = []

    def loop(model: torch.nn.Module, loader: object, config: ff.TrainConfig) -> None:
        seen.append(config.mu)
        assert float(config.proximal(model).detach()) == 0.0  # it starts at the global model

    fedprox = ff.FedProx(mu=0.3)
    with pytest.raises(ConfigError, match=r"config.proximal\(model\).*proximal=True"):
        ff.simulate(
            ff.Workload(small_model, blob_site, train=loop, sites=2),
            algorithm=fedprox,
            rounds=1,
            clients_per_round=2,
        )
    proximal = ff.Workload(small_model, blob_site, train=loop, sites=2, proximal=True)
    ff.simulate(proximal, algorithm=fedprox, rounds=1, clients_per_round=2)
    assert seen == [0.3, 0.3]
    with pytest.raises(ConfigError, match="Scaffold cannot run a training function"):
        ff.simulate(proximal, algorithm=ff.Scaffold(), rounds=1, clients_per_round=2)
    with pytest.raises(ConfigError, match="'vectorized' is not possible: a training function"):
        ff.simulate(proximal, rounds=1, clients_per_round=2, backend="vectorized")


def test_auto_takes_workers_for_a_model_vmap_cannot_batch(caplog: pytest.LogCaptureFixture) -> None:
    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) if float(x.sum()) > -1e9 else -self.linear(x)  # data-dependent

    with caplog.at_level(logging.INFO, logger="fedforge"):
        result = ff.simulate(
            ff.Workload(Branchy, blob_site, sites=2), rounds=1, clients_per_round=2, backend="auto"
        )
    assert result.backend == "workers"
    assert "torch.func.vmap cannot batch this model" in caplog.text
    with pytest.raises(ConfigError, match="vmap cannot batch this model"):
        ff.simulate(
            ff.Workload(Branchy, blob_site, sites=2),
            rounds=1,
            clients_per_round=2,
            backend="vectorized",
        )


def test_an_undeclared_metric_fails_the_client_with_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def loop(model: torch.nn.Module, loader: object, config: ff.TrainConfig) -> dict[str, float]:
        return {"auc": 0.9}

    # Every client fails in every round: the run is an error, not a success with the
    # initial model, and each client's reason is in the log.
    failing = ff.Workload(small_model, blob_site, train=loop, sites=2)
    expected = r"no client completed any of the 2 rounds \(4 "
    with (
        caplog.at_level(logging.WARNING, logger="fedforge"),
        pytest.raises(FedforgeError, match=expected),
    ):
        ff.simulate(failing, rounds=2, clients_per_round=2)
    assert "auc" in caplog.text


def always_fails(model: torch.nn.Module, loader: object, config: ff.TrainConfig) -> None:
    raise RuntimeError("the site's loop is broken")


def test_a_run_whose_clients_all_fail_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedforge.cli import app

    result = CliRunner().invoke(
        app,
        [
            "run",
            "--quiet",
            "--out",
            str(tmp_path / "run"),
            "--set",
            'client.train="tests.workload.test_workload:always_fails"',
            "--set",
            'data.dataset="synthetic"',
            "--set",
            "partition.num_clients=3",
            "--set",
            "server.clients_per_round=3",
            "--set",
            "server.rounds=2",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "no client completed any of the 2 rounds (6 client failures" in result.output


def test_a_simulation_stops_on_a_site_whose_labels_the_model_cannot_predict() -> None:
    def data(site: ff.Site) -> ff.ArrayDataset:
        part = blob_site(site)
        y = part.y + (3 if site.index == 1 else 0)  # site 1's labels are 3..5
        return ff.ArrayDataset(part.x, y)

    with pytest.raises(ff.DataError, match=r"site 1: label [345] is outside the model's 3 classes"):
        ff.simulate(ff.Workload(small_model, data, sites=2), rounds=1, clients_per_round=2)
