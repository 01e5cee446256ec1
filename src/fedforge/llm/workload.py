"""Federated LoRA as a :class:`~fedforge.Workload`: ``fedforge run`` with a ``[lora]``
section, :func:`fedforge.simulate` with :func:`lora_workload`, and deployed clients all
train the same model on the same text.

The model (:class:`LoraTextModule`) is the process's one base (loaded once,
:func:`~fedforge.llm.adapters.load_lora_model`) with peft LoRA layers; only the adapters and
a classification head are trainable (``requires_grad``), so only they are exchanged: the
frozen base stays on each side and the handshake compares its SHA-256
(``train/torch_model.py``). ``ffa`` freezes ``A`` too (every process derives the same ``A``
from the seed). Its input is one integer array ``x`` of shape ``(n, 2, seq_len)``: token ids
and attention mask; its output, logits over the package labels (classify) or over the
vocabulary for the token after the window (next_token, the Shakespeare task's framing:
each example is a window and the token that follows it).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from fedforge.aggregate.kinds import Aggregation, WeightedMean
from fedforge.aggregate.server_opt import ServerOptimizer, ServerSGD
from fedforge.algorithms.base import Algorithm
from fedforge.algorithms.fedavg import FedAvg
from fedforge.core.errors import ConfigError, DataError
from fedforge.data.datasets import ArrayDataset
from fedforge.llm.adapters import LoraModel, load_lora_model
from fedforge.llm.memory import available_memory, check_fits, estimate_memory
from fedforge.llm.models import DecoderShape, LoraModelSpec, Task, TextModel
from fedforge.llm.modes import Mode, traits
from fedforge.llm.sites import classify_split, next_token_texts, read_site_file
from fedforge.llm.stdlib_text import CLASSES
from fedforge.llm.tokens import TokenCache, default_cache_dir, encode_classification, encode_stream
from fedforge.train.program import LocalProgram, LocalSGD
from fedforge.workload.base import Site, Workload

if TYPE_CHECKING:
    from fedforge.algorithms.lora_exact import LoraPair
    from fedforge.config import RunConfig

ModelName = Literal["minilm", "gpt2-small"]
LORA = ".lora_"


@dataclass(frozen=True)
class LoraSetup:
    """Which base, which LoRA, which aggregation mode and how much text (the ``[lora]``
    section's keys)."""

    model: ModelName | None = "minilm"
    pretrained: str | None = None
    task: Task | None = None
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()
    aggregation: Mode = "fedit"
    exact_factors: Literal["svd", "mean"] = "svd"
    clients: int = 10
    seq_len: int = 64
    examples: int | None = None
    test_examples: int | None = None
    decoder: DecoderShape = field(default_factory=DecoderShape)
    seed: int = 0

    @property
    def task_name(self) -> Task:
        if self.task is not None:
            return self.task
        if self.model is None:
            raise ConfigError("lora.pretrained needs lora.task (classify or next_token)")
        return "classify" if self.model == "minilm" else "next_token"

    def spec(self) -> LoraModelSpec:
        traits(self.aggregation)  # an unknown mode is refused here
        return LoraModelSpec(
            task=self.task_name,
            pretrained=self.pretrained,
            num_labels=len(CLASSES),
            decoder=self.decoder,
            rank=self.rank,
            alpha=self.alpha,
            targets=self.targets,
            seed=self.seed,
        )

    @classmethod
    def of(cls, config: RunConfig) -> LoraSetup:
        lora = config.lora
        return cls(
            model=lora.model,
            pretrained=lora.pretrained,
            task=lora.task,
            rank=lora.rank,
            alpha=lora.alpha,
            targets=tuple(lora.targets),
            aggregation=lora.aggregation,
            exact_factors=lora.exact_factors,
            clients=lora.clients,
            seq_len=lora.seq_len,
            examples=lora.examples,
            test_examples=lora.test_examples,
            decoder=DecoderShape(
                n_embd=lora.decoder_width,
                n_layer=lora.decoder_layers,
                n_head=lora.decoder_heads,
                n_positions=max(lora.seq_len, 8),
            ),
            seed=config.seed,
        )


class LoraTextModule(nn.Module):
    """``forward(x)``, ``x`` integer ``(n, 2, L)`` (token ids, attention mask): logits per
    example (classify: the package; next_token: the token after the window's last real
    token, from that position's hidden state only)."""

    def __init__(self, text: TextModel) -> None:
        super().__init__()
        self.text = text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0].long(), x[:, 1].long()
        if self.text.head is not None:
            logits: torch.Tensor = self.text(ids, mask)
            return logits
        base: Any = self.text.base  # a Hugging Face causal language model
        hidden = base.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = (mask.sum(1) - 1).clamp(min=0)
        out: torch.Tensor = base.get_output_embeddings()(hidden[torch.arange(len(ids)), last])
        return out


