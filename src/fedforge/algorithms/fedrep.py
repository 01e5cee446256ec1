"""FedRep (Collins et al. 2021, Algorithm 1): FedPer's split (a shared body averaged as in
FedAvg, a personal head kept in client state and never sent) with a two-phase local round.

Each round a client first trains only its head for ``head_epochs`` passes (body frozen at the
global body), then only the body for the configured local epochs (head frozen at its new
value), and sends the body's change from the global body. Both phases are one head-first
schedule of the one local program (:class:`~fedforge.train.program.HeadFirst`), so every
runtime runs them; a round's step count (virtual clock) covers both. A simulated straggler's
partial work shortens the body phase; the head phase always runs in full.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from fedforge.algorithms.fedper import FedPer
from fedforge.train.program import HeadFirst, LocalProgram


@dataclass(frozen=True)
class FedRep(FedPer):
    # Head-only epochs per round (the paper's tau_h); None: as many as the body's epochs.
    head_epochs: int | None = None
    loop_refusal: ClassVar[str | None] = (
        "its head-only then body-only schedule is the built-in program's"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_epochs is not None and self.head_epochs < 1:
            raise ValueError(f"FedRep needs head_epochs >= 1, got {self.head_epochs}")

    def program(self) -> LocalProgram:
        epochs = self.local.epochs if self.head_epochs is None else self.head_epochs
        return replace(super().program(), head_first=HeadFirst(self.head, epochs))
