"""Exact LoRA's server update: base offset + new adapters = the weighted mean of the
clients' models, whatever the records; fedit's mean of factors is not."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest

from fedforge.aggregate.kinds import Aggregate
from fedforge.algorithms.base import RoundContext, model_view, state_metrics
from fedforge.algorithms.lora_exact import RESIDUAL_NORM, ExactLora, LoraPair
from fedforge.train.torch_model import FROZEN

RANK, D_IN, D_OUT, SCALE = 2, 5, 4, 1.5


def _round(algorithm: ExactLora, state, deltas, weights):  # type: ignore[no-untyped-def]
    stacked = {n: np.stack([d[n] for d in deltas]) for n in deltas[0]}
    w = np.asarray(weights, np.float64)
    mean = {n: np.tensordot(w / w.sum(), v, axes=1) for n, v in stacked.items()}
    aggregate = Aggregate(mean, {}, len(deltas), float(w.sum()), stacked=stacked, weights=w)
    return algorithm.server_update(state, aggregate, RoundContext(1, 3, 3))


@pytest.mark.parametrize(
    ("transposed", "factors"), [(False, "svd"), (True, "svd"), (False, "mean")]
)
def test_exact_update_is_the_weighted_mean_of_the_clients_models(
    transposed: bool, factors: Literal["svd", "mean"]
) -> None:
    rng = np.random.default_rng(0)
    pair = LoraPair("a", "b", "base.weight", SCALE, transposed)
    algorithm = ExactLora(pairs=(pair,), factors=factors)
    params = {
        "a": rng.standard_normal((RANK, D_IN)).astype(np.float32),
        "b": rng.standard_normal((D_OUT, RANK)).astype(np.float32),
        "head": np.zeros(3, np.float32),
    }
    state = algorithm.init(params)
    weights = [1.0, 2.0, 5.0]
    expected_offset = np.zeros((D_OUT, D_IN))
    for _ in range(2):  # two rounds: the residual accumulates in the server state
        deltas = [
            {n: (0.3 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in params.items()}
            for _ in weights
        ]
        old = state.params
        models = [
            SCALE * (old["b"] + d["b"]).astype(np.float64) @ (old["a"] + d["a"]).astype(np.float64)
            for d in deltas
        ]
        mean_model = sum(w * m for w, m in zip(weights, models, strict=True)) / sum(weights)
        state = _round(algorithm, state, deltas, weights)
        offset = model_view(algorithm, state)[FROZEN + "base.weight"].astype(np.float64)
        offset = offset.T if transposed else offset
        new = SCALE * state.params["b"].astype(np.float64) @ state.params["a"]
        residual = offset - expected_offset  # this round's fold into the base
        # base + adapters hold the exact mean of the clients' models
        np.testing.assert_allclose(residual + new, mean_model, atol=2e-5)
        norm = state_metrics(state)[RESIDUAL_NORM]
        assert norm > 0.1  # rank 2 cannot hold the mean of 3 clients' rank-2 models
        np.testing.assert_allclose(norm, np.linalg.norm(residual), rtol=1e-4)
        expected_offset = offset
    head = np.tensordot(
        np.asarray(weights) / sum(weights), np.stack([d["head"] for d in deltas]), 1
    )
    np.testing.assert_allclose(state.params["head"] - old["head"], head, atol=1e-6)


def test_fedit_on_the_same_records_is_not_the_mean_of_the_models() -> None:
    rng = np.random.default_rng(1)
    a = [rng.standard_normal((RANK, D_IN)) for _ in range(2)]
    b = [rng.standard_normal((D_OUT, RANK)) for _ in range(2)]
    mean_of_products = (b[0] @ a[0] + b[1] @ a[1]) / 2
    product_of_means = ((b[0] + b[1]) / 2) @ ((a[0] + a[1]) / 2)
    assert np.linalg.norm(mean_of_products - product_of_means) > 0.1


def test_exact_without_every_record_is_an_error() -> None:
    algorithm = ExactLora(pairs=(LoraPair("a", "b", "w", 1.0),))
    state = algorithm.init({"a": np.zeros((1, 2)), "b": np.zeros((2, 1))})
    with pytest.raises(Exception, match="every record"):
        algorithm.server_update(state, Aggregate({}, {}, 1, 1.0), RoundContext(1, 1, 1))
