"""Frozen parameters stay local: not exchanged, hashed for the handshake, moved only by the
server's ``frozen/`` offsets; the gather kind that keeps every record."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedforge.aggregate.stacked import StackedRecords
from fedforge.core.records import Record
from fedforge.train.torch_model import FROZEN, TorchModel, frozen_digest, trainable_names
from fedforge.workload.fingerprint import fingerprint


def _partly_frozen(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    for p in [*model[0].parameters(), *model[1].parameters()]:
        p.requires_grad_(False)
    return model


def test_frozen_parameters_and_their_modules_buffers_are_not_exchanged() -> None:
    model = _partly_frozen()
    tm = TorchModel(model)
    assert tm.names == ["2.weight", "2.bias"] == trainable_names(model)
    assert set(tm.get_params()) == {"2.weight", "2.bias"}
    whole = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    assert "1.running_mean" in TorchModel(whole).names  # nothing frozen: all state travels
    assert frozen_digest(whole) is None


def test_the_frozen_digest_names_the_weights_and_the_fingerprint_carries_it() -> None:
    a, b = _partly_frozen(0), _partly_frozen(0)
    assert frozen_digest(a) == frozen_digest(b)
    with torch.no_grad():
        b[0].weight[0, 0] += 1e-6  # one changed frozen weight
    assert frozen_digest(a) != frozen_digest(b)
    fa, fb = fingerprint(a), fingerprint(b)
    why = fa.difference(fb, "the server", "site")
    assert why is not None and "frozen weights sha256" in why
    assert frozen_digest(a) in why and frozen_digest(b) in why  # both digests named
    c = _partly_frozen(0)
    with torch.no_grad():
        c[2].weight.add_(1.0)  # trained weights differ: the same frozen base
    assert frozen_digest(c) == frozen_digest(a)


def test_frozen_offsets_add_to_the_local_value_and_are_undone() -> None:
    model = _partly_frozen()
    tm = TorchModel(model)
    original = model[0].weight.detach().clone()
    offset = np.full((4, 3), 0.5, np.float32)
    tm.set_frozen_offsets({FROZEN + "0.weight": offset, "2.weight": np.zeros((2, 4))})
    torch.testing.assert_close(model[0].weight.detach(), original + 0.5)
    tm.set_frozen_offsets({FROZEN + "0.weight": 2 * offset})  # not cumulative
    torch.testing.assert_close(model[0].weight.detach(), original + 1.0)
    tm.set_frozen_offsets({})
    torch.testing.assert_close(model[0].weight.detach(), original)
    with pytest.raises(ValueError, match="not frozen"):
        tm.set_frozen_offsets({FROZEN + "2.weight": np.zeros((2, 4), np.float32)})
    with pytest.raises(ValueError, match="shape"):
        tm.set_frozen_offsets({FROZEN + "0.weight": np.zeros((3, 4), np.float32)})


def test_stacked_records_keep_every_record_beside_the_mean() -> None:
    acc = StackedRecords().accumulator()
    for cid, (value, n) in enumerate([(1.0, 1), (4.0, 3)]):
        record = Record(cid, n, {"w": np.full(2, value, np.float32)})
        acc.add(record.as_batch(), np.array([float(n)]))
    result = acc.result()
    np.testing.assert_allclose(result.arrays["w"], [3.25, 3.25])
    assert result.stacked is not None and result.weights is not None
    np.testing.assert_array_equal(result.stacked["w"], [[1, 1], [4, 4]])
    np.testing.assert_array_equal(result.weights, [1, 3])
