"""One site's data as the runtimes hold it: what a data function returned, converted to a
:class:`~fedforge.ClientData` and checked against the model before the site takes part."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from fedforge.core.errors import DataError
from fedforge.data.datasets import ArrayDataset
from fedforge.data.federated import ClientData
from fedforge.workload.readers import checked_arrays

MAX_DATASET_ITEMS = 10_000_000  # a torch Dataset longer than this is refused, not read


def as_client_data(value: object, where: str) -> ClientData:
    """A data function's result as checked arrays: ``(x, y)``, an ``ArrayDataset``, a
    ``ClientData`` (its held-out split kept) or a torch map-style ``Dataset`` of ``(x, y)``
    pairs, read once into arrays."""
    if isinstance(value, ClientData):
        held = value.holdout
        return ClientData(
            as_arrays(value.train, where),
            as_arrays(held, f"{where} (held-out split)") if held is not None else None,
        )
    return ClientData(as_arrays(value, where))


def as_arrays(value: object, where: str) -> ArrayDataset:
    if isinstance(value, ArrayDataset):
        return checked_arrays(value.x, value.y, where)
    if isinstance(value, tuple) and len(value) == 2:
        return checked_arrays(_array(value[0]), _array(value[1]), where)
    if isinstance(value, torch.utils.data.Dataset):
        return _read_dataset(value, where)
    raise DataError(
        f"{where} returned {type(value).__name__}: return arrays (x, y), a fedforge "
        "ArrayDataset or ClientData, or a torch Dataset of (x, y) pairs"
    )


def _array(value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _read_dataset(dataset: torch.utils.data.Dataset[object], where: str) -> ArrayDataset:
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(
            f"{where}: a torch Dataset without len() (iterable datasets are not "
            "supported: return arrays)"
        ) from None
    if not 0 < size <= MAX_DATASET_ITEMS:
        raise DataError(f"{where}: a torch Dataset of {size} items")
    xs, ys = [], []
    for i in range(size):
        item = dataset[i]
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise DataError(f"{where}: item {i} of the Dataset is not an (x, y) pair")
        xs.append(_array(item[0]))
        ys.append(int(_array(item[1])))
    shapes = {x.shape for x in xs}
    if len(shapes) != 1:
        raise DataError(f"{where}: the Dataset's examples have different shapes {sorted(shapes)}")
    return checked_arrays(np.stack(xs), np.array(ys, np.int64), where)


def check_against_model(
    data: ClientData, module: torch.nn.Module, where: str, inputs: Sequence[int] | None = None
) -> None:
    """Stop a site whose examples the model cannot take or whose labels it cannot predict:
    the feature shape (against ``inputs``, the model's declared input shape, when known; by
    a forward pass otherwise) and the labels (within the model's output classes). An opaque
    site's object is the workload's own business."""
    if data.site is not None:
        return
    parts = [("", data.train)] + ([(" (held-out split)", data.holdout)] if data.holdout else [])
    for suffix, part in parts:
        shape = tuple(part.x.shape[1:])
        if inputs is not None and math.prod(shape) != math.prod(inputs):
            raise DataError(
                f"{where}{suffix}: {math.prod(shape)} features per example "
                f"(shape {list(shape)}), the model takes {math.prod(inputs)} "
                f"(shape {list(inputs)})"
            )
        classes = output_classes(module, part, f"{where}{suffix}")
        bad = np.flatnonzero((part.y < 0) | (part.y >= classes))
        if len(bad):
            raise DataError(
                f"{where}{suffix}: label {int(part.y[bad[0]])} (example {bad[0] + 1}) is "
                f"outside the model's {classes} classes"
            )


def output_classes(module: torch.nn.Module, data: ArrayDataset, where: str) -> int:
    """The model's number of outputs on the first examples of ``data``."""
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.from_numpy(data.x[:2]))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{where}: examples of shape {list(data.x.shape[1:])} do not fit the model ({first})"
        ) from None
    finally:
        module.train(training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"{where}: the model returns {shape}; expected (batch, classes) logits")
    return int(out.shape[1])
