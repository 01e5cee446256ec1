"""One process at a time in a run directory.

A run holds an exclusive ``flock`` on ``RUN_DIR/run.lock`` while it trains, and writes its
process id, host and start time into the file. The kernel releases the lock when the process
ends, however it ends (SIGKILL included), so a lock left by a dead process is simply taken
over, and whether a live process owns a directory is a question the kernel answers: a
second ``--resume``, an ``--overwrite`` or a dashboard asks it before acting. The lock file
itself stays (deleting it would let two processes lock two different files of one name).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fedforge.core.errors import FedforgeError

LOCK = "run.lock"
# A dashboard's probe holds a shared lock for microseconds: an exclusive request retries
# this long before it concludes that a live process owns the directory.
_RETRY_SECONDS = 0.5
_HELD: dict[Path, RunLock] = {}
Owner = Literal["alive", "dead", "unknown"]


class RunDirInUse(FedforgeError):
    """Another live process is training in this run directory."""


class RunDirGone(FedforgeError):
    """The run directory was deleted (or replaced) while the run was training."""


class RunLock:
    """This process's hold on a run directory (re-entrant: ``hold`` of a directory this
    process already holds returns the same lock, released by the last ``release``)."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._fd = fd
        self._depth = 1
        stat = os.fstat(fd)
        self._identity = (stat.st_dev, stat.st_ino)

    def check(self) -> None:
        """Raise :class:`RunDirGone` when the locked file is no longer in the directory (the
        run directory was deleted, moved or replaced under the run)."""
        try:
            stat = os.stat(self.directory / LOCK)
        except FileNotFoundError:
            stat = None
        if stat is None or (stat.st_dev, stat.st_ino) != self._identity:
            raise RunDirGone(
                f"the run directory {self.directory} was deleted while the run was training; "
                "the run stopped (start it again to get a new run directory)"
            )

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            _HELD.pop(self.directory.resolve(), None)
            os.close(self._fd)  # releases the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold(directory: Path) -> RunLock:
    """Lock the existing ``directory`` for this process, or raise :class:`RunDirInUse` with
    the owner's pid when a live process holds it."""
    key = directory.resolve()
    held = _HELD.get(key)
    if held is not None:
        held._depth += 1
        return held
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + _RETRY_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            owner = _read(fd)
            os.close(fd)
            raise RunDirInUse(
                f"{directory} {in_use_text(owner)}: one process at a time trains in a run "
                "directory; wait for that run to end (or stop it) first"
            ) from None
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    lock = RunLock(directory, fd)
    _HELD[key] = lock
    return lock


def _forget_in_child() -> None:
    """A forked child (a worker process) does not own its parent's run directories: close its
    copies of the lock files (which leaves the parent's locks held) so that the lock ends
    with the process that took it."""
    for lock in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(lock._fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def held_here(directory: Path) -> bool:
    """Whether this process holds ``directory``'s lock."""
    return directory.resolve() in _HELD


def in_use_text(owner: dict[str, Any]) -> str:
    """``is in use by the run in process 123, started ...``: whom a refusal names."""
    who = f"process {owner['pid']}" if "pid" in owner else "another process"
    if owner.get("host") and owner["host"] != socket.gethostname():
        who += f" on {owner['host']}"
    since = f", started {owner['started']}" if "started" in owner else ""
    return f"is in use by the run in {who}{since}"


def _read(fd: int) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        value = json.loads(os.pread(fd, 4096, 0) or b"{}")
        if isinstance(value, dict):
            return value
    return {}


def owner(directory: Path) -> tuple[Owner, dict[str, Any]]:
    """Whether a live process holds ``directory`` (``alive``), held it and ended (``dead``),
    or never locked it (``unknown``: no lock file), with what the lock file says of it."""
    try:
        fd = os.open(directory / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return "unknown", {}
    try:
        info = _read(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return "alive", info
        return "dead", info
    finally:
        os.close(fd)  # releases the probe's shared lock at once
