"""The ``[rl]`` section: federated reinforcement learning, where an agent's data is its
environment (:mod:`fedforge.rl.workload` turns it into a workload)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fedforge.config.base import Section

RLMethod = Literal["fedavg", "fedpg", "fedpg_br"]


class RLConfig(Section):
    """Agents, their environments and their policy-gradient work.

    ``method``: ``fedavg`` averages the agents' policies after ``iterations`` local ascent
    steps (``client.lr``); ``fedpg`` has each agent report its gradient estimate at the
    global policy and the server step along the mean (``server.optimizer``, ``server.lr``);
    ``fedpg_br`` adds FedPG-BR's server: the Byzantine filter (``aggregation.kind =
    'fedpg_br'``) and SCSG steps (each a ``server.optimizer`` step) on the server's own
    environment.

    ``estimator`` defaults to ``gpomdp``, and under ``fedpg_br`` to ``standardized`` (the
    FedPG-BR authors' estimator: its scale stays fixed, so the filter's fixed radius
    ``aggregation.sigma = 0.06`` keeps the honest agents all run long)."""

    env: Literal["CartPole-v1", "Acrobot-v1"] = "CartPole-v1"
    agents: int = Field(2, ge=1, description="simulation: the number of agents")
    max_episode_steps: int = Field(500, ge=1, description="episodes are truncated here")
    spread: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="physical parameter -> (low, high): uniform across agents, seeded",
    )
    heldout: int = Field(4, ge=0, description="held-out physics settings (central evaluation)")
    heldout_spread: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="the held-out ranges (empty: spread)"
    )
    agent: int | None = Field(
        None, ge=0, description="deployment: this agent's draw from spread (its id)"
    )
    physics: dict[str, float] = Field(
        default_factory=dict, description="deployment: this agent's own physical parameters"
    )
    method: RLMethod = "fedavg"
    episodes: int = Field(10, ge=1, description="trajectories per local iteration")
    iterations: int = Field(1, ge=1, description="fedavg: local ascent steps per round")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="fedavg: the local optimizer")
    discount: float = Field(0.999, gt=0, le=1)
    estimator: Literal["reinforce", "gpomdp", "standardized"] = "gpomdp"
    baseline: bool = True
    penalty: Literal["none", "kl", "prox"] = Field(
        "none", description="fedavg: a penalty toward the global policy (FedKL, FedProx)"
    )
    penalty_coef: float = Field(0.0, ge=0, description="the penalty's weight")
    hidden: list[int] = Field(default_factory=lambda: [16, 16])
    eval_episodes: int = Field(5, ge=1, description="episodes per evaluation")
    faulty: int = Field(0, ge=0, description="simulation: agents 0..faulty-1 are faulty")
    fault: Literal["random_noise", "random_action", "sign_flip"] = "sign_flip"
    mini_batch: int = Field(4, ge=1, description="fedpg_br: the server's trajectories per step")
    max_inner_steps: int = Field(
        20, ge=1, description="fedpg_br: cap on the geometric number of SCSG steps"
    )

    @model_validator(mode="before")
    @classmethod
    def _method_default_estimator(cls, data: Any) -> Any:
        """``fedpg_br`` without an ``estimator`` takes ``standardized`` (see the class)."""
        if isinstance(data, dict) and data.get("method") == "fedpg_br" and "estimator" not in data:
            return {**data, "estimator": "standardized"}
        return data
