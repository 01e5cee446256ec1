"""The batched LoRA program equals per-client peft training: forward, gradients, steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.llm.conftest import random_adapters


def _client_data(lm, kind: str, sizes: list[int]):  # type: ignore[no-untyped-def]
    """Real text per client: docstrings of one package each, tokenized by the model's tokenizer."""
    from fedforge.llm.batched import TextData
    from fedforge.llm.stdlib_text import stdlib_corpus
    from fedforge.llm.tokens import (
        TokenCache,
        encode_classification,
        encode_stream,
        next_token_batch,
    )

    corpus = stdlib_corpus(["base64", "json", "shlex"]).by_package()
    out = []
    for label, (docs, size) in enumerate(zip(corpus.values(), sizes, strict=False)):
        texts = [d.text for d in docs]
        if kind == "classify":
            enc = encode_classification(
                lm.tokenizer, texts[:size], 20, TokenCache(None), lm.spec.tokenizer_dir()
            )
            out.append(TextData(enc["ids"], enc["mask"], np.full(size, label % 3)))
        else:
            w = encode_stream(
                lm.tokenizer, "\n\n".join(texts), 12, TokenCache(None), lm.spec.tokenizer_dir()
            )
            b = next_token_batch(w["tokens"][:size], w["valid"][:size])
            out.append(TextData(b["ids"], b["mask"], b["labels"]))
    return out


def _program(momentum: float = 0.0, epochs: int = 1, lr: float = 0.1):  # type: ignore[no-untyped-def]
    from fedforge.llm.batched import text_loss
    from fedforge.train.program import LocalProgram, LocalSGD

    return LocalProgram(
        LocalSGD(lr=lr, epochs=epochs, batch_size=2, momentum=momentum, loss_fn=text_loss)
    )


@pytest.fixture(params=["encoder", "decoder"])
def model(request):  # type: ignore[no-untyped-def]
    return request.getfixturevalue(request.param)


def test_batched_forward_equals_each_clients_peft_forward(model) -> None:  # type: ignore[no-untyped-def]
    from fedforge.llm.adapters import set_adapters
    from fedforge.llm.batched import client_batched

    rng = np.random.default_rng(0)
    starts = [random_adapters(model, rng) for _ in range(3)]
    datas = _client_data(model, model.spec.task, [2, 2, 2])
    ids = torch.cat([torch.as_tensor(d.ids, dtype=torch.long) for d in datas])
    mask = torch.cat([torch.as_tensor(d.mask, dtype=torch.long) for d in datas])
    stacked = {n: torch.from_numpy(np.stack([s[n] for s in starts])) for n in starts[0]}
    scales = {m.module: torch.full((3,), m.scale) for m in model.layout.matrices}
    with torch.no_grad(), client_batched(model, 3, stacked, scales):
        batched = model.module(ids, mask)
    for c, start in enumerate(starts):
        set_adapters(model, start)
        with torch.no_grad():
            alone = model.module(ids[2 * c : 2 * c + 2], mask[2 * c : 2 * c + 2])
        torch.testing.assert_close(batched[2 * c : 2 * c + 2], alone, rtol=1e-4, atol=1e-5)
    assert (
        model.module.get_submodule(model.layout.matrices[0].module).forward.__self__ is not None
    )  # restored


def test_batched_gradients_equal_each_clients_autograd_gradients(model) -> None:  # type: ignore[no-untyped-def]
    from fedforge.llm.adapters import set_adapters, trainable_tensors
    from fedforge.llm.batched import text_loss, train_batched

    rng = np.random.default_rng(1)
    starts = [random_adapters(model, rng) for _ in range(3)]
    datas = _client_data(model, model.spec.task, [2, 1, 2])  # a short batch: filler rows
    trained = list(model.layout.spec())
    results = train_batched(
        model,
        _program(lr=1.0),
        starts,
        datas,
        [np.random.default_rng(i) for i in range(3)],
        trained,
    )
    for start, data, result in zip(starts, datas, results, strict=True):
        set_adapters(model, start)
        own = trainable_tensors(model)
        loss = text_loss(
            model.module(
                torch.as_tensor(data.ids, dtype=torch.long),
                torch.as_tensor(data.mask, dtype=torch.long),
            ),
            torch.as_tensor(data.labels, dtype=torch.long),
        )
        grads = torch.autograd.grad(loss, [own[n] for n in trained])
        for name, g in zip(trained, grads, strict=True):
            np.testing.assert_allclose(
                start[name] - result.params[name], g.numpy(), rtol=1e-3, atol=2e-6
            )


@pytest.mark.parametrize("case", ["momentum", "mixed_ranks", "frozen_a"])
def test_batched_training_equals_sequential_peft_training(model, case: str) -> None:  # type: ignore[no-untyped-def]
    from fedforge.llm.batched import train_batched, train_sequential
    from fedforge.llm.layout import LORA_A

    rng = np.random.default_rng(2)
    starts = [random_adapters(model, rng) for _ in range(3)]
    layouts = [model.layout] * 3
    if case == "mixed_ranks":  # hetero: ranks 2, 4, 3 with peft's scales alpha / r
        layouts = [model.layout.with_rank(r, 16.0) for r in (2, 4, 3)]
        starts = [
            {
                n: a[: lay.matrices[0].rank]
                if n.startswith(LORA_A)
                else (a[:, : lay.matrices[0].rank] if a.ndim == 2 and n.startswith("lora_B") else a)
                for n, a in s.items()
            }
            for s, lay in zip(starts, layouts, strict=True)
        ]
    trained = [n for n in model.layout.spec() if not (case == "frozen_a" and n.startswith(LORA_A))]
    program = _program(momentum=0.9 if case == "momentum" else 0.0, epochs=2)
    datas = _client_data(model, model.spec.task, [3, 4, 2])  # 4, 4 and 2 steps: clients leave
    batched = train_batched(
        model,
        program,
        starts,
        datas,
        [np.random.default_rng(i) for i in range(3)],
        trained,
        layouts,
    )
    for i in range(3):
        alone = train_sequential(
            model, program, starts[i], datas[i], np.random.default_rng(i), trained, layouts[i]
        )
        assert alone.steps == batched[i].steps and alone.train_loss == pytest.approx(
            batched[i].train_loss, rel=1e-5
        )
        for name, value in alone.params.items():
            assert value.shape == starts[i][name].shape
            np.testing.assert_allclose(batched[i].params[name], value, rtol=1e-4, atol=1e-6)
            if name not in trained:
                np.testing.assert_array_equal(value, starts[i][name])  # FFA's A never moves
        moved = max(float(np.abs(alone.params[n] - starts[i][n]).max()) for n in trained)
        assert moved > 1e-3
