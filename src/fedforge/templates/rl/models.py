"""The policy: with [rl], fedforge builds it (model.factory cannot be set with [rl]): an MLP
from the environment's observations to its actions, hidden layers [rl] hidden (tanh),
categorical actions. Server and agents build the same one (the handshake checks it).

load_policy gives you the trained policy of a run (its model.safetensors), to inspect it or
to act with it: policy(observations) are the action logits."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from fedforge.config import load_config
from fedforge.workload.configured import configured_workload

HERE = Path(__file__).resolve().parent


def make_policy(config: Path = HERE / "fedforge.toml") -> nn.Module:
    """The configured policy, freshly initialized."""
    return configured_workload(load_config(config)).model()


def load_policy(run_dir: Path, config: Path = HERE / "fedforge.toml") -> nn.Module:
    """The policy a run trained (``fedforge run fedforge.toml --out RUN_DIR``)."""
    policy = make_policy(config)
    policy.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    return policy.eval()
