"""The round loop: sample, broadcast, run clients, validate, aggregate, step, evaluate.

Runtime-agnostic: the same loop drives every backend (sequential, vectorized, worker
processes, Ray, network), so each algorithm has exactly one server-side code path.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from fedforge.algorithms.base import Algorithm, ServerState
from fedforge.core.errors import FedforgeError, InvalidUpdateError
from fedforge.core.params import Params, num_bytes, spec_of
from fedforge.core.results import ClientFailure, ClientOutcome
from fedforge.core.rng import Purpose, RngStreams
from fedforge.report.history import RoundRecord
from fedforge.runtime.backend import ClientBackend
from fedforge.runtime.sampling import sample_clients
from fedforge.runtime.validation import validate_result
from fedforge.train.evaluate import Evaluation

log = logging.getLogger("fedforge")

Evaluator = Callable[[Params], Evaluation]


class RoundListener:
    """Hooks for progress display; override what you need."""

    def round_started(self, round_number: int, client_ids: list[int]) -> None:
        """Called after sampling, before any client runs."""

    def client_done(self, outcome: ClientOutcome, accepted: bool) -> None:
        """Called once per client outcome, as it arrives."""

    def round_finished(self, record: RoundRecord) -> None:
        """Called with the completed round's record."""


@dataclass
class RoundLoop:
    """Drives rounds of ``algorithm`` on ``backend``.

    ``population()`` lists the client ids that may be sampled now (in simulation all of
    them; in deployment the connected ones). ``example_cap(client_id)`` is the largest sample
    count the server accepts from that client (in simulation, the size of its dataset).
    """

    algorithm: Algorithm
    backend: ClientBackend
    population: Callable[[], Sequence[int]]
    clients_per_round: int
    streams: RngStreams
    example_cap: Callable[[int], int]
    evaluator: Evaluator | None = None
    listener: RoundListener = field(default_factory=RoundListener)

    def run_round(self, state: ServerState, attempt: int = 0) -> tuple[ServerState, RoundRecord]:
        """Run round ``state.round + 1``; ``attempt`` > 0 re-draws the sample for a retry."""
        start = time.perf_counter()
        round_number = state.round + 1
        coords = (round_number,) if attempt == 0 else (round_number, attempt)
        sampled = sample_clients(
            self.population(),
            self.clients_per_round,
            self.streams.generator(Purpose.SAMPLING, *coords),
        )
        self.listener.round_started(round_number, sampled)
        spec = spec_of(state.params)
        aggregator = self.algorithm.aggregator()
        failed = rejected = bytes_up = 0
        loss_sum = weight_sum = 0.0
        for outcome in self.backend.run(round_number, sampled, state.params):
            accepted = False
            if isinstance(outcome, ClientFailure) and outcome.rejected:
                rejected += 1
                log.warning(
                    "round %d: rejected result of client %d: %s",
                    round_number,
                    outcome.client_id,
                    outcome.error,
                )
            elif isinstance(outcome, ClientFailure):
                failed += 1
                log.warning(
                    "round %d: client %d failed: %s\n%s",
                    round_number,
                    outcome.client_id,
                    outcome.error,
                    outcome.traceback,
                )
            else:
                bytes_up += num_bytes(outcome.update) if isinstance(outcome.update, dict) else 0
                try:
                    validate_result(outcome, spec, self.example_cap(outcome.client_id))
                except InvalidUpdateError as exc:
                    rejected += 1
                    log.warning(
                        "round %d: rejected update of client %d: %s",
                        round_number,
                        outcome.client_id,
                        exc,
                    )
                else:
                    weight = self.algorithm.aggregation_weight(outcome)
                    aggregator.add(outcome.update, weight)
                    loss_sum += outcome.train_loss * outcome.num_examples
                    weight_sum += outcome.num_examples
                    accepted = True
            self.listener.client_done(outcome, accepted)
        if aggregator.count > 0:
            state = self.algorithm.server_update(state, aggregator.result())
        else:
            log.warning("round %d: no client update was accepted; model unchanged", round_number)
        state = replace(state, round=round_number)
        evaluation = self.evaluator(state.params) if self.evaluator else None
        record = RoundRecord(
            round=round_number,
            test_accuracy=evaluation.accuracy if evaluation else math.nan,
            test_loss=evaluation.loss if evaluation else math.nan,
            train_loss=loss_sum / weight_sum if weight_sum else math.nan,
            clients_sampled=len(sampled),
            clients_completed=aggregator.count,
            clients_failed=failed,
            clients_rejected=rejected,
            bytes_down=num_bytes(state.params) * len(sampled),
            bytes_up=bytes_up,
            wall_seconds=time.perf_counter() - start,
        )
        self.listener.round_finished(record)
        return state, record

    def run_round_with_retries(
        self,
        state: ServerState,
        min_completed: int,
        max_retries: int,
        before_attempt: Callable[[], object] = lambda: None,
    ) -> tuple[ServerState, RoundRecord]:
        """Run the next round; if fewer than ``min_completed`` results are accepted, discard
        it and re-sample, up to ``max_retries`` times. ``before_attempt`` runs before every
        attempt (the network server waits there for enough connected clients)."""
        for attempt in range(max_retries + 1):
            before_attempt()
            new_state, record = self.run_round(state, attempt)
            if record.clients_completed >= min_completed:
                return new_state, record
            log.warning(
                "round %d attempt %d: %d accepted results (< %d)%s",
                record.round,
                attempt,
                record.clients_completed,
                min_completed,
                "; re-sampling" if attempt < max_retries else "",
            )
        raise FedforgeError(
            f"round {state.round + 1} got fewer than {min_completed} accepted results in "
            f"{max_retries + 1} attempts"
        )
