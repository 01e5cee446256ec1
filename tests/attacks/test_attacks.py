"""Attacks: hand-computed golden values, the papers' formulas, and argument validation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import scipy.stats

from fedforge.attacks.data import attack_success_rate, backdoor, flip_labels, pixel_trigger
from fedforge.attacks.updates import (
    alie_z_max,
    gaussian,
    inner_product_manipulation,
    little_is_enough,
    scaled,
    sign_flip,
)

OWN = np.array([[1.0, -2.0], [0.5, 3.0]])
# Honest stack with per-coordinate mean [3, 4] and sample std (ddof=1) [2, 4]:
# column 0 deviations -2, 0, 2 -> var 8/2 = 4; column 1 deviations -4, 0, 4 -> var 32/2 = 16.
HONEST = np.array([[1.0, 0.0], [3.0, 4.0], [5.0, 8.0]])
FLOATS = [np.float32, np.float64]

# --- model poisoning ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_sign_flip_and_scaled_golden(dtype: type[np.floating]) -> None:
    own = OWN.astype(dtype)
    before = own.copy()
    flipped = sign_flip(own, scale=2.0)
    assert flipped.dtype == dtype
    np.testing.assert_array_equal(flipped, [[-2.0, 4.0], [-1.0, -6.0]])
    np.testing.assert_array_equal(sign_flip(own), [[-1.0, 2.0], [-0.5, -3.0]])
    boosted = scaled(own, 10.0)
    assert boosted.dtype == dtype
    np.testing.assert_array_equal(boosted, [[10.0, -20.0], [5.0, 30.0]])
    np.testing.assert_array_equal(own, before)  # inputs are never modified


@pytest.mark.parametrize("dtype", FLOATS)
def test_gaussian_is_seeded_and_shaped(dtype: type[np.floating]) -> None:
    noise = gaussian((3, 4), 2.0, np.random.default_rng(7), dtype=dtype)
    assert noise.shape == (3, 4) and noise.dtype == dtype
    expected = np.random.default_rng(7).normal(0.0, 2.0, size=(3, 4)).astype(dtype)
    np.testing.assert_array_equal(noise, expected)
    np.testing.assert_array_equal(gaussian((2, 3), 0.0, np.random.default_rng(0)), 0.0)
    big = gaussian((200, 500), 0.5, np.random.default_rng(1), dtype=np.float64)
    assert abs(big.std() - 0.5) < 0.01 and abs(big.mean()) < 0.01


def test_alie_z_max_matches_the_paper() -> None:
    # n = 50, f = 10: s = floor(50/2 + 1) - 10 = 16; z = Phi^-1((50 - 16)/50) = Phi^-1(0.68)
    assert alie_z_max(50, 10) == pytest.approx(0.4676987991145084, abs=1e-12)
    assert alie_z_max(50, 10) == pytest.approx(scipy.stats.norm.ppf(34 / 50), abs=1e-12)
    # n = 10, f = 2: s = 6 - 2 = 4; z = Phi^-1(6/10) ~ 0.2533
    assert alie_z_max(10, 2) == pytest.approx(0.2533471031357997, abs=1e-12)
    # n = 10, f = 5: s = 1 (the largest f allowed); z = Phi^-1(9/10) ~ 1.2816
    assert alie_z_max(10, 5) == pytest.approx(1.2815515655446004, abs=1e-12)
    for n, f in [(7, 1), (20, 4), (100, 20), (101, 50)]:
        s = int(np.floor(n / 2 + 1)) - f
        assert alie_z_max(n, f) == pytest.approx(scipy.stats.norm.ppf((n - s) / n), abs=1e-12)


@pytest.mark.parametrize("dtype", FLOATS)
def test_little_is_enough_golden(dtype: type[np.floating]) -> None:
    honest = HONEST.astype(dtype)
    # mean [3, 4] - 0.5 * std [2, 4] = [2, 2], the same row for both attackers
    out = little_is_enough(honest, num_byzantine=2, z=0.5)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, [[2.0, 2.0], [2.0, 2.0]])
    # default z: n = 3 honest + 2 Byzantine = 5, s = floor(3.5) - 2 = 1, z = Phi^-1(4/5)
    z = 0.8416212335729143
    default = little_is_enough(honest, num_byzantine=2)
    np.testing.assert_allclose(default, [[3 - 2 * z, 4 - 4 * z]] * 2, rtol=1e-6)
    # an explicit n: n = 10, f = 2 -> z = Phi^-1(0.6) ~ 0.2533
    z10 = 0.2533471031357997
    explicit = little_is_enough(honest, num_byzantine=2, num_clients=10)
    np.testing.assert_allclose(explicit, [[3 - 2 * z10, 4 - 4 * z10]] * 2, rtol=1e-6)


def test_alie_stays_inside_the_honest_range() -> None:
    rng = np.random.default_rng(3)
    honest = rng.normal(0.1, 1.0, size=(40, 200)).astype(np.float32)  # n = 50, f = 10
    out = little_is_enough(honest, num_byzantine=10)
    assert out.shape == (10, 200)
    assert (out >= honest.min(axis=0)).all() and (out <= honest.max(axis=0)).all()
    # shifted by z_max ~ 0.4677 honest standard deviations below the mean, every coordinate
    shift = (honest.mean(axis=0) - out[0]) / honest.std(axis=0, ddof=1)
    np.testing.assert_allclose(shift, 0.4676987991145084, rtol=1e-4)


@pytest.mark.parametrize("dtype", FLOATS)
def test_inner_product_manipulation_golden(dtype: type[np.floating]) -> None:
    honest = HONEST.astype(dtype)
    out = inner_product_manipulation(honest, epsilon=0.5, num_byzantine=3)
    assert out.dtype == dtype and out.shape == (3, 2)
    np.testing.assert_array_equal(out, [[-1.5, -2.0]] * 3)  # -0.5 * [3, 4]
    mean = honest.mean(axis=0)
    assert float(out[0] @ mean) == pytest.approx(-12.5)  # -1.5*3 - 2*4: negative
    rng = np.random.default_rng(4)
    random_honest = rng.normal(1.0, 1.0, size=(20, 50))
    ipm = inner_product_manipulation(random_honest, epsilon=0.1, num_byzantine=5)
    assert float(ipm[0] @ random_honest.mean(axis=0)) < 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: sign_flip(np.ones(3)), "own must be a non-empty"),
        (lambda: sign_flip(np.ones((2, 3), np.int64)), "floating dtype"),
        (lambda: sign_flip(OWN, scale=0.0), "scale must be finite and > 0"),
        (lambda: sign_flip(OWN, scale=float("nan")), "scale must be finite"),
        (lambda: scaled(OWN, float("inf")), "factor must be finite"),
        (lambda: gaussian((3,), 1.0, np.random.default_rng()), "own_shape must be"),
        (lambda: gaussian((3, 2), -1.0, np.random.default_rng()), "std must be"),
        (lambda: gaussian((3, 2), 1.0, np.random.RandomState(0)), "rng must be"),
        (lambda: gaussian((3, 2), 1.0, np.random.default_rng(), np.int32), "floating dtype"),
        (lambda: alie_z_max(10, 0), "num_byzantine must be >= 1"),
        (lambda: alie_z_max(10, 6), r"f <= 5 at n=10"),
        (lambda: alie_z_max(3, 3), "must exceed num_byzantine"),
        (lambda: little_is_enough(HONEST[:1], 1), ">= 2 honest updates"),
        (lambda: little_is_enough(HONEST, 0, z=1.0), "num_byzantine must be >= 1"),
        (lambda: little_is_enough(HONEST, 1, z=float("nan")), "z must be finite"),
        (lambda: inner_product_manipulation(HONEST, 0.0, 1), "epsilon must be"),
        (lambda: inner_product_manipulation(HONEST, 0.5, 0), "num_byzantine must be >= 1"),
    ],
)
def test_update_attacks_validate_arguments(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# --- data poisoning -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_flip_labels_golden(dtype: type[np.integer]) -> None:
    y = np.array([0, 1, 2, 9], dtype)
    reverse = flip_labels(y, 10)
    assert reverse.dtype == dtype
    np.testing.assert_array_equal(reverse, [9, 8, 7, 0])  # 10 - 1 - y
    np.testing.assert_array_equal(flip_labels(y, 10, "shift"), [1, 2, 3, 0])  # (y + 1) % 10
    np.testing.assert_array_equal(y, [0, 1, 2, 9])


@pytest.mark.parametrize(
    ("corner", "indices"),
    [
        # a 2x2 square in a 4x4 image, row-major flattened (index = 4 * row + col)
        ("bottom_right", [10, 11, 14, 15]),
        ("bottom_left", [8, 9, 12, 13]),
        ("top_right", [2, 3, 6, 7]),
        ("top_left", [0, 1, 4, 5]),
    ],
)
def test_pixel_trigger_corners(corner: str, indices: list[int]) -> None:
    x = np.full((2, 16), 0.25, np.float32)
    out = pixel_trigger(x, (4, 4), size=2, corner=corner)
    expected = np.full((2, 16), 0.25, np.float32)
    expected[:, indices] = 1.0
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(x, 0.25)  # a copy, not in place


def test_pixel_trigger_digits_and_channels() -> None:
    out = pixel_trigger(np.zeros((1, 64)), image_shape=(8, 8), size=3)
    # rows 5..7, cols 5..7 of an 8x8 image
    assert np.flatnonzero(out[0]).tolist() == [45, 46, 47, 53, 54, 55, 61, 62, 63]
    mnist = pixel_trigger(np.zeros((3, 784), np.float32), value=0.9)
    assert (mnist.reshape(3, 28, 28)[:, 25:, 25:] == np.float32(0.9)).all()
    assert np.count_nonzero(mnist) == 3 * 9
    # channel-first (2, 3, 3), a 1x1 trigger: the last pixel of each channel
    rgb = pixel_trigger(np.zeros((1, 18)), image_shape=(2, 3, 3), size=1)
    assert np.flatnonzero(rgb[0]).tolist() == [8, 17]


@pytest.mark.parametrize(("n", "fraction", "poisoned"), [(10, 0.3, 3), (8, 0.25, 2), (5, 0.0, 0)])
def test_backdoor_poisons_exactly_the_chosen_examples(
    n: int, fraction: float, poisoned: int
) -> None:
    x = np.zeros((n, 16), np.float32)
    y = (np.arange(n) % 3).astype(np.int64)
    x_out, y_out = backdoor(x, y, 7, fraction, np.random.default_rng(5), image_shape=(4, 4), size=2)
    assert x_out.dtype == np.float32 and y_out.dtype == np.int64
    changed = np.flatnonzero((x_out != x).any(axis=1))
    assert len(changed) == poisoned == round(fraction * n)
    trigger = np.zeros(16, np.float32)
    trigger[[10, 11, 14, 15]] = 1.0
    np.testing.assert_array_equal(x_out[changed], np.tile(trigger, (poisoned, 1)))
    np.testing.assert_array_equal(y_out[changed], 7)
    clean = np.setdiff1d(np.arange(n), changed)
    np.testing.assert_array_equal(y_out[clean], y[clean])
    np.testing.assert_array_equal(x, 0.0)  # the inputs are untouched
    np.testing.assert_array_equal(y, np.arange(n) % 3)
    # reproducible from the seed
    x_again, y_again = backdoor(x, y, 7, fraction, np.random.default_rng(5), (4, 4), size=2)
    np.testing.assert_array_equal(x_again, x_out)
    np.testing.assert_array_equal(y_again, y_out)


def test_attack_success_rate_with_a_fake_model() -> None:
    x = np.zeros((6, 16), np.float32)
    x[[2, 5], 0] = 1.0  # examples 2 and 5 "resist": the fake model ignores their trigger
    y = np.array([0, 1, 2, 1, 0, 2])  # target 1: examples 0, 2, 4, 5 are attacked
    seen: list[np.ndarray] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        seen.append(batch)
        triggered = batch[:, 15] == 1.0
        return np.where(triggered & (batch[:, 0] < 0.5), 1, 0)

    asr = attack_success_rate(predict, x, y, 1, image_shape=(4, 4), size=2)
    assert asr == pytest.approx(2 / 4)  # examples 0 and 4 flip to the target
    assert len(seen) == 1 and len(seen[0]) == 4
    assert (seen[0][:, [10, 11, 14, 15]] == 1.0).all()
    always = attack_success_rate(lambda b: np.ones(len(b), np.int64), x, y, 1, (4, 4), 2)
    never = attack_success_rate(lambda b: np.zeros(len(b), np.int64), x, y, 1, (4, 4), 2)
    assert (always, never) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: flip_labels(np.array([0, 10]), 10), r"labels must lie in \[0, 10\)"),
        (lambda: flip_labels(np.array([0.0, 1.0]), 10), "integer label array"),
        (lambda: flip_labels(np.array([0, 1]), 1), "num_classes must be >= 2"),
        (lambda: flip_labels(np.array([0, 1]), 3, "swap"), "mapping must be"),
        (lambda: pixel_trigger(np.zeros((2, 10)), (4, 4)), r"x must be \(n, 16\)"),
        (lambda: pixel_trigger(np.zeros(16), (4, 4)), r"x must be \(n, 16\)"),
        (lambda: pixel_trigger(np.zeros((1, 16)), (16,)), "image_shape must be"),
        (lambda: pixel_trigger(np.zeros((1, 16)), (4, 4), size=5), r"size must be in \[1, 4\]"),
        (lambda: pixel_trigger(np.zeros((1, 16)), (4, 4), corner="middle"), "corner must be"),
        (lambda: pixel_trigger(np.zeros((1, 16)), (4, 4), value=np.inf), "value must be finite"),
        (
            lambda: backdoor(
                np.zeros((3, 4)), np.zeros(3, int), 1, 1.5, np.random.default_rng(), (2, 2)
            ),
            r"fraction must be in \[0, 1\]",
        ),
        (
            lambda: backdoor(
                np.zeros((3, 4)), np.zeros(2, int), 1, 0.5, np.random.default_rng(), (2, 2)
            ),
            "n = len",
        ),
        (
            lambda: backdoor(
                np.zeros((3, 4)), np.zeros(3, int), -1, 0.5, np.random.default_rng(), (2, 2)
            ),
            "target_label must be >= 0",
        ),
        (
            lambda: backdoor(np.zeros((3, 4)), np.zeros(3, int), 1, 0.5, 0, (2, 2)),
            "rng must be",
        ),
        (
            lambda: attack_success_rate(
                lambda b: b, np.zeros((2, 4)), np.ones(2, int), 1, (2, 2), 1
            ),
            "nothing to attack",
        ),
        (
            lambda: attack_success_rate(
                lambda b: b, np.zeros((2, 4)), np.zeros(2, int), 1, (2, 2), 1
            ),
            "one label per input",
        ),
    ],
)
def test_data_attacks_validate_arguments(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
