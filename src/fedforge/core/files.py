"""Writing files so that a full disk is an ordinary ``OSError``: bytes are written through
Python's own I/O (whose errors carry the errno and the path, where a library's writer may
raise its own exception type), and a partial file is removed."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path


def write_file(path: Path, data: bytes, *, sync: bool = False) -> None:
    """Write ``data`` to ``path`` (``sync``: to the disk, before returning); on failure
    nothing partial is left behind."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        if exc.filename is None:  # a failed write() names no file: name it
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def sqlite_disk_error(exc: sqlite3.Error, path: Path) -> OSError | None:
    """The ``OSError`` for SQLite's report of a full disk or a failed write (a file size
    limit gives an I/O error), None for any other SQLite error."""
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith("SQLITE_FULL"):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if name.startswith("SQLITE_IOERR"):
        return OSError(errno.EIO, f"disk I/O error ({exc})", str(path))
    return None
