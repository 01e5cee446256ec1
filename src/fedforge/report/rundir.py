"""The run directory: resolved config, provenance, history, final model, report."""

from __future__ import annotations

import json
import math
import platform
import secrets
import shutil
import sys
import tomllib
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w
from safetensors.numpy import save

from fedforge.config import RunConfig, to_toml
from fedforge.core.errors import FedforgeError
from fedforge.data.federated import FederatedDataset
from fedforge.report.history import History, RoundRecord, accuracy_text
from fedforge.report.live import settings_text
from fedforge.report.plots import plot_report
from fedforge.report.runlock import LOCK, RunDirInUse, RunLock, hold, in_use_text, owner
from fedforge.runtime.driver import RoundListener

if TYPE_CHECKING:
    from fedforge.runtime.simulation import SimulationResult

PROVENANCE = "provenance.json"


def new_run_dir(root: Path = Path("runs"), now: datetime | None = None) -> Path:
    """Create and return a fresh ``root/<YYYYmmdd-HHMMSS>-<6 hex>`` directory.

    The directory is created with ``exist_ok=False``, so two runs started in the same second
    (in one process or several) never share one: a name already taken is drawn again."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = root / f"{stamp}-{secrets.token_hex(3)}"
        try:
            candidate.mkdir(exist_ok=False)
        except FileExistsError:
            continue
        return candidate


def is_run_dir(path: Path) -> bool:
    return (path / "config.toml").is_file()


def prepare_out_dir(out_dir: Path, *, overwrite: bool = False) -> RunLock:
    """Make ``out_dir`` ready for a new run, lock it for this process and return the lock,
    without ever destroying a previous run silently.

    A missing or empty directory is fine. A directory a live run holds is refused, whatever
    the flags. A directory with files is refused unless ``overwrite`` is given, and even
    then only a previous run directory (one with a ``config.toml``) is replaced:
    ``--overwrite`` never deletes an arbitrary folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FedforgeError(f"--out {out_dir} exists and is not a directory")
    if _holds_files(out_dir):
        state, info = owner(out_dir)
        if state == "alive":
            raise RunDirInUse(
                f"--out {out_dir} {in_use_text(info)}; choose another directory (or wait "
                "for that run to end)"
            )
        if not overwrite:
            raise FedforgeError(
                f"--out {out_dir} already exists and is not empty; pass --overwrite to replace "
                "it, --resume to continue it, or choose another directory"
            )
        resolved, cwd = out_dir.resolve(), Path.cwd().resolve()
        if not is_run_dir(out_dir) or resolved == cwd or resolved in cwd.parents:
            raise FedforgeError(
                f"--out {out_dir} is not empty and is not a fedforge run directory (no "
                "config.toml); --overwrite only replaces previous runs, choose another directory"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = hold(out_dir)  # a run that started since the check above is refused here
    if overwrite:
        for entry in out_dir.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return lock


def _holds_files(directory: Path) -> bool:
    """Whether ``directory`` exists and holds anything besides a run's lock file."""
    return directory.is_dir() and any(e.name != LOCK for e in directory.iterdir())


class RunComplete(FedforgeError):
    """A resumed run has nothing left to do (the message says how to extend it)."""


def claim_run_dir(
    out: Path | None, resume: Path | None, *, overwrite: bool, rounds: int
) -> tuple[Path, RunLock]:
    """The run directory of ``fedforge run``, locked for this process: the one resumed
    (RunDirInUse while another process trains in it; RunComplete when it has its ``rounds``
    already), ``out`` (prepared: see :func:`prepare_out_dir`), or a new one."""
    from fedforge.report.stops import complete_text

    if resume is not None:
        lock = hold(resume)
        complete = complete_text(resume, rounds)
        if complete:
            lock.release()
            raise RunComplete(complete)
        return resume, lock
    if out is not None:
        return out, prepare_out_dir(out, overwrite=overwrite)
    out_dir = new_run_dir()
    return out_dir, hold(out_dir)


def simulation_toml(config: RunConfig) -> str:
    """The resolved configuration as TOML, without the ``[deploy]`` section that simulations
    ignore (every key has a default, so the file loads back to the same configuration)."""
    raw = tomllib.loads(to_toml(config))
    raw.pop("deploy", None)
    return tomli_w.dumps(raw)


def provenance(
    config: RunConfig, *, backend: str, device: str | None, started: datetime
) -> dict[str, Any]:
    """What ran, where, with what: versions, the backend that actually ran, the device, the
    command line and the start time."""
    import numpy
    import torch

    import fedforge

    return {
        "fedforge": fedforge.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend_requested": config.runtime.backend,
        "backend": backend,
        "device": device,
        "command": list(sys.argv),
        "started": started.isoformat(timespec="seconds"),
        "seed": config.seed,
    }


def start_provenance(
    out_dir: Path, record: dict[str, Any], *, resume: bool = False
) -> dict[str, Any]:
    """Write ``provenance.json`` as a run starts and return the record to complete at its end;
    a resumed run keeps the original start and command and lists this one under ``resumed``."""
    path = out_dir / PROVENANCE
    if resume and path.exists():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
        if isinstance(previous, dict) and "started" in previous:
            record = {
                **record,
                "started": previous["started"],
                "command": previous.get("command"),
                "resumed": [
                    *previous.get("resumed", []),
                    {"started": record["started"], "command": record["command"]},
                ],
            }
    write_provenance(out_dir, record)
    return record


def write_provenance(out_dir: Path, record: dict[str, Any]) -> None:
    """``provenance.json``: what ran, where, and when it started (and finished)."""
    (out_dir / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")


class RunWatch(RoundListener):
    """Keeps a running simulation's directory honest: records the backend and device in
    ``provenance.json`` as soon as they are known, and stops the run (RunDirGone) at the
    next round boundary once its directory was deleted."""

    def __init__(self, lock: RunLock, record: dict[str, Any]) -> None:
        self.lock = lock
        self.record = record

    def run_started(self, backend: str, device: str) -> None:
        self.lock.check()
        self.record.update(backend=backend, device=device)
        write_provenance(self.lock.directory, self.record)

    def round_started(self, round_number: int, client_ids: list[int]) -> None:
        self.lock.check()

    def round_finished(self, record: RoundRecord) -> None:
        self.lock.check()


def write_run_dir(
    out_dir: Path,
    config: RunConfig,
    result: SimulationResult,
    data: FederatedDataset,
    provenance_record: dict[str, Any] | None = None,
) -> None:
    """Write the finished run's ``provenance.json`` (when given), ``history.json``,
    ``model.safetensors`` and ``report.png`` (``config.toml`` is written when the run
    starts, so that a killed run can be resumed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if provenance_record is not None:
        write_provenance(out_dir, provenance_record)
    # Written through an ordinary open(), as a new file, so it gets the same mode as the
    # others (safetensors' save_file creates it 0600 whatever the umask).
    model_path = out_dir / "model.safetensors"
    model_path.unlink(missing_ok=True)
    model_path.write_bytes(save(result.state.params))
    write_report(out_dir, config, result.history, data, result.backend)


def write_report(
    out_dir: Path,
    config: RunConfig,
    history: History,
    data: FederatedDataset | None,
    backend: str,
) -> None:
    """``history.json`` and ``report.png`` of a run (simulated or deployed) in ``out_dir``;
    ``data`` None: a deployment on the sites' own data (no label distribution to plot)."""
    history.save(out_dir / "history.json")
    settings = settings_text(config.model_dump(mode="json", exclude_none=True))
    if config.rl is not None:  # agents, not a dataset
        rl = config.rl
        settings = (
            f"{rl.method} on {rl.env}, {rl.agents} agents ({rl.faulty} faulty), "
            f"{rl.episodes} episodes a round, {rl.estimator}, aggregation "
            f"{config.aggregation.kind}, seed {config.seed}"
        )
    title = f"{settings}\n{history[-1].round} rounds on the {backend} backend"
    last = history[-1]
    if math.isnan(last.test_accuracy):  # no built-in accuracy: what the run evaluated
        title += f", final {accuracy_text(last)}"
    else:
        title += f", final test accuracy {100 * last.test_accuracy:.2f}%"
    labels = data.label_distribution() if data is not None else None
    plot_report(history, labels, out_dir / "report.png", title)
