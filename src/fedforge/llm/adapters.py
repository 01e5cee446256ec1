"""LoRA on a shared frozen base, through peft; adapters in and out as fedforge ``Params``.

:func:`load_lora_model` builds a model once per process (cached by its spec) and injects peft
LoRA layers into the target modules; only the adapters and the head are trainable. Every
simulated client of the process uses that one model: its adapters are written in before the
client trains (:func:`set_adapters`) and read out after (:func:`get_adapters`), as float32
arrays named by role (:mod:`fedforge.llm.layout`). :func:`base_fingerprint` is the SHA-256 of
the frozen base's bytes, what a network handshake compares.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedforge.core.errors import ConfigError
from fedforge.core.params import Params
from fedforge.llm.layout import HEAD, AdaptedMatrix, AdapterLayout, init_adapters
from fedforge.llm.models import (
    LoraModelSpec,
    TextModel,
    build_text_model,
    default_targets,
    load_tokenizer,
    require,
)

ADAPTER = "default"  # peft's adapter name; the only one fedforge injects


@dataclass(frozen=True)
class LoraModel:
    """A text model with LoRA layers injected, its adapter layout and its tokenizer."""

    spec: LoraModelSpec
    module: TextModel
    layout: AdapterLayout
    tokenizer: Any


def lora_layers(module: nn.Module) -> Iterator[tuple[str, Any]]:
    """(module path, peft LoRA layer) for every injected layer, in module order."""
    tuners = require("peft.tuners.lora")
    for name, sub in module.named_modules():
        if isinstance(sub, tuners.LoraLayer):
            yield name, sub


def inject_lora(model: TextModel, spec: LoraModelSpec) -> AdapterLayout:
    """Inject LoRA (rank ``spec.rank``, scale ``alpha / rank``, no dropout) into the base's
    target modules; freeze everything but the adapters and the head."""
    peft = require("peft")
    targets = list(spec.targets or default_targets(model))
    conv1d = require("transformers.pytorch_utils").Conv1D
    fan_in_fan_out = any(
        isinstance(m, conv1d) for n, m in model.base.named_modules() if n.endswith(tuple(targets))
    )
    config = peft.LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=targets,
        lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
    )
    try:
        peft.inject_adapter_in_model(config, model.base, adapter_name=ADAPTER)
    except ValueError as exc:  # peft: no module matches the targets
        raise ConfigError(f"LoRA targets {targets} do not fit the model: {exc}") from exc
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name or name.startswith("head."))
    matrices = tuple(
        AdaptedMatrix(
            module=path,
            d_in=int(layer.lora_A[ADAPTER].in_features),
            d_out=int(layer.lora_B[ADAPTER].out_features),
            rank=int(layer.r[ADAPTER]),
            scale=float(layer.scaling[ADAPTER]),
            transposed=bool(layer.fan_in_fan_out),
        )
        for path, layer in lora_layers(model)
    )
    if not matrices:
        raise ConfigError(f"no module of the model matches the LoRA targets {targets}")
    head = tuple(
        (n.removeprefix("head."), tuple(p.shape))
        for n, p in model.named_parameters()
        if n.startswith("head.")
    )
    return AdapterLayout(matrices, head)


@functools.lru_cache(maxsize=4)
def load_lora_model(spec: LoraModelSpec) -> LoraModel:
    """The process's one model for ``spec``: base loaded once, LoRA injected, adapters at
    their seeded initialization. Cached: every simulated client shares it."""
    model = build_text_model(spec)
    layout = inject_lora(model, spec)
    lm = LoraModel(spec, model, layout, load_tokenizer(spec))
    set_adapters(lm, {**init_adapters(layout, spec.seed), **get_head(lm)})
    return lm


def _layer(lm: LoraModel, module: str) -> Any:
    return lm.module.get_submodule(module)


def get_head(lm: LoraModel) -> Params:
    head = lm.module.head
    if head is None:
        return {}
    return {HEAD + n: p.detach().cpu().numpy().copy() for n, p in head.named_parameters()}


def get_adapters(lm: LoraModel) -> Params:
    """The current adapters and head as float32 arrays (copies), named by role."""
    out: Params = {}
    for m in lm.layout.matrices:
        layer = _layer(lm, m.module)
        out[m.a_name] = layer.lora_A[ADAPTER].weight.detach().cpu().numpy().copy()
        out[m.b_name] = layer.lora_B[ADAPTER].weight.detach().cpu().numpy().copy()
    return {**out, **get_head(lm)}


def set_adapters(
    lm: LoraModel, params: Mapping[str, np.ndarray], layout: AdapterLayout | None = None
) -> None:
    """Write adapters (and head) into the model. ``layout`` (default: the model's) may have
    lower ranks and other scales than the model (a ``hetero`` client): its factors are
    zero-padded to the model's rank and each layer's scale is set to the client's, which
    computes exactly the client's ``scale * B @ A`` and keeps the padding at zero in training."""
    layout = layout or lm.layout
    with torch.no_grad():
        for mine, own in zip(lm.layout.matrices, layout.matrices, strict=True):
            if (mine.module, mine.d_in, mine.d_out) != (own.module, own.d_in, own.d_out):
                raise ValueError(f"layout mismatch at {own.module}: {own} vs {mine}")
            if own.rank > mine.rank:
                raise ValueError(f"rank {own.rank} of {own.module} exceeds the model's {mine.rank}")
            a, b = params[own.a_name], params[own.b_name]
            if a.shape != (own.rank, own.d_in) or b.shape != (own.d_out, own.rank):
                raise ValueError(f"factor shapes {a.shape}, {b.shape} do not fit {own}")
            layer = _layer(lm, mine.module)
            weight_a, weight_b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            weight_a.zero_()[: own.rank].copy_(torch.from_numpy(np.asarray(a, np.float32)))
            weight_b.zero_()[:, : own.rank].copy_(torch.from_numpy(np.asarray(b, np.float32)))
            layer.scaling[ADAPTER] = own.scale
        head = lm.module.head
        if head is not None:
            for n, p in head.named_parameters():
                p.copy_(torch.from_numpy(np.asarray(params[HEAD + n], np.float32)))


def trainable_tensors(lm: LoraModel) -> dict[str, torch.Tensor]:
    """The model's own trainable tensors under their role names (what local training updates
    in place on the sequential path)."""
    out: dict[str, torch.Tensor] = {}
    for m in lm.layout.matrices:
        layer = _layer(lm, m.module)
        out[m.a_name] = layer.lora_A[ADAPTER].weight
        out[m.b_name] = layer.lora_B[ADAPTER].weight
    head = lm.module.head
    if head is not None:
        out.update({HEAD + n: p for n, p in head.named_parameters()})
    return out


def base_state(lm: LoraModel) -> Iterator[tuple[str, torch.Tensor]]:
    """The frozen base's tensors (parameters and persistent buffers) under the base
    checkpoint's own names, sorted: no adapter, no head."""
    items = []
    for name, tensor in lm.module.base.state_dict(keep_vars=True).items():
        if ".lora_" in name:
            continue
        items.append((name.replace(".base_layer.", "."), tensor))
    yield from sorted(items, key=lambda item: item[0])


def base_fingerprint(lm: LoraModel) -> str:
    """SHA-256 (hex) of the frozen base: every tensor's name, dtype, shape and bytes, in name
    order. Two processes hold the same base exactly when their fingerprints agree."""
    digest = hashlib.sha256()
    for name, tensor in base_state(lm):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fold_into_base(lm: LoraModel, residual: Mapping[str, np.ndarray]) -> None:
    """Add a dense ``d_out x d_in`` residual per module to the frozen base weight (``exact``'s
    fold; transposed for a ``d_in x d_out`` weight such as GPT-2's ``Conv1D``)."""
    by_module = {m.module: m for m in lm.layout.matrices}
    with torch.no_grad():
        for module, delta in residual.items():
            m = by_module[module]
            if delta.shape != (m.d_out, m.d_in):
                raise ValueError(f"residual of {module} has shape {delta.shape}")
            weight = _layer(lm, module).base_layer.weight
            value = torch.from_numpy(np.asarray(delta, np.float32))
            weight.add_(value.T if m.transposed else value)
