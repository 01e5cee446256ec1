"""A round's fit without secure aggregation: every accepted record is decoded and summed as
it arrives; the aggregate is refused when the records include an outlier (the driver's
``outliers`` bound) or when it is not finite (``aggregate/guard.py``)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from fedforge.aggregate.guard import Refusal, aggregate_problem, record_norms
from fedforge.aggregate.kinds import Aggregate, StreamingMean
from fedforge.algorithms.base import ServerState
from fedforge.core.records import FIT, RecordBatch, Task
from fedforge.runtime.exchange import Exchanged

if TYPE_CHECKING:
    from fedforge.runtime.driver import Driver


def plain_fit(
    driver: Driver, tasks: list[Task], state: ServerState
) -> tuple[Exchanged, Aggregate | None, Refusal | None]:
    """The fit exchange and its aggregate (None when no record arrived), or the refusal."""
    accumulator = driver.aggregation.accumulator()
    norms: dict[int, float] = {}
    steps: dict[int, int] = {}
    program = driver.algorithm.program()

    # A mean of records that no stage decodes and no outlier bound inspects checks their
    # values in the same pass that sums them.
    fused = (
        isinstance(accumulator, StreamingMean)
        and not driver.stages.decodes
        and driver.outliers is None
    )
    # A mean of records that only a codec decodes sums them from their encoded form (each
    # row decoded into a small buffer, or top-k's entries alone) when the codec can.
    summed = (
        isinstance(accumulator, StreamingMean) and driver.stages.decodes and driver.outliers is None
    )

    def accept(batch: RecordBatch) -> list[str | None] | None:
        if fused:
            assert isinstance(accumulator, StreamingMean)
            return accumulator.add_finite(batch, driver._weights(batch))
        if summed and len(batch) > 1:
            assert isinstance(accumulator, StreamingMean)
            weights = driver._weights(batch)
            if accumulator.add_summed(batch, weights, partial(driver.stages.weighted_sum, batch)):
                return None
        decoded = driver.stages.decode(batch, state.stage_states)
        if driver.outliers is not None:
            rows = zip(decoded.client_ids, record_norms(decoded), decoded.num_examples, strict=True)
            for cid, norm, n in rows:
                norms[int(cid)] = float(norm)
                steps[int(cid)] = program.num_steps(int(n))
        accumulator.add(decoded, driver._weights(decoded))
        return None

    check = driver._spec_check(driver.fit_spec, FIT, arrays=not fused)
    fit = driver._exchange(tasks, check, accept, driver.listener)
    offenders = {} if driver.outliers is None else driver.outliers.offenders(norms, steps)
    if offenders:
        named = ", ".join(f"{driver.describe(c)}: {why}" for c, why in offenders.items())
        return fit, None, Refusal(f"outlying updates ({named})", offenders)
    if not accumulator.count:
        return fit, None, None
    aggregate = accumulator.result()
    # A mean of records is no larger than its largest record (when their norms are known).
    bound = max(norms.values()) if driver.aggregation.kind == "mean" and norms else None
    problem = aggregate_problem(aggregate.arrays, bound)
    return fit, aggregate, None if problem is None else Refusal(problem)
