"""The driver: one outer loop for simulation and deployment.

A round: sample clients, send each a fit task (the model, the algorithm's broadcast and the
stages' broadcast), classify every reply the same way whatever the runtime (failed, rejected
with its reason, or accepted), decode and sum accepted records with the aggregation kind,
update the stages and the server state, evaluate centrally and, when configured, run a second
exchange in which sampled clients evaluate the new model on their held-out data. After every
round the whole server state and history go to the checkpoint callback.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fedforge.aggregate.gather import combines_whole_records, is_mean
from fedforge.aggregate.guard import OutlierBound, Refusal, params_problem
from fedforge.aggregate.kinds import Aggregate, Aggregation, WeightedMean
from fedforge.algorithms.base import (
    Algorithm,
    RoundContext,
    ServerState,
    model_view,
    state_metrics,
)
from fedforge.compress.downlink import Downlink, encode_broadcast
from fedforge.core.errors import ConfigError, FedforgeError
from fedforge.core.params import ParamSpec, num_bytes
from fedforge.core.records import (
    EVALUATE,
    FIT,
    ClientFailure,
    RecordBatch,
    RecordSpec,
    Reply,
    Task,
)
from fedforge.core.rng import Purpose, RngStreams
from fedforge.privacy.amplification import sampling_problem
from fedforge.privacy.guards import OUTLIERS_UNDER_CENTRAL_DP, privacy_problem, resume_problem
from fedforge.report.history import DP_SGD_MAX, History, RoundRecord
from fedforge.runtime.client_app import DP_SGD_EPSILON, PERSONAL_ACCURACY, PERSONAL_LOSS
from fedforge.runtime.client_state import ClientStateStore
from fedforge.runtime.clock import VirtualClock, spec_bytes
from fedforge.runtime.exchange import (
    ACCEPTED,
    FAILED,
    REJECTED,
    Accept,
    Check,
    Evaluator,
    Exchanged,
    FederatedEvaluation,
    RoundListener,
    federated_metrics,
)
from fedforge.runtime.plain_fit import plain_fit
from fedforge.runtime.sampling import Sampler
from fedforge.runtime.secure_fit import secure_fit
from fedforge.runtime.stopping import STOPPED, StopRule
from fedforge.runtime.stragglers import Stragglers
from fedforge.runtime.transport import Transport
from fedforge.runtime.validation import validate_batch
from fedforge.secagg.aggregation import SecureAggregation
from fedforge.stages.base import StageChain, SumContext
from fedforge.stages.dp_noise import CentralGaussian
from fedforge.train.program import WORK_EPOCHS

__all__ = [  # the driver, and what its users import with it
    "ACCEPTED",
    "FAILED",
    "REJECTED",
    "Accept",
    "Check",
    "Driver",
    "Evaluator",
    "Exchanged",
    "FederatedEvaluation",
    "RoundListener",
]

log = logging.getLogger("fedforge")


def work_epochs(task: Task) -> int | None:
    """The local epochs a fit task asks for (a straggler's partial work), or None: all."""
    epochs = task.scalars.get(WORK_EPOCHS)
    return None if epochs is None else int(epochs)


@dataclass
class Driver:
    """Drives rounds of ``algorithm`` through ``transport``.

    ``population()`` lists the clients that may be sampled now; ``population_size()`` counts
    all clients of the federation (SCAFFOLD's N); ``example_cap(client, stage)`` is the largest
    example count the server accepts from that client (a larger claim is rejected);
    ``count_cap(client, stage)`` the most it counts (a larger claim is clamped to it and the
    client listed in ``clients.clamped``), None for no such cap.

    ``outliers`` refuses a round with a record far larger than the round's others, and every
    round's aggregate and new model must be finite: a refused round leaves the model
    unchanged and is tried again without its offenders; after ``max_refused`` refusals of
    one round the run stops with the reason (:mod:`fedforge.aggregate.guard`).
    """

    algorithm: Algorithm
    transport: Transport
    sampler: Sampler
    streams: RngStreams
    model_spec: ParamSpec
    trainable: list[str]
    population: Callable[[], Sequence[int]]
    population_size: Callable[[], int]
    example_cap: Callable[[int, str], int]
    stages: StageChain = field(default_factory=StageChain)
    aggregation: Aggregation = field(default_factory=WeightedMean)
    evaluator: Evaluator | None = None
    federated_eval: FederatedEvaluation | None = None
    listener: RoundListener = field(default_factory=RoundListener)
    describe: Callable[[int], str] = str
    client_states: ClientStateStore | None = None  # simulation: the runtime's state store
    client_metrics: tuple[str, ...] = ()  # metrics fit records carry beyond train_loss
    eval_metrics: tuple[str, ...] = ()  # a workload's evaluate: its metrics (else loss, accuracy)
    labels: dict[str, str] = field(default_factory=dict)  # recorded with every round
    # Central DP's amplification by sampling needs a sample nobody can predict: then the
    # sampler draws from this secret seed (kept by the server only), not from the run seed.
    sampling_seed: int | None = None
    downlink: Downlink = "none"  # how the broadcast model travels (compress/downlink.py)
    # Simulation on a virtual clock: only online clients are sampled, stragglers dropped.
    clock: VirtualClock | None = None
    stragglers: Stragglers | None = None  # simulation: clients that can do only partial work
    stop_when: StopRule | None = None  # early stopping on a recorded metric
    count_cap: Callable[[int, str], int | None] | None = None
    outliers: OutlierBound | None = None
    max_refused: int = 3

    def __post_init__(self) -> None:
        self.stop_reason: str | None = None  # why ``run`` stopped before its last round
        self.refusal: Refusal | None = None  # why the last attempt's aggregate was refused
        self.benched: set[int] = set()  # offenders left out of the current round's retries
        self.stages.check(self.aggregation)
        sample = {name: np.zeros(1, np.float32) for name in self.trainable}
        self._algorithm_stateful = bool(self.algorithm.init_client_state(sample))
        self._check_algorithm()
        fit_spec = self.algorithm.record_spec(self.model_spec, self.trainable)
        fit_spec = replace(fit_spec, metrics=(*fit_spec.metrics, *self.client_metrics))
        self.fit_spec = self.stages.wire_spec(fit_spec)
        self._check_privacy()
        self._dp_sgd_max = -math.inf  # the largest DP-SGD epsilon any client reported so far
        # Secure aggregation: the fit reply carries no arrays (the record stays with its
        # client until it is masked); everything summed travels in the masked vector.
        if isinstance(self.aggregation, SecureAggregation):
            metrics = () if self.aggregation.withhold_metrics else self.fit_spec.metrics
            self.fit_reply_spec = RecordSpec({}, (), metrics)
        else:
            self.fit_reply_spec = self.fit_spec
        personal = (PERSONAL_ACCURACY, PERSONAL_LOSS) if self.algorithm.personalized else ()
        scores = self.eval_metrics or ("accuracy", "loss", *personal)
        self.eval_spec = RecordSpec({}, metrics=scores)

    def _check_algorithm(self) -> None:
        """An algorithm whose record must reach the server as the client computed it
        (``accepts_stages`` False) refuses stages, and aggregations that break it."""
        if self.algorithm.accepts_stages:
            return
        name = type(self.algorithm).__name__
        if self.stages.stages:
            names = ", ".join(s.name for s in self.stages.stages)
            raise ConfigError(
                f"{name} cannot run with update stages ({names}): its client state or the "
                "normalizer in its record is computed from the record before the stages "
                "change it"
            )
        if self._algorithm_stateful and not is_mean(self.aggregation):
            raise ConfigError(
                f"{name} cannot run with aggregation {self.aggregation.name!r}: every accepted "
                "client moves its control variate by its own record, so the server must add "
                "them all (the weighted mean); a rule that drops, reweighs or clips records "
                "breaks c = mean(c_i)"
            )
        if not combines_whole_records(self.aggregation):
            raise ConfigError(
                f"{name} cannot run with aggregation {self.aggregation.name!r}: it combines the "
                "normalizer in each record apart from the update it normalizes (per "
                "coordinate or rescaled); use the mean, krum, multi_krum or geometric_median"
            )

    def _check_privacy(self) -> None:
        """Central DP: the clients summed each round must be a sample its accountant bounds
        (``privacy/amplification.py``) and the aggregation must keep its sensitivity
        (``privacy/guards.py``); unless its noise is seeded, clients are sampled from a
        secret of the server's (amplification needs a sample nobody can predict)."""
        stages = self.stages.stages
        population = self.population_size()
        per_round = getattr(self.sampler, "per_round", population)
        array_size = sum(int(np.prod(a.shape)) for a in self.fit_spec.arrays.values())
        problem = privacy_problem(stages, self.aggregation, array_size, min(per_round, population))
        central = [s for s in stages if isinstance(s, CentralGaussian)]
        if central and problem is None:
            problem = sampling_problem(
                central[0].scheme, self.sampler, population, self.clock, self.stragglers
            )
        if central and problem is None and self.outliers is not None:
            problem = OUTLIERS_UNDER_CENTRAL_DP
        if problem:
            raise ConfigError(problem)
        if central and self.sampling_seed is None and not central[0].source.seeded:
            self.sampling_seed = secrets.randbits(128)

    # One exchange ---------------------------------------------------------------------------
    def _spec_check(self, spec: RecordSpec, stage: str, arrays: bool = True) -> Check:
        """Validation against ``spec``, with each client's example cap for ``stage``
        (``arrays=False``: the array values are left to the accumulator's check)."""

        def check(batch: RecordBatch) -> tuple[np.ndarray, list[str | None]]:
            caps = np.array([self.example_cap(int(c), stage) for c in batch.client_ids])
            return validate_batch(batch, spec, caps, arrays)

        return check

    def _exchange(
        self,
        tasks: list[Task],
        check: Check,
        accept: Accept,
        notify: RoundListener | None,
    ) -> Exchanged:
        out = Exchanged()
        round_number = tasks[0].round if tasks else 0
        stage = tasks[0].stage if tasks else FIT
        for reply in self.transport.exchange(tasks):
            self._take(reply, round_number, check, accept, notify, out, stage)
        return out

    def _take(
        self,
        reply: Reply,
        round_number: int,
        check: Check,
        accept: Accept,
        notify: RoundListener | None,
        out: Exchanged,
        stage: str = FIT,
    ) -> None:
        """Classify one reply (failed, rejected with its reason, or accepted, its example
        count clamped to the client's count cap for ``stage``, and passed to ``accept``),
        counting it in ``out`` and telling the ``notify`` listener."""
        if isinstance(reply, ClientFailure):
            kind = REJECTED if reply.rejected else FAILED
            (out.rejected if reply.rejected else out.failed).append(reply.client_id)
            log.warning(
                "round %d: %s %s: %s%s",
                round_number,
                "rejected the reply of" if reply.rejected else "failure of",
                self.describe(reply.client_id),
                reply.error,
                f"\n{reply.traceback}" if reply.traceback else "",
            )
            if notify is not None:
                notify.client_done(reply.client_id, kind)
                notify.client_reported(reply.client_id, kind, reply.error, {})
            return
        start = time.perf_counter()
        batch = reply.as_batch() if not isinstance(reply, RecordBatch) else reply
        out.bytes_up += batch.array_bytes()
        keep, reasons = check(batch)
        good = self._clamp(batch.select(keep), stage, out)
        refused = accept(good) if len(good) else None
        if refused is not None and any(r is not None for r in refused):
            for row, reason in zip(np.flatnonzero(keep), refused, strict=True):
                reasons[row] = reason
            keep = np.array([r is None for r in reasons])
            good = good.select(np.array([r is None for r in refused]))
        for cid, reason in zip(batch.client_ids, reasons, strict=True):
            if reason is not None:
                out.rejected.append(int(cid))
                out.why = f"{self.describe(int(cid))}: {reason}"
                log.warning(
                    "round %d: rejected the record of %s: %s",
                    round_number,
                    self.describe(int(cid)),
                    reason,
                )
        if len(good):
            weights = good.num_examples.astype(np.float64)
            for name, values in good.metrics.items():
                out.sums[name] = out.sums.get(name, 0.0) + float(weights @ values)
                out.maxima[name] = max(out.maxima.get(name, -math.inf), float(values.max()))
                out.values.setdefault(name, []).extend(float(v) for v in values)
            out.examples += float(weights.sum())
            out.accepted += len(good)
            out.accepted_ids.extend(int(c) for c in good.client_ids)
        out.server_seconds += time.perf_counter() - start
        if notify is not None:
            for i, (cid, ok) in enumerate(zip(batch.client_ids, keep, strict=True)):
                status = ACCEPTED if ok else REJECTED
                notify.client_done(int(cid), status)
                metrics = {n: float(v[i]) for n, v in batch.metrics.items()} if ok else {}
                notify.client_reported(int(cid), status, reasons[i] or "", metrics)

    def _clamp(self, batch: RecordBatch, stage: str, out: Exchanged) -> RecordBatch:
        """``batch`` with each example count clamped to its client's count cap."""
        if self.count_cap is None or not len(batch):
            return batch
        caps = [self.count_cap(int(c), stage) for c in batch.client_ids]
        limit = np.array([np.iinfo(np.int64).max if c is None else c for c in caps], np.int64)
        over = batch.num_examples > limit
        if not over.any():
            return batch
        out.clamped.extend(int(c) for c in batch.client_ids[over])
        counts = np.minimum(batch.num_examples, limit).astype(batch.num_examples.dtype)
        return replace(batch, num_examples=counts)

    # One round ------------------------------------------------------------------------------
    def run_round(
        self, state: ServerState, attempt: int = 0, min_completed: int = 0
    ) -> tuple[ServerState, RoundRecord]:
        """Run round ``state.round + 1``; ``attempt`` > 0 re-draws the sample for a retry. With
        fewer than ``min_completed`` accepted records the attempt is not evaluated (the
        caller discards it)."""
        start = time.perf_counter()
        round_number = state.round + 1
        coords = (round_number,) if attempt == 0 else (round_number, attempt)
        streams = self.streams if self.sampling_seed is None else RngStreams(self.sampling_seed)
        population = [c for c in self.population() if c not in self.benched]
        if self.clock is not None:
            population = self.clock.online(population)
        sampled = self.sampler(population, streams.generator(Purpose.SAMPLING, *coords))
        self.listener.round_started(round_number, sampled)
        shared = encode_broadcast(
            {**state.params, **self.algorithm.broadcast(state)}, self.downlink
        )
        broadcast = self.stages.broadcast(state.stage_states)
        metrics: dict[str, float] = {}
        clients: dict[str, list[int]] = {}
        seeds = self.streams.task_seeds(round_number, sampled)
        tasks = [
            Task(FIT, round_number, cid, seed, shared, broadcast)
            for cid, seed in zip(sampled, seeds, strict=True)
        ]
        stragglers: list[int] = []
        if self.stragglers is not None:
            tasks, stragglers = self.stragglers.assign(tasks, self.streams, attempt)
        cohort = sampled
        if self.clock is not None:  # too slow for the deadline: dropped before they train
            epochs = [work_epochs(t) for t in tasks]  # a straggler's partial work is shorter
            ids = [t.client_id for t in tasks]
            timing = self.clock.schedule(
                ids, num_bytes(shared), spec_bytes(self.fit_spec.arrays), epochs
            )
            kept, too_slow = set(timing.kept), set(timing.dropped)
            tasks = [t for t in tasks if t.client_id in kept]
            cohort = [c for c in sampled if c not in too_slow]
            clients["too_slow"] = timing.dropped
            seconds = timing.seconds
            if not population and not self.clock.fixed_rounds:  # nobody online: look later
                seconds = self.clock.devices.availability.resolution
            metrics["clock.seconds"] = seconds
            metrics["clock.time"] = self.clock.advance(seconds)
        fit_started = time.perf_counter()
        secure_bytes_down = 0
        notes: dict[str, str] = {}  # this round's labels (who was excluded, and why)
        if isinstance(self.aggregation, SecureAggregation):
            fit, summed, secure_bytes_down, refusal = secure_fit(
                self, self.aggregation, tasks, broadcast, metrics, clients, notes
            )
        else:
            fit, summed, refusal = plain_fit(self, tasks, state)
        fit_seconds = time.perf_counter() - fit_started
        server_started = time.perf_counter()
        for name in sorted(set(fit.sums) - {"train_loss"}):  # e.g. each client's DP-SGD epsilon
            metrics[name] = fit.mean(name)
            metrics[f"{name}.max"] = fit.maxima[name]
        if DP_SGD_EPSILON in fit.maxima:
            self._dp_sgd_max = max(self._dp_sgd_max, fit.maxima[DP_SGD_EPSILON])
        if self._dp_sgd_max > -math.inf:  # every client's ledger only grows: the largest yet
            metrics[DP_SGD_MAX] = self._dp_sgd_max
        clients.update(failed=fit.failed, rejected=fit.rejected, clamped=fit.clamped)
        if stragglers:
            dropped = self.stragglers is not None and self.stragglers.drop
            clients["dropped_stragglers" if dropped else "stragglers"] = stragglers
        everyone_rejected = fit.rejected and not (fit.accepted or fit.failed)
        if refusal is None and everyone_rejected and not clients.get("secagg_dropped"):
            # Every client answered and none could be used: waiting changes nothing when
            # the model itself is broken (records that are all NaN).
            refusal = Refusal(f"every record was rejected (the last, {fit.why})")
        if refusal is None and (summed is not None or self.stages.releases_when_empty):
            # Central DP releases noise even when no record arrived: an unchanged model would
            # reveal that nobody took part, which the accounted mechanism never does.
            aggregate = self.stages.on_sum(
                summed if summed is not None else self._empty_aggregate(),
                state.stage_states,
                SumContext(round_number, attempt, broadcast),
            )
            aggregate = replace(aggregate, unsummed=fit.rejected)  # (local DP counts them)
            stage_states, stage_metrics = self.stages.finish_round(state.stage_states, aggregate)
            metrics.update(stage_metrics)
            context = RoundContext(round_number, self.population_size(), len(cohort))
            updated = self.algorithm.server_update(state, aggregate, context)
            problem = params_problem(updated.params)
            if problem is not None:  # what the stages released stands (see ``run``)
                refusal = Refusal(problem)
                state = replace(state, stage_states=stage_states)
            else:
                state = replace(updated, stage_states=stage_states)
                metrics.update(state_metrics(state))
                clients["excluded"] = aggregate.excluded
                clients["downweighted"] = aggregate.downweighted
        else:
            if refusal is None:
                log.warning("round %d: no record was accepted; model unchanged", round_number)
            # A privacy ledger still counts every record the server saw (a refused round's
            # too) and reports its epsilon.
            seen = fit.rejected + (fit.accepted_ids if refusal is not None else [])
            empty = replace(self._empty_aggregate(), unsummed=seen)
            stage_states, stage_metrics = self.stages.finish_ledgers(state.stage_states, empty)
            metrics.update(stage_metrics)
            state = replace(state, stage_states=stage_states)
        self.refusal = refusal
        # the offenders of this attempt and of the round's refused attempts before it
        clients["refused"] = sorted(self.benched | set(refusal.offenders if refusal else ()))
        if refusal is not None:
            log.warning(
                "round %d: refused the aggregate (model unchanged): %s",
                round_number,
                refusal.reason,
            )
        state = replace(state, round=round_number)
        aggregate_seconds = fit.server_seconds + time.perf_counter() - server_started
        counts = refusal is None and fit.accepted >= min_completed
        if self._algorithm_stateful or isinstance(self.aggregation, SecureAggregation):
            # (a secure session holds the record: forgotten unless it went into the sum)
            self._forget_unused_states(round_number, sampled, fit.accepted_ids if counts else [])
        else:  # the only client state is a privacy ledger: whoever sent a record spent budget
            self._forget_unused_states(round_number, sampled, fit.accepted_ids + fit.rejected)

        eval_started = time.perf_counter()
        evaluation = (
            self.evaluator(model_view(self.algorithm, state)) if self.evaluator and counts else None
        )
        if evaluation is not None:
            metrics.update(evaluation.metrics)
        # (stragglers the clock dropped downloaded the model too)
        bytes_down = num_bytes(shared) * len(sampled) + secure_bytes_down
        fed = self._federated_evaluation(state) if counts else None
        if fed is not None:
            fed_exchange, fed_bytes = fed
            bytes_down += fed_bytes
            metrics.update(
                federated_metrics(fed_exchange, self.algorithm.personalized, self.eval_metrics)
            )
            clients["fed_eval_failed"] = fed_exchange.failed + fed_exchange.rejected
            clients["fed_eval_clamped"] = fed_exchange.clamped
        eval_seconds = time.perf_counter() - eval_started
        record = RoundRecord(
            round=round_number,
            test_accuracy=evaluation.accuracy if evaluation else math.nan,
            test_loss=evaluation.loss if evaluation else math.nan,
            train_loss=fit.mean("train_loss"),
            clients_sampled=len(sampled),
            clients_completed=fit.accepted,
            clients_failed=len(fit.failed),
            clients_rejected=len(fit.rejected),
            bytes_down=bytes_down,
            bytes_up=fit.bytes_up,
            train_seconds=max(fit_seconds - fit.server_seconds, 0.0),
            aggregate_seconds=aggregate_seconds,
            eval_seconds=eval_seconds,
            wall_seconds=time.perf_counter() - start,
            metrics=metrics,
            clients={k: sorted(v) for k, v in clients.items() if v},
            labels={**self.labels, **self.stages.labels(), **notes},
        )
        self.listener.round_finished(record)
        return state, record

    def _weights(self, batch: RecordBatch) -> np.ndarray:
        """The aggregation weights of decoded records: the algorithm's, bounded by the
        stages (from the validated example counts)."""
        if self.algorithm.weighting == "uniform":
            weights = np.ones(len(batch))
        else:
            weights = batch.num_examples.astype(np.float64)
        return self.stages.weights(batch, weights)

    def _empty_aggregate(self) -> Aggregate:
        """The sum of no records: zeros shaped like a fit record."""
        arrays = {k: np.zeros(a.shape, a.dtype) for k, a in self.fit_spec.arrays.items()}
        return Aggregate(arrays, {}, 0, 0.0)

    def _forget_unused_states(self, round_number: int, sampled: list[int], used: list[int]) -> None:
        """An algorithm's client state moves only with the aggregate: a client whose record
        was rejected, failed, or belonged to an abandoned attempt keeps its previous state.
        (A DP-SGD ledger, the state of a stateless algorithm's client, moves with every record
        that left the client.)"""
        if self.client_states is None:
            return
        for cid in set(sampled) - set(used):
            self.client_states.discard(cid, round_number)

    def _federated_evaluation(self, state: ServerState) -> tuple[Exchanged, int] | None:
        fed = self.federated_eval
        if fed is None or state.round % fed.every:
            return None
        # Only clients that hold out data can evaluate (their held-out example cap is > 0).
        population = [c for c in self.population() if self.example_cap(int(c), EVALUATE) > 0]
        if not population:
            return None
        count = max(1, round(fed.fraction * len(population)))
        rng = self.streams.generator(Purpose.EVALUATION, state.round)
        chosen = sorted(int(c) for c in rng.choice(population, size=count, replace=False))
        model = encode_broadcast(model_view(self.algorithm, state), self.downlink)
        tasks = [Task(EVALUATE, state.round, cid, 0, model) for cid in chosen]
        check = self._spec_check(self.eval_spec, EVALUATE)
        exchange = self._exchange(tasks, check, lambda batch: None, notify=None)
        return exchange, num_bytes(model) * len(tasks)

    def initial_record(self, state: ServerState) -> RoundRecord:
        """Round 0: the initial model's central evaluation."""
        started = time.perf_counter()
        evaluation = self.evaluator(model_view(self.algorithm, state)) if self.evaluator else None
        seconds = time.perf_counter() - started
        record = RoundRecord(
            round=state.round,
            test_accuracy=evaluation.accuracy if evaluation else math.nan,
            test_loss=evaluation.loss if evaluation else math.nan,
            metrics=dict(evaluation.metrics) if evaluation else {},
            eval_seconds=seconds,
            wall_seconds=seconds,
        )
        self.listener.round_finished(record)
        return record

    def _resume_privacy(self, history: History) -> None:
        """A resumed run keeps its privacy mode and settings (``privacy/guards.py``) and
        continues the largest DP-SGD epsilon reported so far."""
        problem = resume_problem(history, {**self.labels, **self.stages.labels()})
        if problem:
            raise ConfigError(problem)
        most = (r.metrics.get(DP_SGD_MAX, r.metrics.get(f"{DP_SGD_EPSILON}.max")) for r in history)
        self._dp_sgd_max = max([v for v in most if v is not None], default=-math.inf)

    # The run --------------------------------------------------------------------------------
    def run(
        self,
        state: ServerState,
        rounds: int,
        history: History,
        *,
        min_completed: int = 0,
        max_retries: int | None = 0,
        before_attempt: Callable[[], object] = lambda: None,
        checkpoint: Callable[[ServerState, History], None] | None = None,
    ) -> ServerState:
        """Run until ``rounds`` rounds are complete; a round with fewer than ``min_completed``
        accepted records is re-sampled up to ``max_retries`` times (``None``: until it
        succeeds; ``before_attempt`` then decides how long to wait between attempts). A round
        whose aggregate was refused is tried again without its offenders, up to
        ``max_refused`` times; then the run stops with an error naming the reason."""
        if self.clock is not None and history:  # a resumed run continues the clock
            self.clock.now = history[-1].metrics.get("clock.time", 0.0)
        self._resume_privacy(history)
        if not history:
            history.append(self.initial_record(state))
            if checkpoint:
                checkpoint(state, history)
        elif self._stopped(history):  # a resumed run that had stopped early stays stopped
            return state
        while state.round < rounds:
            short, refused = 0, 0
            self.benched = set()
            for attempt in itertools.count():
                problem = self.stages.budget_problem(state.stage_states)
                if problem:
                    log.warning("stopping before round %d: %s", state.round + 1, problem)
                    self.stop_reason = problem
                    return state
                before_attempt()
                new_state, record = self.run_round(state, attempt, min_completed)
                refusal = self.refusal
                if refusal is None and record.clients_completed >= min_completed:
                    break
                # A discarded attempt's update is dropped, but what its stages released (a
                # noised sum the privacy ledger paid for, a moved clip norm) stands.
                state = replace(state, stage_states=new_state.stage_states)
                if refusal is not None:
                    refused += 1
                    self._retry_after_refusal(record.round, refused, refusal)
                    continue
                short += 1
                again = max_retries is None or short <= max_retries
                log.warning(
                    "round %d attempt %d: %d accepted results (< %d)%s",
                    record.round,
                    attempt,
                    record.clients_completed,
                    min_completed,
                    "; re-sampling" if again else "",
                )
                if not again:
                    raise FedforgeError(
                        f"round {state.round + 1} got fewer than {min_completed} accepted "
                        f"results in {short} attempts"
                    )
            state = new_state
            history.append(record)
            stopped = self._stopped(history)
            if checkpoint:
                checkpoint(state, history)
            if stopped:
                return state
        return state

    def _stopped(self, history: History) -> bool:
        """Whether early stopping ends the run after ``history``'s last round; if so, the
        reason is the driver's ``stop_reason`` and that round's ``stopped`` label."""
        reason = self.stop_when.reason(history) if self.stop_when is not None else None
        if reason is None:
            return False
        log.info("stopping early after round %d: %s", history[-1].round, reason)
        self.stop_reason = reason
        last = history[-1]
        history[-1] = replace(last, labels={**last.labels, STOPPED: reason})
        return True

    def _retry_after_refusal(self, round_number: int, refused: int, refusal: Refusal) -> None:
        """Leave the refusal's offenders out of the round's next attempt, or stop the run
        once ``max_refused`` attempts were refused."""
        if refused > self.max_refused:
            raise FedforgeError(
                f"round {round_number}: the aggregate was refused in {refused} attempts (last: "
                f"{refusal.reason}); the run cannot make progress"
            )
        self.benched |= set(refusal.offenders)
        log.warning(
            "round %d: trying again%s",
            round_number,
            f" without {', '.join(self.describe(c) for c in sorted(self.benched))}"
            if self.benched
            else "",
        )
