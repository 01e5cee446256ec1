"""FedProx (Li et al. 2020): FedAvg whose local objective adds ``mu/2 ||w - w_global||^2``.

The proximal term is an objective term of the local program, so every runtime (the
vectorized one and its fused MLP kernel included) trains it; ``mu = 0`` is FedAvg bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedforge.algorithms.fedavg import FedAvg
from fedforge.train.program import LocalProgram, Proximal


@dataclass(frozen=True)
class FedProx(FedAvg):
    mu: float = 0.01

    def __post_init__(self) -> None:
        if self.mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {self.mu}")

    def program(self) -> LocalProgram:
        if self.mu == 0:
            return LocalProgram(self.local)
        return LocalProgram(self.local, terms=(Proximal(self.mu),))
