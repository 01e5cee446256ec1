"""Update codecs: sizes match the formulas, quantizers are unbiased, errors stay bounded."""

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from bench.bench_codecs import timings
from fedforge.compress.codecs import (
    BFloat16,
    Codec,
    Float16,
    StochasticQuantizer,
    TopK,
    concat,
    with_error_feedback,
)
from fedforge.compress.rotation import Rotated, rotate, rotation_shape, unrotate

CODECS: list[Codec[Any]] = [
    Float16(),
    BFloat16(),
    StochasticQuantizer(8, None),
    StochasticQuantizer(8, 256),
    StochasticQuantizer(4, None),
    StochasticQuantizer(4, 16),
    StochasticQuantizer(2, 7),
    StochasticQuantizer(1, None),
    TopK(0.1),
    TopK(1.0),
    Rotated(StochasticQuantizer(4, None)),
    Rotated(StochasticQuantizer(8, 64), block=None),
]
IDS = [c.name for c in CODECS]


def _batch(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _block_steps(q: StochasticQuantizer, step: np.ndarray, d: int) -> np.ndarray:
    """Each coordinate's quantization step, from the per-block steps."""
    size = d if q.block is None else min(q.block, d)
    return np.repeat(step, size, axis=1)[:, :d]


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
@pytest.mark.parametrize("d", [1, 7, 256, 1001])
def test_sizes_dtypes_and_round_trip_of_the_arrays(codec: Codec[Any], d: int) -> None:
    n = 3
    payload = codec.encode(_batch(n, d), [11, 12, 13])
    arrays = payload.arrays()
    for a in arrays.values():
        assert a.ndim == 2 and a.shape[0] == n and a.dtype.kind in "uif"
    assert payload.nbytes == n * codec.encoded_bytes(d)
    assert payload.select([1]).nbytes == codec.encoded_bytes(d)
    out = codec.decode(payload, d)
    assert out.shape == (n, d) and out.dtype == np.float32 and out.flags.c_contiguous
    rebuilt = codec.from_arrays({k: v.copy() for k, v in arrays.items()})
    np.testing.assert_array_equal(codec.decode(rebuilt, d), out)
    parts = concat([payload.select(slice(0, 1)), payload.select([1, 2])])
    np.testing.assert_array_equal(codec.decode(parts, d), out)


def test_encoded_bytes_formulas() -> None:
    d = 200_000
    assert Float16().encoded_bytes(d) == BFloat16().encoded_bytes(d) == 400_000
    assert StochasticQuantizer(8, 256).encoded_bytes(d) == d + 8 * 782
    assert StochasticQuantizer(4, 256).encoded_bytes(d) == d // 2 + 8 * 782
    assert StochasticQuantizer(4, None).encoded_bytes(d) == d // 2 + 8
    assert StochasticQuantizer(4, None).encoded_bytes(7) == 4 + 8
    assert StochasticQuantizer(2, None).encoded_bytes(d) == d // 4 + 8
    assert TopK(0.1).encoded_bytes(d) == 8 * 20_000
    assert TopK(0.01).encoded_bytes(1001) == 8 * 11
    assert rotation_shape(d) == (262_144, 262_144)
    assert rotation_shape(d, 4096) == (4096, 200_704)
    assert rotation_shape(1001, 4096) == (1024, 1024)
    assert Rotated(StochasticQuantizer(4, None)).encoded_bytes(d) == 16 + 200_704 // 2 + 8


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
def test_rows_encode_independently_of_their_batch(codec: Codec[Any]) -> None:
    x, seeds = _batch(4, 300, seed=3), [5, 2**100 + 1, 0, 9]
    together = codec.encode(x, seeds).arrays()
    for i in range(4):
        alone = codec.encode(x[i : i + 1], seeds[i : i + 1]).arrays()
        for name, a in alone.items():
            np.testing.assert_array_equal(together[name][i : i + 1], a)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("block", [None, 16])
def test_stochastic_quantizer_is_unbiased(bits: int, block: int | None) -> None:
    draws, d = 4000, 100
    x = np.random.default_rng(1).standard_t(3, d).astype(np.float32)
    q = StochasticQuantizer(bits, block)  # type: ignore[arg-type]
    payload = q.encode(np.tile(x, (draws, 1)), np.arange(draws))
    mean = q.decode(payload, d).astype(np.float64).mean(axis=0)
    step = _block_steps(q, payload.step[:1], d)[0]
    # each draw has variance <= step^2 / 4: allow 6 standard errors of the mean
    assert np.all(np.abs(mean - x) <= 6 * step / (2 * math.sqrt(draws)) + 1e-6)
    assert np.abs(mean - x).max() > 0  # the draws really are random


def test_rotated_quantizer_is_unbiased_over_seeds() -> None:
    draws, d = 3000, 100
    x = np.random.default_rng(2).standard_t(2, d).astype(np.float32)
    codec = Rotated(StochasticQuantizer(4, None))
    payload = codec.encode(np.tile(x, (draws, 1)), np.arange(draws))
    mean = codec.decode(payload, d).astype(np.float64).mean(axis=0)
    step = float(payload.inner.step.max())
    assert np.abs(mean - x).max() <= 6 * step / (2 * math.sqrt(draws))


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("block", [None, 256, 5])
def test_quantization_error_is_at_most_one_step(bits: int, block: int | None) -> None:
    n, d = 6, 1001
    x = np.random.default_rng(4).standard_t(2, (n, d)).astype(np.float32)
    x[1] = 0.25  # a constant row decodes exactly
    q = StochasticQuantizer(bits, block)  # type: ignore[arg-type]
    payload = q.encode(x, range(n))
    error = np.abs(q.decode(payload, d) - x)
    step = _block_steps(q, payload.step, d)
    assert np.all(error <= step + 1e-6 * np.abs(x).max())
    assert not error[1].any()
    assert payload.low[0, 0] == x[0, : block or d].min()


def test_quantizer_is_reproducible_and_seed_dependent() -> None:
    x, q = _batch(2, 500), StochasticQuantizer(4, 64)
    a, b = q.encode(x, [1, 2]), q.encode(x, [1, 2])
    np.testing.assert_array_equal(a.codes, b.codes)
    assert not np.array_equal(a.codes[1], q.encode(x, [1, 3]).codes[1])


def test_float16_rounds_to_nearest_and_saturates() -> None:
    rng = np.random.default_rng(5)
    magnitude = np.exp2(rng.uniform(-14, 15.99, 20_000)).astype(np.float32)
    x = (magnitude * rng.choice([-1, 1], magnitude.size)).astype(np.float32)[None]
    codec = Float16()
    y = codec.decode(codec.encode(x), x.shape[1])
    assert np.all(np.abs(y - x) <= 2.0**-11 * np.abs(x))
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    specials = np.array([[1e6, -1e6, np.nan, 0.0]], np.float32)
    out = codec.decode(codec.encode(specials), 4)
    assert out[0, 0] == 65504 and out[0, 1] == -65504 and np.isnan(out[0, 2]) and out[0, 3] == 0


def test_bfloat16_rounds_to_nearest_even() -> None:
    codec = BFloat16()
    ties = np.array([[1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8)]], np.float32)
    expected = [1.0, 1 + 2**-6, 1 + 2**-7, -1.0]
    np.testing.assert_array_equal(codec.decode(codec.encode(ties), 4)[0], expected)
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(50_000) * np.exp2(rng.uniform(-100, 100, 50_000))).astype(np.float32)
    x[:6] = np.array([np.inf, -np.inf, 0.0, -0.0, 1e-40, np.finfo(np.float32).max])
    bits = codec.encode(x[None]).bits[0]
    reference = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, reference)
    normal = np.abs(x) >= np.finfo(np.float32).tiny
    normal[:6] = False
    y = codec.decode(codec.encode(x[None]), x.size)[0]
    assert np.all(np.abs(y[normal] - x[normal]) <= 2.0**-8 * np.abs(x[normal]))
    nan = codec.decode(codec.encode(np.array([[np.nan]], np.float32)), 1)
    assert np.isnan(nan).all()


