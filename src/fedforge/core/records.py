"""What travels in a round: tasks down, records up, and failures.

A :class:`Task` asks one client to run one stage of a round ("fit", "evaluate", ...). A client
answers with a :class:`Record`: summable arrays, named scalars summed beside them (a clipped
bit, a step count), metrics that are reported but not summed (a training loss), and the
example count it claims. Runtimes that train many clients at once answer with a
:class:`RecordBatch` (the same fields stacked along a leading client axis), so the server
validates and sums a whole chunk with one array operation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedforge.core.params import ArraySpec, Params

FIT = "fit"
EVALUATE = "evaluate"


@dataclass(frozen=True)
class Task:
    """One exchange with one client.

    ``shared`` holds the arrays every client of this exchange receives (the global model and
    the algorithm's broadcast, e.g. SCAFFOLD's server control variate); ``scalars`` the
    stages' broadcast values (e.g. a clip norm). ``seed`` (128 bits) seeds the client's
    random stream for this round, so every runtime draws the same batches.
    """

    stage: str
    round: int
    client_id: int
    seed: int
    shared: Params
    scalars: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Record:
    """One client's answer to a task."""

    client_id: int
    num_examples: int
    arrays: Params
    scalars: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def as_batch(self) -> RecordBatch:
        """A batch of one (views, no copies)."""
        return RecordBatch(
            client_ids=np.array([self.client_id], np.int64),
            num_examples=np.array([self.num_examples]),
            arrays={k: np.asarray(v)[None] for k, v in self.arrays.items()},
            scalars={k: np.array([v], np.float64) for k, v in self.scalars.items()},
            metrics={k: np.array([v], np.float64) for k, v in self.metrics.items()},
        )


@dataclass(frozen=True)
class RecordBatch:
    """Records of several clients, every field stacked along axis 0 (row i = client i)."""

    client_ids: np.ndarray
    num_examples: np.ndarray
    arrays: dict[str, np.ndarray]
    scalars: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.client_ids)

    def select(self, rows: np.ndarray) -> RecordBatch:
        """The rows where the boolean mask ``rows`` is true."""
        if rows.all():
            return self
        return RecordBatch(
            self.client_ids[rows],
            self.num_examples[rows],
            {k: v[rows] for k, v in self.arrays.items()},
            {k: v[rows] for k, v in self.scalars.items()},
            {k: v[rows] for k, v in self.metrics.items()},
        )

    def replace_arrays(self, arrays: dict[str, np.ndarray]) -> RecordBatch:
        return RecordBatch(self.client_ids, self.num_examples, arrays, self.scalars, self.metrics)

    def with_scalars(self, **scalars: np.ndarray) -> RecordBatch:
        return RecordBatch(
            self.client_ids,
            self.num_examples,
            self.arrays,
            {**self.scalars, **scalars},
            self.metrics,
        )

    def row(self, i: int) -> Record:
        return Record(
            client_id=int(self.client_ids[i]),
            num_examples=int(self.num_examples[i]),
            arrays={k: v[i] for k, v in self.arrays.items()},
            scalars={k: float(v[i]) for k, v in self.scalars.items()},
            metrics={k: float(v[i]) for k, v in self.metrics.items()},
        )

    def array_bytes(self) -> int:
        """Bytes of the arrays as sent (all rows)."""
        return sum(int(v.nbytes) for v in self.arrays.values())


@dataclass(frozen=True)
class RecordSpec:
    """What a valid record of one stage holds: named arrays (shape and dtype), the names of
    the summed scalars and of the reported metrics. Validation checks records against it."""

    arrays: dict[str, ArraySpec]
    scalars: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()

    def with_scalars(self, names: Sequence[str]) -> RecordSpec:
        return RecordSpec(self.arrays, (*self.scalars, *names), self.metrics)


@dataclass(frozen=True)
class ClientFailure:
    """A client that raised, crashed or timed out; the round goes on without it.

    ``rejected`` marks an answer that arrived but broke the protocol (bad chunks, digest,
    encoding); the driver counts it with the rejected results.
    """

    client_id: int
    error: str
    traceback: str = ""
    rejected: bool = False


Reply = Record | RecordBatch | ClientFailure
