"""The live log of a run (``live.jsonl`` in the run directory) and what a dashboard shows.

While a run trains, :class:`LiveLog` appends one JSON line per event: a round starts (how
many clients were sampled), clients report (counts, at most every ``every`` seconds), a
client fails or is rejected (with the reason, at once), a round finishes (its record and
the per-client metrics of its accepted clients). :class:`LiveState` reads the file
incrementally and folds it, with the run directory's other files, into the JSON a
dashboard polls. A line still being written is left for the next read.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedforge.report.history import History, RoundRecord, finite, to_json
from fedforge.report.runlock import owner

if TYPE_CHECKING:
    from fedforge.config import RunConfig
from fedforge.runtime.driver import ACCEPTED, RoundListener

LIVE = "live.jsonl"
MAX_PROBLEMS = 200


class LiveLog(RoundListener):
    """Appends the run's events to ``path`` (one JSON object a line)."""

    def __init__(self, path: Path, *, every: float = 0.5, max_client_metrics: int = 500) -> None:
        self.path = path
        self.every = every
        self.max_client_metrics = max_client_metrics
        self._round = 0
        self._counts: dict[str, int] = {}
        self._client_metrics: dict[int, dict[str, float]] = {}
        self._last_write = 0.0

    def _write(self, event: dict[str, Any]) -> None:
        event["time"] = time.time()
        with self.path.open("a") as f:
            f.write(to_json(event) + "\n")
        self._last_write = time.monotonic()

    def round_started(self, round_number: int, client_ids: list[int]) -> None:
        self._round, self._counts, self._client_metrics = round_number, {}, {}
        self._write({"event": "start", "round": round_number, "sampled": len(client_ids)})

    def round_expects(self, results: int) -> None:
        """FedBuff: the update's window waits for ``results`` (the dashboard's denominator)."""
        self._write({"event": "start", "round": self._round, "sampled": results})

    def client_done(self, client_id: int, status: str) -> None:
        self._counts[status] = self._counts.get(status, 0) + 1
        if time.monotonic() - self._last_write >= self.every:
            self._write({"event": "progress", "round": self._round, "counts": self._counts})

    def client_reported(
        self, client_id: int, status: str, reason: str, metrics: dict[str, float]
    ) -> None:
        if status != ACCEPTED:
            event = {"round": self._round, "client": client_id, "status": status}
            self._write({"event": "problem", **event, "reason": reason})
        elif metrics and len(self._client_metrics) < self.max_client_metrics:
            self._client_metrics[client_id] = metrics

    def round_finished(self, record: RoundRecord) -> None:
        metrics = [{"client": cid, **m} for cid, m in sorted(self._client_metrics.items())]
        self._write({"event": "round", "record": record.to_dict(), "client_metrics": metrics})
        self._client_metrics = {}

    def stopped(self, exc: BaseException) -> None:
        """Record why the run ended before its last round (when its directory still exists)."""
        if isinstance(exc, KeyboardInterrupt):
            reason = "interrupted (Ctrl-C)"
        else:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        with contextlib.suppress(OSError):
            if self.path.parent.is_dir():
                self._write({"event": "stopped", "round": self._round, "reason": reason})


