import numpy as np

from fedforge.core.params import ArraySpec
from fedforge.core.records import Record, RecordBatch, RecordSpec
from fedforge.runtime.validation import validate_batch

SPEC = RecordSpec(
    {"w": ArraySpec((2, 3), np.dtype(np.float32)), "b": ArraySpec((3,), np.dtype(np.float32))},
    scalars=("clip.clipped",),
    metrics=("train_loss",),
)


def good(cid: int = 0, n: int = 5, **over: object) -> Record:
    fields: dict[str, object] = dict(
        client_id=cid,
        num_examples=n,
        arrays={"w": np.zeros((2, 3), np.float32), "b": np.ones(3, np.float32)},
        scalars={"clip.clipped": 0.0},
        metrics={"train_loss": 0.5},
    )
    fields.update(over)
    return Record(**fields)  # type: ignore[arg-type]


def check(record: Record, cap: int = 10) -> str | None:
    keep, reasons = validate_batch(record.as_batch(), SPEC, np.array([cap]))
    assert keep[0] == (reasons[0] is None)
    return reasons[0]


def test_good_record_passes() -> None:
    assert check(good()) is None


def test_each_defect_is_named() -> None:
    arrays = good().arrays
    assert "missing ['b']" in (check(good(arrays={"w": arrays["w"]})) or "")
    assert "unexpected ['x']" in (check(good(arrays={**arrays, "x": arrays["b"]})) or "")
    assert "shape" in (check(good(arrays={**arrays, "b": np.ones(4, np.float32)})) or "")
    assert "dtype" in (check(good(arrays={**arrays, "b": np.ones(3, np.float64)})) or "")
    nan = arrays["w"].copy()
    nan[0, 0] = np.nan
    assert "NaN" in (check(good(arrays={**arrays, "w": nan})) or "")
    assert "range" in (check(good(n=11)) or "")
    assert "range" in (check(good(n=0)) or "")
    assert "integer" in (check(good(n=2.5)) or "")  # type: ignore[arg-type]
    assert "integer" in (check(good(n=True)) or "")  # type: ignore[arg-type]
    assert "not finite" in (check(good(metrics={"train_loss": float("inf")})) or "")
    assert "scalars" in (check(good(scalars={})) or "")
    assert (check(good(arrays={**arrays, "b": "junk"})) or "").startswith("b: ")


def test_a_batch_rejects_only_its_bad_rows() -> None:
    rows = [good(0), good(1), good(2)]
    batch = RecordBatch(
        client_ids=np.array([0, 1, 2]),
        num_examples=np.array([5, 50, 5]),
        arrays={k: np.stack([r.arrays[k] for r in rows]) for k in ("w", "b")},
        scalars={"clip.clipped": np.zeros(3)},
        metrics={"train_loss": np.array([0.1, 0.2, np.nan])},
    )
    keep, reasons = validate_batch(batch, SPEC, np.array([10, 10, 10]))
    assert keep.tolist() == [True, False, False]
    assert reasons[0] is None and "range" in str(reasons[1]) and "finite" in str(reasons[2])
