"""A round's fit under secure aggregation: clients train and keep their records, then the
four SecAgg+ exchanges run through the driver's exchange (the same validation, accounting
and failure handling as every exchange); the driver applies the aggregate."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedforge.aggregate.guard import Refusal, aggregate_problem
from fedforge.aggregate.kinds import Aggregate
from fedforge.core.errors import ConfigError
from fedforge.core.records import FIT, RecordBatch, Task
from fedforge.runtime.exchange import Accept, Check, Exchanged
from fedforge.secagg.aggregation import SecureAggregation, run_session
from fedforge.secagg.protocol import SecAggAbort

if TYPE_CHECKING:
    from fedforge.runtime.driver import Driver

log = logging.getLogger("fedforge")


def secure_fit(
    driver: Driver,
    secure: SecureAggregation,
    tasks: list[Task],
    broadcast: dict[str, float],
    metrics: dict[str, float],
    clients: dict[str, list[int]],
    notes: dict[str, str],
) -> tuple[Exchanged, Aggregate | None, int, Refusal | None]:
    """The fit exchange (clients train and keep their records), then the four
    secure-aggregation exchanges; returns the fit's outcome with the survivors as its
    accepted clients, the aggregate (None when the session aborted), the bytes the
    secure-aggregation tasks sent down, and a refusal when the sum was impossible or a
    culprit made it unrecoverable. Clients the session excluded are listed in
    ``clients.secagg_excluded``, with the reasons in the round's label
    ``secagg.excluded``."""
    weights: dict[int, float] = {}

    def accept_fit(batch: RecordBatch) -> None:
        for cid, w in zip(batch.client_ids, driver._weights(batch), strict=True):
            weights[int(cid)] = float(w)

    check = driver._spec_check(driver.fit_reply_spec, FIT)
    fit = driver._exchange(tasks, check, accept_fit, driver.listener)
    if not weights:
        return fit, None, 0, None
    round_number = tasks[0].round
    try:
        session, scale = secure.session(
            round_number, weights, driver.fit_spec, broadcast, driver.describe
        )
    except (SecAggAbort, ConfigError) as exc:  # e.g. fewer than 2 clients trained
        log.warning("round %d: %s", round_number, exc)
        clients["secagg_dropped"] = sorted(weights)
        fit.accepted, fit.accepted_ids = 0, []
        return fit, None, 0, None

    def exchange(step_tasks: list[Task], check: Check, accept: Accept) -> Exchanged:
        return driver._exchange(step_tasks, check, accept, None)

    outcome = run_session(session, {t.client_id: t.seed for t in tasks}, exchange)
    fit.bytes_up += outcome.bytes_up
    fit.server_seconds += outcome.server_seconds
    metrics.update(outcome.metrics)
    survivors = outcome.result.survivors if outcome.result is not None else []
    clients["secagg_dropped"] = sorted(set(weights) - set(survivors))  # not in the sum
    clients["secagg_failed"] = sorted(outcome.failed)  # failed a step (maybe after masking)
    clients["secagg_excluded"] = sorted(outcome.excluded)  # broke the protocol
    if outcome.excluded:
        notes["secagg.excluded"] = "; ".join(
            f"{driver.describe(c)}: {why}" for c, why in sorted(outcome.excluded.items())
        )
    fit.accepted, fit.accepted_ids = len(survivors), list(survivors)
    refusal = None
    if outcome.refused is not None:  # retried without every culprit the session named
        refusal = Refusal(outcome.refused, dict(outcome.excluded))
    if outcome.result is None:
        return fit, None, outcome.bytes_down, refusal
    aggregate = secure.aggregate(outcome.result, weights, scale)
    problem = aggregate_problem(aggregate.arrays)
    if refusal is None and problem is not None:
        refusal = Refusal(problem)
    return fit, aggregate, outcome.bytes_down, refusal
