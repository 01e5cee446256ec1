"""cos, sin and squares rounded the way gymnasium's NumPy scalar arithmetic rounds them.

gymnasium's classic-control envs compute with NumPy float64 scalars and Python floats, so
their ``cos``/``sin`` and ``x**2`` are the C library's (``x**2`` is ``pow(x, 2)``, which is
1 ulp away from ``x * x`` for about one argument in a thousand). torch's CPU kernels differ
in the last bit now and then (SLEEF's cos/sin; ``x**2`` is ``x * x``), and Acrobot is
chaotic: one such bit grows into a different trajectory within ~100 steps. On the CPU these
functions therefore evaluate through NumPy's libm-backed ufuncs, which makes the torch
dynamics agree with gymnasium bit for bit (tested). Elsewhere (a GPU), or when a gradient
is needed, they are torch's own, equal to float64 rounding.
"""

from __future__ import annotations

import numpy as np
import torch


def _through_numpy(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not x.requires_grad


def cos(x: torch.Tensor) -> torch.Tensor:
    if not _through_numpy(x):
        return torch.cos(x)
    return torch.from_numpy(np.asarray(np.cos(x.numpy())))


def sin(x: torch.Tensor) -> torch.Tensor:
    if not _through_numpy(x):
        return torch.sin(x)
    return torch.from_numpy(np.asarray(np.sin(x.numpy())))


def squared(x: torch.Tensor) -> torch.Tensor:
    """``x ** 2`` as C's ``pow(x, 2)``, what Python floats and NumPy scalars compute."""
    if not _through_numpy(x):
        return x * x
    return torch.from_numpy(np.asarray(np.float_power(x.numpy(), 2.0)))
