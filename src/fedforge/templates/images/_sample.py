"""A CNN on images: one image folder per site, one subfolder per class (handwritten digits).

The sample data is scikit-learn's 1,797 handwritten digits (8x8 grayscale scans from the UCI
optical-recognition set), written as PNG files: three sites whose digits are skewed toward
different classes (site 1 mostly 0-3, site 2 mostly 3-6, site 3 mostly 6-9), 150 each, and a
test set of 150 digits, each folder holding ``<digit>/<n>.png``. The split is fixed (seed 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedforge.workload.images import write_image

SITES = {"site1": (0, 1, 2, 3), "site2": (3, 4, 5, 6), "site3": (6, 7, 8, 9)}
PER_SITE = 150
TEST = 150
FAVOURED = 0.8  # share of a site's digits from its favoured classes


def write(project: Path) -> list[Path]:
    """Write ``project/data/<site>/<digit>/<n>.png`` for the three sites and the test set."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    test, rest = order[:TEST], list(order[TEST:])
    parts = {"test": list(test)}
    for name, favoured in SITES.items():
        want = round(FAVOURED * PER_SITE)
        mine = [i for i in rest if bunch.target[i] in favoured][:want]
        others = [i for i in rest if bunch.target[i] not in favoured and i not in mine]
        chosen = mine + others[: PER_SITE - len(mine)]
        parts[name] = chosen
        rest = [i for i in rest if i not in set(chosen)]
    written = []
    for name, indices in parts.items():
        for n, i in enumerate(indices):
            path = project / "data" / name / str(bunch.target[i]) / f"{n}.png"
            write_image(images[i], path)
            written.append(path)
    return written
