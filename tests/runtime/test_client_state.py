import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedforge.runtime.client_state import ClientStateStore, DiskStateStore, MemoryStateStore
from fedforge.runtime.state_slots import ClientStates


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


def _stores(tmp_path: Path) -> dict[str, ClientStateStore]:
    return {
        "memory": MemoryStateStore(),
        "spilled": ClientStates(8, budget=0),  # every client in the mapped file
        "half": ClientStates(8, budget=2 * 2 * 12 * 4),  # two clients in memory, then the file
        "run-dir": ClientStates(8, directory=tmp_path / "run"),
    }


def test_client_states_follow_the_versioning_of_the_memory_store(tmp_path: Path) -> None:
    """Puts, replays, discards and odd-shaped states, in memory, spilled or in a run
    directory: every store answers every get the same."""
    rng = np.random.default_rng(0)
    stores = _stores(tmp_path)
    for round_number in range(1, 6):
        for cid in rng.choice(8, 5, replace=False).tolist():
            state = {"a": rng.standard_normal(8).astype(np.float32), "b": np.arange(4) * cid}
            if cid == 5 and round_number == 3:
                state = {"a": np.zeros(3, np.float32)}  # unlike the others: kept beside
            for store in stores.values():
                store.put(cid, state, round_number)
            if cid % 3 == 0:  # a rejected record: the state this round wrote is forgotten
                for store in stores.values():
                    store.discard(cid, round_number)
        for before in range(1, round_number + 2):
            for cid in range(8):
                got = [s.get(cid, before) for s in stores.values()]
                first = got[0]
                for other in got[1:]:
                    assert (other is None) == (first is None)
                    if first is not None and other is not None:
                        assert other.keys() == first.keys()
                        for key in first:
                            np.testing.assert_array_equal(other[key], first[key])
    for store in stores.values():
        if isinstance(store, ClientStates):
            store.close()


_WRITER = """
import os, signal, sys
from pathlib import Path
import numpy as np
from fedforge.runtime.state_slots import ClientStates
states = ClientStates(50, directory=Path(sys.argv[1]))
for cid in range(50):
    states.put(cid, {"c": np.full(20_000, cid, np.float32)}, 1)
states.flush()  # round 1 is committed
print("flushed", flush=True)
round_number = 2
while True:  # round 2 (and its replays) write until the process is killed
    for cid in range(50):
        states.put(cid, {"c": np.full(20_000, -round_number, np.float32)}, 2)
"""


def test_a_killed_writer_leaves_the_committed_states_intact(tmp_path: Path) -> None:
    """SIGKILL while a round's states are being written (after the previous round's flush):
    reopened, the store gives every client its committed state, bit for bit."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "flushed"
    time.sleep(0.2)  # mid-way through rewriting round 2's states, over and over
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reopened = ClientStates(50, directory=tmp_path, resume=True)
    for cid in range(50):
        state = reopened.get(cid, before_round=2)  # the resumed round 2 starts from here
        assert state is not None
        np.testing.assert_array_equal(state["c"], np.full(20_000, cid, np.float32))
    reopened.close()
