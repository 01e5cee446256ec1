"""Data-poisoning transforms on one client's arrays: pure functions returning new arrays.

``x`` is (n, features), flattened images with pixels in [0, 1] (channel-first when
``image_shape`` is (C, H, W)); ``y`` is (n,) integer labels. Nothing is modified in place.
Random choices draw only from the ``np.random.Generator`` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np

__all__ = [
    "CORNERS",
    "attack_success_rate",
    "backdoor",
    "flip_labels",
    "pixel_trigger",
]

Corner = Literal["bottom_right", "bottom_left", "top_right", "top_left"]
CORNERS: tuple[Corner, ...] = ("bottom_right", "bottom_left", "top_right", "top_left")


def flip_labels(
    y: np.ndarray, num_classes: int, mapping: Literal["reverse", "shift"] = "reverse"
) -> np.ndarray:
    """Label flipping (e.g. Fang et al. 2020; Tolpegin et al. 2020): ``"reverse"`` maps
    y -> C - 1 - y, ``"shift"`` maps y -> (y + 1) mod C. Returns a new array in y's dtype."""
    labels = _labels(y, num_classes)
    if mapping == "reverse":
        out = num_classes - 1 - labels
    elif mapping == "shift":
        out = (labels + 1) % num_classes
    else:
        raise ValueError(f"mapping must be 'reverse' or 'shift', got {mapping!r}")
    return out.astype(labels.dtype, copy=False)


def pixel_trigger(
    x: np.ndarray,
    image_shape: tuple[int, ...] = (28, 28),
    size: int = 3,
    value: float = 1.0,
    corner: Corner = "bottom_right",
) -> np.ndarray:
    """BadNets pixel-pattern trigger (Gu et al. 2017): a solid ``size`` x ``size`` square of
    ``value`` (white for pixels in [0, 1]) in one ``corner`` of every image, every channel.
    ``x`` is (n, prod(image_shape)) with ``image_shape`` (H, W) or (C, H, W), e.g. (28, 28)
    for MNIST or (8, 8) for scikit-learn digits. Returns a copy in x's dtype."""
    images = _images(x, image_shape).copy()
    h, w = image_shape[-2:]
    if not 1 <= size <= min(h, w):
        raise ValueError(f"size must be in [1, {min(h, w)}] for images of {h}x{w}, got {size}")
    if not math.isfinite(value):
        raise ValueError(f"value must be finite, got {value}")
    if corner not in CORNERS:
        raise ValueError(f"corner must be one of {', '.join(CORNERS)}, got {corner!r}")
    rows = slice(h - size, h) if corner.startswith("bottom") else slice(0, size)
    cols = slice(w - size, w) if corner.endswith("right") else slice(0, size)
    images[..., rows, cols] = value
    return images.reshape(np.asarray(x).shape)


def backdoor(
    x: np.ndarray,
    y: np.ndarray,
    target_label: int,
    fraction: float,
    rng: np.random.Generator,
    image_shape: tuple[int, ...] = (28, 28),
    size: int = 3,
    value: float = 1.0,
    corner: Corner = "bottom_right",
) -> tuple[np.ndarray, np.ndarray]:
    """Backdoor poisoning (Gu et al. 2017; Bagdasaryan et al. 2020): ``round(fraction * n)``
    examples (Python's round, half to even), chosen by ``rng`` without replacement, get the
    :func:`pixel_trigger` and the label ``target_label``; the others are unchanged. Returns
    new (x, y) arrays."""
    x_arr = np.asarray(x)
    labels = np.asarray(y)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"y must be a 1-D integer label array, got {labels.dtype} {labels.shape}")
    if x_arr.ndim != 2 or len(x_arr) != len(labels):
        raise ValueError(
            f"x must be (n, features) with n = len(y) = {len(labels)}, got {x_arr.shape}"
        )
    if target_label < 0:
        raise ValueError(f"target_label must be >= 0, got {target_label}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    chosen = rng.choice(len(labels), size=round(fraction * len(labels)), replace=False)
    x_out = x_arr.copy()
    y_out = labels.copy()
    x_out[chosen] = pixel_trigger(x_arr[chosen], image_shape, size, value, corner)
    y_out[chosen] = target_label
    return x_out, y_out


def attack_success_rate(
    predict: Callable[[np.ndarray], np.ndarray],
    x_test: np.ndarray,
    y_test: np.ndarray,
    target_label: int,
    image_shape: tuple[int, ...] = (28, 28),
    size: int = 3,
    value: float = 1.0,
    corner: Corner = "bottom_right",
) -> float:
    """Backdoor attack success rate: among test inputs whose true label is not
    ``target_label``, the share that ``predict`` (inputs (n, features) -> labels (n,))
    classifies as ``target_label`` once the trigger is added."""
    labels = np.asarray(y_test)
    x_arr = np.asarray(x_test)
    if labels.ndim != 1 or x_arr.ndim != 2 or len(x_arr) != len(labels):
        raise ValueError(
            f"need x_test (n, features) and y_test (n,), got {x_arr.shape} and {labels.shape}"
        )
    keep = labels != target_label
    if not keep.any():
        raise ValueError(f"every test label equals target_label={target_label}; nothing to attack")
    triggered = pixel_trigger(x_arr[keep], image_shape, size, value, corner)
    predicted = np.asarray(predict(triggered))
    if predicted.shape != (len(triggered),):
        raise ValueError(
            f"predict must return one label per input, shape ({len(triggered)},), "
            f"got {predicted.shape}"
        )
    return float(np.mean(predicted == target_label))


def _labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(y)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"y must be a 1-D integer label array, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
        )
    return labels


def _images(x: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    x_arr = np.asarray(x)
    if len(image_shape) not in (2, 3) or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (H, W) or (C, H, W), got {tuple(image_shape)}")
    features = math.prod(image_shape)
    if x_arr.ndim != 2 or x_arr.shape[1] != features:
        raise ValueError(
            f"x must be (n, {features}) flattened images of shape {tuple(image_shape)}, "
            f"got {x_arr.shape}"
        )
    return x_arr.reshape(len(x_arr), *image_shape)
