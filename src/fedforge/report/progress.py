"""Live terminal progress for a run: round, accuracy, loss, clients done."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedforge.report.history import RoundRecord, privacy_text
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
        self.progress.update(
            self.task,
            completed=record.round,
            acc=f"{100 * record.test_accuracy:5.1f}%",
            loss=f"{record.test_loss:.3f}",
            dp=privacy_text(record),
        )
