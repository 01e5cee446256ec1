"""Where LoRA adapters live in fedforge's ``Params``: names by role, shapes, scales.

A LoRA-adapted weight ``W`` (``d_out x d_in``) is used as ``W + scale * B @ A`` with ``A``
(``rank x d_in``) and ``B`` (``d_out x rank``). In ``Params`` its factors are named by role,
``lora_A/<module>`` and ``lora_B/<module>`` (``<module>`` is the adapted module's path in the
base model), and a trained task head's arrays are ``head/<name>``. Exchange and aggregation
select arrays by these prefixes, never by framework-specific names (peft's
``base_model.model....lora_A.default.weight`` stays inside :mod:`fedforge.llm.adapters`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from fedforge.core.params import ArraySpec, Params, ParamSpec

LORA_A = "lora_A/"
LORA_B = "lora_B/"
HEAD = "head/"


@dataclass(frozen=True)
class AdaptedMatrix:
    """One adapted base weight: its module path, sizes, LoRA rank and scale.

    ``transposed`` marks a base weight stored ``d_in x d_out`` (GPT-2's ``Conv1D``); the LoRA
    update is always ``d_out x d_in`` and is transposed when folded into such a weight."""

    module: str
    d_in: int
    d_out: int
    rank: int
    scale: float
    transposed: bool = False

    @property
    def a_name(self) -> str:
        return LORA_A + self.module

    @property
    def b_name(self) -> str:
        return LORA_B + self.module


@dataclass(frozen=True)
class AdapterLayout:
    """Every adapted matrix of a model, in module order, and the head's array shapes."""

    matrices: tuple[AdaptedMatrix, ...]
    head: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def spec(self, dtype: np.dtype | type = np.float32) -> ParamSpec:
        """Shape and dtype of every trainable array (factors, then head)."""
        dt = np.dtype(dtype)
        out: ParamSpec = {}
        for m in self.matrices:
            out[m.a_name] = ArraySpec((m.rank, m.d_in), dt)
            out[m.b_name] = ArraySpec((m.d_out, m.rank), dt)
        for name, shape in self.head:
            out[HEAD + name] = ArraySpec(shape, dt)
        return out

    def with_rank(self, rank: int, alpha: float) -> AdapterLayout:
        """The same modules at another rank, with peft's scale ``alpha / rank``."""
        if rank < 1:
            raise ValueError(f"a LoRA rank must be >= 1, got {rank}")
        return replace(
            self,
            matrices=tuple(replace(m, rank=rank, scale=alpha / rank) for m in self.matrices),
        )

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(HEAD + name for name, _ in self.head)


def factor_names(layout: AdapterLayout, role: str) -> list[str]:
    """The ``Params`` names of one role (``LORA_A`` or ``LORA_B``), in module order."""
    if role not in (LORA_A, LORA_B):
        raise ValueError(f"unknown factor role {role!r}")
    return [m.a_name if role == LORA_A else m.b_name for m in layout.matrices]


def init_adapters(layout: AdapterLayout, seed: int) -> Params:
    """Fresh adapters as peft initializes them: ``A`` Kaiming-uniform (bound ``1/sqrt(d_in)``,
    peft's ``kaiming_uniform_(a=sqrt(5))``), ``B`` zero, so the initial update is zero; the
    head is not touched (it comes from the model). Deterministic in ``seed``: every client
    and the server derive the same shared ``A`` (FFA-LoRA freezes it)."""
    rng = np.random.default_rng(seed)
    out: Params = {}
    for m in layout.matrices:
        bound = 1.0 / np.sqrt(m.d_in)
        out[m.a_name] = rng.uniform(-bound, bound, (m.rank, m.d_in)).astype(np.float32)
        out[m.b_name] = np.zeros((m.d_out, m.rank), np.float32)
    return out


def pad_rank(params: Mapping[str, np.ndarray], layout: AdapterLayout, rank: int) -> Params:
    """Factors zero-padded to ``rank`` (rows of ``A``, columns of ``B``).

    The padded update ``B_pad @ A_pad`` equals ``B @ A`` exactly, and under gradient descent the
    padding stays zero (its gradients are products with the other factor's zero padding), so a
    cohort of mixed ranks can be stacked and trained as one batch."""
    out = dict(params)
    for m in layout.matrices:
        if rank < m.rank:
            raise ValueError(f"cannot pad rank {m.rank} of {m.module} down to {rank}")
        a = np.zeros((rank, m.d_in), params[m.a_name].dtype)
        a[: m.rank] = params[m.a_name]
        b = np.zeros((m.d_out, rank), params[m.b_name].dtype)
        b[:, : m.rank] = params[m.b_name]
        out[m.a_name], out[m.b_name] = a, b
    return out


def crop_rank(params: Mapping[str, np.ndarray], layout: AdapterLayout) -> Params:
    """Padded factors cut back to each matrix's own rank in ``layout``."""
    out = dict(params)
    for m in layout.matrices:
        out[m.a_name] = np.ascontiguousarray(params[m.a_name][: m.rank])
        out[m.b_name] = np.ascontiguousarray(params[m.b_name][:, : m.rank])
    return out
