from pathlib import Path

import numpy as np
import pytest

from fedforge.runtime.client_state import DiskStateStore, MemoryStateStore


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_versions_by_round(kind: str, tmp_path: Path) -> None:
    store = MemoryStateStore() if kind == "memory" else DiskStateStore(tmp_path / "s")
    assert store.get(3, before_round=1) is None
    store.put(3, {"c": np.array([1.0])}, 1)
    store.put(3, {"c": np.array([2.0])}, 4)
    assert store.get(3, before_round=5)["c"][0] == 2.0  # type: ignore[index]
    # A replayed or retried round 4 starts from the state before round 4.
    assert store.get(3, before_round=4)["c"][0] == 1.0  # type: ignore[index]
    store.put(3, {"c": np.array([2.5])}, 4)  # the retry overwrites its own round
    assert store.get(3, before_round=4)["c"][0] == 1.0  # type: ignore[index]
    assert store.get(3, before_round=5)["c"][0] == 2.5  # type: ignore[index]
    assert store.get(7, before_round=9) is None


def test_disk_store_survives_a_new_process_object(tmp_path: Path) -> None:
    DiskStateStore(tmp_path).put(1, {"c": np.arange(3, dtype=np.float32)}, 2)
    again = DiskStateStore(tmp_path).get(1, before_round=3)
    assert again is not None and again["c"].tolist() == [0.0, 1.0, 2.0]
    assert not list(tmp_path.glob("*.tmp"))
