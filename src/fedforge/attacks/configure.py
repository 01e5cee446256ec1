"""Turn ``[attack]`` into the pieces of an attacked simulation: the attackers (seeded), their
poisoned data, the poisoning stage or aggregation wrapper, and the backdoor's success-rate
probe. The attacker ids are recorded in the history's labels."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fedforge.aggregate.kinds import Aggregation
from fedforge.attacks.data import attack_success_rate, backdoor, flip_labels
from fedforge.attacks.simulated import ModelPoisoning, Omniscient, Overclaim, choose_attackers
from fedforge.config import AttackConfig, RunConfig
from fedforge.core.rng import Purpose, RngStreams
from fedforge.data.datasets import ArrayDataset
from fedforge.data.federated import FederatedDataset
from fedforge.runtime.simulation import Probe
from fedforge.stages.base import Stage

ATTACK_STREAM = 7  # the coordinate of the attack's random stream (attackers, poisoned rows)


@dataclass(frozen=True)
class AttackPlan:
    attackers: frozenset[int]
    data: FederatedDataset
    aggregation: Aggregation
    stages: list[Stage] = field(default_factory=list)
    probes: dict[str, Probe] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


def image_shape(config: RunConfig) -> tuple[int, int]:
    return (8, 8) if config.data.dataset == "digits" else (28, 28)


def trigger_size(config: RunConfig) -> int:
    return 2 if config.data.dataset == "digits" else 3


def plan_attack(config: RunConfig, data: FederatedDataset, aggregation: Aggregation) -> AttackPlan:
    """The configured attack on ``data`` (no attack: everything unchanged)."""
    a = config.attack
    if a.kind == "none" or a.fraction == 0:
        return AttackPlan(frozenset(), data, aggregation)
    rng = RngStreams(config.seed).generator(Purpose.PARTITION, ATTACK_STREAM)
    attackers = choose_attackers(data.num_clients, a.fraction, rng)
    labels = {
        "attack.kind": a.kind,
        "attack.clients": ",".join(str(c) for c in sorted(attackers)),
    }
    lies: list[Stage] = [Overclaim(attackers, a.overclaim)] if a.overclaim > 1 else []
    plan = AttackPlan(attackers, data, aggregation, labels=labels, stages=lies)
    if a.kind in ("label_flip", "backdoor"):
        poisoned = poison_data(config, a, data, attackers, rng)
        probes = (
            {"attack.success_rate": backdoor_probe(config, a, data)} if a.kind == "backdoor" else {}
        )
        return replace(plan, data=poisoned, probes=probes)
    if a.kind in ("alie", "ipm"):
        wrapped = Omniscient(aggregation, attackers, a.kind, epsilon=a.epsilon)
        return replace(plan, aggregation=wrapped)
    scale = a.scale
    stage = ModelPoisoning(attackers, a.kind, scale=scale, std=a.std)  # type: ignore[arg-type]
    return replace(plan, stages=[stage, *lies])


def poison_data(
    config: RunConfig,
    a: AttackConfig,
    data: FederatedDataset,
    attackers: frozenset[int],
    rng: np.random.Generator,
) -> FederatedDataset:
    """A copy of ``data`` whose attackers' training examples are flipped or backdoored."""
    x, y = data.train.x.copy(), data.train.y.copy()
    for cid in sorted(attackers):
        rows = data.partition[cid]
        if a.kind == "label_flip":
            y[rows] = flip_labels(y[rows], data.num_classes)
        else:
            x[rows], y[rows] = backdoor(
                x[rows],
                y[rows],
                a.target_label,
                a.poison_fraction,
                rng,
                image_shape(config),
                size=trigger_size(config),
            )
    return replace(data, train=ArrayDataset(x, y))


def backdoor_probe(config: RunConfig, a: AttackConfig, data: FederatedDataset) -> Probe:
    """The share of triggered test inputs (true label not the target) classified as the
    target: the backdoor's attack success rate."""

    @torch.no_grad()
    def success_rate(module: torch.nn.Module) -> float:
        module.eval()

        def predict(x: np.ndarray) -> np.ndarray:
            result: np.ndarray = module(torch.from_numpy(x)).argmax(dim=1).numpy()
            return result

        return attack_success_rate(
            predict,
            data.test.x,
            data.test.y,
            a.target_label,
            image_shape(config),
            size=trigger_size(config),
        )

    return success_rate
