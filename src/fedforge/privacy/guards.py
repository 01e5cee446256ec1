"""What the driver refuses before the first round of a run with differential privacy, so the
Python API gets the refusals a configuration gets when it loads (``config/checks.py``).

- Central DP: the clients summed must be a sample its accountant bounds
  (``privacy/amplification.py``), and the aggregation must add every accepted clipped record
  with its bounded weight: the weighted mean without a weight cap, or the secure sum. A
  robust rule (the median moves by several clip norms when one record changes), a weight cap
  (a share of the realized total) or a simulated attack that rewrites records after the
  server's re-clip (ALIE, IPM) breaks the sensitivity the accountant assumes. So does refusing
  outlying records (a round retried without a client because of its record's norm).
- Central DP over secure aggregation: each record is stochastically rounded to the ring's
  ``2^-f`` grid after it is clipped, which can move it by up to ``sqrt(D) 2^-f``, and the
  server cannot re-clip a masked record. The noise stage's ``record_bound`` (in clip norms)
  must cover the clip plus that, for the largest cohort the sampler can draw.
- Distributed DP adds its noise inside secure aggregation: nothing else can run it.
- A resumed run keeps its privacy mode (and DP-SGD its delta and accountant).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from fedforge.aggregate.kinds import Aggregation
from fedforge.compress.rotation import rotation_shape
from fedforge.config.checks import OUTLIERS_UNDER_CENTRAL_DP as OUTLIERS_UNDER_CENTRAL_DP
from fedforge.report.history import RoundRecord
from fedforge.secagg.aggregation import CLIP_KEY, SecureAggregation
from fedforge.secagg.protocol import ROTATION_BLOCK, SecAggParams
from fedforge.secagg.ring import frac_bits, rotated_bound
from fedforge.stages.base import Stage
from fedforge.stages.clip import ADAPTIVE_FLOOR, AdaptiveClip, FixedClip
from fedforge.stages.dp_noise import CentralGaussian, DistributedGaussian

# Central DP over secure aggregation accounts each record at up to 1 + this many clip norms
# (configured runs; privacy/setup.py): a configuration whose rounding can add more is refused.
SECURE_SUM_SLACK = 0.01


def aggregation_problem(aggregation: Aggregation) -> str | None:
    """Why central DP's noised sum cannot follow ``aggregation`` (None: it can)."""
    if isinstance(aggregation, SecureAggregation):
        return None
    plain = getattr(aggregation, "inner", None) is None
    if aggregation.kind == "mean" and plain and getattr(aggregation, "max_weight", None) is None:
        return None
    return (
        f"central DP cannot follow the aggregation {aggregation.name!r}: its sensitivity is "
        "one clip norm only for the weighted mean without max_weight or the secure sum (a "
        "robust rule, a weight cap or an attack that rewrites records after the clip moves "
        "the result by more)"
    )


def rounding_excess(
    params: SecAggParams, array_size: int, clients: int, clip: float, floor: float | None = None
) -> float:
    """The most stochastic rounding can add to a record's norm in secure aggregation, over
    the norm it was clipped to: ``sqrt(D) 2^-f / clip``, ``f`` the fractional bits a session
    of ``clients`` picks for records clipped to ``clip`` (as ``SecAggRound.mask_params``).

    ``floor``: the clip norm moves (adaptive clipping) but stays at or above ``floor``; then
    the bound that holds at every such norm: ``f`` is the largest integer with
    ``B 2^f < room`` (``B`` the coordinate bound, ``room = 2^(bits-1) / clients - 1``) and at
    most ``52 - ceil(log2 B)`` (``ring.frac_bits``), so ``2^-f <= max(2B / room,
    max(2B, 1) 2^-52)``, and ``B`` is proportional to the norm."""
    if params.rotation:
        size, words = rotation_shape(array_size, ROTATION_BLOCK)
        spread = rotated_bound(1.0, size)  # a rotated coordinate's bound per unit of norm
    else:
        words, spread = array_size, 1.0
    if floor is None:
        bits = frac_bits(params.ring_bits, spread * clip, clients)
        return math.sqrt(words) * 2.0**-bits / clip
    room = 2.0 ** (params.ring_bits - 1) / clients - 1
    return math.sqrt(words) * max(2 * spread / room, 2.0**-52 * max(2 * spread, 1 / floor))


