"""The LoRA aggregation modes against a NumPy mean of B_k A_k (no extra needed)."""

from __future__ import annotations

import numpy as np
import pytest

from fedforge.llm.aggregation import (
    Factors,
    exact,
    fedit,
    ffa,
    hetero,
    low_rank_svd,
    product_mean,
)
from fedforge.llm.layout import AdaptedMatrix, AdapterLayout, crop_rank, init_adapters, pad_rank
from fedforge.llm.modes import (
    MODES,
    aggregate,
    client_record,
    exchanged_names,
    residual_bytes,
    slice_rank,
    traits,
    uplink_bytes,
)

D_IN, D_OUT = 24, 18


def random_clients(
    rng: np.random.Generator, ranks: list[int], alpha: float = 16.0
) -> list[Factors]:
    return [
        Factors(rng.normal(size=(r, D_IN)), rng.normal(size=(D_OUT, r)), alpha / r) for r in ranks
    ]


def reference_mean(clients: list[Factors], weights: np.ndarray) -> np.ndarray:
    """The weighted mean of s_k B_k A_k, written out in dense NumPy."""
    total = sum(w * c.scale * (c.b @ c.a) for w, c in zip(weights, clients, strict=True))
    return total / weights.sum()


def test_exact_merged_update_is_the_weighted_mean_of_the_client_products() -> None:
    rng = np.random.default_rng(0)
    clients = random_clients(rng, [4, 4, 4, 4, 4])
    weights = rng.uniform(1, 10, 5)
    result = exact(clients, weights, rank=4, scale=4.0)
    merged = result.factors.update() + result.residual.dense()
    np.testing.assert_allclose(merged, reference_mean(clients, weights), atol=1e-10)
    assert result.factors.rank == 4
    # The residual is what rank 4 cannot hold: its norm is the tail of the mean's spectrum.
    sigma = np.linalg.svd(reference_mean(clients, weights), compute_uv=False)
    assert result.residual_norm == pytest.approx(np.sqrt(np.sum(sigma[4:] ** 2)), rel=1e-9)
    assert result.residual_norm == pytest.approx(np.linalg.norm(result.residual.dense()), rel=1e-9)
    # And rank 4 keeps the best part (Eckart-Young): the factors are the truncated SVD.
    u, s, vt = np.linalg.svd(reference_mean(clients, weights))
    np.testing.assert_allclose(result.factors.update(), (u[:, :4] * s[:4]) @ vt[:4], atol=1e-10)


def test_fedit_is_not_the_mean_of_the_products_on_a_constructed_example() -> None:
    # Two clients with the same update e11 = B A, reached with opposite signs of both factors:
    # the mean update is e11, but mean(B) = mean(A) = 0, so FedIT's update is zero.
    a = np.zeros((1, 3))
    a[0, 0] = 1.0
    b = np.zeros((3, 1))
    b[0, 0] = 1.0
    clients = [Factors(a, b, 1.0), Factors(-a, -b, 1.0)]
    weights = np.ones(2)
    assert product_mean(clients, weights)[0, 0] == 1.0
    np.testing.assert_array_equal(fedit(clients, weights).update(), 0.0)
    result = exact(clients, weights, rank=1, scale=1.0)
    np.testing.assert_allclose(result.factors.update(), product_mean(clients, weights), atol=1e-12)


def test_fedit_differs_from_the_exact_mean_on_random_adapters() -> None:
    rng = np.random.default_rng(1)
    clients = random_clients(rng, [4, 4, 4])
    weights = np.array([1.0, 2.0, 3.0])
    gap = np.linalg.norm(fedit(clients, weights).update() - reference_mean(clients, weights))
    assert gap > 0.1 * np.linalg.norm(reference_mean(clients, weights))


def test_ffa_equals_exact_when_a_is_shared() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(4, D_IN))
    bs = [rng.normal(size=(D_OUT, 4)) for _ in range(4)]
    weights = rng.uniform(1, 5, 4)
    clients = [Factors(a, b, 2.0) for b in bs]
    shared = ffa(bs, a, 2.0, weights)
    result = exact(clients, weights, rank=4, scale=2.0)
    np.testing.assert_allclose(shared.update(), result.factors.update(), atol=1e-10)
    np.testing.assert_allclose(shared.update(), reference_mean(clients, weights), atol=1e-10)
    assert result.residual_norm < 1e-10  # the mean has rank 4: nothing to fold


