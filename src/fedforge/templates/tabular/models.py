"""The model every site trains: any torch.nn.Module (fedforge calls make_model with the
options of [model] in fedforge.toml, under a torch RNG seeded from the run seed)."""

from __future__ import annotations

from torch import nn


def make_model(features: int = 30, classes: int = 2, hidden: int = 32) -> nn.Module:
    """A one-hidden-layer network: ``features`` inputs, ``classes`` output logits."""
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))
