"""Secure aggregation as an aggregation kind (``secure_sum``): the driver runs one
:class:`~fedforge.secagg.server.SecAggRound` per round instead of summing records itself.

Weights are decided by the server, as for every kind (the algorithm's weighting, bounded by
the stages, from each client's validated example count), scaled so the largest is 1, and
sent to each client, which multiplies its clipped record by its weight before masking. The
aggregate is the masked sum times the scale over the survivors' total weight: the weighted
mean, computed without the server seeing any single record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fedforge.aggregate.kinds import Accumulator, Aggregate, Kind
from fedforge.core.errors import FedforgeError
from fedforge.core.records import RecordSpec
from fedforge.secagg.protocol import SecAggParams
from fedforge.secagg.server import Layout, SecAggRound, SecureSum

CLIP_KEY = "clip.norm"  # the clip stage's broadcast norm, when a clip stage runs
NOISE_KEY = "ddg.noise_std"  # distributed DP: the noise stddev the sum must carry
RHO = "ddg.rho"  # ... and what the release cost (zCDP), for the accountant


@dataclass(frozen=True)
class SecureAggregation:
    """SecAgg+ over the round's clients; ``require_identities``: every client must sign its
    keys with its certificate (deployment)."""

    params: SecAggParams = field(default_factory=SecAggParams)
    require_identities: bool = False
    withhold_metrics: bool = False  # distributed DP: fit replies carry no loss or count
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
