"""Image-folder sites: one subfolder per class, images of any size read with Pillow,
converted to grayscale or RGB, resized, scaled to [0, 1] and stored as ``(C, H, W)``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedforge.core.errors import DataError
from fedforge.data.datasets import ArrayDataset

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def class_index(name: str, labels: Sequence[str], folder: Path) -> int:
    """The class of a subfolder: its position in ``labels``, or its name as an integer."""
    if labels:
        if name not in labels:
            raise DataError(
                f"{folder}: class folder {name!r} is not one of the labels {list(labels)}"
            )
        return list(labels).index(name)
    if not name.isdigit():
        raise DataError(
            f"{folder}: class folder {name!r} is not an integer class; list the class folder "
            "names in data.labels"
        )
    return int(name)


def read_image_folder(
    path: Path, labels: Sequence[str], size: Sequence[int], channels: int
) -> ArrayDataset:
    """Every image under ``path/<class>/`` as float32 ``(C, H, W)`` in [0, 1]."""
    from PIL import Image

    if len(size) != 2 or min(size) < 1:
        raise DataError(f"data.image_size must be [height, width], got {list(size)}")
    height, width = int(size[0]), int(size[1])
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{path}: no class subfolders (expected {path}/<class>/<image files>)")
    images, targets = [], []
    for folder in folders:
        target = class_index(folder.name, labels, path)
        for file in sorted(folder.iterdir()):
            if not file.is_file() or file.suffix.lower() not in SUFFIXES:
                continue
            try:
                with Image.open(file) as image:
                    pixels = image.convert("L" if channels == 1 else "RGB").resize(
                        (width, height), Image.Resampling.BILINEAR
                    )
                    array = np.asarray(pixels, dtype=np.float32) / np.float32(255.0)
            except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError...
                raise DataError(f"{file}: not a readable image ({type(exc).__name__})") from None
            images.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
            targets.append(target)
    if not images:
        raise DataError(f"{path}: no images ({', '.join(SUFFIXES)}) in its class subfolders")
    return ArrayDataset(np.stack(images), np.array(targets, np.int64))


def write_image(array: np.ndarray, file: Path) -> None:
    """Save a ``(H, W)`` or ``(C, H, W)`` array in [0, 1] as an image (templates, tests)."""
    from PIL import Image

    pixels = np.clip(np.asarray(array) * 255.0, 0, 255).round().astype(np.uint8)
    if pixels.ndim == 3:
        pixels = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    file.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(file)
