"""Where an asynchronous run's time and results come from: the virtual clock in simulation,
or the transport in real time over the network. The asynchronous driver
(``async_driver.py``) starts jobs on its time source, asks it for the next arrivals, and lets
it pass time when nothing can run."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fedforge.algorithms.base import ServerState
from fedforge.core.errors import FedforgeError
from fedforge.core.records import RecordBatch, Reply, Task
from fedforge.runtime.clock import VirtualClock
from fedforge.runtime.driver import Exchanged
from fedforge.runtime.transport import AsyncTransport


@dataclass(order=True)
class Job:
    finish: float  # simulated seconds (the virtual clock); 0 in real time
    seq: int
    client_id: int = field(compare=False)
    version: int = field(compare=False)


@dataclass
class Window:
    """What happened since the last server update (one history record)."""

    started: float
    real_started: float
    dispatched: int = 0
    failed: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    train_seconds: float = 0.0

    def count(self, out: Exchanged) -> None:
        self.failed += out.failed
        self.rejected += out.rejected
        self.bytes_up += out.bytes_up


class Runner(Protocol):
    """What a time source asks of the asynchronous driver."""

    def task(self, job: Job, state: ServerState) -> Task: ...

    def train(self, jobs: list[Job], state: ServerState, window: Window) -> None:
        """Train ``jobs`` (all on the current model version) in one exchange."""
        ...

    def receive(self, job: Job, reply: Reply, state: ServerState, window: Window) -> None:
        """Take one reply, as it arrived."""
        ...

    def bytes_down(self, state: ServerState) -> int: ...

    def bytes_up(self) -> int: ...


class TimeSource(Protocol):
    """Where an asynchronous run's time and results come from: the virtual clock, or the
    transport in real time."""

    def now(self) -> float: ...

    def in_flight(self) -> int: ...

    def available(self, population: Sequence[int]) -> list[int]: ...

    def start(self, jobs: list[Job], state: ServerState, window: Window) -> None: ...

    def next(self, state: ServerState, window: Window) -> list[Job]:
        """The jobs that finish next (all those of one instant; none if none came)."""
        ...

    def flush(self, state: ServerState, window: Window) -> None:
        """Before the model moves on: anything dispatched on it must have trained."""
        ...

    def wait(self) -> None:
        """Nothing is in flight and nobody can be dispatched: let time pass."""
        ...

    def metrics(self, window: Window) -> dict[str, float]: ...

    def close(self) -> None: ...


class VirtualTime:
    """Simulated time: a job finishes at its dispatch time plus its device's duration; jobs
    train lazily, all those started on one model version in one exchange (a vectorized
    batch), before that version's first result is needed or the model moves on."""

    def __init__(self, run: Runner, clock: VirtualClock, max_idle_waits: int = 100_000):
        self.run, self.clock, self.max_idle_waits = run, clock, max_idle_waits
        self._heap: list[Job] = []
        self._pending: list[Job] = []  # dispatched on the current version, not yet trained
        self._waits = 0

    def now(self) -> float:
        return self.clock.now

    def in_flight(self) -> int:
        return len(self._heap)

    def available(self, population: Sequence[int]) -> list[int]:
        return list(self.clock.online(population))

    def start(self, jobs: list[Job], state: ServerState, window: Window) -> None:
        ids = [j.client_id for j in jobs]
        durations = self.clock.durations(ids, self.run.bytes_down(state), self.run.bytes_up())
        for job, seconds in zip(jobs, durations, strict=True):
            job.finish = self.clock.now + float(seconds)
            heapq.heappush(self._heap, job)
        self._pending += jobs

    def next(self, state: ServerState, window: Window) -> list[Job]:
        self._waits = 0
        now = self._heap[0].finish
        self.clock.now = now
        jobs = []
        while self._heap and self._heap[0].finish <= now:
            jobs.append(heapq.heappop(self._heap))
        return jobs

    def flush(self, state: ServerState, window: Window) -> None:
        jobs, self._pending = self._pending, []
        self.run.train(jobs, state, window)

    def wait(self) -> None:
        self._waits += 1
        if self._waits > self.max_idle_waits:
            raise FedforgeError("asynchronous run: no client came online")
        self.clock.advance(self.clock.devices.availability.resolution)

    def metrics(self, window: Window) -> dict[str, float]:
        return {"clock.seconds": self.clock.now - window.started, "clock.time": self.clock.now}

    def close(self) -> None:
        """Nothing runs between calls."""


class RealTime:
    """Real time: tasks go out through the transport as soon as they are dispatched, and
    each reply is taken as it arrives; a client that finishes gets new work at once. With
    nobody in flight and nobody to dispatch, ``wait`` blocks (e.g. until a client connects);
    a poll returns after ``poll_s`` without a reply, so newly connected clients get work."""

    def __init__(
        self, run: Runner, transport: AsyncTransport, wait: Callable[[], None], poll_s: float
    ) -> None:
        self.run, self.transport, self.wait, self.poll_s = run, transport, wait, poll_s
        self._jobs: dict[int, Job] = {}  # by client: its job in flight
        self._started = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._started

    def in_flight(self) -> int:
        return len(self._jobs)

    def available(self, population: Sequence[int]) -> list[int]:
        return list(population)

    def start(self, jobs: list[Job], state: ServerState, window: Window) -> None:
        for job in jobs:
            self._jobs[job.client_id] = job
        self.transport.submit([self.run.task(job, state) for job in jobs])

    def next(self, state: ServerState, window: Window) -> list[Job]:
        started = time.perf_counter()
        reply = self.transport.poll(self.poll_s)
        window.train_seconds += time.perf_counter() - started
        if reply is None:
            return []
        cid = int(reply.client_ids[0]) if isinstance(reply, RecordBatch) else reply.client_id
        job = self._jobs.pop(cid)
        self.run.receive(job, reply, state, window)
        return [job]

    def flush(self, state: ServerState, window: Window) -> None:
        """Every job trained as soon as it was dispatched."""

    def metrics(self, window: Window) -> dict[str, float]:
        return {}

    def close(self) -> None:
        self.transport.cancel()
