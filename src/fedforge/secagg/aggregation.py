"""Secure aggregation as an aggregation kind (``secure_sum``): the driver runs one
:class:`~fedforge.secagg.server.SecAggRound` per round instead of summing records itself.

Weights are decided by the server, as for every kind (the algorithm's weighting, bounded by
the stages, from each client's validated example count), scaled so the largest is 1, and
sent to each client, which multiplies its clipped record by its weight before masking. The
aggregate is the masked sum times the scale over the survivors' total weight: the weighted
mean, computed without the server seeing any single record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedforge.aggregate.kinds import Accumulator, Aggregate, Kind
from fedforge.core.errors import ConfigError, FedforgeError
from fedforge.core.records import RecordBatch, RecordSpec, Task
from fedforge.secagg.protocol import STEPS, SecAggAbort, SecAggParams
from fedforge.secagg.records import Layout, SecureSum
from fedforge.secagg.server import SecAggRound

CLIP_KEY = "clip.norm"  # the clip stage's broadcast norm, when a clip stage runs
NOISE_KEY = "ddg.noise_std"  # distributed DP: the noise stddev the sum must carry
RHO = "ddg.rho"  # ... and what the release cost (zCDP), for the accountant

log = logging.getLogger("fedforge")


@dataclass(frozen=True)
class SecureAggregation:
    """SecAgg+ over the round's clients; ``require_identities``: every client must sign its
    keys with its certificate (deployment), which the server verifies itself against the
    run's CA (``ca_pem``) and each client's certificate name (``names``, by client id)."""

    params: SecAggParams = field(default_factory=SecAggParams)
    require_identities: bool = False
    withhold_metrics: bool = False  # distributed DP: fit replies carry no loss or count
    ca_pem: bytes | None = None
    names: Mapping[int, str] = field(default_factory=dict)
    kind: Kind = "secure_sum"
    name: str = "secagg"

    def accumulator(self) -> Accumulator:
        raise FedforgeError("secure aggregation has no accumulator: the driver runs a session")

    def session(
        self,
        round_number: int,
        weights: Mapping[int, float],
        spec: RecordSpec,
        broadcast: Mapping[str, float],
        describe: Callable[[int], str] = str,
    ) -> tuple[SecAggRound, float]:
        """A session over the clients in ``weights`` (their aggregation weights); returns it
        and the weight scale (the largest weight)."""
        scale = max(weights.values())
        clip = min(self.params.clip_norm, broadcast.get(CLIP_KEY, self.params.clip_norm))
        session = SecAggRound(
            self.params,
            round_number,
            sorted(weights),
            {c: w / scale for c, w in weights.items()},
            Layout.of(spec),
            clip,
            require_identities=self.require_identities,
            noise_std=broadcast.get(NOISE_KEY, 0.0),
            ca_pem=self.ca_pem,
            names=self.names,
            describe=describe,
        )
        return session, scale

    @staticmethod
    def aggregate(result: SecureSum, weights: Mapping[int, float], scale: float) -> Aggregate:
        """The weighted mean from the secure sum of ``weight / scale * record``."""
        total = sum(weights[c] for c in result.survivors)
        arrays = {
            name: (values * (scale / total)).astype(result.dtypes[name])
            for name, values in result.arrays.items()
        }
        scalars = dict(result.scalars)
        if result.rho > 0:
            scalars[RHO] = result.rho
        return Aggregate(
            arrays,
            scalars,
            len(result.survivors),
            total,
            client_ids=list(result.survivors),
        )


class StepExchange(Protocol):
    """What one exchange reports back (the driver's exchange outcome)."""

    failed: list[int]
    rejected: list[int]
    bytes_up: int
    server_seconds: float


Check = Callable[[RecordBatch], tuple[np.ndarray, list[str | None]]]
Exchange = Callable[[list[Task], Check, Callable[[RecordBatch], None]], StepExchange]


@dataclass
class SessionOutcome:
    """One round's secure session as the driver records it."""

    result: SecureSum | None = None  # None: aborted (the model stays unchanged)
    failed: list[int] = field(default_factory=list)  # clients that failed a step
    excluded: dict[int, str] = field(default_factory=dict)  # culprits the server excluded
    refused: str | None = None  # the sum was impossible (or a culprit made it unrecoverable)
    bytes_up: int = 0
    bytes_down: int = 0
    server_seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


def run_session(
    session: SecAggRound, seeds: Mapping[int, int], exchange: Exchange
) -> SessionOutcome:
    """The four steps of ``session``, each one exchange through the driver (``exchange``
    validates replies with the given check and hands the accepted ones over); an abort is
    logged and returns no result. A client whose reply breaks the protocol is excluded and
    named in ``excluded`` with the reason; one that fails or times out, in ``failed``."""
    out = SessionOutcome(
        metrics={"secagg.degree": session.degree, "secagg.threshold": session.threshold}
    )
    logged: set[int] = set()  # the exchange logged their rejected replies
    try:
        for step in STEPS:
            done = exchange(
                session.tasks(step, seeds), _step_check(session, step), _step_accept(session, step)
            )
            out.bytes_up += done.bytes_up
            out.server_seconds += done.server_seconds
            out.failed.extend(done.failed + [c for c in done.rejected if c not in session.excluded])
            logged.update(done.rejected)
        out.result = session.result()
    except (SecAggAbort, ConfigError) as exc:  # a session that cannot complete safely
        if isinstance(exc, SecAggAbort):
            for cid, reason in exc.culprits.items():
                session.excluded.setdefault(cid, reason)
            if exc.impossible or exc.culprits:
                out.refused = str(exc)  # the driver says it refused the round
        if out.refused is None:
            log.warning("round %d: %s", session.round, exc)
    out.excluded = dict(session.excluded)
    for cid, reason in sorted(out.excluded.items()):
        if cid in logged:
            continue
        log.warning(
            "round %d: secure aggregation excluded %s: %s",
            session.round,
            session.describe(cid),
            reason,
        )
    out.bytes_down = session.shared_bytes
    if out.result is not None and session.reports_clipped:
        out.metrics["secagg.clipped"] = out.result.clipped
    return out


def _step_check(session: SecAggRound, step: str) -> Check:
    """A step's replies checked by the session, record by record."""

    def check(batch: RecordBatch) -> tuple[np.ndarray, list[str | None]]:
        reasons = [session.check(step, batch.row(i)) for i in range(len(batch))]
        for cid, reason in zip(batch.client_ids, reasons, strict=True):
            if reason is not None:
                session.exclude(int(cid), reason)
        return np.array([r is None for r in reasons], bool), reasons

    return check


def _step_accept(session: SecAggRound, step: str) -> Callable[[RecordBatch], None]:
    def accept(batch: RecordBatch) -> None:
        for i in range(len(batch)):
            session.accept(step, batch.row(i))

    return accept
