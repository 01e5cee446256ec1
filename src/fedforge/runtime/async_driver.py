"""Asynchronous training with a buffer (FedBuff, Nguyen et al. 2022) on the virtual clock.

Up to ``concurrency`` clients train at once, each on the model version it received. A
finished client leaves at once and an idle online client takes its place with the current
model; the server applies an update every ``buffer`` arrivals, each record weighted by its
aggregation weight times ``(1 + staleness) ** -exponent`` (``exponent`` 0.5:
``1 / sqrt(1 + staleness)``), where staleness is how many server updates happened since the
client's model version. The buffer's aggregate is ``sum(w_i s_i delta_i) / sum(w_i)``: with no
staleness and ``buffer`` = the cohort, one update is a synchronous FedAvg round.

Events are ordered by simulated finish time (ties by dispatch order; arrivals at one instant
are all handled before anyone is dispatched). Training runs as fast as the runtime allows:
a task's duration depends only on its step count and payload sizes, so clients are trained
lazily, all the tasks started on one model version in one exchange (a vectorized batch),
before that version's first result is needed or the model moves on. Everything else is the
synchronous driver's: the transport, validation, stages' decoding, the aggregation's
accumulator, the server optimizer, evaluation and the history.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from fedforge.algorithms.base import RoundContext, ServerState
from fedforge.core.errors import ConfigError, FedforgeError
from fedforge.core.params import num_bytes
from fedforge.core.records import FIT, RecordBatch, Task
from fedforge.core.rng import Purpose
from fedforge.report.history import History, RoundRecord
from fedforge.runtime.clock import VirtualClock, spec_bytes
from fedforge.runtime.driver import Driver
from fedforge.runtime.sampling import UniformSampler
from fedforge.stages.base import SumContext

log = logging.getLogger("fedforge")


def staleness_weight(staleness: np.ndarray | int, exponent: float = 0.5) -> np.ndarray:
    """``(1 + staleness) ** -exponent``: 1 for a fresh update; exponent 0 weighs all alike."""
    return np.power(1.0 + np.asarray(staleness, np.float64), -exponent)


@dataclass(frozen=True)
class FedBuff:
    """FedBuff's knobs: a server update every ``buffer`` arrivals, at most ``concurrency``
    clients training, staleness weight ``(1 + s) ** -staleness_exponent``."""

    buffer: int = 10
    concurrency: int = 100
    staleness_exponent: float = 0.5
    eval_every: int = 1  # server updates between central evaluations (and the last)

    def __post_init__(self) -> None:
        if self.buffer < 1 or self.concurrency < self.buffer or self.eval_every < 1:
            raise ConfigError("FedBuff needs 1 <= buffer <= concurrency and eval_every >= 1")
        if self.staleness_exponent < 0:
            raise ConfigError("FedBuff's staleness exponent must be >= 0")


@dataclass(frozen=True)
class Arrival:
    """A result reaching the server: who, the model version it trained on, the server's
    version when it arrived, and when (simulated seconds)."""

    client_id: int
    started: int
    arrived: int
    time: float

    @property
    def staleness(self) -> int:
        return self.arrived - self.started


@dataclass(order=True)
class _Job:
    finish: float
    seq: int
    client_id: int = field(compare=False)
    version: int = field(compare=False)


@dataclass
class _Window:
    """What happened since the last server update (one history record)."""

    started: float
    real_started: float
    dispatched: int = 0
    failed: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    bytes_up: int = 0
    train_seconds: float = 0.0


class AsyncDriver:
    """Runs FedBuff with ``driver``'s pieces on ``clock``; one history record per update."""

    def __init__(self, driver: Driver, clock: VirtualClock, fedbuff: FedBuff) -> None:
        if driver.aggregation.kind != "mean":
            raise ConfigError(
                "asynchronous training sums its buffer with the weighted mean: "
                f"aggregation {driver.aggregation.name!r} is not supported"
            )
        if driver._algorithm_stateful:
            raise ConfigError(
                "asynchronous training cannot run an algorithm with client state (SCAFFOLD): "
                "a stale client's state would move with a model it never saw"
            )
        if driver.stages.releases_when_empty or driver.federated_eval is not None:
            raise ConfigError(
                "asynchronous training supports neither central DP nor federated evaluation"
            )
        self.driver, self.clock, self.fedbuff = driver, clock, fedbuff
        self.arrivals: list[Arrival] = []  # every result that reached the server, in order
        self._heap: list[_Job] = []
        self._pending: list[_Job] = []  # dispatched on the current version, not yet trained
        self._results: dict[int, RecordBatch | None] = {}  # by job seq; None: failed
        self._busy: set[int] = set()
        self._seq = 0
        self._dispatches = 0  # dispatch calls on the current version
        self._seeded: set[tuple[int, int]] = set()  # (version, client) seeds handed out

    # Dispatch and lazy training ---------------------------------------------------------
    def _dispatch(self, state: ServerState, window: _Window) -> None:
        free = self.fedbuff.concurrency - len(self._heap)
        if free <= 0:
            return
        idle = [c for c in self.clock.online(self.driver.population()) if c not in self._busy]
        if not idle:
            return
        version = state.round
        coords = (version + 1,) if self._dispatches == 0 else (version + 1, self._dispatches)
        self._dispatches += 1
        rng = self.driver.streams.generator(Purpose.SAMPLING, *coords)
        chosen = UniformSampler(free)(idle, rng)
        durations = self.clock.durations(
            chosen, self._bytes_down(state), spec_bytes(self.driver.fit_spec.arrays)
        )
        for cid, seconds in zip(chosen, durations, strict=True):
            job = _Job(self.clock.now + float(seconds), self._seq, cid, version)
            self._seq += 1
            heapq.heappush(self._heap, job)
            self._pending.append(job)
            self._busy.add(cid)
        window.dispatched += len(chosen)

    def _bytes_down(self, state: ServerState) -> int:
        return num_bytes(state.params) + num_bytes(self.driver.algorithm.broadcast(state))

    def _train_pending(self, state: ServerState, window: _Window) -> None:
        """Train every task dispatched on the current model version, in one exchange."""
        if not self._pending:
            return
        d = self.driver
        started = time.perf_counter()
        shared = {**state.params, **d.algorithm.broadcast(state)}
        broadcast = d.stages.broadcast(state.stage_states)
        seq_of = {job.client_id: job.seq for job in self._pending}
        tasks = [
            Task(FIT, job.version + 1, job.client_id, self._seed(job), shared, broadcast)
            for job in self._pending
        ]
        self._pending = []

        def accept(batch: RecordBatch) -> None:
            decoded = d.stages.decode(batch, state.stage_states)
            for i, cid in enumerate(decoded.client_ids):
                row = decoded.select(np.arange(len(decoded)) == i)
                # the runtime may reuse the batch's storage: keep a copy
                self._results[seq_of[int(cid)]] = RecordBatch(
                    row.client_ids.copy(),
                    row.num_examples.copy(),
                    {k: v.copy() for k, v in row.arrays.items()},
                    {k: v.copy() for k, v in row.scalars.items()},
                    {k: v.copy() for k, v in row.metrics.items()},
                )

        out = d._exchange(tasks, d._spec_check(d.fit_spec, FIT), accept, True)
        for cid in out.failed + out.rejected:
            self._results.setdefault(seq_of[cid], None)
        window.failed += out.failed
        window.rejected += out.rejected
        window.bytes_up += out.bytes_up
        window.train_seconds += time.perf_counter() - started

    def _seed(self, job: _Job) -> int:
        """The synchronous driver's seed for (round, client); a client dispatched again on
        the same version gets a seed of its own (else it would repeat its work)."""
        seed = self.driver.streams.task_seed(job.version + 1, job.client_id)
        key = (job.version, job.client_id)
        if key in self._seeded:
            return seed ^ ((job.seq & (2**63 - 1)) << 64)
        self._seeded.add(key)
        return seed

    # The run ---------------------------------------------------------------------------
    def run(
        self,
        state: ServerState,
        updates: int,
        history: History,
        *,
        checkpoint: Callable[[ServerState, History], None] | None = None,
        max_idle_waits: int = 100_000,
    ) -> ServerState:
        """Run until ``updates`` server updates are done (``state.round`` counts them)."""
        d = self.driver
        if history:  # resumed: the clock continues; in-flight work is dispatched anew
            self.clock.now = history[-1].metrics.get("clock.time", 0.0)
        else:
            history.append(d.initial_record(state))
            if checkpoint:
                checkpoint(state, history)
        buffer: list[tuple[Arrival, RecordBatch]] = []
        window = _Window(self.clock.now, time.perf_counter())
        d.listener.round_started(state.round + 1, [])
        waits = 0
        while state.round < updates:
            self._dispatch(state, window)
            if not self._heap:
                waits += 1
                if waits > max_idle_waits:
                    raise FedforgeError("asynchronous run: no client came online")
                self.clock.advance(self.clock.devices.availability.resolution)
                continue
            waits = 0
            now = self._heap[0].finish
            self.clock.now = now
            while self._heap and self._heap[0].finish <= now and state.round < updates:
                job = heapq.heappop(self._heap)
                self._busy.discard(job.client_id)
                if job.seq not in self._results:
                    self._train_pending(state, window)
                result = self._results.pop(job.seq, None)  # None: it failed
                if result is None:
                    continue
                arrival = Arrival(job.client_id, job.version, state.round, now)
                self.arrivals.append(arrival)
                buffer.append((arrival, result))
                if len(buffer) == self.fedbuff.buffer:
                    self._train_pending(state, window)  # before the model moves on
                    state = self._update(state, buffer, window, history, updates)
                    buffer = []
                    window = _Window(self.clock.now, time.perf_counter())
                    self._dispatches = 0
                    self._seeded.clear()
                    if checkpoint:
                        checkpoint(state, history)
                    if state.round < updates:
                        d.listener.round_started(state.round + 1, [])
        return state

    def _update(
        self,
        state: ServerState,
        buffer: list[tuple[Arrival, RecordBatch]],
        window: _Window,
        history: History,
        updates: int,
    ) -> ServerState:
        d = self.driver
        server_started = time.perf_counter()
        version = state.round + 1
        accumulator = d.aggregation.accumulator()
        staleness = np.array([a.staleness for a, _ in buffer])
        factors = staleness_weight(staleness, self.fedbuff.staleness_exponent)
        plain = 0.0
        sums: dict[str, float] = {}
        examples = 0.0
        for (_, batch), factor in zip(buffer, factors, strict=True):
            weights = d._weights(batch)
            plain += float(weights.sum())
            accumulator.add(batch, weights * factor)
            n = float(batch.num_examples.sum())
            examples += n
            for name, values in batch.metrics.items():
                sums[name] = sums.get(name, 0.0) + n * float(values.sum())
        aggregate = accumulator.result()
        scale = aggregate.total_weight / plain
        if scale != 1.0:  # stale records count less: sum(w s delta) / sum(w)
            arrays = {k: (v * scale).astype(v.dtype) for k, v in aggregate.arrays.items()}
            aggregate = replace(aggregate, arrays=arrays)
        broadcast = d.stages.broadcast(state.stage_states)
        aggregate = d.stages.on_sum(
            aggregate, state.stage_states, SumContext(version, 0, broadcast)
        )
        stage_states, metrics = d.stages.finish_round(state.stage_states, aggregate)
        context = RoundContext(version, d.population_size(), len(buffer))
        state = d.algorithm.server_update(state, aggregate, context)
        state = replace(state, round=version, stage_states=stage_states)
        aggregate_seconds = time.perf_counter() - server_started
        eval_started = time.perf_counter()
        due = version % self.fedbuff.eval_every == 0 or version == updates
        evaluation = d.evaluator(state.params) if d.evaluator and due else None
        if evaluation is not None:
            metrics.update(evaluation.metrics)
        metrics.update(
            {
                "clock.seconds": self.clock.now - window.started,
                "clock.time": self.clock.now,
                "async.staleness.mean": float(staleness.mean()),
                "async.staleness.max": float(staleness.max()),
                "async.in_flight": float(len(self._heap)),
            }
        )
        record = RoundRecord(
            round=version,
            test_accuracy=evaluation.accuracy if evaluation else math.nan,
            test_loss=evaluation.loss if evaluation else math.nan,
            train_loss=sums.get("train_loss", math.nan) / examples if examples else math.nan,
            clients_sampled=window.dispatched,
            clients_completed=len(buffer),
            clients_failed=len(window.failed),
            clients_rejected=len(window.rejected),
            bytes_down=window.dispatched * self._bytes_down(state),
            bytes_up=window.bytes_up,
            train_seconds=window.train_seconds,
            aggregate_seconds=aggregate_seconds,
            eval_seconds=time.perf_counter() - eval_started,
            wall_seconds=time.perf_counter() - window.real_started,
            metrics=metrics,
            clients={
                k: sorted(v)
                for k, v in {
                    "failed": window.failed,
                    "rejected": window.rejected,
                    "arrived": [a.client_id for a, _ in buffer],
                }.items()
                if v
            },
            labels={**d.labels, **d.stages.labels(), "async": "fedbuff"},
        )
        history.append(record)
        d.listener.round_finished(record)
        return state
