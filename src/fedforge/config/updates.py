"""What happens to an update between client and model: stages, privacy, aggregation,
secure aggregation and simulated attacks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedforge.aggregate.gather import Rule
from fedforge.config.base import Section
from fedforge.secagg.protocol import SecAggParams


class UpdateConfig(Section):
    """Client-side update stages, and the compression of what travels each way."""

    clip_norm: float | None = Field(None, gt=0, description="clip each record to this L2 norm")
    codec: Literal[
        "none", "float16", "bfloat16", "q8", "q4", "rotated_q4", "rotated_q2", "topk"
    ] = Field("none", description="compress each update on the client (bytes up are encoded)")
    codec_block: int = Field(256, ge=1, description="q8, q4: coordinates sharing one scale")
    topk_fraction: float = Field(0.01, gt=0, le=1, description="topk: share of coordinates sent")
    error_feedback: bool | None = Field(
        None, description="keep what the codec lost in client state (default: on for topk)"
    )
    downlink: Literal["none", "float16", "bfloat16"] = Field(
        "none", description="compress the broadcast model (bytes down are the encoded ones)"
    )

    @property
    def uses_error_feedback(self) -> bool:
        if self.error_feedback is None:
            return self.codec == "topk"
        return self.error_feedback


class PrivacyConfig(Section):
    """Differential privacy (off by default). ``central``: clients clip, the server noises the
    sum (DP-FedAvg); ``local``: each client clips and noises its own update; ``sample``:
    DP-SGD inside each client through Opacus (per-example privacy of each client's data);
    ``distributed``: with secure aggregation, each client adds discrete Gaussian noise in the
    ring, so the server only sees a noised sum."""

    mode: Literal["off", "central", "local", "sample", "distributed"] = "off"
    noise_multiplier: float | None = Field(None, gt=0, description="noise stddev / clip norm")
    target_epsilon: float | None = Field(
        None, gt=0, description="central: calibrate the noise so the run ends at this epsilon"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta epsilon is reported at")
    clip_norm: float = Field(
        1.0, gt=0, description="update L2 bound (initial one when adaptive); sample: per example"
    )
    adaptive_clip: bool = Field(False, description="central: adapt the clip norm to a quantile")
    target_quantile: float = Field(0.5, ge=0, le=1, description="adaptive: unclipped share")
    clip_learning_rate: float = Field(0.2, gt=0, description="adaptive: geometric step")
    count_stddev: float | None = Field(
        None, gt=0, description="adaptive: clipped-count noise (default expected clients / 20)"
    )
    accountant: Literal["pld", "rdp"] = "pld"
    weighting: Literal["uniform", "capped"] = Field(
        "uniform", description="central: every client weight 1, or min(examples / cap, 1)"
    )
    weight_cap: float | None = Field(None, gt=0, description="capped: examples for weight 1")
    seeded_noise: bool = Field(
        False, description="reproducible noise from the run seed (research only, predictable)"
    )

    def problems(self) -> list[str]:
        """Cross-key errors within this section."""
        if self.mode == "off":
            return []
        out = []
        calibrated = self.mode == "central" and self.target_epsilon is not None
        if (self.noise_multiplier is None) == (not calibrated):
            out.append(
                "privacy: set exactly one of privacy.noise_multiplier and "
                "privacy.target_epsilon (target_epsilon calibrates central DP only)"
                if self.mode == "central"
                else f"privacy.noise_multiplier is required with privacy.mode = {self.mode!r}"
            )
        if self.mode != "central":
            for key in ("adaptive_clip", "target_epsilon", "weight_cap"):
                if getattr(self, key) not in (None, False):
                    out.append(f"privacy.{key} applies to privacy.mode = 'central' only")
            if self.weighting != "uniform":
                out.append("privacy.weighting applies to privacy.mode = 'central' only")
        if self.weighting == "capped" and self.weight_cap is None:
            out.append("privacy.weighting = 'capped' needs privacy.weight_cap (examples)")
        return out


class AggregationConfig(Section):
    """How accepted records are combined: the weighted mean, secure aggregation
    (``secure_sum``: the server learns only the sum, see ``[secagg]``), or a Byzantine-robust
    rule."""

    kind: Literal["mean", "secure_sum", Rule] = "mean"
    max_weight: float | None = Field(None, gt=0, description="mean: cap on one client's weight")
    byzantine: int = Field(0, ge=0, description="krum, multi_krum, bulyan: attackers tolerated")
    trim: float = Field(0.1, ge=0, lt=0.5, description="trimmed_mean: share cut at each end")
    multi_krum: int = Field(2, ge=1, description="multi_krum: updates averaged")
    max_norm: float | None = Field(None, gt=0, description="norm_bound: fixed L2 bound")
    norm_quantile: float | None = Field(
        None, gt=0, le=1, description="norm_bound: bound at this quantile of the round's norms"
    )
    tau: float = Field(1.0, gt=0, description="centered_clipping: clipping radius")
    iterations: int = Field(3, ge=1, description="centered_clipping: iterations")
    sigma: float = Field(
        0.06, gt=0, description="fedpg_br: bound on one trajectory's gradient deviation"
    )
    delta: float = Field(0.6, gt=0, lt=1, description="fedpg_br: the filter's failure probability")
    alpha: float = Field(0.3, ge=0, lt=0.5, description="fedpg_br: faulty share tolerated")
    outlier_ratio: float | None = Field(
        None,
        ge=0,
        description="refuse a round with a record whose update norm exceeds this many times "
        "the round's median norm, and retry it without that client (default: 10 in "
        "deployment, off in simulation; 0: off)",
    )
    max_refused: int = Field(
        3, ge=0, description="refused aggregates of one round before the run stops (an error)"
    )


class SecAggConfig(Section):
    """Secure aggregation (SecAgg+), used when ``aggregation.kind = 'secure_sum'``."""

    ring_bits: Literal[16, 32, 64] = Field(32, description="the ring the masked sum lives in")
    rotation: bool = Field(
        False, description="rotate records first (randomized Hadamard): 16-bit rings need it"
    )
    security: float = Field(3.0, gt=0, description="graph degree = security * log2(clients)")
    complete_graph: bool = Field(False, description="every client shares with every client")
    threshold: float = Field(
        0.5, ge=0.5, lt=1, description="shares needed: floor(threshold * neighbourhood) + 1"
    )
    clip_norm: float = Field(
        10.0, gt=0, description="records are clipped to this L2 norm (or the clip stage's)"
    )
    scalar_bound: float = Field(65536.0, ge=1, description="largest summed scalar (a count)")

    def params(self) -> SecAggParams:
        return SecAggParams(
            ring_bits=self.ring_bits,
            security=self.security,
            complete=self.complete_graph,
            threshold=self.threshold,
            clip_norm=self.clip_norm,
            scalar_bound=self.scalar_bound,
            rotation=self.rotation,
        )


class AttackConfig(Section):
    """A simulated attack (simulation only): a seeded ``fraction`` of the clients attacks."""

    kind: Literal[
        "none", "label_flip", "backdoor", "sign_flip", "scaled", "gaussian", "alie", "ipm"
    ] = "none"
    fraction: float = Field(0.2, ge=0, lt=1, description="share of clients that attack")
    scale: float = Field(10.0, gt=0, description="sign_flip, scaled: factor on the update")
    std: float = Field(1.0, gt=0, description="gaussian: stddev of the noise update")
    epsilon: float = Field(0.5, gt=0, description="ipm: -epsilon x the honest mean")
    target_label: int = Field(0, ge=0, description="backdoor: label the trigger maps to")
    poison_fraction: float = Field(
        0.5, gt=0, le=1, description="backdoor: share of an attacker's examples poisoned"
    )
    overclaim: float = Field(
        1.0, ge=1, description="attackers claim this many times their example count"
    )
