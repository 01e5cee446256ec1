"""Per-round records of a run, serializable to JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class RoundRecord:
    """What happened in one round. Accuracy and loss are on the central test set after
    the round's update; ``train_loss`` is the example-weighted mean over accepted clients
    (NaN when none was accepted)."""

    round: int
    test_accuracy: float
    test_loss: float
    train_loss: float
    clients_sampled: int
    clients_completed: int
    clients_failed: int
    clients_rejected: int
    bytes_down: int
    bytes_up: int
    wall_seconds: float


class History(list[RoundRecord]):
    """The list of round records, with JSON round-tripping."""

    def to_json(self) -> str:
        return json.dumps([asdict(r) for r in self], indent=2, allow_nan=True)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> History:
        names = {f.name for f in fields(RoundRecord)}
        rows = json.loads(path.read_text())
        return cls(RoundRecord(**{k: v for k, v in row.items() if k in names}) for row in rows)