def test_topk_keeps_the_largest_magnitudes() -> None:
    x = _batch(5, 1000, seed=7)
    codec = TopK(0.05)
    payload = codec.encode(x)
    assert payload.indices.shape == (5, 50) and payload.indices.dtype == np.int32
    assert np.all(np.diff(payload.indices, axis=1) > 0)
    y = codec.decode(payload, 1000)
    kept = y != 0
    assert np.all(kept.sum(axis=1) == 50)
    np.testing.assert_array_equal(y[kept], x[kept])
    smallest_kept = np.where(kept, np.abs(x), np.inf).min(axis=1)
    largest_dropped = np.where(kept, 0, np.abs(x)).max(axis=1)
    assert np.all(smallest_kept >= largest_dropped)


def test_error_feedback_carries_exactly_what_topk_dropped() -> None:
    rounds, n, d = 20, 3, 400
    rng = np.random.default_rng(8)
    residual = None
    sent, total = np.zeros((n, d), np.float32), np.zeros((n, d), np.float32)
    for _ in range(rounds):
        x = rng.standard_normal((n, d)).astype(np.float32)
        before = x if residual is None else x + residual
        payload, residual = with_error_feedback(TopK(0.02), x, residual)
        decoded = TopK(0.02).decode(payload, d)
        np.testing.assert_array_equal(decoded + residual, before)
        assert not np.take_along_axis(residual, payload.indices.astype(np.intp), 1).any()
        sent += decoded
        total += x
    assert residual is not None
    np.testing.assert_allclose(sent + residual, total, atol=1e-4)


