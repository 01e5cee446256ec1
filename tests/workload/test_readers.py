"""The built-in readers round-trip small files, and every bad-data case stops a site with
one line naming the file and the problem (in-process here; the command line's exit code and
single line are checked once, in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedforge import ArrayDataset, ClientData, read_data
from fedforge.config import load_config
from fedforge.core.errors import DataError
from fedforge.net.site import prepare
from fedforge.workload.images import write_image
from fedforge.workload.sitedata import as_client_data, check_against_model

CSV = "age,sex,size,label\n40,F,1.5,0\n50,M,2.5,1\n60,F,3.5,1\n70,X,4.5,0\n"


def test_csv_round_trips_with_site_scaling_and_hashed_categories(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    path.write_text(CSV)
    data = read_data(path, categorical=["sex"], category_buckets=4)
    assert data.x.dtype == np.float32 and data.x.shape == (4, 1 + 4 + 1)
    np.testing.assert_array_equal(data.y, [0, 1, 1, 0])
    age = data.x[:, 0]
    np.testing.assert_allclose(age, (np.array([40, 50, 60, 70]) - 55) / np.std([40, 50, 60, 70]))
    sex = data.x[:, 1:5]
    assert (sex.sum(axis=1) == 1).all()
    np.testing.assert_array_equal(sex[0], sex[2])  # F hashes to the same bucket everywhere
    raw = read_data(path, categorical=["sex"], category_buckets=4, scale="none")
    np.testing.assert_array_equal(raw.x[:, 5], [1.5, 2.5, 3.5, 4.5])
    # Columns picked by name, in the configured order; text labels through the label list.
    path.write_text("size,diagnosis,age\n1,M,40\n2,B,50\n")
    named = read_data(
        path, label="diagnosis", labels=["B", "M"], features=["age", "size"], scale="none"
    )
    np.testing.assert_array_equal(named.x, [[40, 1], [50, 2]])
    np.testing.assert_array_equal(named.y, [1, 0])


def test_parquet_npz_and_image_folders_round_trip(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"a": [1.0, 2.0, 3.0], "b": [4, 5, 6], "label": [0, 1, 0]})
    pq.write_table(table, tmp_path / "site.parquet")
    data = read_data(tmp_path / "site.parquet", scale="none")
    np.testing.assert_array_equal(data.x, [[1, 4], [2, 5], [3, 6]])
    np.testing.assert_array_equal(data.y, [0, 1, 0])

    x = np.arange(24, dtype=np.float32).reshape(6, 2, 2)
    np.savez(tmp_path / "site.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2]))
    data = read_data(tmp_path / "site.npz")
    np.testing.assert_array_equal(data.x, x)
    assert data.y.dtype == np.int64

    rng = np.random.default_rng(0)
    images = {(c, i): rng.random((4, 6)).astype(np.float32) for c in (0, 2) for i in range(2)}
    for (c, i), image in images.items():
        write_image(image, tmp_path / "imgs" / str(c) / f"{i}.png")
    data = read_data(tmp_path / "imgs", image_size=[4, 6])
    assert data.x.shape == (4, 1, 4, 6)
    np.testing.assert_array_equal(data.y, [0, 0, 2, 2])
    np.testing.assert_allclose(data.x[0, 0], images[(0, 0)], atol=1 / 255)
    named = read_data(tmp_path / "imgs", image_size=[2, 3], channels=3, labels=["2", "0"])
    assert named.x.shape == (4, 3, 2, 3)
    np.testing.assert_array_equal(named.y, [1, 1, 0, 0])


BAD_CSV = [
    ("age,sex,size\n40,F,1\n", "no label column 'label'"),
    ("age,size,label\n40,,0\n50,2,1\n", "column 'size' has a missing, NaN or infinite value"),
    ("age,size,label\n40,nan,0\n", "column 'size' has a missing, NaN or infinite value"),
    ("age,size,label\n40,1,0\n50,2,1.5\n", "label '1.5' in row 2 is not a class"),
    ("age,size,label\n40,F,0\n", "column 'size' holds text ('F' in row 1)"),
    ("age,size,label\n40,1\n", "row 1 has 2 fields, the header has 3"),
]


@pytest.mark.parametrize(("text", "problem"), BAD_CSV)
def test_each_bad_table_gives_one_line_naming_the_file(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "site.csv"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_data(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


def test_bad_arrays_and_folders_give_one_line(tmp_path: Path) -> None:
    np.savez(tmp_path / "nan.npz", x=np.array([[0.0], [np.nan]]), y=np.array([0, 1]))
    np.savez(tmp_path / "noy.npz", x=np.zeros((2, 1)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken" / "0").mkdir(parents=True)
    (tmp_path / "broken" / "0" / "a.png").write_bytes(b"not an image")
    for name, problem in [
        ("nan.npz", "example 2 has a NaN or infinite feature"),
        ("noy.npz", "no array 'y'"),
        ("empty", "no class subfolders"),
        ("broken", "not a readable image"),
        ("missing.csv", "no such file or directory"),
        ("data.txt", "unknown data format"),
    ]:
        (tmp_path / "data.txt").write_text("x")
        with pytest.raises(DataError, match=problem):
            read_data(tmp_path / name)


def test_data_is_checked_against_the_model() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    good = ClientData(ArrayDataset(np.zeros((4, 3), np.float32), np.array([0, 1, 1, 0])))
    check_against_model(good, model, "site.csv")
    wide = ClientData(ArrayDataset(np.zeros((4, 4), np.float32), np.array([0, 1, 1, 0])))
    with pytest.raises(DataError, match=r"site.csv: 4 features per example .*the model takes 3"):
        check_against_model(wide, model, "site.csv", inputs=(3,))
    with pytest.raises(DataError, match=r"site.csv: examples of shape \[4\] do not fit the model"):
        check_against_model(wide, model, "site.csv")
    beyond = ClientData(ArrayDataset(np.zeros((2, 3), np.float32), np.array([0, 2])))
    with pytest.raises(DataError, match=r"label 2 \(example 2\) is outside the model's 2 classes"):
        check_against_model(beyond, model, "site.csv")
    # A torch Dataset of (x, y) pairs is read once into arrays.
    dataset = torch.utils.data.TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 0]))
    data = as_client_data(dataset, "site")
    assert data.train.x.shape == (3, 2) and data.train.y.tolist() == [0, 1, 0]
    with pytest.raises(DataError, match="returned str"):
        as_client_data("oops", "site")


def _site_config(tmp_path: Path) -> Path:
    config = tmp_path / "fedforge.toml"
    config.write_text(
        '[data]\nsites = ["a.csv"]\n[model]\nname = "logistic"\ninputs = [2]\nclasses = 2\n'
        "[server]\nclients_per_round = 1\n"
    )
    return config


def test_a_deployed_site_checks_its_data_before_it_connects(tmp_path: Path) -> None:
    config = load_config(_site_config(tmp_path))
    good, wrong = tmp_path / "good.csv", tmp_path / "wide.csv"
    good.write_text("a,b,label\n1,2,0\n3,4,1\n")
    wrong.write_text("a,b,c,label\n1,2,3,0\n3,4,5,1\n")
    site = prepare(config, good)
    assert isinstance(site.data, ClientData) and len(site.data.train) == 2
    with pytest.raises(DataError, match=f"{wrong}: 3 features per example"):
        prepare(config, wrong)
    beyond = tmp_path / "beyond.csv"
    beyond.write_text("a,b,label\n1,2,0\n3,4,7\n")
    with pytest.raises(DataError, match=r"label 7 .* outside the model's 2 classes"):
        prepare(config, beyond)


def test_the_client_command_stops_on_bad_data_with_one_line_and_never_connects(
    tmp_path: Path,
) -> None:
    """Port 9 on loopback has no server: the client must fail on its data before trying."""
    config = _site_config(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,diagnosis\n1,2,0\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedforge.cli",
            "client",
            str(config),
            "--server",
            "127.0.0.1:9",
            "--data",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [f"error: {bad}: no label column 'label' (columns: a, b, diagnosis)"]