def build_module(lm: LoraModel, mode: Mode) -> LoraTextModule:
    """A copy of the process's model; trainable: the adapters the mode trains and the head."""
    module = LoraTextModule(copy.deepcopy(lm.module))
    trains_a = traits(mode).trains_a
    for name, param in module.named_parameters():
        adapter = ".lora_B." in name or (".lora_A." in name and trains_a)
        param.requires_grad_(adapter or name.startswith("text.head."))
    return module.eval()


def lora_pairs(setup: LoraSetup) -> tuple[LoraPair, ...]:
    """The adapted weights of the model's parameters, for exact aggregation."""
    from fedforge.algorithms.lora_exact import LoraPair

    lm = load_lora_model(setup.spec())
    return tuple(
        LoraPair(
            a=f"text.{m.module}.lora_A.default.weight",
            b=f"text.{m.module}.lora_B.default.weight",
            base=f"text.{m.module}.base_layer.weight",
            scale=m.scale,
            transposed=m.transposed,
        )
        for m in lm.layout.matrices
    )


@functools.lru_cache(maxsize=8)
def check_memory(setup: LoraSetup, batch_size: int, momentum: float, limit_mb: int | None) -> None:
    """Refuse, before training, a run whose estimated peak (base, adapters, gradients,
    optimizer state, activations: ``llm/memory.py``) for one client at a time exceeds
    ``limit_mb`` (default: the memory available), naming the estimate and what to lower."""
    lm = load_lora_model(setup.spec())
    program = LocalProgram(LocalSGD(batch_size=batch_size, momentum=momentum))
    estimate = estimate_memory(lm, program, 1, max(batch_size, 1), setup.seq_len)
    available = available_memory() if limit_mb is None else (limit_mb << 20) - estimate.base
    try:
        check_fits(estimate, max(available, 0))
    except ConfigError as exc:
        limit = f" (lora.memory_limit_mb = {limit_mb})" if limit_mb is not None else ""
        raise ConfigError(f"{exc}{limit}") from None


def _cache() -> TokenCache:
    return TokenCache(default_cache_dir())


def _classify_arrays(lm: LoraModel, items: list[tuple[str, int]], seq_len: int) -> ArrayDataset:
    texts = [t for t, _ in items]
    enc = encode_classification(lm.tokenizer, texts, seq_len, _cache(), lm.spec.tokenizer_dir())
    x = np.stack([enc["ids"], enc["mask"].astype(np.int32)], 1)
    return ArrayDataset(x, np.array([label for _, label in items], np.int64))


def _window_arrays(lm: LoraModel, text: str, seq_len: int) -> ArrayDataset:
    enc = encode_stream(lm.tokenizer, text, seq_len, _cache(), lm.spec.tokenizer_dir())
    full = enc["valid"][:, -1] > 0  # the last window may be cut short
    tokens = enc["tokens"][full]
    if not len(tokens):
        raise DataError(f"fewer than {seq_len + 1} tokens of text")
    x = np.stack([tokens[:, :-1], np.ones_like(tokens[:, :-1])], 1)
    return ArrayDataset(x, tokens[:, -1].astype(np.int64))


def _head(data: ArrayDataset, count: int | None) -> ArrayDataset:
    return data if count is None else data.subset(np.arange(min(count, len(data))))


def _split_windows(data: ArrayDataset) -> tuple[ArrayDataset, ArrayDataset]:
    """(first 80% of a site's windows, last 20%: its share of the test set)."""
    cut = max(1, round(len(data) * 0.8))
    return data.subset(np.arange(cut)), data.subset(np.arange(cut, len(data)))