@pytest.mark.parametrize(("d", "block"), [(1, None), (1001, None), (1100, 256), (5000, 128)])
def test_rotation_is_orthonormal(d: int, block: int | None) -> None:
    x, seeds = _batch(4, d, seed=9), [3, 1, 4, 2**127]
    y = rotate(x, seeds, block)
    assert y.shape == (4, rotation_shape(d, block)[1]) and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    np.testing.assert_allclose(unrotate(y, seeds, d, block), x, atol=1e-5)


@pytest.mark.parametrize("size", [2, 64, 512])
def test_rotation_is_a_signed_sylvester_hadamard_matrix(size: int) -> None:
    rows = rotate(np.eye(size, dtype=np.float32), [7] * size)  # row i = s_i H e_i / sqrt(size)
    hadamard: np.ndarray = np.ones((1, 1))
    while hadamard.shape[0] < size:
        hadamard = np.kron(hadamard, [[1, 1], [1, -1]])
    np.testing.assert_allclose(rows * np.sign(rows[:, :1]), hadamard / math.sqrt(size), atol=1e-6)
    np.testing.assert_allclose(rows @ rows.T, np.eye(size), atol=1e-5)


def test_rotation_lowers_low_bit_error_on_heavy_tailed_updates() -> None:
    x = np.random.default_rng(10).standard_t(1.5, (16, 4096)).astype(np.float32)
    seeds = range(16)
    errors = {}
    pair: tuple[Codec[Any], ...] = (
        StochasticQuantizer(4, None),
        Rotated(StochasticQuantizer(4, None)),
    )
    for codec in pair:
        errors[codec.name] = float(np.mean((codec.decode(codec.encode(x, seeds), 4096) - x) ** 2))
    plain, rotated = errors["q4/row"], errors["rotated4096-q4/row"]
    assert rotated < 0.2 * plain, errors