def test_hetero_projection_error_is_the_tail_of_the_mean_eckart_young() -> None:
    rng = np.random.default_rng(3)
    clients = random_clients(rng, [4, 8, 16, 4, 8])
    weights = rng.uniform(1, 5, 5)
    mean = reference_mean(clients, weights)
    sigma = np.linalg.svd(mean, compute_uv=False)
    result = hetero(clients, weights, {4: 4.0, 8: 2.0, 16: 1.0})
    for rank, factors in result.factors.items():
        assert factors.rank == rank
        error = np.linalg.norm(mean - factors.update())
        tail = np.sqrt(np.sum(sigma[rank:] ** 2))
        assert error <= tail * (1 + 1e-9) + 1e-12
        assert error == pytest.approx(tail, rel=1e-9)  # and it is attained
        assert result.tail_norms[rank] == pytest.approx(tail, rel=1e-9)
    # What even the largest rank cannot hold is the residual: together they are the mean.
    np.testing.assert_allclose(
        result.factors[16].update() + result.residual.dense(), mean, atol=1e-9
    )


def test_low_rank_svd_matches_the_dense_svd() -> None:
    rng = np.random.default_rng(4)
    left, right = rng.normal(size=(30, 12)), rng.normal(size=(12, 40))
    svd = low_rank_svd(left, right)
    np.testing.assert_allclose(
        svd.s, np.linalg.svd(left @ right, compute_uv=False)[:12], rtol=1e-10
    )
    np.testing.assert_allclose((svd.u * svd.s) @ svd.vt, left @ right, atol=1e-10)


def test_bad_weights_are_refused() -> None:
    clients = random_clients(np.random.default_rng(5), [2, 2])
    for weights in ([1.0], [1.0, -1.0], [0.0, 0.0], [np.nan, 1.0]):
        with pytest.raises(ValueError, match="weight"):
            exact(clients, weights, 2, 8.0)
    with pytest.raises(ValueError, match="one rank"):
        fedit(random_clients(np.random.default_rng(5), [2, 4]), [1.0, 1.0])


LAYOUT = AdapterLayout(
    (
        AdaptedMatrix("enc.0.query", 24, 24, 4, 4.0),
        AdaptedMatrix("enc.0.value", 24, 24, 4, 4.0),
        AdaptedMatrix("dec.0.c_attn", 24, 72, 4, 4.0, transposed=True),
    ),
    head=(("weight", (3, 24)), ("bias", (3,))),
)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_bytes_per_round_equal_the_formula(mode: str, dtype: type) -> None:
    trained = {n: np.ones(s.shape, np.float32) for n, s in LAYOUT.spec().items()}
    record = client_record(mode, trained, LAYOUT)
    sent = sum(np.asarray(v, dtype).nbytes for v in record.values())
    formula = {
        "fedit": lambda m: m.rank * (m.d_in + m.d_out),
        "exact": lambda m: m.rank * (m.d_in + m.d_out),
        "hetero": lambda m: m.rank * (m.d_in + m.d_out),
        "ffa": lambda m: m.rank * m.d_out,
        "fedsa": lambda m: m.rank * m.d_in,
    }[mode]
    head = 3 * 24 + 3
    expected = (sum(formula(m) for m in LAYOUT.matrices) + head) * np.dtype(dtype).itemsize
    assert sent == expected == uplink_bytes(mode, LAYOUT, dtype)


def test_each_modes_record_holds_only_what_it_sends() -> None:
    assert all(
        n.startswith("lora_B/") or n.startswith("head/") for n in exchanged_names("ffa", LAYOUT)
    )
    assert all(
        n.startswith("lora_A/") or n.startswith("head/") for n in exchanged_names("fedsa", LAYOUT)
    )
    assert [traits(m).summable for m in MODES] == [True, True, False, False, True]
    with pytest.raises(ValueError, match="choose one of"):
        traits("mean")


def _records(rng: np.random.Generator, layouts: list[AdapterLayout]) -> list[dict[str, np.ndarray]]:
    return [
        {n: rng.normal(size=s.shape) for n, s in lay.spec(np.float64).items()} for lay in layouts
    ]


