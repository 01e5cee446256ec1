"""Server optimizers: ``(init, step)`` transforms applied to the aggregated client update.

The aggregate is a pseudo-gradient pointing *downhill* (FedAvg's mean of ``local - global``),
so SGD with ``lr=1`` and no momentum reproduces FedAvg exactly. Optimizer state is plain
``Params`` so it can be checkpointed like the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedforge.core.params import Params


class ServerOptimizer(Protocol):
    def init(self, params: Params) -> Params: ...

    def step(self, params: Params, update: Params, state: Params) -> tuple[Params, Params]: ...


@dataclass(frozen=True)
class ServerSGD:
    """``v = momentum * v + update``; ``params += lr * v``. lr=1, momentum=0 is FedAvg;
    momentum > 0 is FedAvgM (Hsu et al. 2019)."""

    lr: float = 1.0
    momentum: float = 0.0

    def init(self, params: Params) -> Params:
        if self.momentum == 0.0:
            return {}
        return {name: np.zeros_like(arr) for name, arr in params.items()}

    def step(self, params: Params, update: Params, state: Params) -> tuple[Params, Params]:
        if self.momentum == 0.0:
            direction, new_state = update, state
        else:
            new_state = {k: self.momentum * state[k] + update[k] for k in update}
            direction = new_state
        new_params = {}
        for k, p in params.items():
            step = np.multiply(direction[k], self.lr, dtype=p.dtype)
            new_params[k] = np.add(p, step, out=step)
        return new_params, new_state
