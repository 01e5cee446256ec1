"""Progress of a run: a live bar on a terminal (:class:`ProgressListener`), or plain lines
for logs and the Python API (:class:`LineProgress`): round, accuracy, loss, clients done."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedforge.report.history import RoundRecord, privacy_text, workload_scores
from fedforge.runtime.driver import ACCEPTED, RoundListener


class ProgressListener(RoundListener):
    """Drives a rich progress bar from round-loop events."""

    def __init__(self, progress: Progress, total_rounds: int) -> None:
        self.progress = progress
        self.task = progress.add_task(
            "training", total=total_rounds, acc="  -  ", loss="  -  ", clients="-", dp=""
        )
        self._sampled = 0
        self._done = 0
        self._buffer = False  # FedBuff: count the results in the buffer

    @staticmethod
    def make_progress(console: Console | None = None) -> Progress:
        """A progress display on ``console``: pass the console the log handler writes to, so
        log lines print above the live bar instead of through it."""
        return Progress(
            TextColumn("round {task.completed:>4.0f}/{task.total:.0f}"),
            BarColumn(),
            TextColumn("acc {task.fields[acc]}"),
            TextColumn("{task.fields[dp]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("clients {task.fields[clients]}"),
            TimeElapsedColumn(),
            console=console,
        )

    def round_started(self, round_number: int, client_ids: list[int]) -> None:
        self._sampled, self._done, self._buffer = len(client_ids), 0, False
        self.progress.update(self.task, clients=f"0/{self._sampled}")

    def round_expects(self, results: int) -> None:
        """FedBuff: the column counts the results in the buffer, of the ``results`` an
        update waits for (failed or rejected tasks do not fill it)."""
        self._sampled, self._buffer = results, True
        self.progress.update(self.task, clients=f"{self._done}/{self._sampled}")

    def client_done(self, client_id: int, status: str) -> None:
        if self._buffer and status != ACCEPTED:
            return
        self._done += 1
        self.progress.update(self.task, clients=f"{self._done}/{self._sampled}")

    def round_finished(self, record: RoundRecord) -> None:
        own = workload_scores(record) if math.isnan(record.test_accuracy) else ""
        self.progress.update(
            self.task,
            completed=record.round,
            acc=own or f"{100 * record.test_accuracy:5.1f}%",
            loss="" if own else f"{record.test_loss:.3f}",
            dp=privacy_text(record),
        )


# Off a terminal (nohup, SLURM, CI) and from the Python API: at most one line this often,
# plus the first and the last round.
LINE_SECONDS = 5.0


class LineProgress(RoundListener):
    """Prints one line per finished round to ``stream`` (default: stderr at the time of
    writing), at most one every ``interval`` seconds besides round 0 and the last round
    (``interval`` 0: every round)."""

    def __init__(
        self,
        total_rounds: int,
        stream: TextIO | None = None,
        interval: float = LINE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_rounds = total_rounds
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self._start = clock()
        self._last: float | None = None

    def round_finished(self, record: RoundRecord) -> None:
        now = self.clock()
        due = self._last is None or now - self._last >= self.interval
        if not (due or record.round >= self.total_rounds):
            return
        self._last = now
        print(
            round_line(record, self.total_rounds, now - self._start),
            file=self.stream or sys.stderr,
            flush=True,
        )


def round_line(record: RoundRecord, total_rounds: int, elapsed: float) -> str:
    """``round 3/50: accuracy 85.2%, loss 0.432, clients 10/10, 1.2 s`` (and epsilon, and
    failed or rejected clients, when there are)."""
    own = workload_scores(record) if math.isnan(record.test_accuracy) else ""
    scores = [own] if own else [
        f"accuracy {100 * record.test_accuracy:.1f}%",
        f"loss {record.test_loss:.4g}",
    ]  # fmt: skip
    parts = [f"round {record.round}/{total_rounds}: {scores[0]}", *scores[1:]]
    if record.round > 0:
        sampled = f"/{record.clients_sampled}" if record.clients_sampled else ""
        clients = f"clients {record.clients_completed}{sampled}"
        for count, word in (
            (record.clients_failed, "failed"),
            (record.clients_rejected, "rejected"),
        ):
            if count:
                clients += f" ({count} {word})"
        parts.append(clients)
    dp = privacy_text(record)
    if dp:
        parts.append(dp)
    parts.append(f"{elapsed:.1f} s")
    return ", ".join(parts)
