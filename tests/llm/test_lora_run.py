"""Federated LoRA end to end, as a user runs it: a ``[lora]`` configuration through the
simulation (both models, every wired mode), the Python API, a Hugging Face ``Trainer`` as
``client.train``; only adapters (and the head) travel; what does not compose is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedforge.config import RunConfig
from fedforge.core.errors import ConfigError
from tests.llm.conftest import need_extra

pytestmark = pytest.mark.timeout(300)

GPT2 = {
    "model": "gpt2-small",
    "rank": 4,
    "alpha": 8.0,
    "clients": 2,
    "seq_len": 12,
    "examples": 6,
    "test_examples": 8,
    "decoder_layers": 2,
    "decoder_width": 64,
    "decoder_heads": 2,
}
MINILM = {"model": "minilm", "rank": 2, "alpha": 4.0, "clients": 2, "seq_len": 12,
          "examples": 6, "test_examples": 10}  # fmt: skip


def _config(lora: dict[str, Any], **sections: dict[str, Any]) -> RunConfig:
    return RunConfig.model_validate(
        {
            "lora": lora,
            "client": {"epochs": 1, "batch_size": 3, "lr": 0.1},
            "server": {"rounds": 2, "clients_per_round": 2},
            "runtime": {"backend": "sequential"},
            **sections,
        }
    )


def _run(config: RunConfig, state_dir: Path | None = None):  # type: ignore[no-untyped-def]
    from fedforge.experiment import build_dataset, simulate_config

    return simulate_config(config, build_dataset(config), state_dir=state_dir)


def _matrices(config: RunConfig):  # type: ignore[no-untyped-def]
    from fedforge.llm.adapters import load_lora_model
    from fedforge.llm.workload import LoraSetup

    return load_lora_model(LoraSetup.of(config).spec()).layout


def test_gpt2_fedit_exchanges_adapters_only(tmp_path: Path) -> None:
    need_extra()
    from fedforge.runtime.checkpoint import CheckpointStore

    config = _config(GPT2)
    result = _run(config, tmp_path)
    layout = _matrices(config)
    per_client = 4 * sum(m.rank * (m.d_in + m.d_out) for m in layout.matrices)  # r(d_in+d_out)
    for record in result.history[1:]:
        assert record.clients_completed == 2
        assert record.bytes_up == record.bytes_down == 2 * per_client
    params = result.state.params
    assert params and all(".lora_" in n for n in params)  # no base weight in the state
    saved = CheckpointStore(tmp_path / "checkpoint").open_run(
        config.seed, result.state, resume=True
    )
    assert set(saved[1].params) == set(params)
    assert any(np.abs(v).sum() > 0 for n, v in params.items() if ".lora_B." in n)  # trained


def test_gpt2_exact_folds_the_residual_into_the_base() -> None:
    need_extra()
    from fedforge.train.torch_model import FROZEN

    result = _run(
        _config({**GPT2, "aggregation": "exact"}, client={"epochs": 2, "lr": 0.5, "batch_size": 2})
    )
    norms = [r.metrics["lora.residual_norm"] for r in result.history[1:]]
    assert len(norms) == 2 and all(n > 0 for n in norms)
    offsets = {k: v for k, v in result.state.extras.items() if k.startswith(FROZEN)}
    assert len(offsets) == 2  # c_attn of both layers
    model = result.model  # the final model: the base moved by the offsets
    from fedforge.llm.workload import LoraSetup, build_module

    setup = LoraSetup.of(_config({**GPT2, "aggregation": "exact"}))
    from fedforge.llm.adapters import load_lora_model

    initial = dict(build_module(load_lora_model(setup.spec()), "exact").named_parameters())
    final = dict(model.named_parameters())
    for name, offset in offsets.items():
        base = name[len(FROZEN) :]
        assert not final[base].requires_grad  # frozen, yet moved by the folded residual
        moved = (final[base] - initial[base]).detach().numpy()
        np.testing.assert_allclose(moved, offset, atol=1e-6)
    # the broadcast carries the residual: round 2 sends more than round 1
    assert result.history[2].bytes_down > result.history[1].bytes_down
    assert result.history[1].bytes_up == result.history[2].bytes_up


@pytest.mark.parametrize("mode", ["ffa", "fedsa"])
def test_minilm_ffa_and_fedsa_send_their_formula(mode: str) -> None:
    need_extra()
    config = _config({**MINILM, "aggregation": mode})
    result = _run(config)
    layout = _matrices(config)
    head = 384 * 10 + 10
    side = "d_out" if mode == "ffa" else "d_in"  # ffa: B up; fedsa: A up (B stays home)
    per_client = 4 * (sum(m.rank * getattr(m, side) for m in layout.matrices) + head)
    assert result.history[1].bytes_up == 2 * per_client
    names = set(result.state.params)
    if mode == "ffa":
        assert not any(".lora_A." in n for n in names)  # frozen A is derived, not sent
    else:
        assert any(".lora_B." in n for n in names)  # the server keeps B's initial value...
        assert result.history[-1].test_accuracy >= 0.0
    assert 0.0 <= result.history[-1].test_accuracy <= 1.0


def test_the_python_api_runs_a_lora_workload() -> None:
    need_extra()
    import fedforge
    from fedforge.llm.models import DecoderShape
    from fedforge.llm.workload import LoraSetup, lora_aggregation, lora_algorithm, lora_workload

    setup = LoraSetup(model="gpt2-small", rank=2, clients=2, seq_len=12, examples=4,
                      test_examples=4, decoder=DecoderShape(64, 2, 2, 12))  # fmt: skip
    result = fedforge.simulate(
        lora_workload(setup, batch_size=2),
        algorithm=lora_algorithm(setup),
        aggregation=lora_aggregation(setup),
        rounds=1,
        clients_per_round=2,
        verbose=0,
    )
    assert result.history[-1].clients_completed == 2


@pytest.mark.parametrize("mode", ["ffa", "exact", "fedsa"])  # (fedit: the other tests)
def test_a_hugging_face_trainer_is_the_clients_training_loop(mode: str) -> None:
    need_extra()
    from fedforge.llm.adapters import load_lora_model
    from fedforge.llm.workload import LoraSetup, build_module
    from fedforge.train.torch_model import TorchModel

    lora = {**GPT2, "aggregation": mode}
    config = _config(lora, client={"epochs": 1, "batch_size": 3, "lr": 0.1,
                                   "train": "fedforge.llm.hf_trainer:train"})  # fmt: skip
    result = _run(config)
    assert result.history[-1].clients_completed == 2
    assert np.isfinite(result.history[-1].train_loss)  # the Trainer's own loss, reported
    setup = LoraSetup.of(config)
    initial = TorchModel(build_module(load_lora_model(setup.spec()), mode)).get_params()
    moved = [n for n, v in result.state.params.items() if not np.allclose(v, initial[n])]
    assert any(".lora_" in n for n in moved)  # the Trainer trained the adapters


def test_a_run_that_will_not_fit_is_refused_before_training() -> None:
    need_extra()
    from fedforge.experiment import build_dataset

    config = _config({**GPT2, "memory_limit_mb": 1})
    with pytest.raises(ConfigError, match=r"estimated peak .* exceeds .*lora.memory_limit_mb = 1"):
        build_dataset(config)


@pytest.mark.parametrize(
    ("sections", "reason"),
    [
        ({"aggregation": {"kind": "secure_sum"}}, "cannot run with secure aggregation"),
        ({"aggregation": {"kind": "median"}}, "robust rule on factor rows"),
        ({"privacy": {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 1.0}},
         "privacy.mode = 'central'"),
        ({"server": {"optimizer": "adam", "rounds": 2, "clients_per_round": 2}},
         "server optimizer step on factors"),
        ({"runtime": {"backend": "vectorized"}}, "not wired into it yet"),
    ],
)  # fmt: skip
def test_what_does_not_compose_with_exact_is_refused_at_load(
    sections: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        _config({**GPT2, "aggregation": "exact"}, **sections)


def test_hetero_and_stray_lora_keys_are_refused_at_load() -> None:
    with pytest.raises(ValueError, match="'hetero' is not wired"):
        _config({**GPT2, "aggregation": "hetero"})
    with pytest.raises(ValueError, match=r"lora\.rank applies with lora\.model"):
        RunConfig.model_validate({"lora": {"rank": 4}})
    _config({**GPT2, "aggregation": "fedit"}, aggregation={"kind": "secure_sum"})  # a sum


def test_the_model_freezes_the_base_and_ffa_freezes_a() -> None:
    need_extra()
    from fedforge.llm.adapters import load_lora_model
    from fedforge.llm.workload import LoraSetup, build_module

    config = _config({**GPT2, "aggregation": "ffa"})
    setup = LoraSetup.of(config)
    module = build_module(load_lora_model(setup.spec()), "ffa")
    trained = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trained and all(".lora_B." in n for n in trained)
    x = torch.zeros((2, 2, 12), dtype=torch.int64)
    x[:, 1] = 1
    assert module(x).shape == (2, 30522)  # the next token over MiniLM's vocabulary


def test_the_vectorized_runtime_refuses_a_model_with_frozen_parameters() -> None:
    need_extra()
    import fedforge
    from fedforge.llm.models import DecoderShape
    from fedforge.llm.workload import LoraSetup, lora_workload

    setup = LoraSetup(model="gpt2-small", rank=2, clients=2, seq_len=12, examples=4,
                      test_examples=4, decoder=DecoderShape(64, 2, 2, 12))  # fmt: skip
    with pytest.raises(ConfigError, match="frozen parameters"):
        fedforge.simulate(lora_workload(setup), rounds=1, backend="vectorized", verbose=0)
