"""Exact federated LoRA (FedEx-LoRA's idea, Singhal et al. 2025): the server forms the
weighted mean of the clients' adapter products ``s B_k A_k``, keeps its best rank-``r`` part
as the new adapters (truncated SVD) and folds what rank ``r`` cannot hold (the residual) into
the frozen base weight, so base + adapters equal the mean of the clients' models exactly.

Clients train and send their adapter deltas as under FedAvg; the aggregation must keep every
record (:class:`~fedforge.aggregate.stacked.StackedRecords`), because the mean of products is
not a function of the mean of the factors. The accumulated residual of each adapted weight
lives in the server state (``extras["frozen/<base weight>"]``) and is broadcast each round as
that frozen parameter's offset (``train/torch_model.py``): the base itself never travels.
Other trainable arrays (a classification head) take the mean delta. The residual's Frobenius
norm, summed over matrices, is recorded every round (``lora.residual_norm``).

``factors`` picks the new adapters: ``"svd"``, the best rank-``r`` part of the mean (the
residual is its tail), or ``"mean"``, the weighted means of the clients' ``A`` and ``B``
(FedIT's factors, so local training continues at their scale; the residual is
``mean(s B_k A_k) - s mean(B) mean(A)``, FedEx-LoRA's own choice). Both are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from fedforge.aggregate.kinds import Aggregate
from fedforge.algorithms.base import METRIC, RoundContext, ServerState
from fedforge.algorithms.fedavg import FedAvg
from fedforge.core.errors import FedforgeError
from fedforge.core.params import Params
from fedforge.llm.aggregation import Factors, exact, fedit, product_mean
from fedforge.train.torch_model import FROZEN

RESIDUAL_NORM = "lora.residual_norm"


@dataclass(frozen=True)
class LoraPair:
    """One adapted weight: its factors' parameter names (``a``: ``r x d_in``, ``b``:
    ``d_out x r``), the frozen base weight's name, the LoRA scale, and whether the base weight
    is stored ``d_in x d_out`` (GPT-2's ``Conv1D``)."""

    a: str
    b: str
    base: str
    scale: float
    transposed: bool = False


@dataclass(frozen=True)
class ExactLora(FedAvg):
    pairs: tuple[LoraPair, ...] = ()
    factors: Literal["svd", "mean"] = "svd"

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ValueError("ExactLora needs the model's adapter pairs")

    def broadcast(self, state: ServerState) -> Params:
        """The accumulated residuals: offsets of the frozen base weights."""
        return {k: v for k, v in state.extras.items() if k.startswith(FROZEN)}

    def server_update(
        self, state: ServerState, aggregate: Aggregate, context: RoundContext
    ) -> ServerState:
        if aggregate.stacked is None or aggregate.weights is None:
            raise FedforgeError("exact LoRA needs every record: use StackedRecords")
        deltas, weights = aggregate.stacked, aggregate.weights
        params = dict(state.params)
        factors = {name for p in self.pairs for name in (p.a, p.b)}
        for name, value in state.params.items():  # the head: FedAvg's mean
            if name not in factors:
                params[name] = (value + aggregate.arrays[name]).astype(value.dtype)
        extras = dict(state.extras)
        squared = 0.0
        for p in self.pairs:
            a0, b0 = state.params[p.a], state.params[p.b]
            clients = [
                Factors(a0 + deltas[p.a][k], b0 + deltas[p.b][k], p.scale)
                for k in range(len(weights))
            ]
            if self.factors == "svd":
                result = exact(clients, weights, a0.shape[0], p.scale)
                new, residual = result.factors, result.residual.dense()
            else:  # FedEx-LoRA: the mean factors, and what their product misses
                new = fedit(clients, weights)
                residual = product_mean(clients, weights) - new.update()
            params[p.a] = new.a.astype(a0.dtype)
            params[p.b] = new.b.astype(b0.dtype)
            squared += float(np.sum(residual**2))
            residual = residual.T if p.transposed else residual
            key = FROZEN + p.base
            previous = extras.get(key)
            extras[key] = (residual if previous is None else previous + residual).astype(np.float32)
        extras[METRIC + RESIDUAL_NORM] = np.array([np.sqrt(squared)])
        return replace(state, params=params, extras=extras)
