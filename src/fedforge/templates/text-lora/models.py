"""The model: with [lora], fedforge builds it (model.factory cannot be set with [lora]).

Its base is the one [lora] names (model = "minilm": the packaged all-MiniLM-L6-v2 encoder with
a classification head; "gpt2-small": a small GPT-2 from the seed; pretrained = "PATH" with
task: any local Hugging Face checkpoint), with LoRA adapters of rank and alpha on its
attention (targets). The base stays frozen at every site: only the adapters (and the head)
train and travel, and the handshake compares the base's SHA-256. what_travels lists them
(python models.py)."""

from __future__ import annotations

import math
from pathlib import Path

from fedforge.config import load_config
from fedforge.workload.configured import configured_workload

HERE = Path(__file__).resolve().parent


def what_travels(config: Path = HERE / "fedforge.toml") -> dict[str, tuple[int, ...]]:
    """The trainable parameters of the configured model: name -> shape."""
    model = configured_workload(load_config(config)).model()
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    shapes = what_travels()
    for name, shape in shapes.items():
        print(f"{name}  {shape}")
    floats = sum(math.prod(s) for s in shapes.values())
    print(f"{len(shapes)} tensors, {floats} floats ({4 * floats / 1e6:.2f} MB) per update")
