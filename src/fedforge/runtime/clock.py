"""The virtual clock of a simulation: how long rounds take on simulated devices.

Training runs as fast as the runtime allows; only time is simulated. A client's task takes
``steps / speed + bytes down / down bandwidth + bytes up / up bandwidth`` simulated seconds,
from the client's real local step count and the real payload sizes (the model sent down, the
encoded record sent up: validation holds every accepted record to the wire spec's size).

A synchronous round may have a ``deadline`` (clients slower than it are dropped: the server
waits until the deadline) and over-selection (``keep``: the sampler drew more clients, the
first ``keep`` to finish are kept and the round ends when the last of them arrives). Only
clients online at the round's start are sampled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

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
) -> Schedule:
    """Who of ``ids`` (with their ``durations``) counts, and how long the round lasts."""
    order = sorted(range(len(ids)), key=lambda i: (float(durations[i]), int(ids[i])))
    kept = [i for i in order if deadline is None or durations[i] <= deadline]
    if keep is not None:
        kept = kept[:keep]
    if deadline is not None and len(kept) < min(len(ids), keep or len(ids)):
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
    rounds' deadline (simulated seconds) and over-selection (keep the first ``keep``)."""

    devices: Devices
    deadline: float | None = None
    keep: int | None = None


@dataclass
class VirtualClock:
    """Simulated time of a run over ``devices``; ``steps(client)`` is a client's local step
    count per task."""

    devices: Devices
    steps: Callable[[int], int]
    deadline: float | None = None
    keep: int | None = None
    now: float = 0.0

    def online(self, population: Sequence[int]) -> list[int]:
        """The clients of ``population`` online now."""
        ids = [int(c) for c in population]
        mask = self.devices.online(ids, self.now)
        return [c for c, ok in zip(ids, mask, strict=True) if ok]

    def durations(self, ids: Sequence[int], bytes_down: int, bytes_up: int) -> np.ndarray:
        steps = np.array([self.steps(int(c)) for c in ids], np.float64)
        return self.devices.durations(list(ids), steps, bytes_down, bytes_up)

    def schedule(self, ids: Sequence[int], bytes_down: int, bytes_up: int) -> Schedule:
        return schedule_round(
            ids, self.durations(ids, bytes_down, bytes_up), self.deadline, self.keep
        )

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now
