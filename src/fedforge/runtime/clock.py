"""The virtual clock of a simulation: how long rounds take on simulated devices.

Training runs as fast as the runtime allows; only time is simulated. A client's task takes
``steps / speed + bytes down / down bandwidth + bytes up / up bandwidth`` simulated seconds,
from the client's real local step count (its task's local epochs: a straggler doing partial
work takes fewer steps) and the real payload sizes (the model sent down, the encoded record
sent up: validation holds every accepted record to the wire spec's size).

A synchronous round may have a ``deadline`` (clients slower than it are dropped: the server
waits until the deadline) and over-selection (``keep``: the sampler drew more clients, the
first ``keep`` to finish are kept and the round ends when the last of them arrives). Only
clients online at the round's start are sampled. With ``fixed_rounds`` every round lasts
exactly the deadline, so the simulated time of round t (and who is online then) does not
depend on who took part before: central DP's sampling among online clients needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedforge.core.errors import ConfigError
from fedforge.core.params import ParamSpec
from fedforge.runtime.devices import Devices


def spec_bytes(spec: ParamSpec) -> int:
    """Bytes of one record's arrays under ``spec``."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in spec.values())


@dataclass(frozen=True)
class Schedule:
    """A round on the clock: the clients kept, those dropped (too slow, or not among the
    first ``keep``), every sampled client's duration, and the round's simulated seconds."""

    kept: list[int]
    dropped: list[int]
    durations: dict[int, float]
    seconds: float


def schedule_round(
    ids: Sequence[int],
    durations: np.ndarray,
    deadline: float | None = None,
    keep: int | None = None,
    fixed: bool = False,
) -> Schedule:
    """Who of ``ids`` (with their ``durations``) counts, and how long the round lasts
    (``fixed``: always the deadline)."""
    if fixed and deadline is None:
        raise ValueError("fixed-length rounds need a deadline")
    order = sorted(range(len(ids)), key=lambda i: (float(durations[i]), int(ids[i])))
    kept = [i for i in order if deadline is None or durations[i] <= deadline]
    if keep is not None:
        kept = kept[:keep]
    if deadline is not None and (fixed or len(kept) < min(len(ids), keep or len(ids))):
        seconds = deadline  # the server waited for clients that never came in time
    else:
        seconds = max((float(durations[i]) for i in kept), default=0.0)
    chosen = {int(ids[i]) for i in kept}
    return Schedule(
        kept=sorted(chosen),
        dropped=sorted(int(c) for c in ids if int(c) not in chosen),
        durations={int(c): float(d) for c, d in zip(ids, durations, strict=True)},
        seconds=seconds,
    )


@dataclass(frozen=True)
class ClockSpec:
    """What a simulation needs to run on the virtual clock: the devices, and the synchronous
    rounds' deadline (simulated seconds), over-selection (keep the first ``keep``) and
    whether every round lasts exactly the deadline (``fixed_rounds``)."""

    devices: Devices
    deadline: float | None = None
    keep: int | None = None
    fixed_rounds: bool = False

    def __post_init__(self) -> None:
        if self.fixed_rounds and self.deadline is None:
            raise ConfigError("fixed-length rounds (fixed_rounds) need a deadline")


# A client's local steps for one task: (client id, the task's local epochs; None: as configured)
StepCount = Callable[[int, int | None], int]


@dataclass
class VirtualClock:
    """Simulated time of a run over ``devices``; ``steps(client, epochs)`` is a client's
    local step count for a task of ``epochs`` local epochs (None: the configured ones)."""

    devices: Devices
    steps: StepCount
    deadline: float | None = None
    keep: int | None = None
    fixed_rounds: bool = False
    now: float = 0.0

    def online(self, population: Sequence[int]) -> list[int]:
        """The clients of ``population`` online now."""
        ids = [int(c) for c in population]
        mask = self.devices.online(ids, self.now)
        return [c for c, ok in zip(ids, mask, strict=True) if ok]

    def durations(
        self,
        ids: Sequence[int],
        bytes_down: int,
        bytes_up: int,
        epochs: Sequence[int | None] | None = None,
    ) -> np.ndarray:
        """Each task's simulated seconds; ``epochs`` are the tasks' local epochs (a
        straggler's partial work; None: the configured epochs)."""
        work = list(epochs) if epochs is not None else [None] * len(ids)
        steps = np.array([self.steps(int(c), e) for c, e in zip(ids, work, strict=True)])
        return self.devices.durations(list(ids), steps.astype(np.float64), bytes_down, bytes_up)

    def schedule(
        self,
        ids: Sequence[int],
        bytes_down: int,
        bytes_up: int,
        epochs: Sequence[int | None] | None = None,
    ) -> Schedule:
        durations = self.durations(ids, bytes_down, bytes_up, epochs)
        return schedule_round(ids, durations, self.deadline, self.keep, self.fixed_rounds)

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now