def record_bound_needed(
    aggregation: SecureAggregation, clip: FixedClip, array_size: int, clients: int
) -> float:
    """The largest norm, in clip norms, a clipped record can have in the secure sum."""
    params = aggregation.params
    # The session clips to the smaller of its own norm and the clip stage's (when that
    # stage broadcasts under CLIP_KEY); the clip stage already bounded the record by its norm.
    follows_stage = f"{clip.name}.norm" == CLIP_KEY
    if isinstance(clip, AdaptiveClip):
        lowest = clip.norm * ADAPTIVE_FLOOR
        floor = min(params.clip_norm, lowest) if follows_stage else params.clip_norm
        excess = rounding_excess(params, array_size, clients, params.clip_norm, floor)
        # relative to the session's norm, which is at most the stage's (or to the lowest)
        return 1 + (excess if follows_stage else excess * params.clip_norm / lowest)
    session = min(params.clip_norm, clip.norm) if follows_stage else params.clip_norm
    excess = rounding_excess(params, array_size, clients, session)
    return 1 + excess * session / clip.norm


def privacy_problem(
    stages: Sequence[Stage],
    aggregation: Aggregation,
    array_size: int,
    largest_cohort: int,
) -> str | None:
    """Why these privacy stages cannot run with ``aggregation`` (None: they can);
    ``array_size`` is the coordinates of a fit record, ``largest_cohort`` the most clients
    one round can sum."""
    for stage in stages:
        if isinstance(stage, DistributedGaussian) and not isinstance(
            aggregation, SecureAggregation
        ):
            return "distributed DP adds its noise inside secure aggregation: use SecureAggregation"
        if not isinstance(stage, CentralGaussian):
            continue
        problem = aggregation_problem(aggregation)
        if problem or not isinstance(aggregation, SecureAggregation):
            return problem
        clips = [s for s in stages if isinstance(s, FixedClip) and s.name == stage.clip]
        if not clips:
            return f"central DP needs its clip stage {stage.clip!r} before it"
        needed = record_bound_needed(aggregation, clips[0], array_size, largest_cohort)
        if needed > stage.record_bound * (1 + 1e-12):
            return (
                f"central DP over secure aggregation: stochastic rounding in the "
                f"{aggregation.params.ring_bits}-bit ring can push a record of {array_size} "
                f"coordinates to {needed:.4g} clip norms with {largest_cohort} clients, "
                f"above the {stage.record_bound:g} accounted: set secagg.ring_bits = 32 or 64, "
                "or sample fewer clients per round (Python API: CentralGaussian.record_bound)"
            )
    return None


def privacy_mode(labels: Mapping[str, str]) -> str:
    """The privacy mode a round's labels record (``off`` without one)."""
    mode = labels.get("dp.mode")
    return mode.split()[0] if mode else "off"


def resume_problem(history: Sequence[RoundRecord], labels: Mapping[str, str]) -> str | None:
    """Why a run whose rounds so far are ``history`` cannot go on with a privacy chain that
    records ``labels`` (None: it can). The ledger of one mode says nothing of another's
    releases, and rounds that ran without privacy cannot be taken back: the mode stays, and so
    does whether the noise is seeded (predictable from the run seed) or not. DP-SGD
    keeps each client's ledger on the client; its delta and accountant stay too (the other
    modes' ledgers check theirs: ``stages/dp_noise.py``)."""
    done = [r for r in history if r.round > 0]
    if not done:
        return None
    last = done[-1]
    before, now = privacy_mode(last.labels), privacy_mode(labels)
    if before != now:
        return (
            f"this run's {last.round} rounds so far ran with privacy.mode = {before!r}; "
            f"resuming it with {now!r} would leave their privacy loss unaccounted: resume "
            "with the same privacy.mode, or start a new run"
        )
    seeded = ["SEEDED" in labels_.get("dp.noise", "") for labels_ in (last.labels, labels)]
    if seeded[0] != seeded[1]:
        return (
            "this run's noise was "
            + ("seeded from the run seed" if seeded[0] else "drawn from os.urandom")
            + " so far; resuming it with privacy.seeded_noise = "
            + ("false" if seeded[0] else "true")
            + " would change what its epsilon means: resume with the same setting, or start a "
            "new run"
        )
    for key in ("dp.delta", "dp.accountant"):
        old, new = last.labels.get(key), labels.get(key)
        if now == "sample" and old is not None and new is not None and old != new:
            return (
                f"DP-SGD's {key} changed since this run started ({old} -> {new}): its "
                "clients' epsilons so far were reported with the old one; resume with the "
                "same privacy settings, or start a new run"
            )
    return None
