import numpy as np
import pytest

from fedforge.core.errors import InvalidUpdateError
from fedforge.core.params import spec_of
from fedforge.core.results import ClientResult
from fedforge.runtime.validation import validate_result

PARAMS = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
SPEC = spec_of(PARAMS)


def result(update: dict, n: object = 5, loss: float = 0.1) -> ClientResult:  # type: ignore[type-arg]
    return ClientResult(client_id=0, num_examples=n, update=update, train_loss=loss)  # type: ignore[arg-type]


def test_valid_result_passes() -> None:
    validate_result(result(dict(PARAMS)), SPEC, max_examples=5)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (result({**PARAMS, "w": np.full((2, 3), np.nan, np.float32)}), "NaN"),
        (result({**PARAMS, "b": np.array([np.inf, 0, 0], np.float32)}), "infinite"),
        (result({**PARAMS, "w": np.zeros((3, 2), np.float32)}), "shape"),
        (result({**PARAMS, "w": np.zeros((2, 3), np.float64)}), "dtype"),
        (result({"w": PARAMS["w"]}), "missing"),
        (result({**PARAMS, "extra": np.zeros(1, np.float32)}), "unexpected"),
        (result({**PARAMS, "w": [[0.0] * 3] * 2}), "numpy array"),
        (result(dict(PARAMS), n=0), "outside"),
        (result(dict(PARAMS), n=-3), "outside"),
        (result(dict(PARAMS), n=6), "outside"),
        (result(dict(PARAMS), n=2.5), "integer"),
        (result(dict(PARAMS), n=True), "integer"),
        (result(dict(PARAMS), loss=float("nan")), "train_loss"),
    ],
)
def test_invalid_results_are_rejected_with_a_reason(bad: ClientResult, message: str) -> None:
    with pytest.raises(InvalidUpdateError, match=message):
        validate_result(bad, SPEC, max_examples=5)
