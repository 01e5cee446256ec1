"""Measure the peak resident memory a batched LoRA step adds, beside the planner's estimate.

Run as a script in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then returns
freed tensors to the system at once, so resident memory follows live tensors); prints one
JSON line per configuration ``task:clients:batch:seq_len`` given on the command line; the
first argument is the encoder checkpoint directory for ``classify`` ("-": the packaged one);
``next_token`` uses the default decoder. LoRA rank 8, momentum 0.9.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from fedforge.llm.adapters import get_adapters, load_lora_model
from fedforge.llm.batched import TextData, text_loss, train_batched
from fedforge.llm.memory import estimate_memory
from fedforge.llm.models import LoraModelSpec
from fedforge.train.program import LocalProgram, LocalSGD


def status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure(
    encoder: str | None, task: str, clients: int, batch: int, seq_len: int
) -> dict[str, float]:
    pretrained = encoder if task == "classify" else None
    spec = LoraModelSpec(task, pretrained, num_labels=4, rank=8)  # type: ignore[arg-type]
    lm = load_lora_model(spec)
    local = LocalSGD(lr=0.01, epochs=1, batch_size=batch, momentum=0.9, loss_fn=text_loss)
    program = LocalProgram(local)
    rng = np.random.default_rng(0)
    datas = []
    for _ in range(clients):
        ids = rng.integers(1000, 20000, (batch, seq_len))
        labels = rng.integers(0, 4, batch) if task == "classify" else ids
        datas.append(TextData(ids, np.ones_like(ids), labels))
    start, trained = get_adapters(lm), list(lm.layout.spec())

    def step() -> None:
        rngs = [np.random.default_rng(i) for i in range(clients)]
        train_batched(lm, program, [start] * clients, datas, rngs, trained)

    step()  # warm-up: lazily created buffers and caches
    estimate = estimate_memory(lm, program, clients, batch, seq_len)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS:")
    step()
    measured = status("VmHWM:") - before
    return {"measured": measured, "estimate": estimate.training, "base": estimate.base}


if __name__ == "__main__":
    torch.set_num_threads(1)
    encoder = None if sys.argv[1] == "-" else sys.argv[1]
    for arg in sys.argv[2:]:
        task, *sizes = arg.split(":")
        print(json.dumps({"config": arg, **measure(encoder, task, *map(int, sizes))}), flush=True)
