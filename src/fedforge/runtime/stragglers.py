"""Simulated stragglers (the FedProx paper's systems heterogeneity).

Each round a ``fraction`` of the sampled clients (rounded to the nearest count, drawn from the
run seed) are stragglers: each can only run a random number of local epochs in ``[1, E]``.
With ``drop`` they are left out of the round (FedAvg's deadline drops them); otherwise they
run their partial work (FedProx keeps it), which their fit task names in its scalars.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedforge.core.records import Task
from fedforge.core.rng import Purpose, RngStreams
from fedforge.train.program import WORK_EPOCHS


@dataclass(frozen=True)
class Stragglers:
    fraction: float
    epochs: int  # E: the full local work
    drop: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.fraction <= 1 or self.epochs < 1:
            raise ValueError("stragglers need 0 <= fraction <= 1 and epochs >= 1")

    def assign(
        self, tasks: list[Task], streams: RngStreams, attempt: int = 0
    ) -> tuple[list[Task], list[int]]:
        """(the tasks to send, the stragglers' ids): stragglers' tasks carry their epochs, or
        are left out with ``drop``."""
        if not tasks or self.fraction == 0:
            return tasks, []
        round_number = tasks[0].round
        rng = streams.generator(Purpose.STRAGGLERS, round_number, attempt)
        count = round(self.fraction * len(tasks))
        chosen = set(int(i) for i in rng.choice(len(tasks), size=count, replace=False))
        work = rng.integers(1, self.epochs + 1, size=len(tasks))
        ids = sorted(tasks[i].client_id for i in chosen)
        if self.drop:
            return [t for i, t in enumerate(tasks) if i not in chosen], ids
        out = [
            replace(t, scalars={**t.scalars, WORK_EPOCHS: float(work[i])}) if i in chosen else t
            for i, t in enumerate(tasks)
        ]
        return out, ids
