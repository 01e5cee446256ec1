"""Per-agent physical parameters: where non-IID comes from in federated RL.

An :class:`EnvSpec` names the environment, the episode horizon and, for any physical
parameter, a uniform range it is spread over across agents (the others stay at gymnasium's
values). Agent ``k``'s parameters are drawn from their own random stream, keyed by the run seed
and ``k`` alone (``RngStreams(seed).generator(Purpose.ENVIRONMENT, 0, k)``), so they do not
depend on how many agents there are or where the agent runs: a networked client computes its
own from its id and the seed. The held-out evaluation set (``heldout`` rows, drawn from
``heldout_spread`` or, if that is empty, from ``spread``) comes from a separate stream
(``Purpose.ENVIRONMENT, 1``), so it never coincides with an agent's draw.

Example: pole lengths (gymnasium's ``length``, half the pole) uniform in [0.35, 0.65]::

    EnvSpec(env_id="CartPole-v1", spread={"length": (0.35, 0.65)})
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedforge.core.rng import Purpose, RngStreams
from fedforge.rl.envs import BatchEnv, batch_env

AGENT_STREAM = 0
HELDOUT_STREAM = 1


class EnvSpec(BaseModel):
    """An agent's environment: a gymnasium id, the horizon and the parameter distribution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env_id: Literal["CartPole-v1", "Acrobot-v1"] = "CartPole-v1"
    max_episode_steps: int = Field(500, ge=1, description="episodes are truncated after this")
    spread: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="parameter -> (low, high), uniform across agents"
    )
    heldout_spread: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="held-out evaluation ranges (empty: as spread)"
    )
    heldout: int = Field(10, ge=0, description="number of held-out parameter settings")

    @model_validator(mode="after")
    def _check_ranges(self) -> EnvSpec:
        env = batch_env(self.env_id)
        for label, ranges in (("spread", self.spread), ("heldout_spread", self.heldout_spread)):
            for name, (low, high) in ranges.items():
                if name not in env.parameters:
                    raise ValueError(
                        f"{label}: {self.env_id} has no physical parameter {name!r}; "
                        f"choose from {', '.join(env.parameters)}"
                    )
                if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
                    raise ValueError(
                        f"{label}.{name}: need finite 0 < low <= high, got ({low}, {high})"
                    )
        return self

    @property
    def env(self) -> BatchEnv:
        return batch_env(self.env_id)


def _draw(
    env: BatchEnv, ranges: dict[str, tuple[float, float]], rng: np.random.Generator, rows: int
) -> torch.Tensor:
    """``rows`` parameter rows: each spread parameter uniform in its range (drawn in the
    order of ``env.parameters``), the others at gymnasium's defaults."""
    table = np.tile(np.asarray(env.defaults, dtype=np.float64), (rows, 1))
    for column, name in enumerate(env.parameters):
        if name in ranges:
            low, high = ranges[name]
            table[:, column] = rng.uniform(low, high, size=rows)
    return torch.from_numpy(table)


def agent_physics(spec: EnvSpec, agents: Sequence[int], seed: int) -> torch.Tensor:
    """The physical parameters (len(agents), P) float64 of the given agent ids."""
    streams = RngStreams(seed)
    rows = [
        _draw(spec.env, spec.spread, streams.generator(Purpose.ENVIRONMENT, AGENT_STREAM, k), 1)
        for k in agents
    ]
    if not rows:
        return torch.zeros(0, len(spec.env.parameters), dtype=torch.float64)
    return torch.cat(rows)


def heldout_physics(spec: EnvSpec, seed: int) -> torch.Tensor:
    """The held-out evaluation parameters (spec.heldout, P) float64."""
    rng = RngStreams(seed).generator(Purpose.ENVIRONMENT, HELDOUT_STREAM)
    return _draw(spec.env, spec.heldout_spread or spec.spread, rng, spec.heldout)
