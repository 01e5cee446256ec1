"""A classifier on tabular data: one CSV file per site (three hospitals' breast-cancer cases).

The sample data is scikit-learn's copy of the Wisconsin Diagnostic Breast Cancer data (569
patients, 30 measurements of cell nuclei from a fine-needle aspirate, diagnosis benign or
malignant), written as three hospitals of different sizes and case mixes and a test set:

- ``data/test.csv``: 114 patients (20%, stratified), the evaluation set every model is scored on;
- ``data/hospital1.csv``: a general hospital, 240 patients, 30% malignant;
- ``data/hospital2.csv``: an oncology referral centre, 130 patients, 65% malignant;
- ``data/hospital3.csv``: a screening clinic, 85 patients, 15% malignant.

The split is fixed (seed 0), so every project made from this template holds the same files.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

HOSPITALS = {"hospital1": (240, 72), "hospital2": (130, 85), "hospital3": (85, 13)}
TEST = 114  # 42 malignant, 72 benign


def write(project: Path) -> list[Path]:
    """Write the test set and the three hospitals' files into ``project/data``."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    columns = [name.replace(" ", "_") for name in bunch.feature_names]
    diagnosis = np.where(bunch.target == 0, "M", "B")  # scikit-learn: 0 = malignant
    rng = np.random.default_rng(0)
    malignant = list(rng.permutation(np.flatnonzero(diagnosis == "M")))
    benign = list(rng.permutation(np.flatnonzero(diagnosis == "B")))
    test_m = round(TEST * len(malignant) / len(diagnosis))
    parts = {"test": _take(malignant, test_m) + _take(benign, TEST - test_m)}
    for name, (size, sick) in HOSPITALS.items():
        parts[name] = _take(malignant, sick) + _take(benign, size - sick)
    written = []
    for name, rows in parts.items():
        path = project / "data" / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        order = rng.permutation(np.array(rows))
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow([*columns, "diagnosis"])
            for i in order:
                out.writerow([*(f"{v:.6g}" for v in bunch.data[i]), diagnosis[i]])
        written.append(path)
    return written


def _take(pool: list[int], count: int) -> list[int]:
    if count > len(pool):
        raise ValueError("the split asks for more patients than remain")
    taken = pool[:count]
    del pool[:count]
    return taken