class LiveState:
    """What the dashboard shows of ``run_dir``, kept current by reading only what the live
    log gained since the last call (thread-safe)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._lock = threading.Lock()
        self._offset = 0
        self._rounds: dict[int, dict[str, Any]] = {}
        self._client_metrics: dict[str, Any] = {}
        self._problems: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None
        self._updated: float | None = None
        self._stopped: dict[str, Any] | None = None  # why the run ended early, if it said

    def _read_live(self) -> None:
        path = self.run_dir / LIVE
        try:
            with path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n") + 1  # a partial last line waits for the next read
        self._offset += end
        for line in chunk[:end].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self._apply(event)

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        self._updated = event.get("time", self._updated)
        if kind == "start":
            self._current = {"round": event["round"], "sampled": event["sampled"], "counts": {}}
            self._stopped = None  # a resumed run goes on
        elif kind == "stopped":
            self._stopped = {"round": event.get("round"), "reason": event.get("reason", "")}
            self._current = None
        elif kind == "progress" and self._current is not None:
            self._current["counts"] = event["counts"]
        elif kind == "problem":
            self._problems.append({k: event.get(k) for k in ("round", "client", "status")})
            self._problems[-1]["reason"] = event.get("reason", "")
            del self._problems[:-MAX_PROBLEMS]
        elif kind == "round":
            record = event["record"]
            self._rounds[int(record["round"])] = record  # a resumed run's rerun wins
            self._client_metrics = {"round": record["round"], "clients": event["client_metrics"]}
            self._current = None

    def _files(self) -> tuple[dict[str, Any], dict[str, Any]]:
        config: dict[str, Any] = {}
        provenance: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            config = tomllib.loads((self.run_dir / "config.toml").read_text())
        with contextlib.suppress(OSError, ValueError):
            provenance = json.loads((self.run_dir / "provenance.json").read_text())
        return config, provenance

    def state(self) -> dict[str, Any]:
        """The dashboard's JSON: settings, status, every round record, the round in
        progress, the latest client problems and per-client metrics (NaN as null)."""
        with self._lock:
            self._read_live()
            rounds = [self._rounds[r] for r in sorted(self._rounds)]
            if not rounds and (self.run_dir / "history.json").exists():  # no live log
                rounds = [r.to_dict() for r in History.load(self.run_dir / "history.json")]
            config, provenance = self._files()
            status, why = self._status(config, provenance)
            state = {
                "run_dir": str(self.run_dir),
                "title": settings_text(config),
                "total_rounds": total_rounds(config),
                "status": status,
                "status_reason": why,
                "updated": self._updated,
                "provenance": provenance,
                "rounds": rounds,
                "current": self._current,
                "problems": list(self._problems),
                "client_metrics": self._client_metrics,
            }
        return finite(state)  # type: ignore[no-any-return]

    def _status(self, config: dict[str, Any], provenance: dict[str, Any]) -> tuple[str, str]:
        """(status, why): ``finished``; ``running`` while a live process holds the run;
        ``stopped`` when the run said why it ended early (Ctrl-C, an error); ``killed`` when
        its process ended without a word (SIGKILL, a crash of the machine); ``waiting``
        before a run starts. A directory no run ever locked (a deployment's state
        directory from before servers locked it) is ``running`` once it has a configuration."""
        if "finished" in provenance:
            return "finished", ""
        state, info = owner(self.run_dir)
        if state == "alive":
            return "running", ""
        if self._stopped is not None:
            return "stopped", str(self._stopped["reason"])
        if state == "dead":
            pid = f" {info['pid']}" if "pid" in info else ""
            return "killed", f"its process{pid} ended without finishing the run"
        return ("running" if config else "waiting"), ""


def _validated(config: dict[str, Any]) -> RunConfig | None:
    from fedforge.config import RunConfig

    try:
        return RunConfig.model_validate(config) if config else None
    except ValueError:
        return None


def total_rounds(config: dict[str, Any]) -> int | None:
    """The rounds a run's (raw) configuration asks for, defaults applied."""
    c = _validated(config)
    return None if c is None else c.server.rounds


def settings_text(config: dict[str, Any]) -> str:
    """One line of a run's settings from its (raw) configuration: what a report's title and
    a dashboard's header say."""
    c = _validated(config)
    if c is None:
        return ""
    clients = c.data.devices if c.partition.scheme == "natural" else c.partition.num_clients
    sampled = (
        f"{c.server.clients_per_round} per round"
        if c.server.sampler == "uniform"
        else f"Poisson q={c.server.sampling_rate}"
    )
    batch = "full" if c.client.batch_size == 0 else str(c.client.batch_size)
    text = (
        f"{c.algorithm.name} ({c.server.optimizer} server) on {c.data.dataset}, "
        f"{c.partition.scheme} over {clients} clients, {sampled}, E={c.client.epochs}, "
        f"B={batch}, lr={c.client.lr}, {c.model.name} model, seed {c.seed}"
    )
    extras = []
    if c.privacy.mode != "off":
        extras.append(f"{c.privacy.mode} DP")
    if c.aggregation.kind != "mean":
        extras.append(f"{c.aggregation.kind} aggregation")
    if c.update.codec != "none":
        extras.append(f"{c.update.codec} codec")
    if c.attack.kind != "none":
        extras.append(f"{c.attack.kind} attack ({c.attack.fraction:g} of clients)")
    return text + "".join(f", {e}" for e in extras)
