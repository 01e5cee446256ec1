"""Federated RL end to end: `fedforge run` with an [rl] section, the Python API, the
vectorized runtime against the sequential one, FedPG-BR's filter as a gather rule, resume,
and what the configuration refuses. Tiny: 2-5 agents, 2-3 rounds, short episodes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedforge import simulate
from fedforge.aggregate.gather import RobustAggregation
from fedforge.algorithms.fedavg import FedAvg
from fedforge.cli import app
from fedforge.config import load_config
from fedforge.config.rl import RLConfig
from fedforge.core.errors import ConfigError
from fedforge.experiment import build_dataset, simulate_config
from fedforge.report.history import History
from fedforge.report.plots import trajectories_per_agent
from fedforge.rl.fedpg_br_server import fedpg_br
from fedforge.rl.workload import rl_workload
from fedforge.runtime.exchange import FederatedEvaluation
from fedforge.train.program import LocalSGD

TINY = """
seed = 2
[rl]
agents = 2
episodes = 3
max_episode_steps = 40
heldout = 2
eval_episodes = 2
spread = { length = [0.35, 0.65] }
[client]
lr = 0.05
[server]
rounds = 2
clients_per_round = 2
[evaluation]
fraction = 1.0
"""


def _tiny(**rl: object) -> RLConfig:
    base: dict[str, object] = {
        "agents": 3,
        "episodes": 3,
        "max_episode_steps": 40,
        "heldout": 2,
        "eval_episodes": 2,
        "spread": {"length": (0.35, 0.65)},
    }
    return RLConfig.model_validate({**base, **rl})


def test_fedforge_run_trains_two_agents_for_two_rounds(tmp_path: Path) -> None:
    config = tmp_path / "rl.toml"
    config.write_text(TINY)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "test episode_return" in result.output
    history = History.load(out / "history.json")
    assert [r.round for r in history] == [0, 1, 2]
    assert history[0].metrics["test_episode_return"] > 0  # the initial policy, held out
    for record in history[1:]:
        assert record.clients_completed == 2
        assert record.metrics["trajectories"] == 3.0
        assert 1 <= record.metrics["fed_eval.episode_return"] <= 40
        assert 1 <= record.metrics["test_episode_return"] <= 40
        assert record.train_loss == -record.metrics["episode_return"]
    assert trajectories_per_agent(history, 2) == [(0, 0.0), (1, 3.0), (2, 6.0)]
    assert (out / "report.png").stat().st_size > 0
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["finished"]


@pytest.mark.parametrize("method", ["fedavg", "fedpg"])
def test_vectorized_agents_equal_sequential_gymnasium_agents(method: str) -> None:
    """The vectorized runtime (torch dynamics, vmapped policies) and the sequential one
    (gymnasium, one agent at a time) collect the same trajectories (the same returns, to the
    last bit); the policies agree to float32 rounding (vmap batches the agents' gradients, so
    sums reduce in another order): 1e-6 after FedAvg's Adam steps, 1e-4 on FedPG's raw
    gradients (|g| ~ 10)."""
    workload = rl_workload(_tiny(method=method, faulty=1, fault="random_action"), 0)
    runs = {
        backend: simulate(
            workload,
            algorithm=FedAvg(LocalSGD(lr=0.05)),
            rounds=2,
            clients_per_round=3,
            backend=backend,
            federated_eval=FederatedEvaluation(1.0),
            verbose=0,
        )
        for backend in ("sequential", "vectorized", "auto")
    }
    assert runs["auto"].backend == "vectorized"
    assert runs["sequential"].backend == "sequential"
    sequential, vectorized = runs["sequential"], runs["vectorized"]
    tolerance = 1e-6 if method == "fedavg" else 1e-4
    for name, value in sequential.state.params.items():
        np.testing.assert_allclose(vectorized.state.params[name], value, rtol=0, atol=tolerance)
    for a, b in zip(sequential.history[1:], vectorized.history[1:], strict=True):
        assert a.metrics["episode_return"] == b.metrics["episode_return"]
        assert a.metrics["fed_eval.episode_return"] == b.metrics["fed_eval.episode_return"]


def test_fedpg_br_filters_noisy_agents_and_keeps_honest_ones() -> None:
    rl = _tiny(agents=5, episodes=6, heldout=0, method="fedpg_br", faulty=2, fault="random_noise")
    result = simulate(
        rl_workload(rl, 0),
        algorithm=fedpg_br(rl, 0),
        aggregation=RobustAggregation("fedpg_br", batch_size=6, alpha=0.4),
        rounds=2,
        clients_per_round=5,
        verbose=0,
    )
    for record in result.history[1:]:  # (a faulty agent whose noise is small may pass)
        assert record.clients["excluded"] and set(record.clients["excluded"]) <= {0, 1}
    assert result.history[-1].round == 2


def test_fedpg_br_keeps_every_honest_agent_in_every_round() -> None:
    """With the paper's settings (the authors' standardized estimator, sigma 0.06, Adam lr
    1e-3), 3 of 10 agents flipping signs: the filter keeps all 7 honest agents in every round
    and excludes the flippers in most. (With GPOMDP's unnormalized reports it kept nobody.)"""
    rl = RLConfig(
        agents=10, episodes=32, max_episode_steps=100, heldout=0, method="fedpg_br", faulty=3,
        fault="sign_flip",
    )  # fmt: skip
    assert rl.estimator == "standardized"
    result = simulate(
        rl_workload(rl, 1),
        algorithm=fedpg_br(rl, 1),
        aggregation=RobustAggregation("fedpg_br", batch_size=rl.episodes),  # sigma 0.06
        rounds=6,
        clients_per_round=10,
        seed=1,
        backend="vectorized",
        verbose=0,
    )
    excluded = [set(r.clients.get("excluded", [])) for r in result.history[1:]]
    assert len(excluded) == 6
    kept = [10 - len(e) for e in excluded]
    assert all(e <= {0, 1, 2} for e in excluded), excluded  # every honest agent, every round
    assert all(k >= 7 for k in kept), kept
    assert sum(e == {0, 1, 2} for e in excluded) >= 5, excluded


def test_a_resumed_run_continues_where_it_stopped(tmp_path: Path) -> None:
    rl = _tiny(method="fedpg_br", heldout=0)
    run = {
        "algorithm": fedpg_br(rl, 1),
        "aggregation": RobustAggregation("fedpg_br", batch_size=3),
        "clients_per_round": 3,
        "seed": 1,
        "verbose": 0,
    }
    whole = simulate(rl_workload(rl, 1), rounds=3, **run)  # type: ignore[arg-type]
    simulate(rl_workload(rl, 1), rounds=2, state_dir=tmp_path, **run)  # type: ignore[arg-type]
    resumed = simulate(rl_workload(rl, 1), rounds=3, state_dir=tmp_path, resume=True, **run)  # type: ignore[arg-type]
    for name, value in whole.state.params.items():
        np.testing.assert_array_equal(resumed.state.params[name], value)
    assert [r.round for r in resumed.history] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ('[algorithm]\nname = "scaffold"', "assumes supervised local SGD"),
        ('[rl]\nmethod = "fedpg_br"', "set aggregation.kind = 'fedpg_br'"),
        ('[aggregation]\nkind = "fedpg_br"', "rl.method = 'fedavg' reports changes"),
        ("[client]\nepochs = 2", "client.epochs describes local SGD on examples"),
        ('[privacy]\nmode = "sample"\nnoise_multiplier = 1.0', "DP-SGD) clips examples"),
        ('[attack]\nkind = "label_flip"', "poisons examples"),
        ('[rl]\nmethod = "fedpg"\npenalty = "kl"', "rl.penalty applies to rl.method = 'fedavg'"),
        ("[rl]\nmini_batch = 8", "rl.mini_batch applies to rl.method = 'fedpg_br'"),
        ("[rl]\nfaulty = 3", "rl.faulty = 3 exceeds rl.agents = 2"),
        (
            '[rl]\nestimator = "standardized"\nbaseline = false',
            "cannot run with rl.baseline = false",
        ),
        ("[rl]\nbogus = 1", "rl.bogus: unknown key; allowed keys here: env, agents"),
        ("[rl]\nphysics = { pole = 0.4 }", "rl.physics: CartPole-v1 has no physical parameter"),
    ],
)
def test_what_does_not_compose_with_rl_agents_is_refused_at_load(
    tmp_path: Path, extra: str, problem: str
) -> None:
    text = TINY
    section = extra.partition("\n")[0]
    if section in text:  # merge into the existing section
        text = text.replace(section + "\n", extra + "\n")
    else:
        text += extra + "\n"
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises((ConfigError, ValueError)) as caught:
        load_config(path)
    assert problem in str(caught.value)
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_fedpg_br_under_secure_aggregation_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        TINY.replace("[rl]\n", '[rl]\nmethod = "fedpg_br"\n')
        + '[aggregation]\nkind = "secure_sum"\n'
    )
    with pytest.raises((ConfigError, ValueError)) as caught:
        load_config(path)
    assert "secure aggregation would hide the reports the filter must see" in str(caught.value)


@pytest.mark.parametrize(
    "stages",
    [
        '[update]\nclip_norm = 0.05\ncodec = "q8"\n[aggregation]\nkind = "median"\n',
        '[privacy]\nmode = "central"\nnoise_multiplier = 0.5\nclip_norm = 0.05\n'
        '[aggregation]\nkind = "secure_sum"\n',
    ],
    ids=["clip-q8-median", "central-dp-secagg"],
)
def test_the_usual_stages_apply_to_agents_records(tmp_path: Path, stages: str) -> None:
    path = tmp_path / "rl.toml"
    path.write_text(TINY.replace("[evaluation]\nfraction = 1.0\n", "") + stages)
    config = load_config(path)
    result = simulate_config(config, build_dataset(config), backend="sequential")
    last = result.history[-1]
    assert last.round == 2 and last.clients_completed == 2
    metrics = last.metrics
    if "privacy" in stages:
        assert metrics["dp.epsilon"] > 0
    else:
        assert metrics["clip.clipped"] == 2.0  # both agents' policy changes exceed 0.05
