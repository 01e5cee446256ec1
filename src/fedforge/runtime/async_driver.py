"""Asynchronous training with a buffer (FedBuff, Nguyen et al. 2022), on the virtual clock
in simulation or in real time over the network: one core, two sources of time.

Up to ``concurrency`` clients train at once, each on the model version it received. A
finished client leaves at once and an idle online client takes its place with the current
model; the server applies an update every ``buffer`` arrivals, each record weighted by its
aggregation weight times ``(1 + staleness) ** -exponent`` (``exponent`` 0.5:
``1 / sqrt(1 + staleness)``), where staleness is how many server updates happened since the
client's model version. The buffer's aggregate is ``sum(w_i s_i delta_i) / sum(w_i)``: with no
staleness and ``buffer`` = the cohort, one update is a synchronous FedAvg round (with
``max_weight``, weights are capped before the staleness discount). A buffer holds at most one
result per client: a client's second result is held for the next buffer (its staleness counted
when it enters), and the client gets no new task while it has one held. A client whose task
failed or was rejected rests before its next one (1 s, doubled per failure in a row).

On the virtual clock, events are ordered by simulated finish time (ties by dispatch order;
arrivals at one instant are all handled before anyone is dispatched). Training runs as fast
as the runtime allows: a task's duration depends only on its step count and payload sizes,
so clients are trained lazily, all the tasks started on one model version in one exchange (a
vectorized batch), before that version's first result is needed or the model moves on. In
real time, tasks go out through the transport as soon as they are dispatched and each reply
is taken as it arrives. Everything else is the synchronous driver's: the transport,
validation, stages' decoding, the aggregation's accumulator, the server optimizer,
evaluation and the history.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from fedforge.aggregate.guard import aggregate_problem, params_problem, record_norms
from fedforge.aggregate.kinds import WeightedMean, cap_weights
from fedforge.algorithms.base import RoundContext, ServerState
from fedforge.compress.downlink import encode_broadcast
from fedforge.core.errors import ConfigError, FedforgeError
from fedforge.core.params import Params, num_bytes
from fedforge.core.records import FIT, RecordBatch, Reply, Task
from fedforge.core.rng import Purpose
from fedforge.report.history import History, RoundRecord
from fedforge.report.listeners import DeferredEvents, Event
from fedforge.runtime.async_time import Job, RealTime, TimeSource, VirtualTime, Window
from fedforge.runtime.clock import VirtualClock, spec_bytes
from fedforge.runtime.driver import Accept, Check, Driver, Exchanged
from fedforge.runtime.sampling import UniformSampler
from fedforge.runtime.transport import AsyncTransport
from fedforge.stages.base import SumContext

log = logging.getLogger("fedforge")
FAILURE_REST_S = 1.0  # seconds (simulated or real) a client rests after a failed task
MAX_REST_S = 60.0


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


def fedbuff_problem(driver: Driver) -> str | None:
    """Why FedBuff cannot run ``driver``'s pieces (what ``asynchronous.mode = 'fedbuff'``
    refuses when a configuration loads), or None."""
    name = type(driver.algorithm).__name__
    if driver._algorithm_stateful:
        return (
            f"asynchronous training cannot run an algorithm with client state ({name}): a "
            "stale client's state would move with a model it never saw"
        )
    if not driver.algorithm.accepts_stages:
        return (
            f"asynchronous training cannot run {name}: its record carries a normalizer beside "
            "the update, which the staleness discount would scale with it"
        )
    if driver.stragglers is not None:
        return (
            "asynchronous training cannot simulate stragglers: clients run at their device's "
            "speed on the clock, and a slow one arrives late (stale) instead of doing "
            "partial work"
        )
    if any(stage.position == "noise" for stage in driver.stages.stages):
        return "asynchronous training cannot run differential privacy: it is accounted per round"
    if driver.federated_eval is not None:
        return "asynchronous training cannot run federated evaluation: it has no rounds"
    return None


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


@dataclass(frozen=True)
class _Version:
    """A model version's task payload: the shared arrays, the stages' broadcast, the bytes."""

    round: int
    shared: Params
    broadcast: dict[str, float]
    bytes: int


class AsyncDriver:
    """Runs FedBuff with ``driver``'s pieces; one history record per server update.

    With ``clock``, time is simulated (training runs lazily, as fast as the runtime allows);
    without it, in real time through the driver's transport, which must accept tasks while
    others are in flight (:class:`~fedforge.runtime.transport.AsyncTransport`: the network).
    """

    def __init__(
        self,
        driver: Driver,
        fedbuff: FedBuff,
        clock: VirtualClock | None = None,
        *,
        wait: Callable[[], None] | None = None,
        poll_s: float = 1.0,
    ) -> None:
        if driver.aggregation.kind != "mean":
            raise ConfigError(
                "asynchronous training sums its buffer with the weighted mean: "
                f"aggregation {driver.aggregation.name!r} is not supported"
            )
        problem = fedbuff_problem(driver)
        if problem:
            raise ConfigError(problem)
        self.driver, self.fedbuff = driver, fedbuff
        self.time: TimeSource
        if clock is not None:
            self.time = VirtualTime(self, clock)
        elif isinstance(driver.transport, AsyncTransport):
            idle = wait or (lambda: time.sleep(poll_s))
            self.time = RealTime(self, driver.transport, idle, poll_s)
        else:
            raise ConfigError(
                "asynchronous training in real time needs a transport that takes new tasks "
                "while others run (the network); simulations run it on the virtual clock"
            )
        self.arrivals: list[Arrival] = []  # every result that reached the server, in order
        self._results: dict[int, RecordBatch | None] = {}  # by job seq; None: failed
        self._busy: set[int] = set()
        self._seq = 0
        self._dispatches = 0  # dispatch calls on the current version
        self._seeded: set[tuple[int, int]] = set()  # (version, client) seeds handed out
        self._version: _Version | None = None  # what tasks on the current version carry
        # At most one result per client in a buffer (else one fast client could make every
        # update on its own): a client's second result is held for the next buffer, and the
        # client gets no new task while it has a result held.
        self._in_buffer: set[int] = set()
        self._held: list[tuple[Job, RecordBatch]] = []  # results to enter a buffer, in order
        self._events: dict[int, list[Event]] = {}  # by job seq: what the listener hears of it
        # A client whose task failed or was rejected rests before it gets another:
        # FAILURE_REST_S, doubled after each failure in a row (at most MAX_REST_S).
        self._failures: dict[int, int] = {}  # client -> failures in a row
        self._rest: dict[int, float] = {}  # client -> time it may be dispatched again

    # Dispatch ---------------------------------------------------------------------------
    def _dispatch(self, state: ServerState, window: Window) -> None:
        free = self.fedbuff.concurrency - self.time.in_flight()
        if free <= 0:
            return
        online = self.time.available(self.driver.population())
        now = self.time.now()
        held = {job.client_id for job, _ in self._held}
        idle = [
            c
            for c in online
            if c not in self._busy and c not in held and self._rest.get(c, 0) <= now
        ]
        if not idle:
            return
        version = state.round
        coords = (version + 1,) if self._dispatches == 0 else (version + 1, self._dispatches)
        self._dispatches += 1
        rng = self.driver.streams.generator(Purpose.SAMPLING, *coords)
        chosen = UniformSampler(free)(idle, rng)
        jobs = []
        for cid in chosen:
            jobs.append(Job(0.0, self._seq, cid, version))
            self._seq += 1
            self._busy.add(cid)
        window.dispatched += len(jobs)
        window.bytes_down += len(jobs) * self.bytes_down(state)
        self.time.start(jobs, state, window)

    def _next_held(self) -> tuple[Job, RecordBatch] | None:
        """The earliest held result whose client has none in the buffer (removed)."""
        for i, (job, _) in enumerate(self._held):
            if job.client_id not in self._in_buffer:
                return self._held.pop(i)
        return None

    def _rested(self, client_id: int) -> None:
        """A failed or rejected task: the client rests before its next one."""
        failures = self._failures.get(client_id, 0) + 1
        self._failures[client_id] = failures
        rest = min(FAILURE_REST_S * 2 ** (failures - 1), MAX_REST_S)
        self._rest[client_id] = self.time.now() + rest

    def _current(self, state: ServerState) -> _Version:
        """What every task on this model version carries (built once per version)."""
        if self._version is None or self._version.round != state.round:
            d = self.driver
            shared = encode_broadcast({**state.params, **d.algorithm.broadcast(state)}, d.downlink)
            broadcast = d.stages.broadcast(state.stage_states)
            self._version = _Version(state.round, shared, broadcast, num_bytes(shared))
        return self._version

    def task(self, job: Job, state: ServerState) -> Task:
        current = self._current(state)
        seed = self._seed(job)
        return Task(FIT, job.version + 1, job.client_id, seed, current.shared, current.broadcast)

    def bytes_down(self, state: ServerState) -> int:
        return self._current(state).bytes

    def bytes_up(self) -> int:
        return spec_bytes(self.driver.fit_spec.arrays)

    def _seed(self, job: Job) -> int:
        """The synchronous driver's seed for (round, client); a client dispatched again on
        the same version gets a seed of its own (else it would repeat its work)."""
        seed = self.driver.streams.task_seed(job.version + 1, job.client_id)
        key = (job.version, job.client_id)
        if key in self._seeded:
            return seed ^ ((job.seq & (2**63 - 1)) << 64)
        self._seeded.add(key)
        return seed

    # Results ----------------------------------------------------------------------------
    def _keeper(self, state: ServerState, seq_of: Callable[[int], int]) -> Accept:
        """Decodes accepted records and keeps each under its job's sequence number."""
        d = self.driver

        def accept(batch: RecordBatch) -> None:
            decoded = d.stages.decode(batch, state.stage_states)
            for i, cid in enumerate(decoded.client_ids):
                row = decoded.select(np.arange(len(decoded)) == i)
                # the runtime may reuse the batch's storage: keep a copy
                self._results[seq_of(int(cid))] = RecordBatch(
                    row.client_ids.copy(),
                    row.num_examples.copy(),
                    {k: v.copy() for k, v in row.arrays.items()},
                    {k: v.copy() for k, v in row.scalars.items()},
                    {k: v.copy() for k, v in row.metrics.items()},
                )

        return accept

    def train(self, jobs: list[Job], state: ServerState, window: Window) -> None:
        """Train ``jobs`` (all on the current model version) in one exchange."""
        if not jobs:
            return
        d = self.driver
        started = time.perf_counter()
        seq_of = {job.client_id: job.seq for job in jobs}
        tasks = [self.task(job, state) for job in jobs]
        deferred = DeferredEvents()
        keeper = self._keeper(state, seq_of.__getitem__)
        out = d._exchange(tasks, self._check(), keeper, deferred)
        for cid in out.failed + out.rejected:
            self._results.setdefault(seq_of[cid], None)
        for job in jobs:
            self._events[job.seq] = deferred.events.pop(job.client_id, [])
        window.count(out)
        window.train_seconds += time.perf_counter() - started

    def receive(self, job: Job, reply: Reply, state: ServerState, window: Window) -> None:
        """One reply, as it arrived (real time)."""
        out = Exchanged()
        accept = self._keeper(state, lambda _cid: job.seq)
        deferred = DeferredEvents()
        self.driver._take(reply, job.version + 1, self._check(), accept, deferred, out)
        self._results.setdefault(job.seq, None)  # failed or rejected
        self._events[job.seq] = deferred.events.pop(job.client_id, [])
        window.count(out)

    def _report(self, job: Job) -> None:
        """Tell the listener what became of ``job`` (now that it reached the server)."""
        for event in self._events.pop(job.seq, []):
            event(self.driver.listener)

    def _announce(self, version: int) -> None:
        """A new server update's window: it waits for a buffer of results."""
        self.driver.listener.round_started(version, [])
        self.driver.listener.round_expects(self.fedbuff.buffer)

    def _check(self) -> Check:
        return self.driver._spec_check(self.driver.fit_spec, FIT)

    # The run ---------------------------------------------------------------------------
    def run(
        self,
        state: ServerState,
        updates: int,
        history: History,
        *,
        checkpoint: Callable[[ServerState, History], None] | None = None,
    ) -> ServerState:
        """Run until ``updates`` server updates are done (``state.round`` counts them)."""
        d = self.driver
        if history:  # resumed: in-flight work is dispatched anew (the clock continues)
            if isinstance(self.time, VirtualTime):
                self.time.clock.now = history[-1].metrics.get("clock.time", 0.0)
        else:
            history.append(d.initial_record(state))
            if checkpoint:
                checkpoint(state, history)
        buffer: list[tuple[Arrival, RecordBatch]] = []
        window = Window(self.time.now(), time.perf_counter())
        self._announce(state.round + 1)
        try:
            while state.round < updates:
                self._dispatch(state, window)
                if not self.time.in_flight():
                    self.time.wait()
                    continue
                for job in self.time.next(state, window):
                    if state.round >= updates:
                        break
                    self._busy.discard(job.client_id)
                    if job.seq not in self._results:
                        self.time.flush(state, window)
                    result = self._results.pop(job.seq, None)  # None: it failed
                    if result is None:
                        self._report(job)
                        self._rested(job.client_id)
                        continue
                    self._failures.pop(job.client_id, None)
                    self._held.append((job, result))
                    while state.round < updates:
                        entry = self._next_held()
                        if entry is None:
                            break
                        held, result = entry
                        self._report(held)
                        self._in_buffer.add(held.client_id)
                        now = self.time.now()
                        arrival = Arrival(held.client_id, held.version, state.round, now)
                        self.arrivals.append(arrival)
                        buffer.append((arrival, result))
                        if len(buffer) < self.fedbuff.buffer:
                            continue
                        self.time.flush(state, window)  # before the model moves on
                        state = self._update(state, buffer, window, history, updates)
                        buffer = []
                        self._in_buffer.clear()
                        window = Window(self.time.now(), time.perf_counter())
                        self._dispatches = 0
                        self._seeded.clear()
                        if checkpoint:
                            checkpoint(state, history)
                        if state.round < updates:
                            self._announce(state.round + 1)
        finally:
            self.time.close()
        return state

    def _without_outliers(
        self, buffer: list[tuple[Arrival, RecordBatch]], version: int
    ) -> tuple[list[tuple[Arrival, RecordBatch]], list[int]]:
        """The buffer without the records the driver's outlier bound refuses (they never
        reach the model), and the refused clients."""
        d = self.driver
        if d.outliers is None:
            return buffer, []
        program = d.algorithm.program()
        norms: dict[int, float] = {}
        steps: dict[int, int] = {}
        for index, (_, batch) in enumerate(buffer):
            norms[index] = float(record_norms(batch)[0])
            steps[index] = program.num_steps(int(batch.num_examples[0]))
        offenders = d.outliers.offenders(norms, steps)
        for index, why in offenders.items():
            log.warning(
                "update %d: refused the record of %s: %s",
                version,
                d.describe(buffer[index][0].client_id),
                why,
            )
        kept = [entry for index, entry in enumerate(buffer) if index not in offenders]
        return kept, [buffer[index][0].client_id for index in offenders]

    def _update(
        self,
        state: ServerState,
        buffer: list[tuple[Arrival, RecordBatch]],
        window: Window,
        history: History,
        updates: int,
    ) -> ServerState:
        d = self.driver
        server_started = time.perf_counter()
        version = state.round + 1
        buffer, refused = self._without_outliers(buffer, version)
        accumulator = d.aggregation.accumulator()
        staleness = np.array([a.staleness for a, _ in buffer])
        factors = staleness_weight(staleness, self.fedbuff.staleness_exponent)
        plain = 0.0
        max_weight = d.aggregation.max_weight if isinstance(d.aggregation, WeightedMean) else None
        sums: dict[str, float] = {}
        examples = 0.0
        for (_, batch), factor in zip(buffer, factors, strict=True):
            # capped first: a stale record's discount applies to the weight it may carry
            weights, _ = cap_weights(d._weights(batch), max_weight)
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
        broadcast = self._current(state).broadcast
        aggregate = d.stages.on_sum(
            aggregate, state.stage_states, SumContext(version, 0, broadcast)
        )
        stage_states, metrics = d.stages.finish_round(state.stage_states, aggregate)
        context = RoundContext(version, d.population_size(), len(buffer))
        state = d.algorithm.server_update(state, aggregate, context)
        problem = aggregate_problem(aggregate.arrays) or params_problem(state.params)
        if problem is not None:  # from records that passed every check: nothing to retry
            raise FedforgeError(f"update {version}: {problem}; the run cannot make progress")
        state = replace(state, round=version, stage_states=stage_states)
        aggregate_seconds = time.perf_counter() - server_started
        eval_started = time.perf_counter()
        due = version % self.fedbuff.eval_every == 0 or version == updates
        evaluation = d.evaluator(state.params) if d.evaluator and due else None
        if evaluation is not None:
            metrics.update(evaluation.metrics)
        metrics.update(
            {
                **self.time.metrics(window),
                "async.staleness.mean": float(staleness.mean()),
                "async.staleness.max": float(staleness.max()),
                "async.in_flight": float(self.time.in_flight()),
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
            bytes_down=window.bytes_down,
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
                    "refused": refused,
                }.items()
                if v
            },
            labels={**d.labels, **d.stages.labels(), "async": "fedbuff"},
        )
        history.append(record)
        d.listener.round_finished(record)
        return state
