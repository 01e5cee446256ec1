"""Checks across sections for a federated RL run (``[rl]``): what does not compose with
agents that learn from their own environments is refused at load, with the reason."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fedforge.config.base import changed
from fedforge.config.workload import user_code

if TYPE_CHECKING:
    from fedforge.config.rl import RLConfig
    from fedforge.config.run import RunConfig

LOCAL_SGD_KEYS = ("epochs", "batch_size", "momentum", "weight_decay")
FEDAVG_ONLY = ("iterations", "optimizer", "penalty", "penalty_coef")
FEDPG_BR_ONLY = ("mini_batch", "max_inner_steps")
DATA_ATTACKS = ("label_flip", "backdoor")


def rl_problems(config: RunConfig) -> list[str]:
    """Every problem of an ``[rl]`` run (empty without one)."""
    rl = config.rl
    if rl is None:
        return (
            ["aggregation.kind = 'fedpg_br' filters policy-gradient reports: it needs [rl]"]
            if config.aggregation.kind == "fedpg_br"
            else []
        )
    out = [
        f"{key} cannot be set with [rl]: the agents' model, environments and training are [rl]'s"
        for key in user_code(config)
    ]
    if config.algorithm.name != "fedavg":
        out.append(
            f"algorithm.name = {config.algorithm.name!r} assumes supervised local SGD (its "
            "local program or record), which an RL agent does not run: choose rl.method "
            "(fedavg, fedpg, fedpg_br), and rl.penalty = 'prox' or 'kl' for FedProx's or "
            "FedKL's pull toward the global policy"
        )
    out += [
        f"client.{key} describes local SGD on examples; an RL agent's local work is "
        "rl.iterations steps of rl.episodes trajectories (client.lr is its step size)"
        for key in changed(config.client, "lr")
        if key in LOCAL_SGD_KEYS
    ]
    if config.privacy.mode == "sample":
        out.append("privacy.mode = 'sample' (DP-SGD) clips examples: an RL agent has none")
    if config.attack.kind in DATA_ATTACKS:
        out.append(
            f"attack.kind = {config.attack.kind!r} poisons examples: an RL agent has none "
            "(use rl.faulty and rl.fault, or an attack on updates)"
        )
    out += _environment_problems(rl)
    if rl.estimator == "standardized" and not rl.baseline:
        out.append(
            "rl.estimator = 'standardized' subtracts each episode's mean reward-to-go: it "
            "cannot run with rl.baseline = false (choose gpomdp or reinforce)"
        )
    if rl.faulty > rl.agents:
        out.append(f"rl.faulty = {rl.faulty} exceeds rl.agents = {rl.agents}")
    defaults = type(rl).model_fields
    if rl.method != "fedavg":
        out += [
            f"rl.{key} applies to rl.method = 'fedavg' (local steps), not {rl.method!r}"
            for key in FEDAVG_ONLY
            if getattr(rl, key) != defaults[key].get_default()
        ]
    if rl.method != "fedpg_br":
        out += [
            f"rl.{key} applies to rl.method = 'fedpg_br' (the server's SCSG steps)"
            for key in FEDPG_BR_ONLY
            if getattr(rl, key) != defaults[key].get_default()
        ]
    out += _fedpg_br_problems(config)
    return out


def _environment_problems(rl: RLConfig) -> list[str]:
    """Physical parameters the environment does not have, or ranges it cannot take."""
    from fedforge.rl.envs import batch_env

    env = batch_env(rl.env)
    out = []
    for label, ranges in (("spread", rl.spread), ("heldout_spread", rl.heldout_spread)):
        for name, (low, high) in ranges.items():
            if name not in env.parameters:
                out.append(
                    f"rl.{label}: {rl.env} has no physical parameter {name!r}; choose from "
                    f"{', '.join(env.parameters)}"
                )
            elif not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
                out.append(f"rl.{label}.{name}: need finite 0 < low <= high, got ({low}, {high})")
    for name, value in rl.physics.items():
        if name not in env.parameters:
            out.append(
                f"rl.physics: {rl.env} has no physical parameter {name!r}; choose from "
                f"{', '.join(env.parameters)}"
            )
        elif not (math.isfinite(value) and value > 0):
            out.append(f"rl.physics.{name}: need a finite positive value, got {value}")
    return out


def _fedpg_br_problems(config: RunConfig) -> list[str]:
    assert config.rl is not None
    method, kind = config.rl.method, config.aggregation.kind
    out = []
    if method == "fedpg_br":
        if kind != "fedpg_br":
            out.append(
                f"rl.method = 'fedpg_br' filters the agents' reports with its own rule: set "
                f"aggregation.kind = 'fedpg_br' (not {kind!r}; secure aggregation would hide "
                "the reports the filter must see)"
            )
        if config.privacy.mode != "off":
            out.append(
                "rl.method = 'fedpg_br' with privacy: the filter's radius assumes unclipped, "
                "unnoised B-trajectory gradient estimates (set privacy.mode = 'off')"
            )
        if config.update.clip_norm is not None:
            out.append(
                "rl.method = 'fedpg_br' with update.clip_norm: clipping changes the reports "
                "whose spread the filter's radius bounds"
            )
    elif kind == "fedpg_br" and method == "fedavg":
        out.append(
            "aggregation.kind = 'fedpg_br' filters gradient estimates at the global policy "
            "against their concentration radius: rl.method = 'fedavg' reports changes of "
            "local policies (use rl.method = 'fedpg' or 'fedpg_br', or another robust rule)"
        )
    return out
