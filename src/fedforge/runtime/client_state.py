"""Per-client state that persists across rounds (control variates, residuals, personal layers).

A store keeps, per client, the state written after the client's latest completed task and the
one before it, each tagged with its round. ``get(client, before_round=r)`` returns the newest
state written in a round before ``r``: a round that is retried, or replayed after a crash,
starts from the same client state as the first attempt did. In simulation the driver
``discard``s the state of a client whose record was not used (rejected, or in an abandoned
attempt), so the client state moves only with the aggregate. In memory; on disk (one safetensors
file per client and version, written atomically) on each deployed client, where it survives a
client restart. Simulations keep it in :mod:`fedforge.runtime.state_slots` (memory up to a
budget, then one memory-mapped file; durable in a run directory).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from safetensors.numpy import load_file, save

from fedforge.core.files import write_file
from fedforge.core.params import Params


class ClientStateStore(Protocol):
    def get(self, client_id: int, before_round: int) -> Params | None: ...

    def put(self, client_id: int, state: Params, round_number: int) -> None: ...

    def discard(self, client_id: int, round_number: int) -> None:
        """Forget the state written in ``round_number`` (its record was not used)."""
        ...


class MemoryStateStore:
    def __init__(self) -> None:
        self._versions: dict[int, list[tuple[int, Params]]] = {}

    def get(self, client_id: int, before_round: int) -> Params | None:
        for round_number, state in reversed(self._versions.get(client_id, [])):
            if round_number < before_round:
                return state
        return None

    def put(self, client_id: int, state: Params, round_number: int) -> None:
        versions = [v for v in self._versions.get(client_id, []) if v[0] < round_number]
        self._versions[client_id] = [*versions[-1:], (round_number, state)]

    def discard(self, client_id: int, round_number: int) -> None:
        versions = self._versions.get(client_id, [])
        self._versions[client_id] = [v for v in versions if v[0] != round_number]


class EphemeralSessions:
    """Client state in ``store``, except the entries prefixed ``prefix`` (a secure-aggregation
    session: private keys and the record waiting to be masked), kept in memory only. A
    restarted client has no session and is a dropout of that round, as the protocol
    expects; nothing secret is written to disk."""

    def __init__(self, store: ClientStateStore, prefix: str) -> None:
        self.store, self.prefix = store, prefix
        self._sessions: dict[int, tuple[int, Params]] = {}

    def get(self, client_id: int, before_round: int) -> Params | None:
        state = self.store.get(client_id, before_round)
        session = self._sessions.get(client_id)
        if session is None or session[0] >= before_round:
            return state
        return {**(state or {}), **session[1]}

    def put(self, client_id: int, state: Params, round_number: int) -> None:
        session = {k: v for k, v in state.items() if k.startswith(self.prefix)}
        if session:
            self._sessions[client_id] = (round_number, session)
        else:
            self._sessions.pop(client_id, None)
        rest = {k: v for k, v in state.items() if not k.startswith(self.prefix)}
        self.store.put(client_id, rest, round_number)

    def discard(self, client_id: int, round_number: int) -> None:
        if self._sessions.get(client_id, (None,))[0] == round_number:
            del self._sessions[client_id]
        self.store.discard(client_id, round_number)


class DiskStateStore:
    """``<directory>/<client>.safetensors`` (newest) and ``<client>.prev.safetensors``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _paths(self, client_id: int) -> tuple[Path, Path]:
        return (
            self.directory / f"{int(client_id)}.safetensors",
            self.directory / f"{int(client_id)}.prev.safetensors",
        )

    @staticmethod
    def _round(path: Path) -> int | None:
        """The round a state file was written in (its header only), None if there is none."""
        if not path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            return int((f.metadata() or {}).get("round", "-1"))

    def get(self, client_id: int, before_round: int) -> Params | None:
        for path in self._paths(client_id):
            written = self._round(path)
            if written is not None and written < before_round:
                return load_file(str(path))
        return None

    def put(self, client_id: int, state: Params, round_number: int) -> None:
        newest, prev = self._paths(client_id)
        written = self._round(newest)
        if written is not None and written < round_number:
            os.replace(newest, prev)  # keep the version this round started from
        tmp = newest.with_suffix(".tmp")
        write_file(tmp, save(state, metadata={"round": str(round_number)}))
        os.replace(tmp, newest)

    def discard(self, client_id: int, round_number: int) -> None:
        newest, prev = self._paths(client_id)
        if self._round(newest) != round_number:
            return
        if prev.exists():
            os.replace(prev, newest)
        else:
            newest.unlink()
