"""Crash-safe run state: SQLite for metadata and history, safetensors for arrays.

After every round the driver's checkpoint writes ``round_NNNNNN.safetensors`` (global model,
server optimizer state, the algorithm's server state) to a temporary name, fsyncs and renames
it, then commits the round's record, the stage states and the history in one SQLite
transaction. A restart loads the newest committed round, so a crash at any point loses at most
the round in progress. Every round row stores the SHA-256 of its file, and the file's metadata
names its run and round: a restart verifies both and falls back to the previous intact round
(with a warning) when the newest file is missing, truncated, corrupted or another round's. A
directory holding checkpoints but no readable run is never silently started over. Randomness
needs no saving: every stream is a pure function of (seed, purpose, round, client), and the
seed is stored; client state versions itself by round.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from fedforge.algorithms.base import ServerState
from fedforge.core.errors import FedforgeError
from fedforge.core.files import sqlite_disk_error, write_file
from fedforge.report.history import History, RoundRecord, to_json

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, record TEXT NOT NULL, arrays TEXT NOT NULL, stages TEXT NOT NULL,
    digest TEXT);
CREATE TABLE IF NOT EXISTS clients (
    name TEXT PRIMARY KEY, client_id INTEGER NOT NULL, last_round INTEGER NOT NULL);
"""
_GROUPS = ("params/", "optimizer/", "extras/")
_KEEP_FILES = 2
_STATE_FILES = ("state.sqlite", "state.sqlite-journal", "final_model.safetensors")
log = logging.getLogger("fedforge")


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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
        try:
            self.db = sqlite3.connect(directory / "state.sqlite", check_same_thread=False)
            self.db.executescript(_SCHEMA)
            columns = [row[1] for row in self.db.execute("PRAGMA table_info(rounds)")]
            if "digest" not in columns:  # a state directory from before digests were kept
                self.db.execute("ALTER TABLE rounds ADD COLUMN digest TEXT")
            self.db.commit()
        except sqlite3.DatabaseError as exc:
            disk = sqlite_disk_error(exc, directory / "state.sqlite")
            if disk is not None:
                raise disk from None
            raise FedforgeError(
                f"{directory / 'state.sqlite'} is unreadable ({exc}); restore the state "
                "directory from a backup, or start a new run over it with --new-run"
            ) from None

    @staticmethod
    def discard(directory: Path) -> None:
        """Delete the run state in ``directory`` (to start a new run over it)."""
        for name in _STATE_FILES:
            (directory / name).unlink(missing_ok=True)
        for path in directory.glob("round_*.safetensors"):
            path.unlink()

    def start(self, run_id: str, seed: int) -> None:
        with self._transaction():
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
            leftovers = sorted(
                p.name
                for p in self.directory.glob("*.safetensors")
                if p.name.startswith("round_") or p.name == "final_model.safetensors"
            )
            if leftovers:
                raise FedforgeError(
                    f"{self.directory} holds checkpoints ({', '.join(leftovers)}) but no run "
                    "to resume (its state.sqlite is missing or empty); restore it from a "
                    "backup, or start a new run over it with --new-run"
                )
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
        data = save(arrays, metadata={"run_id": run_id, "round": str(state.round)})
        write_file(tmp, data, sync=True)  # a full disk: OSError, the previous round intact
        digest = hashlib.sha256(data).hexdigest()
        os.replace(tmp, self.directory / name)
        record = history[-1]
        with self._transaction():  # a full disk rolls it back: the previous round stays
            self.db.execute(
                "INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?)",
                (
                    state.round,
                    to_json(record.to_dict()),
                    name,
                    json.dumps(state.stage_states),
                    digest,
                ),
            )
        self._prune()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One SQLite transaction; a full disk rolls it back and raises ``OSError``."""
        try:
            with self.db:
                yield
        except sqlite3.Error as exc:
            disk = sqlite_disk_error(exc, self.directory / "state.sqlite")
            if disk is None:
                raise
            raise disk from None

    def register_client(self, name: str, client_id: int, round_number: int) -> None:
        with self._transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO clients VALUES (?, ?, ?)", (name, client_id, round_number)
            )

    def clients(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT name, client_id FROM clients").fetchall())

    def load(self) -> Checkpoint | None:
        """The newest round whose file is intact (its digest, run and round verified); an
        older intact round, with a warning, when the newer ones are damaged (their rows are
        then dropped, so the history ends at the round resumed)."""
        run_id, seed = self.meta("run_id"), self.meta("seed")
        rows = self.db.execute(
            "SELECT round, arrays, stages, digest FROM rounds ORDER BY round DESC"
        ).fetchall()
        if run_id is None or seed is None or not rows:
            return None
        problems = []
        for round_number, file_name, stages, digest in rows[:_KEEP_FILES]:
            try:
                arrays = self._verified(Path(file_name), run_id, int(round_number), digest)
            except FedforgeError as exc:
                problems.append(str(exc))
                log.warning("checkpoint of round %d is unusable: %s", round_number, exc)
                continue
            if problems:
                log.warning("resuming from round %d, the newest intact checkpoint", round_number)
                with self.db:
                    self.db.execute("DELETE FROM rounds WHERE round > ?", (round_number,))
            groups = [
                {k[len(p) :]: v for k, v in arrays.items() if k.startswith(p)} for p in _GROUPS
            ]
            records = self.db.execute("SELECT record FROM rounds ORDER BY round").fetchall()
            history = History(RoundRecord.from_dict(json.loads(r[0])) for r in records)
            params, optimizer_state, extras = groups
            state = ServerState(
                int(round_number), params, optimizer_state, extras, json.loads(stages)
            )
            return Checkpoint(run_id, int(seed), state, history)
        raise FedforgeError(
            f"no intact checkpoint of run {run_id} in {self.directory} ({'; '.join(problems)}); "
            "restore it from a backup, or start a new run over it with --new-run"
        )

    def _verified(
        self, file_name: Path, run_id: str, round_number: int, digest: str | None
    ) -> dict[str, np.ndarray]:
        path = self.directory / file_name
        if not path.exists():
            raise FedforgeError(f"{path.name} is missing")
        if digest is not None and file_digest(path) != digest:
            raise FedforgeError(f"{path.name} does not match its recorded SHA-256")
        try:
            with safe_open(str(path), framework="numpy") as f:
                metadata = f.metadata() or {}
            arrays = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise FedforgeError(f"{path.name} is unreadable: {exc}") from None
        if metadata.get("run_id") != run_id or metadata.get("round") != str(round_number):
            raise FedforgeError(
                f"{path.name} holds round {metadata.get('round')} of run "
                f"{metadata.get('run_id')}, not round {round_number} of run {run_id}"
            )
        return arrays

    def _prune(self) -> None:
        files = sorted(self.directory.glob("round_*.safetensors"))
        for old in files[:-_KEEP_FILES]:
            old.unlink(missing_ok=True)

    def close(self) -> None:
        self.db.close()