def test_mistakes_are_refused_with_a_reason() -> None:
    x = _batch(2, 10)
    with pytest.raises(ValueError, match="one seed per row"):
        StochasticQuantizer(4).encode(x)
    with pytest.raises(ValueError, match="need 2 seeds"):
        StochasticQuantizer(4).encode(x, [1])
    with pytest.raises(ValueError, match="not finite"):
        StochasticQuantizer(4).encode(np.array([[1.0, np.inf]]), [1])
    with pytest.raises(ValueError, match="bits must be"):
        StochasticQuantizer(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="codec and d"):
        StochasticQuantizer(4).decode(StochasticQuantizer(4).encode(x, [1, 2]), 12)
    payload = TopK(0.5).encode(x)
    payload.indices[0, 0] = 10
    with pytest.raises(ValueError, match="corrupt"):
        TopK(0.5).decode(payload, 10)
    with pytest.raises(ValueError, match="power of 2"):
        rotate(x, [1, 2], block=100)


def test_timings_report_every_codec() -> None:
    result = timings(d=1000, clients=2, repeats=1)
    assert len(result) == 8 and all(min(t) >= 0 for t in result.values())


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile", [1 << 18, 700])  # the whole batch in one tile, or row by row
def test_batched_codecs_send_each_clients_bytes_bit_for_bit(
    device: str, tile: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk encoded as one tensor program (on the CPU a few rows at a time, on CUDA at
    once) gives every client the bytes it sends when it encodes alone on the CPU, ties of
    top-k included; decoding the batch equals decoding each row."""
    from fedforge.compress import kernels

    x = _batch(5, 601, seed=11)
    x[2, :200] = 0.0  # ties at top-k's cut (zeros)
    x[3] = 0.5  # a constant row
    seeds = [7, 2**127 + 5, 0, 3, 2**64]
    codecs: list[Codec[Any]] = [
        StochasticQuantizer(8, 256),
        StochasticQuantizer(4, 64),
        StochasticQuantizer(2, None),
        TopK(0.02),
        TopK(0.7),
        Rotated(StochasticQuantizer(4, 128), block=128),
    ]
    alone = [[c.encode(x[i : i + 1], seeds[i : i + 1]).arrays() for i in range(5)] for c in codecs]
    monkeypatch.setattr(kernels, "TILE", tile)
    for codec, rows in zip(codecs, alone, strict=True):
        if device == "cpu":
            together = codec.encode(x, seeds)
        elif isinstance(codec, StochasticQuantizer):
            parts = codec.encode_tensor(torch.from_numpy(x).to(device), seeds)
            together = codec.from_arrays(
                dict(zip(("codes", "low", "step"), (p.cpu().numpy() for p in parts), strict=True))
            )
        elif isinstance(codec, TopK):
            idx, val = codec.encode_tensor(torch.from_numpy(x).to(device))
            together = codec.from_arrays(
                {"indices": idx.cpu().numpy().astype(np.int32), "values": val.cpu().numpy()}
            )
        else:
            continue  # (the rotation runs where the batch is; its parts are compared above)
        arrays = together.arrays()
        for i, row in enumerate(rows):
            for name, a in row.items():
                np.testing.assert_array_equal(arrays[name][i : i + 1], a, err_msg=codec.name)
        decoded = codec.decode(together, 601)
        for i in range(5):
            single = codec.decode(codec.from_arrays(rows[i]), 601)
            np.testing.assert_array_equal(decoded[i : i + 1], single)
    kept = TopK(0.7).encode(x[2:3]).indices[0]  # 421 of 601: 401 non-zeros, 20 zeros
    expected = np.concatenate([np.arange(20), np.arange(200, 601)])
    np.testing.assert_array_equal(kept, expected)  # the lowest tied zeros win


def _radix2_reference(a: torch.Tensor, size: int) -> torch.Tensor:
    """The plain radix-2 butterflies, lowest index bit first (strided views throughout)."""
    lead = a.numel() // size
    src = a.reshape(lead, size).clone()
    dst = torch.empty_like(src)
    h = 1
    while h < size:
        s, t = src.view(lead, size // (2 * h), 2, h), dst.view(lead, size // (2 * h), 2, h)
        torch.add(s[:, :, 0], s[:, :, 1], out=t[:, :, 0])
        torch.sub(s[:, :, 0], s[:, :, 1], out=t[:, :, 1])
        src, dst = dst, src
        h *= 2
    return src.view(a.shape)


def test_the_transposed_walsh_hadamard_transform_equals_plain_butterflies_bit_for_bit() -> None:
    from fedforge.compress import kernels

    scratch = kernels.Scratch(torch.device("cpu"))
    for size in (1, 2, 4, 8, 32, 128, 2048, 4096):
        for rows in (1, 3):
            x = torch.from_numpy(_batch(rows, 3 * size, seed=size))
            expected = _radix2_reference(x, size)
            got = x.clone()
            assert kernels.fwht_(got, size, scratch) is got
            assert torch.equal(got, expected), size


@pytest.mark.parametrize(
    "codec",
    [
        StochasticQuantizer(8, 256),
        StochasticQuantizer(4, 64),
        StochasticQuantizer(1, None),
        TopK(0.05),
        Rotated(StochasticQuantizer(4, 128), block=128),
    ],
    ids=lambda c: c.name,
)
def test_a_weighted_sum_of_payloads_equals_the_sum_of_the_decoded_rows(codec: Any) -> None:
    x = _batch(6, 1001, seed=3)
    weights = np.array([1.0, 2.5, 0.5, 7.0, 1.0, 3.0])
    payload = codec.encode(x, list(range(6)))
    expected = weights @ codec.decode(payload, 1001).astype(np.float64)
    got = codec.weighted_sum(payload, 1001, weights)
    exact = isinstance(codec, TopK)  # (quantizers accumulate in float32, as a chunk's sum)
    tolerance = 1e-12 if exact else 1e-6 * np.abs(expected).max()
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=tolerance)
    if isinstance(codec, TopK):  # indices not strictly ascending: not summed so
        forged = replace(payload, indices=payload.indices[:, ::-1].copy())
        assert codec.weighted_sum(forged, 1001, weights) is None


def _top_k_by_full_partition(x: np.ndarray, k: int) -> np.ndarray:
    """The k largest magnitudes' indices by one partition of each whole row (ties at the cut
    to the lowest indices)."""
    magnitude = np.abs(x)
    cut = np.partition(magnitude, x.shape[1] - k, axis=1)[:, x.shape[1] - k]
    rows = []
    for row, c in zip(magnitude, cut, strict=True):
        above = np.flatnonzero(row > c)
        rows.append(np.union1d(above, np.flatnonzero(row == c)[: k - len(above)]))
    return np.array(rows)


def test_top_k_from_sampled_candidates_equals_a_full_partition() -> None:
    """The CPU selection among the candidates above a sampled threshold picks exactly the
    indices a partition of the whole row does: Gaussian and heavy-tailed rows, ties at the
    cut, rows of a few distinct values, all-zero rows, k from 1 to d."""
    from fedforge.compress import kernels

    rng = np.random.default_rng(5)
    ties = rng.standard_normal((2, 9000)).astype(np.float32)
    ties[:, ::7] = 5.0  # 1,286 equal magnitudes at the top
    rows = [
        rng.standard_normal((3, 50_000)).astype(np.float32),
        rng.standard_t(1.2, (2, 20_000)).astype(np.float32),
        ties,
        rng.integers(-3, 4, (3, 5000)).astype(np.float32),
        np.zeros((1, 700), np.float32),
    ]
    for x in rows:
        d = x.shape[1]
        for k in {1, 7, math.ceil(0.01 * d), min(1286, d), d // 3, d - 1, d}:
            expected = _top_k_by_full_partition(x, k)
            np.testing.assert_array_equal(kernels._top_k_rows(x, k), expected, err_msg=f"{k}")