def _wmean(arrays: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    return sum(w * a for w, a in zip(weights, arrays, strict=True)) / weights.sum()


def _dense(params: dict[str, np.ndarray], layout: AdapterLayout) -> list[np.ndarray]:
    return [m.scale * params[m.b_name] @ params[m.a_name] for m in layout.matrices]


@pytest.mark.parametrize("mode", ["exact", "ffa", "fedit", "fedsa"])
def test_model_level_aggregate_of_each_mode(mode: str) -> None:
    rng = np.random.default_rng(6)
    records = _records(rng, [LAYOUT] * 3)
    shared_a = init_adapters(LAYOUT, seed=0)
    if mode == "ffa":
        for r in records:
            r.update({m.a_name: shared_a[m.a_name] for m in LAYOUT.matrices})
    weights = np.array([1.0, 3.0, 2.0])
    sent = [client_record(mode, r, LAYOUT) for r in records]
    out = aggregate(mode, sent, weights, [LAYOUT] * 3, LAYOUT, frozen_a=shared_a)
    assert set(out.params) == set(exchanged_names(mode, LAYOUT))
    np.testing.assert_allclose(
        out.params["head/weight"],
        sum(w * r["head/weight"] for w, r in zip(weights, records, strict=True)) / 6,
    )
    truth = [
        sum(w * d for w, d in zip(weights, ds, strict=True)) / 6
        for ds in zip(*(_dense(r, LAYOUT) for r in records), strict=True)
    ]
    if mode in ("exact", "ffa"):
        merged = {**shared_a, **out.params}
        for m, got, want in zip(LAYOUT.matrices, _dense(merged, LAYOUT), truth, strict=True):
            residual = out.residual[m.module].dense() if mode == "exact" else 0.0
            np.testing.assert_allclose(got + residual, want, atol=1e-9)
        if mode == "exact":
            assert out.residual_norm > 0  # three rank-4 clients: the mean has rank 12
    elif mode == "fedsa":
        for m in LAYOUT.matrices:
            np.testing.assert_allclose(
                out.params[m.a_name],
                sum(w * r[m.a_name] for w, r in zip(weights, records, strict=True)) / 6,
            )


def test_model_level_hetero_projects_to_each_clients_rank() -> None:
    rng = np.random.default_rng(7)
    layouts = [LAYOUT.with_rank(r, 16.0) for r in (4, 8, 16)]
    records = _records(rng, layouts)
    out = aggregate("hetero", records, [1.0, 1.0, 1.0], layouts, layouts[-1])
    assert sorted(out.by_rank) == [4, 8, 16]
    for rank, lay in zip((4, 8, 16), layouts, strict=True):
        assert {n: a.shape for n, a in out.by_rank[rank].items() if n.startswith("lora")} == {
            n: s.shape for n, s in lay.spec().items() if n.startswith("lora")
        }
        # One broadcast serves every rank: slicing the top rank gives each rank's projection.
        sliced = slice_rank(out.params, layouts[-1], lay)
        for name, value in out.by_rank[rank].items():
            np.testing.assert_allclose(sliced[name], value, atol=1e-12)
    with pytest.raises(ValueError, match="hetero"):
        aggregate("exact", records, [1.0, 1.0, 1.0], layouts, layouts[-1])


def test_pad_and_crop_rank_keep_the_product() -> None:
    rng = np.random.default_rng(8)
    small = LAYOUT.with_rank(2, 16.0)
    params = {n: rng.normal(size=s.shape) for n, s in small.spec().items()}
    padded = pad_rank(params, small, 6)
    for m in small.matrices:
        np.testing.assert_allclose(
            padded[m.b_name] @ padded[m.a_name], params[m.b_name] @ params[m.a_name]
        )
    back = crop_rank(padded, small)
    assert all(np.array_equal(back[n], params[n]) for n in params)


def test_residual_bytes_take_the_cheaper_of_factors_and_dense() -> None:
    rng = np.random.default_rng(9)
    result = exact(random_clients(rng, [2, 2, 2]), [1, 1, 1], rank=2, scale=8.0)
    low = result.residual  # rank 4 of 18 x 24: factors are cheaper than dense
    assert residual_bytes({"m": low}) == 4 * low.rank * (D_IN + D_OUT)
