"""Local LoRA training of many clients over one frozen base: sequential and batched.

Both paths run the same :class:`~fedforge.train.program.LocalProgram` (its gradient chain and
SGD step), on the same batches (:func:`~fedforge.train.program.batch_order`), from the same
start, and agree to float tolerance:

- :func:`train_sequential` trains one client on the process's peft model: its adapters are
  written in, local steps run eagerly (``LocalProgram.eager_step``), the result is read out.
- :func:`train_batched` trains a cohort as one program. Every client's batch is concatenated
  into one batch for the shared base, so each frozen weight is applied once per step to all
  clients' rows (one large matmul, base unbatched); each LoRA layer adds
  ``s_c * x_c A_c^T B_c^T`` for client ``c``'s rows with two batched matmuls over stacked
  factors ``A (C, r, d_in)``, ``B (C, d_out, r)``, and a classification head is applied per
  client the same way. The loss is the sum of the clients' mean losses, so autograd gives
  every client its own gradient in one backward pass; the chain and step then run on the
  stacked tensors (every transform is elementwise).

``torch.func.vmap`` over a Hugging Face model is not used: its attention-mask code branches
on tensor values, which ``vmap`` cannot trace. Clients of mixed ranks are zero-padded to the
largest rank (exact: see :func:`~fedforge.llm.layout.pad_rank`); each keeps its own scale.
Short batches are filled with copies of the client's first row at zero loss weight; clients
that run out of steps leave the stack (they come sorted by step count, most first).

Both paths use the process's one model in place (adapters written in; LoRA layers' forwards
patched for the duration of a batched call): one training call at a time per model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedforge.core.params import Params
from fedforge.llm.adapters import LoraModel, get_adapters, set_adapters, trainable_tensors
from fedforge.llm.layout import HEAD, AdapterLayout, crop_rank, pad_rank
from fedforge.llm.tokens import IGNORE
from fedforge.train.program import LocalProgram, Tensors, batch_order


@dataclass(frozen=True)
class TextData:
    """One client's examples: ``ids``/``mask`` ``(n, L)``; ``labels`` ``(n,)`` (classes) or
    ``(n, L)`` (next tokens, ``IGNORE`` where nothing is predicted)."""

    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def text_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over examples (``classify``) or over predicted tokens."""
    if logits.dim() == 2:
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


class Packed(nn.Module):
    """``module(ids, mask)`` as ``forward(x)`` with ``x = stack([ids, mask], 1)``, the one-input
    form ``LocalProgram.eager_step`` calls."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.module(x[:, 0], x[:, 1])
        return out


def trimmed(data: TextData, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's tensors, cut after its last real token (right padding only)."""
    mask = data.mask[rows]
    width = int(np.flatnonzero(mask.any(0)).max()) + 1 if mask.any() else 1
    labels = data.labels[rows]
    return (
        torch.as_tensor(data.ids[rows][:, :width], dtype=torch.long),
        torch.as_tensor(mask[:, :width], dtype=torch.long),
        torch.as_tensor(labels[:, :width] if labels.ndim == 2 else labels, dtype=torch.long),
    )


def check_program(program: LocalProgram) -> None:
    if program.personal is not None or program.head_first is not None or program.own_start:
        raise ValueError("LoRA training takes each client's start explicitly: no personal copy")
    if program.local.loss_fn is not text_loss:
        raise ValueError("LoRA training needs LocalSGD(loss_fn=text_loss)")


@dataclass(frozen=True)
class ClientResult:
    """A client's trained arrays (at its own rank), mean training loss and step count."""

    params: Params
    train_loss: float
    steps: int


def train_sequential(
    lm: LoraModel,
    program: LocalProgram,
    start: Mapping[str, np.ndarray],
    data: TextData,
    rng: np.random.Generator,
    trained: Sequence[str],
    layout: AdapterLayout | None = None,
    shared: Tensors | None = None,
) -> ClientResult:
    """One client on the process's peft model; only the arrays named in ``trained`` move
    (``ffa`` leaves ``A`` out)."""
    check_program(program)
    layout = layout or lm.layout
    set_adapters(lm, start, layout)
    own = trainable_tensors(lm)
    params = {n: own[n] for n in trained}
    state = program.init({n: p.detach() for n, p in params.items()})
    module = Packed(lm.module)
    losses = []
    order = batch_order(len(data), program.local.batch_size, program.local.epochs, rng)
    for rows in order:
        ids, mask, labels = trimmed(data, rows)
        state, loss = program.eager_step(
            module, params, state, shared or {}, {}, torch.stack([ids, mask], 1), labels
        )
        losses.append(float(loss))
    out = crop_rank(get_adapters(lm), layout)
    return ClientResult(out, float(np.mean(losses)) if losses else 0.0, len(order))


