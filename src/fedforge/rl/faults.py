"""Faulty agents, as in FedPG-BR's experiments: pure transforms for the attack suite.

- ``random_noise``: the agent reports its honest gradient plus uniform noise,
  ``g + U(-1, 1) * (max(g) - min(g)) * scale`` with ``scale = 3`` (the authors' code scales
  by the range of each parameter tensor; here the range is the whole flattened report's).
- ``sign_flip``: the agent reports ``-scale * g``, ``scale = 2.5`` as in the paper; it is
  :func:`fedforge.attacks.updates.sign_flip`, the attack suite's own.
- ``random_action``: the agent acts uniformly at random and reports the gradient computed
  honestly from those trajectories as if its policy had chosen them. It is a behaviour, not
  a transform of the report: the collectors take a ``random_actions`` mask
  (:func:`random_action_mask`) and the report passes unchanged.

Reports are (m, d) stacks, one row per faulty agent, NumPy in and out, as in
:mod:`fedforge.attacks.updates`; randomness comes only from the generator passed in.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Literal

import numpy as np
import torch

from fedforge.attacks.updates import sign_flip

FaultKind = Literal["random_noise", "random_action", "sign_flip"]
FAULTS: tuple[FaultKind, ...] = ("random_noise", "random_action", "sign_flip")
NOISE_SCALE = 3.0
FLIP_SCALE = 2.5


def random_noise(
    own: np.ndarray, rng: np.random.Generator, scale: float = NOISE_SCALE
) -> np.ndarray:
    """Each row plus uniform noise in +-scale times the row's range of values."""
    x = np.asarray(own)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"own must be a floating (m, d) stack, got {x.dtype} {x.shape}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    span = (x.max(axis=1, keepdims=True) - x.min(axis=1, keepdims=True)).astype(np.float64)
    noise = rng.uniform(-1.0, 1.0, size=x.shape) * span * scale
    noisy: np.ndarray = (x + noise).astype(x.dtype, copy=False)
    return noisy


def faulty_reports(kind: FaultKind, own: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What m faulty agents of ``kind`` report instead of their honest (m, d) gradients."""
    if kind == "random_noise":
        return random_noise(own, rng)
    if kind == "sign_flip":
        return sign_flip(own, FLIP_SCALE)
    if kind == "random_action":
        return np.asarray(own)
    raise ValueError(f"unknown fault {kind!r}; choose one of {', '.join(FAULTS)}")


def random_action_mask(
    kind: FaultKind, num_agents: int, faulty: Collection[int]
) -> torch.Tensor | None:
    """The collectors' ``random_actions`` mask (A,): the faulty agents, if they act randomly."""
    if kind != "random_action":
        return None
    mask = torch.zeros(num_agents, dtype=torch.bool)
    mask[sorted(faulty)] = True
    return mask
