"""Client state that scales: in memory up to a budget, the rest at fixed offsets in one file.

:class:`MappedSlots` keeps every client's state in one memory-mapped file, two slots per client
at fixed offsets (``(2 * client + slot) * slot_bytes``), each tagged with the round that wrote
it; states are read as views of the mapping and written through the file (``pwrite``). A
put goes to the slot that does *not* hold the newest state written before its round, so the
state a round starts from is never overwritten while that round runs: a retried or replayed
round, or a run resumed after a crash, reads it intact. Pages read through the mapping are
released from this process after a while (they stay in the page cache), so the resident
memory stays bounded whatever the number of clients.

:class:`ClientStates` is the simulation's store: clients' states in memory while they fit in
``budget`` bytes, the later ones in :class:`MappedSlots` (a temporary file, or the run
directory). In a run directory every state is in the file and :meth:`ClientStates.flush`,
called just before each checkpoint commits, makes the round's writes durable: the data
(``fsync``: only the pages written since the last flush, i.e. the clients that took part),
then the slot tags, written to a new file and renamed over the old. The tags on disk never
name a slot whose data might not be on disk; tags of rounds after the checkpoint a run
resumes from are never read (``get`` asks for states written before the round it runs).

States whose arrays differ from the first state's layout (names, shapes, dtypes) are kept
beside the slots: in memory, or as files (:class:`DiskStateStore`) in a run directory.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedforge.core.errors import FedforgeError
from fedforge.core.params import Params
from fedforge.runtime.client_state import ClientStateStore, DiskStateStore, MemoryStateStore

DATA, TAGS, LAYOUT = "slots.bin", "slots.tags.npy", "slots.layout.json"
EMPTY = -1
RESIDENT = 256 << 20  # bytes of slots mapped in before their pages are released
_ALIGN = 64


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of a state's arrays, and their byte offsets in a slot."""

    entries: tuple[tuple[str, tuple[int, ...], str, int], ...]  # name, shape, dtype, offset
    slot_bytes: int

    @staticmethod
    def of(state: Params) -> Layout:
        entries, offset = [], 0
        for name in sorted(state):
            arr = np.asarray(state[name])
            entries.append((name, tuple(arr.shape), arr.dtype.str, offset))
            offset += -(-arr.nbytes // _ALIGN) * _ALIGN
        return Layout(tuple(entries), max(offset, _ALIGN))

    def fits(self, state: Params) -> bool:
        if len(state) != len(self.entries):
            return False
        for name, shape, dtype, _ in self.entries:
            arr = state.get(name)
            if arr is None or arr.shape != shape or np.asarray(arr).dtype.str != dtype:
                return False
        return True

    def to_json(self) -> str:
        return json.dumps(
            {"entries": [list(e) for e in self.entries], "slot_bytes": self.slot_bytes}
        )

    @staticmethod
    def from_json(text: str) -> Layout:
        raw = json.loads(text)
        entries = tuple((n, tuple(s), d, int(o)) for n, s, d, o in raw["entries"])
        return Layout(entries, int(raw["slot_bytes"]))


class MappedSlots:
    """Two slots per client in ``directory/slots.bin``; see the module docstring."""

    def __init__(self, directory: Path, layout: Layout, clients: int, resume: bool = False) -> None:
        self.directory, self.layout, self.clients = directory, layout, clients
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / DATA
        size = 2 * clients * layout.slot_bytes
        if resume and (directory / TAGS).exists():
            self.tags = np.load(directory / TAGS)
            if self.tags.shape != (clients, 2) or path.stat().st_size != size:
                raise FedforgeError(
                    f"{directory}: the client state file was written for another federation "
                    f"({self.tags.shape[0]} clients); resume with the same data and model"
                )
        else:
            self.tags = np.full((clients, 2), EMPTY, np.int64)
            (directory / TAGS).unlink(missing_ok=True)  # a previous run's: never these slots
            with open(path, "wb") as f:
                f.truncate(size)  # sparse: only written slots take space
            (directory / LAYOUT).write_text(layout.to_json())
        self._file = open(path, "r+b")  # noqa: SIM115 (kept open for the mapping's lifetime)
        self._map = mmap.mmap(self._file.fileno(), size)
        self._bytes = np.frombuffer(self._map, np.uint8)
        self._resident = 0

    def _view(self, client_id: int, slot: int) -> Params:
        base = (2 * client_id + slot) * self.layout.slot_bytes
        out = {}
        for name, shape, dtype, offset in self.layout.entries:
            count = int(np.prod(shape, dtype=np.int64))
            dt = np.dtype(dtype)
            start = base + offset
            out[name] = self._bytes[start : start + count * dt.itemsize].view(dt).reshape(shape)
        return out

    def _newest(self, client_id: int, before_round: int) -> int | None:
        tags = self.tags[client_id]
        ok = [s for s in (0, 1) if EMPTY < tags[s] < before_round]
        return max(ok, key=lambda s: tags[s]) if ok else None

    def get(self, client_id: int, before_round: int) -> Params | None:
        """The newest state written before ``before_round``: views of the file, valid until
        the client's next put (copy what you keep)."""
        slot = self._newest(client_id, before_round)
        if slot is None:
            return None
        self._touch()
        return self._view(client_id, slot)

    def put(self, client_id: int, state: Params, round_number: int) -> None:
        keep = self._newest(client_id, round_number)
        slot = 1 - keep if keep is not None else 0
        self.tags[client_id, slot] = EMPTY  # (in memory: a torn write is never tagged)
        base = (2 * client_id + slot) * self.layout.slot_bytes
        fd = self._file.fileno()
        for name, _, _, offset in self.layout.entries:
            # Written through the file, not the mapping: no page fault per page (10x less
            # CPU on a fresh file); the mapping sees the same page cache.
            os.pwrite(fd, np.ascontiguousarray(state[name]).data, base + offset)
        self.tags[client_id, slot] = round_number

    def _touch(self) -> None:
        """Count a slot's pages mapped in (read); release them all past :data:`RESIDENT` bytes."""
        self._resident += self.layout.slot_bytes
        if self._resident > RESIDENT:
            self.release()

    def discard(self, client_id: int, round_number: int) -> None:
        self.tags[client_id][self.tags[client_id] == round_number] = EMPTY

    def release(self) -> None:
        """Drop the mapping's pages from this process (they stay in the page cache)."""
        self._map.madvise(mmap.MADV_DONTNEED)
        self._resident = 0

    def flush(self) -> None:
        """Make every put so far durable: the data first, then the tags naming it."""
        self._map.flush()
        os.fsync(self._file.fileno())
        tmp = self.directory / f".{TAGS}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, self.tags)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / TAGS)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        del self._bytes
        # (views handed out by ``get`` may still live: the mapping then goes with them)
        with contextlib.suppress(BufferError):
            self._map.close()
        self._file.close()


class ClientStates:
    """The simulation's client state store (see the module docstring): ``budget`` bytes of
    states in memory (each client reserves two versions), the rest in :class:`MappedSlots`;
    with ``directory`` (a run directory) all of it in the file, durable at each
    :meth:`flush`, and ``resume`` reopens what a previous process flushed there."""

    def __init__(
        self,
        clients: int,
        budget: int = 1 << 30,
        directory: Path | None = None,
        resume: bool = False,
    ) -> None:
        self.clients, self.directory, self.resume = clients, directory, resume
        self.budget = 0 if directory is not None else budget
        self.memory = MemoryStateStore()
        self._in_memory: set[int] = set()
        self._used = 0
        self.slots: MappedSlots | None = None
        self._other: ClientStateStore = MemoryStateStore()
        self._others: set[int] = set()
        self._scratch: str | None = None
        if directory is not None:
            self._other = DiskStateStore(directory / "other")
            self._others = {int(p.name.split(".")[0]) for p in (directory / "other").glob("*.*")}
            if resume and (directory / LAYOUT).exists():
                layout = Layout.from_json((directory / LAYOUT).read_text())
                self.slots = MappedSlots(directory, layout, clients, resume=True)

    def _slots_for(self, state: Params) -> MappedSlots:
        if self.slots is None:
            directory = self.directory
            if directory is None:
                self._scratch = tempfile.mkdtemp(prefix="fedforge-states-")
                directory = Path(self._scratch)
            self.slots = MappedSlots(directory, Layout.of(state), self.clients)
        return self.slots

    def get(self, client_id: int, before_round: int) -> Params | None:
        if client_id in self._in_memory:
            return self.memory.get(client_id, before_round)
        if client_id in self._others:
            return self._other.get(client_id, before_round)
        return None if self.slots is None else self.slots.get(client_id, before_round)

    def put(self, client_id: int, state: Params, round_number: int) -> None:
        if client_id in self._in_memory:
            self.memory.put(client_id, state, round_number)
            return
        if client_id not in self._others:
            size = sum(int(np.asarray(v).nbytes) for v in state.values())
            fresh = self.slots is None or bool((self.slots.tags[client_id] == EMPTY).all())
            if fresh and self.directory is None and self._used + 2 * size <= self.budget:
                self._in_memory.add(client_id)
                self._used += 2 * size
                self.memory.put(client_id, state, round_number)
                return
            slots = self._slots_for(state)
            if slots.layout.fits(state):
                slots.put(client_id, state, round_number)
                return
            self._move_to_others(client_id, slots)  # a state shaped unlike the others
        self._other.put(client_id, state, round_number)

    def _move_to_others(self, client_id: int, slots: MappedSlots) -> None:
        """Keep this client's states beside the slots from now on, its versions moved."""
        tags = slots.tags[client_id]
        for slot in sorted((s for s in (0, 1) if tags[s] != EMPTY), key=lambda s: tags[s]):
            state = slots.get(client_id, int(tags[slot]) + 1)
            assert state is not None
            self._other.put(client_id, {k: v.copy() for k, v in state.items()}, int(tags[slot]))
        slots.tags[client_id] = EMPTY
        self._others.add(client_id)

    def discard(self, client_id: int, round_number: int) -> None:
        if client_id in self._in_memory:
            self.memory.discard(client_id, round_number)
        elif client_id in self._others:
            self._other.discard(client_id, round_number)
        elif self.slots is not None:
            self.slots.discard(client_id, round_number)

    def flush(self) -> None:
        """Make the states durable (run directory only; a no-op otherwise)."""
        if self.directory is not None and self.slots is not None:
            self.slots.flush()

    def close(self) -> None:
        if self.slots is not None:
            self.slots.close()
            self.slots = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def run_states(directory: Path, clients: int, resume: bool) -> ClientStateStore:
    """The client state store of a run directory: :class:`ClientStates` in ``directory``, or
    the per-client files of a run started before it (resumed as they are)."""
    if resume and any(directory.glob("*.safetensors")) and not (directory / LAYOUT).exists():
        return DiskStateStore(directory)
    if not resume:
        for name in (DATA, TAGS, LAYOUT):
            (directory / name).unlink(missing_ok=True)
        shutil.rmtree(directory / "other", ignore_errors=True)
    return ClientStates(clients, directory=directory, resume=resume)