def lora_workload(
    setup: LoraSetup,
    *,
    batch_size: int = 10,
    momentum: float = 0.0,
    memory_limit_mb: int | None = None,
) -> Workload:
    """The LoRA workload; the memory estimate for ``batch_size`` (and momentum's state) is
    checked now, before any data is read or any client trains."""
    spec = setup.spec()
    check_memory(setup, batch_size, momentum, memory_limit_mb)
    lm = load_lora_model(spec)
    task, seq_len = setup.task_name, setup.seq_len

    def model() -> nn.Module:
        return build_module(lm, setup.aggregation)

    def data(site: Site) -> ArrayDataset:
        if site.path is not None:  # a deployed site: its own file
            own = read_site_file(site.path, task)
            if isinstance(own, str):
                return _head(_window_arrays(lm, own, seq_len), setup.examples)
            return _head(_classify_arrays(lm, own, seq_len), setup.examples)
        if task == "next_token":
            windows = _window_arrays(lm, next_token_texts(setup.clients)[site.index], seq_len)
            return _head(_split_windows(windows)[0], setup.examples)
        items = classify_split(setup.clients)[0][site.index]
        if not items:
            raise DataError(f"site {site.index} holds no module's docstrings: lower lora.clients")
        return _head(_classify_arrays(lm, items, seq_len), setup.examples)

    def test() -> ArrayDataset:
        if task == "next_token":
            parts = [
                _split_windows(_window_arrays(lm, text, seq_len))[1]
                for text in next_token_texts(setup.clients)
            ]
            pooled = ArrayDataset(
                np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])
            )
            return _spread(pooled, setup.test_examples)
        return _spread(
            _classify_arrays(lm, classify_split(setup.clients)[1], seq_len), setup.test_examples
        )

    schema = {
        "lora.task": task,
        "lora.seq_len": str(seq_len),
        "lora.aggregation": setup.aggregation,
        "lora.labels": ",".join(CLASSES) if task == "classify" else "next token",
    }
    name = setup.model or "pretrained"
    return Workload(
        model=model, data=data, test=test, sites=setup.clients, schema=schema, name=f"lora-{name}"
    )


def _spread(data: ArrayDataset, count: int | None) -> ArrayDataset:
    """At most ``count`` examples, evenly spaced (every package or site represented)."""
    if count is None or count >= len(data):
        return data
    return data.subset(np.linspace(0, len(data) - 1, count).round().astype(np.int64))


def configured_lora(config: RunConfig) -> Workload:
    """The ``[lora]`` section's workload (``configured_workload`` calls it)."""
    c = config.client
    return lora_workload(
        LoraSetup.of(config),
        batch_size=c.batch_size,
        momentum=c.momentum,
        memory_limit_mb=config.lora.memory_limit_mb,
    )


def lora_algorithm(
    setup: LoraSetup,
    local: LocalSGD | None = None,
    server_optimizer: ServerOptimizer | None = None,
    mu: float = 0.0,
) -> Algorithm:
    """The algorithm of ``setup.aggregation``: ``fedit`` and ``ffa`` are FedAvg (FedProx with
    ``mu``) on what the model trains; ``fedsa`` is FedPer with every ``B`` as the personal
    part; ``exact`` is :class:`~fedforge.algorithms.lora_exact.ExactLora` (run it with
    :func:`lora_aggregation`'s records). ``hetero`` is refused (not wired into runs)."""
    from fedforge.algorithms.fedper import FedPer
    from fedforge.algorithms.fedprox import FedProx
    from fedforge.algorithms.lora_exact import ExactLora

    local = local or LocalSGD()
    opt = server_optimizer or ServerSGD()
    mode = setup.aggregation
    if mode == "hetero":
        raise ConfigError(
            "lora.aggregation = 'hetero' is not wired into runs yet: clients of different "
            "ranks send records of different shapes (the math: fedforge.llm.modes.aggregate)"
        )
    if mode == "exact":
        if not isinstance(opt, ServerSGD) or opt.lr != 1.0 or opt.momentum != 0:
            raise ConfigError("exact LoRA replaces the model by the exact mean: server SGD, lr 1")
        pairs = lora_pairs(setup)
        return ExactLora(
            local=local, server_optimizer=opt, pairs=pairs, factors=setup.exact_factors
        )
    if mode == "fedsa":
        if mu:
            raise ConfigError("fedsa keeps B like FedPer's head: it runs FedAvg's objective")
        return FedPer(local=local, server_optimizer=opt, head=tuple(p.b for p in lora_pairs(setup)))
    if mu:
        return FedProx(local=local, server_optimizer=opt, mu=mu)
    return FedAvg(local=local, server_optimizer=opt)


def lora_aggregation(setup: LoraSetup) -> Aggregation:
    """``exact`` keeps every record (the mean of products needs each); the others average."""
    from fedforge.aggregate.stacked import StackedRecords

    return StackedRecords() if setup.aggregation == "exact" else WeightedMean()
