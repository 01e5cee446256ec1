"""What the command line says when a run ends before its last round, or has nothing left
to do: one line each for Ctrl-C, a full disk, too little memory, another error of the
machine, and a completed run asked to resume, with the command that continues it."""

from __future__ import annotations

import errno
import shlex
import sqlite3
from pathlib import Path

# Errors of a full disk: no space, a quota, a file size limit (RLIMIT_FSIZE gives EFBIG),
# and the I/O error SQLite reports for a write the disk refused.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def resume_command(run_dir: Path, rounds: int | None = None) -> str:
    """``fedforge run --resume DIR`` (with ``--set server.rounds=N`` to extend it)."""
    command = f"fedforge run --resume {shlex.quote(str(run_dir))}"
    return command if rounds is None else f"{command} --set server.rounds={rounds}"


def saved_round(run_dir: Path) -> int | None:
    """The last round checkpointed in ``run_dir`` (None: none), read without changing it."""
    path = run_dir / "checkpoint" / "state.sqlite"
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT MAX(round) FROM rounds").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return None if row is None or row[0] is None else int(row[0])


def interrupted_text(run_dir: Path) -> str:
    """Ctrl-C: how far the run got and the command that continues it."""
    saved = saved_round(run_dir)
    done = f"after round {saved} (saved)" if saved else "before its first round was saved"
    return f"interrupted {done}; continue with: {resume_command(run_dir)}"


def complete_text(run_dir: Path, rounds: int) -> str | None:
    """A resumed run that has nothing left to do: how to extend it; None when it has."""
    saved = saved_round(run_dir)
    if saved is None or saved < rounds or not (run_dir / "history.json").is_file():
        return None
    return (
        f"{run_dir} is complete ({saved} rounds, server.rounds = {rounds}): nothing to resume; "
        f"to train it further, extend it: {resume_command(run_dir, saved + rounds)}"
    )


def environment_text(exc: BaseException, run_dir: Path, command: str | None = None) -> str | None:
    """One line for an error of the machine rather than of the run (a full disk, memory, a
    file the run cannot write), ending with the ``command`` that continues the run (default:
    ``fedforge run --resume RUN_DIR``); None for anything else."""
    command = command or resume_command(run_dir)
    if isinstance(exc, MemoryError):
        return (
            "out of memory while training; lower the model's size, client.batch_size or "
            "runtime.memory_budget_mb, then continue with: " + command
        )
    if not isinstance(exc, OSError):
        return None
    where = f" {exc.filename}" if exc.filename else ""
    what = exc.strerror or str(exc)
    if exc.errno in DISK_FULL:
        return (
            f"cannot write{where}: {what}; the run stopped and its saved rounds are intact: "
            f"free disk space (or raise the file size limit), then continue with: {command}"
        )
    return f"cannot use{where}: {what}; the run stopped (continue with: {command})"
