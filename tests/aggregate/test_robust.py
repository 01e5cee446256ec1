"""Byzantine-robust aggregation rules: hand-computed golden values, NumPy/SciPy references,
honest-cluster selection, breakdown under huge attacks, and the refused configurations."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedforge.aggregate.robust import (
    RobustResult,
    bulyan,
    centered_clipping,
    check_bounds,
    coordinate_median,
    geometric_median,
    krum,
    norm_bound,
    pairwise_sq_distances,
    trimmed_mean,
)
from fedforge.core.errors import ConfigError


def line(values: list[float]) -> np.ndarray:
    """Points (x, -x): squared distances are twice the 1-D ones, so the same rows win."""
    x = np.array(values, dtype=np.float64)
    return np.stack([x, -x], axis=1)


# --- golden values ------------------------------------------------------------------------


def test_coordinate_median_golden() -> None:
    # even n: sorted [1, 2, 3, 100] -> (2 + 3) / 2; sorted [-5, 0, 7, 10] -> (0 + 7) / 2
    even = np.array([[1.0, 10.0], [2.0, -5.0], [100.0, 0.0], [3.0, 7.0]])
    np.testing.assert_array_equal(coordinate_median(even).update, [2.5, 3.5])
    # odd n: the middle value, [1, 2, 100] -> 2 and [-5, 0, 10] -> 0
    np.testing.assert_array_equal(coordinate_median(even[:3]).update, [2.0, 0.0])


def test_trimmed_mean_golden() -> None:
    # beta 0.2, n 5: int(1.0) = 1 trimmed per end; [1, 2, 3, 4, 100] -> mean(2, 3, 4) = 3,
    # [-50, 0, 1, 2, 3] -> mean(0, 1, 2) = 1
    x = np.array([[1.0, 3.0], [100.0, -50.0], [2.0, 0.0], [4.0, 2.0], [3.0, 1.0]])
    result = trimmed_mean(x, 0.2)
    np.testing.assert_allclose(result.update, [3.0, 1.0])
    assert result.info["trimmed_per_end"] == 1
    # beta 0: the plain mean, [110 / 5, -44 / 5]
    np.testing.assert_allclose(trimmed_mean(x, 0.0).update, [22.0, -8.8])


def test_krum_and_multi_krum_golden() -> None:
    # 1-D values [0, 1, 2.5, 3, 20], f = 1: n - f - 2 = 2 nearest squared distances each:
    # 0: 1 + 6.25 = 7.25; 1: 1 + 2.25 = 3.25; 2.5: 0.25 + 2.25 = 2.5; 3: 0.25 + 4 = 4.25;
    # 20: 289 + 306.25. In 2-D (x, -x) every score doubles; the order is unchanged.
    x = line([0, 1, 2.5, 3, 20])
    result = krum(x, f=1)
    np.testing.assert_array_equal(result.update, [2.5, -2.5])
    np.testing.assert_array_equal(result.excluded, [0, 1, 3, 4])
    assert result.info["score_max_selected"] == pytest.approx(2 * 2.5)
    # m = 2: rows 2.5 and 1 -> 1.75; m = 3 adds 3 -> 6.5 / 3
    np.testing.assert_allclose(krum(x, f=1, m=2).update, [1.75, -1.75])
    multi = krum(x, f=1, m=3)
    np.testing.assert_allclose(multi.update, [6.5 / 3, -6.5 / 3])
    np.testing.assert_array_equal(multi.excluded, [0, 4])


def test_bulyan_golden() -> None:
    # 1-D [0, 1, 3, 4, 6, 100, 101], f = 1: theta = 5 picks by Krum on the rows left, with
    # |R| - f - 2 neighbours (ties to the lower row):
    #   |R| 7, k 4: 3 scores 1 + 4 + 9 + 9 = 23 (lowest)        -> row 2
    #   |R| 6, k 3: 4 scores 4 + 9 + 16 = 29                    -> row 3
    #   |R| 5, k 2: 1 scores 1 + 25 = 26                        -> row 1
    #   |R| 4, k 1: 100 and 101 score 1, 0 and 6 score 36      -> row 5 (an attacker)
    #   |R| 3, k 1: 0 and 6 score 36, 101 scores 95^2           -> row 0
    # picked [0, 1, 3, 4, 100]; beta = theta - 2f = 3 values nearest the median 3:
    # 3, 4, 1 -> 8/3 (and -8/3 for -x). Excluded: rows 4 (6) and 6 (101).
    result = bulyan(line([0, 1, 3, 4, 6, 100, 101]), f=1)
    np.testing.assert_allclose(result.update, [8 / 3, -8 / 3])
    np.testing.assert_array_equal(result.excluded, [4, 6])
    assert result.info == {"theta": 5.0, "beta": 3.0}


def test_geometric_median_golden() -> None:
    # Isosceles triangle (-1, 0), (1, 0), (0, 10): every angle < 120 degrees, so the median is
    # the Fermat point (0, y) seeing the base under 120 degrees: tan(60) = 1 / y, y = 1/sqrt(3).
    # Distances 1.155, 1.155, 9.42: the apex's coefficient (1/9.42) / (2/1.155 + 1/9.42) = 0.058
    # is below half its weight (1/6): down-weighted; the base's (0.47) is not.
    tri = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, 10.0]])
    result = geometric_median(tri, np.ones(3), tol=1e-14, max_iter=1000)
    np.testing.assert_allclose(result.update, [0.0, 1 / math.sqrt(3)], atol=1e-7)
    assert result.info["converged"] == 1.0
    assert result.downweighted.tolist() == [2]  # the apex is farther than the others
    # 1-D points 0, 1, 10: the median is the middle point 1 (the mean would be 11/3)
    np.testing.assert_allclose(
        geometric_median(line([0, 1, 10]), np.ones(3)).update, [1, -1], atol=1e-5
    )
    # weights 3 : 1 on the points 0 and 1: the weighted median is 0
    np.testing.assert_allclose(
        geometric_median(line([0, 1]), np.array([3.0, 1.0])).update, [0, 0], atol=1e-5
    )


def test_geometric_median_symmetric_configuration_is_the_center() -> None:
    # the four points (+-1, 0), (0, +-1) around (5, 5): by symmetry the median is (5, 5)
    pts = np.array([[6.0, 5.0], [4.0, 5.0], [5.0, 6.0], [5.0, 4.0]])
    result = geometric_median(pts, np.ones(4))
    np.testing.assert_allclose(result.update, [5.0, 5.0], atol=1e-12)
    assert result.downweighted.size == 0


def test_norm_bound_golden() -> None:
    # (3, 4) has norm 5 -> clipped to 2: (1.2, 1.6); (0, 1) stays; mean of the two
    x = np.array([[3.0, 4.0], [0.0, 1.0]])
    result = norm_bound(x, np.ones(2), max_norm=2.0)
    np.testing.assert_allclose(result.update, [0.6, 1.3])
    np.testing.assert_array_equal(result.downweighted, [0])
    # norms [5, 1, 3], median 3: (3, 4) -> (1.8, 2.4); weights 1, 1, 2:
    # ((1.8, 2.4) + (0, 1) + 2 (0, 3)) / 4 = (0.45, 2.35)
    x3 = np.array([[3.0, 4.0], [0.0, 1.0], [0.0, 3.0]])
    result = norm_bound(x3, np.array([1.0, 1.0, 2.0]), quantile=0.5)
    np.testing.assert_allclose(result.update, [0.45, 2.35])
    assert result.info["bound"] == pytest.approx(3.0)


def test_centered_clipping_golden() -> None:
    # center 0, tau 1: (3, 4) -> (0.6, 0.8); (0.5, 0) is inside; v1 = (0.55, 0.4).
    # Second iteration: (3, 4) - v1 = (2.45, 3.6), norm 4.354595..., clipped to
    # (0.562624..., 0.826713...); (0.5, 0) - v1 = (-0.05, -0.4), norm 0.403, kept;
    # v2 = v1 + their mean = (0.806312..., 0.613356...).
    x = np.array([[3.0, 4.0], [0.5, 0.0]])
    one = centered_clipping(x, np.ones(2), np.zeros(2), tau=1.0)
    np.testing.assert_allclose(one.update, [0.55, 0.4])
    np.testing.assert_array_equal(one.downweighted, [0])
    two = centered_clipping(x, np.ones(2), np.zeros(2), tau=1.0, iterations=2)
    np.testing.assert_allclose(two.update, [0.8063120216533546, 0.6133564399804394])
    # a center already at a point: that row contributes nothing
    at = centered_clipping(x, np.ones(2), np.array([0.5, 0.0]), tau=10.0)
    np.testing.assert_allclose(at.update, [1.75, 2.0])


def test_zero_weight_rows_are_excluded() -> None:
    x = np.array([[1.0, 0.0], [1e6, 1e6], [0.0, 1.0]])
    w = np.array([1.0, 0.0, 1.0])
    for result in [
        geometric_median(x, w),
        norm_bound(x, w, quantile=1.0),
        centered_clipping(x, w, np.zeros(2), tau=10.0),
    ]:
        np.testing.assert_array_equal(result.excluded, [1])
        np.testing.assert_allclose(result.update, [0.5, 0.5], atol=1e-6)


# --- references ---------------------------------------------------------------------------

stacks = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 12), st.integers(1, 6)),
    elements=st.floats(-1e6, 1e6, allow_nan=False),
)


@settings(max_examples=60, deadline=None)
@given(stacks)
def test_median_equals_numpy(x: np.ndarray) -> None:
    np.testing.assert_array_equal(coordinate_median(x).update, np.median(x, axis=0))
    x32 = x.astype(np.float32)
    result = coordinate_median(x32).update
    assert result.dtype == np.float64
    np.testing.assert_array_equal(result, np.median(x32.astype(np.float64), axis=0))


@settings(max_examples=60, deadline=None)
@given(stacks, st.floats(0.0, 0.49))
def test_trimmed_mean_equals_scipy(x: np.ndarray, beta: float) -> None:
    expected = scipy.stats.trim_mean(x, beta, axis=0)
    np.testing.assert_allclose(trimmed_mean(x, beta).update, expected, rtol=1e-12, atol=1e-6)


def test_blocks_cover_wide_inputs() -> None:
    # more columns than one block: the blocked median and trimmed mean still match
    x = np.random.default_rng(0).normal(size=(7, 10_000)).astype(np.float32)
    np.testing.assert_array_equal(coordinate_median(x).update, np.median(x.astype(np.float64), 0))
    np.testing.assert_allclose(
        trimmed_mean(x, 0.3).update, scipy.stats.trim_mean(x.astype(np.float64), 0.3, axis=0)
    )


def test_pairwise_distances_survive_a_large_common_offset() -> None:
    rng = np.random.default_rng(1)
    spread = 1e-3 * rng.normal(size=(6, 5000))
    x = 1e4 + spread  # ||x||^2 ~ 5e11, distances ~ 1e-2: no cancellation after centering
    direct = ((spread[:, None, :] - spread[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(pairwise_sq_distances(x), direct, rtol=1e-8)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6))
def test_geometric_median_minimizes_the_objective(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) * rng.uniform(0.1, 10, size=(n, 1))
    w = rng.uniform(0.1, 5, n)

    def objective(v: np.ndarray) -> float:
        return float(w @ np.linalg.norm(x - v, axis=1))

    result = geometric_median(x, w, tol=1e-12, max_iter=2000)
    best = objective(result.update)
    for candidate in [*x, w @ x / w.sum()]:
        assert best <= objective(candidate) + 1e-6 * (1 + objective(candidate))


# --- honest-cluster selection and breakdown -----------------------------------------------


def honest_and_attackers(
    seed: int, n: int, f: int, d: int = 20, scale: float = 1e6, clustered: bool = True
) -> np.ndarray:
    """n - f honest updates near (1, ..., 1); f attackers far away, clustered or spread."""
    rng = np.random.default_rng(seed)
    x = 1.0 + 0.1 * rng.normal(size=(n, d))
    direction = rng.normal(size=(f if not clustered else 1, d))
    x[n - f :] = scale * direction / np.linalg.norm(direction, axis=1, keepdims=True)
    x[n - f :] += rng.normal(size=(f, d))
    return x


@pytest.mark.parametrize("clustered", [True, False])
def test_krum_selects_the_honest_cluster(clustered: bool) -> None:
    n, f = 12, 3
    x = honest_and_attackers(0, n, f, scale=100.0, clustered=clustered)
    attackers = set(range(n - f, n))
    assert attackers <= set(krum(x, f).excluded.tolist())
    multi = krum(x, f, m=n - f)
    assert set(multi.excluded.tolist()) == attackers
    np.testing.assert_allclose(multi.update, x[: n - f].mean(axis=0))


@pytest.mark.parametrize("clustered", [True, False])
def test_bulyan_stays_with_the_honest_cluster(clustered: bool) -> None:
    n, f = 11, 2
    x = honest_and_attackers(1, n, f, scale=100.0, clustered=clustered)
    result = bulyan(x, f)
    honest = x[: n - f]
    assert np.all(result.update >= honest.min(axis=0)) and np.all(
        result.update <= honest.max(axis=0)
    )
    if not clustered:  # spread attackers never win a Krum round
        assert set(range(n - f, n)) <= set(result.excluded.tolist())


RULES: dict[str, Callable[[np.ndarray, int], RobustResult]] = {
    "median": lambda x, f: coordinate_median(x),
    "trimmed_mean": lambda x, f: trimmed_mean(x, (f + 0.5) / len(x)),
    "krum": lambda x, f: krum(x, f),
    "multi_krum": lambda x, f: krum(x, f, m=len(x) - f),
    "bulyan": lambda x, f: bulyan(x, f),
    "geometric_median": lambda x, f: geometric_median(x, np.ones(len(x))),
    "norm_bound": lambda x, f: norm_bound(x, np.ones(len(x)), quantile=0.5),
    "centered_clipping": lambda x, f: centered_clipping(
        x, np.ones(len(x)), np.zeros(x.shape[1]), tau=10.0, iterations=3
    ),
}


@pytest.mark.parametrize("rule", sorted(RULES))
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), clustered=st.booleans())
def test_breakdown_huge_attackers_stay_bounded(rule: str, seed: int, clustered: bool) -> None:
    n, f = 11, 2  # fewer attackers than every rule tolerates (Bulyan: 4f + 3 = 11)
    x = honest_and_attackers(seed, n, f, scale=1e6, clustered=clustered)
    honest_norm = np.linalg.norm(x[: n - f], axis=1).max()
    aggregate = RULES[rule](x, f).update
    assert np.linalg.norm(aggregate) <= 2 * honest_norm
    assert np.linalg.norm(x.mean(axis=0)) > 1e4 * honest_norm  # the plain mean breaks


# --- refused configurations ---------------------------------------------------------------


def test_impossible_configurations_state_the_bound() -> None:
    x = np.zeros((6, 3))
    with pytest.raises(ConfigError, match=r"n > 2f \+ 2.*n=6, f=2"):
        krum(x, f=2)
    with pytest.raises(ConfigError, match=r"1 <= m <= n - f"):
        krum(x, f=1, m=6)
    with pytest.raises(ConfigError, match=r"n >= 4f \+ 3.*n=6, f=1"):
        bulyan(x, f=1)
    with pytest.raises(ConfigError, match=r"2\*floor\(beta\*n\) < n"):
        trimmed_mean(np.zeros((4, 2)), 0.5)
    with pytest.raises(ConfigError, match="exactly one of max_norm or quantile"):
        norm_bound(x, np.ones(6))
    with pytest.raises(ConfigError, match="tau > 0"):
        centered_clipping(x, np.ones(6), np.zeros(3), tau=0.0)


def test_check_bounds_at_configuration_time() -> None:
    check_bounds("krum", n=7, f=2)
    check_bounds("bulyan", n=11, f=2)
    check_bounds("trimmed_mean", n=10, f=2, beta=0.2)
    check_bounds("geometric_median", n=5, f=2)
    with pytest.raises(ConfigError, match=r"n > 2f \+ 2.*at least 7 clients"):
        check_bounds("krum", n=6, f=2)
    with pytest.raises(ConfigError, match=r"1 <= m <= n - f"):
        check_bounds("krum", n=10, f=2, m=9)
    with pytest.raises(ConfigError, match=r"n >= 4f \+ 3.*at least 11 clients"):
        check_bounds("bulyan", n=10, f=2)
    with pytest.raises(ConfigError, match=r"floor\(beta\*n\) >= f"):
        check_bounds("trimmed_mean", n=10, f=3, beta=0.2)
    with pytest.raises(ConfigError, match="needs beta"):
        check_bounds("trimmed_mean", n=10, f=1)
    with pytest.raises(ConfigError, match=r"n >= 2f \+ 1"):
        check_bounds("coordinate_median", n=4, f=2)
    with pytest.raises(ConfigError, match="choose one of"):
        check_bounds("krum++", n=10, f=1)


def test_results_are_float64_with_integer_indices() -> None:
    x = honest_and_attackers(2, 11, 2).astype(np.float32)
    for rule in RULES.values():
        result = rule(x, 2)
        assert result.update.dtype == np.float64 and result.update.shape == (20,)
        assert result.excluded.dtype == np.int64 and result.downweighted.dtype == np.int64
