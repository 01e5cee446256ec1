"""Crash-safe run state: SQLite for metadata and history, safetensors for arrays.

After every round the driver's checkpoint writes ``round_NNNNNN.safetensors`` (global model,
server optimizer state, the algorithm's server state) to a temporary name, fsyncs and renames
it, then commits the round's record, the stage states and the history in one SQLite
transaction. A restart loads the newest committed round, so a crash at any point loses at most
the round in progress. Randomness needs no saving: every stream is a pure function of (seed,
purpose, round, client), and the seed is stored; client state versions itself by round.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from safetensors.numpy import load_file, save_file

from fedforge.algorithms.base import ServerState
from fedforge.core.errors import FedforgeError
from fedforge.report.history import History, RoundRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, record TEXT NOT NULL, arrays TEXT NOT NULL, stages TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    name TEXT PRIMARY KEY, client_id INTEGER NOT NULL, last_round INTEGER NOT NULL);
"""
_GROUPS = ("params/", "optimizer/", "extras/")
_KEEP_FILES = 2


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    seed: int
    state: ServerState
    history: History


class CheckpointStore:
    """Run state in ``directory`` (created if missing)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(directory / "state.sqlite", check_same_thread=False)
        self.db.executescript(_SCHEMA)
        self.db.commit()

    def start(self, run_id: str, seed: int) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [("run_id", run_id), ("seed", str(seed))],
            )

    def open_run(
        self, seed: int, initial: ServerState, *, resume: bool = True
    ) -> tuple[str, ServerState, History]:
        """(run id, state, history) of the run stored here, its parameters in ``initial``'s
        order (the model's); or a new run starting from ``initial``. A stored run with another
        seed is refused, and so is any stored run unless ``resume``."""
        saved = self.load()
        if saved is None:
            run_id = uuid.uuid4().hex
            self.start(run_id, seed)
            return run_id, initial, History()
        if not resume:
            raise FedforgeError(
                f"{self.directory} already holds run {saved.run_id}; resume it or use another "
                "directory"
            )
        if saved.seed != seed:
            raise FedforgeError(
                f"{self.directory} holds run {saved.run_id} with seed {saved.seed}, not {seed}; "
                "use another directory to start a new run"
            )
        params = {k: saved.state.params[k] for k in initial.params}
        return saved.run_id, replace(saved.state, params=params), saved.history

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def save(self, run_id: str, state: ServerState, history: History) -> None:
        """Persist ``state`` and the newest record of ``history`` (the round just done)."""
        name = f"round_{state.round:06d}.safetensors"
        tmp = self.directory / f".{name}.tmp"
        arrays = {}
        for prefix, group in zip(
            _GROUPS, (state.params, state.optimizer_state, state.extras), strict=True
        ):
            arrays.update({prefix + k: v for k, v in group.items()})
        save_file(arrays, str(tmp), metadata={"run_id": run_id, "round": str(state.round)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / name)
        record = history[-1]
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?)",
                (state.round, json.dumps(record.to_dict()), name, json.dumps(state.stage_states)),
            )
        self._prune()

    def register_client(self, name: str, client_id: int, round_number: int) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO clients VALUES (?, ?, ?)", (name, client_id, round_number)
            )

    def clients(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT name, client_id FROM clients").fetchall())

    def load(self) -> Checkpoint | None:
        run_id, seed = self.meta("run_id"), self.meta("seed")
        row = self.db.execute(
            "SELECT round, arrays, stages FROM rounds ORDER BY round DESC LIMIT 1"
        ).fetchone()
        if run_id is None or seed is None or row is None:
            return None
        arrays = load_file(str(self.directory / row[1]))
        groups = [{k[len(p) :]: v for k, v in arrays.items() if k.startswith(p)} for p in _GROUPS]
        records = self.db.execute("SELECT record FROM rounds ORDER BY round").fetchall()
        history = History(RoundRecord.from_dict(json.loads(r[0])) for r in records)
        params, optimizer_state, extras = groups
        state = ServerState(int(row[0]), params, optimizer_state, extras, json.loads(row[2]))
        return Checkpoint(run_id, int(seed), state, history)

    def _prune(self) -> None:
        files = sorted(self.directory.glob("round_*.safetensors"))
        for old in files[:-_KEEP_FILES]:
            old.unlink(missing_ok=True)

    def close(self) -> None:
        self.db.close()
