"""Crash-safe run state: SQLite for metadata and history, safetensors for arrays.

After every round the driver's checkpoint writes ``round_NNNNNN.safetensors`` (global model,
server optimizer state, the algorithm's server state) to a temporary name, fsyncs and renames
it, then commits the round's record, the stage states and the history in one SQLite
transaction. A restart loads the newest committed round, so a crash at any point loses at most
the round in progress. Every round row stores the SHA-256 of its file, and the file's metadata
names its run and round: a restart verifies both and falls back to the previous intact round
(with a warning) when the newest file is missing, truncated, corrupted or another round's.
Every row is also authenticated: an HMAC-SHA256, keyed by ``checkpoint.key`` (32 random bytes,
mode 0600, beside the database), of its run, round, file digest, stage states and record; so a
checkpoint or record modified on purpose (its digest recomputed) is refused like a corrupted
one. State written before rows were keyed is verified by its digests and keyed once, with a
warning. A directory holding checkpoints but no readable run is never silently started over.
A checkpoint that cannot be written (a full disk) is an ``OSError`` naming the file; the state
stays at the previous round. Randomness
needs no saving: every stream is a pure function of (seed, purpose, round, client), and the
seed is stored; client state versions itself by round.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

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
KEY_FILE = "checkpoint.key"
_KEY_BYTES = 32
_STATE_FILES = ("state.sqlite", "state.sqlite-journal", "final_model.safetensors", KEY_FILE)
log = logging.getLogger("fedforge")


def row_mac(
    key: bytes, run_id: str, round_number: int, digest: str, stages: str, record: str
) -> str:
    """The HMAC-SHA256 (hex) that authenticates one stored round."""
    message = json.dumps([run_id, int(round_number), digest, stages, record]).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


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
            if "mac" not in columns:  # ... or before rows were keyed
                self.db.execute("ALTER TABLE rounds ADD COLUMN mac TEXT")
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
            self.db.execute("DELETE FROM clients")  # a new run numbers its clients afresh
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
        record, stages = to_json(history[-1].to_dict()), json.dumps(state.stage_states)
        mac = row_mac(self._key_made(), run_id, state.round, digest, stages, record)
        with self._transaction():  # a full disk rolls it back: the previous round stays
            self.db.execute(
                "INSERT OR REPLACE INTO rounds (round, record, arrays, stages, digest, mac) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (state.round, record, name, stages, digest, mac),
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

    def _key(self) -> bytes | None:
        """The key of the rows' HMACs, None when there is none yet."""
        path = self.directory / KEY_FILE
        if not path.exists():
            return None
        key = path.read_bytes()
        if len(key) != _KEY_BYTES:
            raise FedforgeError(f"{path} is not a checkpoint key ({len(key)} bytes)")
        return key

    def _key_made(self) -> bytes:
        """The key of the rows' HMACs, made (32 random bytes, mode 0600) when missing."""
        key = self._key()
        if key is not None:
            return key
        path = self.directory / KEY_FILE
        key = os.urandom(_KEY_BYTES)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def set_clients(self, ids: dict[str, int]) -> None:
        """Record the run's client ids (name -> id); ids recorded before are kept."""
        with self._transaction():
            self.db.executemany(
                "INSERT OR IGNORE INTO clients VALUES (?, ?, 0)", sorted(ids.items())
            )

    def clients(self) -> dict[str, int]:
        """The client ids of the run (name -> id), as recorded at its starts."""
        return dict(self.db.execute("SELECT name, client_id FROM clients").fetchall())

    def load(self) -> Checkpoint | None:
        """The newest round whose file is intact (its digest, run and round verified) and
        whose row is authentic (its HMAC); an older intact round, with a warning, when the
        newer ones are damaged (their rows are then dropped, so the history ends at the round
        resumed). A modified record of an earlier round is refused."""
        run_id, seed = self.meta("run_id"), self.meta("seed")
        rows = self.db.execute(
            "SELECT round, arrays, stages, digest, record, mac FROM rounds ORDER BY round DESC"
        ).fetchall()
        if run_id is None or seed is None or not rows:
            return None
        key = self._authentication_key(rows)
        problems = []
        for round_number, file_name, stages, digest, record, mac in rows[:_KEEP_FILES]:
            try:
                if key is not None and mac != row_mac(
                    key, run_id, round_number, digest, stages, record
                ):
                    raise FedforgeError(f"round {round_number}'s row fails its HMAC (modified)")
                arrays = self._verified(Path(file_name), run_id, int(round_number), digest)
            except FedforgeError as exc:
                problems.append(str(exc))
                log.warning("checkpoint of round %d is unusable: %s", round_number, exc)
                continue
            if problems:
                log.warning("resuming from round %d, the newest intact checkpoint", round_number)
                with self._transaction():
                    self.db.execute("DELETE FROM rounds WHERE round > ?", (round_number,))
            earlier = [row for row in rows if row[0] <= round_number]
            self._authenticate_history(run_id, earlier, key)
            groups = [
                {k[len(p) :]: v for k, v in arrays.items() if k.startswith(p)} for p in _GROUPS
            ]
            history = History(RoundRecord.from_dict(json.loads(row[4])) for row in earlier[::-1])
            params, optimizer_state, extras = groups
            state = ServerState(
                int(round_number), params, optimizer_state, extras, json.loads(stages)
            )
            return Checkpoint(run_id, int(seed), state, history)
        raise FedforgeError(
            f"no intact checkpoint of run {run_id} in {self.directory} ({'; '.join(problems)}); "
            "restore it from a backup, or start a new run over it with --new-run"
        )

    def _authentication_key(self, rows: list[tuple[Any, ...]]) -> bytes | None:
        """The key the rows' HMACs must match; None for state written before rows were keyed
        (no key and no HMAC: keyed by :meth:`_authenticate_history` once verified). A keyed
        run without its key, or with rows lacking an HMAC, is refused."""
        key = self._key()
        unkeyed = sorted(int(row[0]) for row in rows if row[5] is None)
        if key is None and len(unkeyed) < len(rows):
            raise FedforgeError(
                f"{self.directory / KEY_FILE} is missing, so the run's checkpoints cannot be "
                "authenticated; restore it from a backup, or start a new run over it with "
                "--new-run"
            )
        if key is not None and unkeyed:
            raise FedforgeError(
                f"the rows of round(s) {', '.join(map(str, unkeyed))} in "
                f"{self.directory / 'state.sqlite'} carry no HMAC though the run is keyed: the "
                "state was modified; restore it from a backup, or start a new run over it with "
                "--new-run"
            )
        return key

    def _authenticate_history(
        self, run_id: str, rows: list[tuple[Any, ...]], key: bytes | None
    ) -> None:
        """Check every kept row's HMAC (one modified record is refused); state from before
        rows were keyed (``key`` None) is keyed now, once, with a warning."""
        if key is None:
            key = self._key_made()
            with self._transaction():
                self.db.executemany(
                    "UPDATE rounds SET mac = ? WHERE round = ?",
                    [(row_mac(key, run_id, r, d, st, rec), r) for r, _, st, d, rec, _ in rows],
                )
            log.warning(
                "%s: checkpoints written before fedforge keyed them: verified by their "
                "SHA-256 and keyed now (%s)",
                self.directory,
                KEY_FILE,
            )
            return
        for round_number, _, stages, digest, record, mac in rows:
            if mac != row_mac(key, run_id, round_number, digest, stages, record):
                raise FedforgeError(
                    f"the stored record of round {round_number} in "
                    f"{self.directory / 'state.sqlite'} fails its HMAC: it was modified; "
                    "restore the state from a backup, or start a new run over it with --new-run"
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