@contextmanager
def client_batched(
    lm: LoraModel, clients: int, stacked: Tensors, scales: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """While active, each LoRA layer (and the head) of ``lm`` computes client ``c``'s rows
    with client ``c``'s stacked tensors: the input's rows are ``clients`` equal blocks."""
    patched: list[nn.Module] = []

    def lora_forward(
        layer: nn.Module, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor
    ) -> Callable[..., torch.Tensor]:
        base = layer.get_submodule("base_layer")

        def forward(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            out: torch.Tensor = base(x, *args, **kwargs)
            rows = x.reshape(clients, -1, x.shape[-1])
            low = torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2))
            return out + (low * s[:, None, None]).reshape(out.shape)

        return forward

    def head_forward(w: torch.Tensor, bias: torch.Tensor) -> Callable[..., torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            rows = x.reshape(clients, -1, x.shape[-1])
            return torch.baddbmm(bias[:, None, :], rows, w.transpose(1, 2)).flatten(0, 1)

        return forward

    try:
        for m in lm.layout.matrices:
            layer = lm.module.get_submodule(m.module)
            fn = lora_forward(layer, stacked[m.a_name], stacked[m.b_name], scales[m.module])
            setattr(layer, "forward", fn)  # noqa: B010 (an instance attribute shadows the method)
            patched.append(layer)
        if lm.module.head is not None:
            head = lm.module.head
            fn = head_forward(stacked[HEAD + "weight"], stacked[HEAD + "bias"])
            setattr(head, "forward", fn)  # noqa: B010
            patched.append(head)
        yield
    finally:
        for module in patched:
            del module.forward


def _client_losses(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, clients: int
) -> torch.Tensor:
    """Each client's mean loss over its real examples (or predicted tokens)."""
    if logits.dim() == 2:
        per = F.cross_entropy(logits, labels, reduction="none") * weights
        per = per.reshape(clients, -1)
        return per.sum(1) / weights.reshape(clients, -1).sum(1)
    flat = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    counts = (labels != IGNORE).reshape(clients, -1).sum(1)
    return flat.reshape(clients, -1).sum(1) / counts


def train_batched(
    lm: LoraModel,
    program: LocalProgram,
    starts: Sequence[Mapping[str, np.ndarray]],
    datas: Sequence[TextData],
    rngs: Sequence[np.random.Generator],
    trained: Sequence[str],
    layouts: Sequence[AdapterLayout] | None = None,
    shared: Tensors | None = None,
) -> list[ClientResult]:
    """A cohort trained as one batched program; results in the order of ``starts``."""
    check_program(program)
    count = len(starts)
    layouts = list(layouts or [lm.layout] * count)
    if not (count == len(datas) == len(rngs) == len(layouts)) or count == 0:
        raise ValueError("need one start, data set, generator and layout per client")
    orders = [
        batch_order(len(d), program.local.batch_size, program.local.epochs, r)
        for d, r in zip(datas, rngs, strict=True)
    ]
    modules = [m.module for m in lm.layout.matrices]
    if any([m.module for m in lay.matrices] != modules for lay in layouts):
        raise ValueError("every client layout must adapt the model's modules, in its order")
    unknown = set(trained) - set(lm.layout.spec())
    if unknown:
        raise ValueError(f"not trainable arrays of this model: {sorted(unknown)}")
    rank = max(m.rank for lay in layouts for m in lay.matrices)
    sort = sorted(range(count), key=lambda i: -len(orders[i]))
    padded = [pad_rank(starts[i], layouts[i], rank) for i in sort]
    stacked = {n: torch.from_numpy(np.stack([p[n] for p in padded])).float() for n in padded[0]}
    scales = {
        m.module: torch.tensor([layouts[i].matrices[j].scale for i in sort], dtype=torch.float32)
        for j, m in enumerate(lm.layout.matrices)
    }
    state = program.init({n: stacked[n] for n in trained})
    losses: list[list[float]] = [[] for _ in range(count)]
    for step in range(len(orders[sort[0]])):
        active = sum(1 for i in sort if len(orders[i]) > step)
        ids, mask, labels, weights = _cohort_batch(
            [datas[i] for i in sort[:active]], [orders[i][step] for i in sort[:active]]
        )
        leaves = {n: stacked[n][:active].detach().requires_grad_(n in trained) for n in stacked}
        view = {m.module: scales[m.module][:active] for m in lm.layout.matrices}
        with client_batched(lm, active, leaves, view):
            per_client = _client_losses(lm.module(ids, mask), labels, weights, active)
        params = {n: leaves[n] for n in trained}
        total = per_client.sum()
        for term in program.terms:
            total = total + term.value(params, shared or {}, {})
        grads = torch.autograd.grad(total, list(params.values()))
        with torch.no_grad():
            views = {n: stacked[n][:active] for n in trained}
            sub = tuple({n: s[n][:active] for n in s} for s in state)
            program.apply(views, dict(zip(params, grads, strict=True)), sub, shared or {}, {}, True)
        for row, value in enumerate(per_client.detach().tolist()):
            losses[sort[row]].append(value)
    results: dict[int, ClientResult] = {}
    for row, i in enumerate(sort):
        arrays = {n: t[row].numpy().copy() for n, t in stacked.items()}
        mean = float(np.mean(losses[i])) if losses[i] else 0.0
        results[i] = ClientResult(crop_rank(arrays, layouts[i]), mean, len(orders[i]))
    return [results[i] for i in range(count)]


def _cohort_batch(
    datas: Sequence[TextData], rows: Sequence[np.ndarray]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The active clients' batches as one, client-major, each filled to the largest batch
    with copies of its first row at weight zero, cut after the last real token."""
    size = max(len(r) for r in rows)
    filled = [np.concatenate([r, np.repeat(r[:1], size - len(r))]) for r in rows]
    ids = np.concatenate([d.ids[r] for d, r in zip(datas, filled, strict=True)])
    mask = np.concatenate([d.mask[r] for d, r in zip(datas, filled, strict=True)])
    labels = np.concatenate([d.labels[r] for d, r in zip(datas, filled, strict=True)])
    weights = np.concatenate([np.arange(size) < len(r) for r in rows]).astype(np.float32)
    if labels.ndim == 2:  # next tokens: filler rows predict nothing
        labels = np.where(weights[:, None] > 0, labels, IGNORE)
    width = int(np.flatnonzero(mask.any(0)).max()) + 1
    return (
        torch.as_tensor(ids[:, :width], dtype=torch.long),
        torch.as_tensor(mask[:, :width], dtype=torch.long),
        torch.as_tensor(labels[:, :width] if labels.ndim == 2 else labels, dtype=torch.long),
        torch.from_numpy(weights),
    )
