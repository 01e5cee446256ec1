"""The terminal progress display: log lines print above the bar (never glued to a stale
frame), and the clients column counts every client, on the vectorized backend too."""

from __future__ import annotations

import io
import logging
import re

import pytest
from rich.console import Console
from rich.logging import RichHandler

import fedforge
from fedforge.data.federated import FederatedDataset
from fedforge.report.history import RoundRecord
from fedforge.report.progress import ProgressListener
from fedforge.runtime.driver import RoundListener
from tests.conftest import small_mlp


def screen(raw: str) -> list[str]:
    """What a terminal shows after ``raw``: \\r returns to column 0, ESC[2K erases the
    line, ESC[nA moves up n lines; other escape sequences are dropped."""
    lines, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", raw):
        if token == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        elif token == "\r":
            col = 0
        elif token == "\x1b[2K":
            lines[row] = ""
        elif re.fullmatch(r"\x1b\[\d*A", token):
            row = max(0, row - int(token[2:-1] or 1))
        elif not token.startswith("\x1b"):
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token) :]
            col += len(token)
    return [line.rstrip() for line in lines]


def test_log_lines_print_above_the_bar_never_glued_to_a_frame() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    logger = logging.getLogger("fedforge.test_progress")
    handler = RichHandler(console=console, show_path=False, show_time=False)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        progress = ProgressListener.make_progress(console)
        with progress:
            listener = ProgressListener(progress, 3)
            for r in (1, 2, 3):
                listener.round_started(r, [1, 2])
                progress.refresh()
                logger.warning("round %d: rejected the record of client 2: NaN", r)
                listener.round_finished(RoundRecord(r, 0.5, 1.0))
                progress.refresh()
    finally:
        logger.removeHandler(handler)
    shown = [line for line in screen(out.getvalue()) if line]
    logs = [line for line in shown if "rejected the record" in line]
    assert len(logs) == 3
    assert all(not line.lstrip().startswith("round") for line in logs), logs  # no frame glued
    assert all(re.match(r"^WARNING +round \d: rejected", line) for line in logs), logs
    frames = [line for line in shown if line.startswith("round")]
    assert frames == [frames[-1]] and frames[-1].startswith("round    3/3")  # one bar, last
    assert shown[-1] == frames[-1]


class Columns(RoundListener):
    """Records the clients column at the end of each round."""

    def __init__(self, progress: ProgressListener) -> None:
        self.progress = progress
        self.seen: list[str] = []

    def round_finished(self, record: RoundRecord) -> None:
        if record.round:
            task = self.progress.progress.tasks[0]
            self.seen.append(task.fields["clients"])


@pytest.mark.parametrize("backend", ["vectorized", "sequential"])
def test_the_clients_column_counts_every_client(
    small_federated: FederatedDataset, backend: str
) -> None:
    from fedforge.report.listeners import ListenerGroup

    progress = ProgressListener.make_progress(Console(file=io.StringIO()))
    listener = ProgressListener(progress, 2)
    columns = Columns(listener)
    fedforge.simulate(
        small_mlp(),
        small_federated,
        fedforge.FedAvg(local=fedforge.LocalSGD(lr=0.1, epochs=1, batch_size=8)),
        rounds=2,
        clients_per_round=6,
        backend=backend,  # type: ignore[arg-type]
        listener=ListenerGroup([listener, columns]),
    )
    assert columns.seen == ["6/6", "6/6"]


# Issue 21: off a terminal and from the Python API, progress is printed as lines.


def test_line_progress_prints_round_0_the_last_round_and_at_most_one_line_per_interval() -> None:
    from fedforge.report.progress import LineProgress

    now = [0.0]
    stream = io.StringIO()
    lines = LineProgress(10, stream, interval=5.0, clock=lambda: now[0])
    for r in range(11):
        now[0] = 1.5 * r  # 1.5 s per round: a line at 0, 7.5, 15 s and the last
        counts = {"clients_sampled": 4, "clients_completed": 3, "clients_failed": 1} if r else {}
        lines.round_finished(RoundRecord(r, 0.5, 1.25, **counts))
    printed = stream.getvalue().splitlines()
    assert [line.split(":")[0] for line in printed] == [
        "round 0/10", "round 4/10", "round 8/10", "round 10/10",
    ]  # fmt: skip
    assert printed[0] == "round 0/10: accuracy 50.0%, loss 1.25, 0.0 s"
    assert printed[-1] == "round 10/10: accuracy 50.0%, loss 1.25, clients 3/4 (1 failed), 15.0 s"


@pytest.mark.parametrize(("verbose", "rounds_printed"), [(0, []), (2, [0, 1, 2, 3]), (1, [0, 3])])
def test_simulate_prints_progress_as_asked(
    small_federated: FederatedDataset,
    capsys: pytest.CaptureFixture[str],
    verbose: int,
    rounds_printed: list[int],
) -> None:
    kwargs = {} if verbose == 1 else {"verbose": verbose}  # 1 is the default
    fedforge.simulate(
        small_mlp(),
        small_federated,
        rounds=3,
        clients_per_round=2,
        **kwargs,  # type: ignore[arg-type]
    )
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout stays the user's
    printed = [int(m) for m in re.findall(r"^round (\d+)/3: accuracy", captured.err, re.M)]
    assert printed == rounds_printed
