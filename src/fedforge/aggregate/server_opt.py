"""Server optimizers: ``(init, step)`` transforms applied to the aggregated client update.

The aggregate is a pseudo-gradient pointing *downhill* (FedAvg's mean of ``local - global``),
so SGD with ``lr=1`` and no momentum reproduces FedAvg exactly. The adaptive optimizers are
Reddi et al. 2021 ("Adaptive Federated Optimization"), Algorithm 2, without bias correction:

    m = beta1 m + (1 - beta1) d
    v = v + d^2                                   (FedAdagrad)
    v = v - (1 - beta2) d^2 sign(v - d^2)          (FedYogi)
    v = beta2 v + (1 - beta2) d^2                  (FedAdam)
    x = x + lr m / (sqrt(v) + tau)

with ``m`` starting at 0 and ``v`` at ``tau^2`` (the paper's ``v_{-1} >= tau^2``). State is plain
``Params`` so it is checkpointed like the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

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


@dataclass(frozen=True)
class _Adaptive:
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    rule: Literal["adam", "yogi", "adagrad"] = "adam"

    def init(self, params: Params) -> Params:
        state: Params = {}
        for name, p in params.items():
            state[f"m/{name}"] = np.zeros(p.shape, np.float64)
            state[f"v/{name}"] = np.full(p.shape, self.tau**2, np.float64)
        return state

    def step(self, params: Params, update: Params, state: Params) -> tuple[Params, Params]:
        new_params: Params = {}
        new_state: Params = {}
        for name, p in params.items():
            d = update[name].astype(np.float64)
            m = self.beta1 * state[f"m/{name}"] + (1 - self.beta1) * d
            v_old, d2 = state[f"v/{name}"], d * d
            if self.rule == "adagrad":
                v = v_old + d2
            elif self.rule == "yogi":
                v = v_old - (1 - self.beta2) * d2 * np.sign(v_old - d2)
            else:
                v = self.beta2 * v_old + (1 - self.beta2) * d2
            new_params[name] = (p + self.lr * m / (np.sqrt(v) + self.tau)).astype(p.dtype)
            new_state[f"m/{name}"], new_state[f"v/{name}"] = m, v
        return new_params, new_state


@dataclass(frozen=True)
class FedAdam(_Adaptive):
    rule: Literal["adam", "yogi", "adagrad"] = "adam"


@dataclass(frozen=True)
class FedYogi(_Adaptive):
    rule: Literal["adam", "yogi", "adagrad"] = "yogi"


@dataclass(frozen=True)
class FedAdagrad(_Adaptive):
    rule: Literal["adam", "yogi", "adagrad"] = "adagrad"
