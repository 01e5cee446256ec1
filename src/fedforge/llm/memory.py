"""Peak memory of a batched LoRA round, estimated before training, and the refusal.

The estimate of one batched step over ``clients`` clients with ``batch_size`` sequences of
``seq_len`` tokens each is the sum of:

- **base**: the frozen base's bytes (shared storage, such as tied embeddings, counted once);
- **adapters**, **gradients**, **optimizer**: the clients' trainable arrays (factors and head),
  their gradients, and one more copy per optimizer slot (momentum: 1);
- **activations**: what autograd keeps for the backward pass, measured by a probe: one
  forward pass of the real model on one and on two sequences of ``seq_len`` tokens, summing
  the tensors autograd saves (``saved_tensors_hooks``) that are not parameters. Activations
  are per sequence, so the two probes give a cost per sequence and a constant, scaled to
  ``clients * batch_size`` sequences. (A meta-device trace is not possible: Hugging Face mask
  code reads tensor values.)
- **transient**: buffers alive only during backward: two copies of the largest saved tensor
  (the gradient arriving at it and the one leaving it; for a language model, the logits).

The test suite holds the estimate to the measured peak resident memory of a real batched step
(``tests/llm/test_memory.py``), within the tolerance :data:`TOLERANCE`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fedforge.core.errors import ConfigError
from fedforge.llm.adapters import LoraModel
from fedforge.llm.batched import _client_losses, client_batched
from fedforge.train.program import LocalProgram

TOLERANCE = 0.10  # |estimate - measured| / measured, for what training adds to the base
GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of one batched step, by part."""

    base: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    transient: int
    clients: int
    batch_size: int
    seq_len: int

    @property
    def training(self) -> int:
        """What training adds to the loaded base."""
        return self.adapters + self.gradients + self.optimizer + self.activations + self.transient

    @property
    def total(self) -> int:
        return self.base + self.training

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {_size(getattr(self, name))}"
            for name in ("base", "adapters", "gradients", "optimizer", "activations", "transient")
        )
        return (
            f"estimated peak {_size(self.total)} for {self.clients} client(s) x "
            f"{self.batch_size} sequence(s) x {self.seq_len} tokens ({parts})"
        )


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _storage(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def base_bytes(lm: LoraModel) -> int:
    """Bytes of the frozen base (parameters and buffers), each storage once."""
    seen: dict[int, int] = {}
    for name, t in lm.module.state_dict(keep_vars=True).items():
        if ".lora_" not in name and not name.startswith("head."):
            ptr, size = _storage(t)
            seen[ptr] = size
    return sum(seen.values())


def adapter_bytes(lm: LoraModel) -> int:
    """Bytes of one client's trainable arrays (float32)."""
    return sum(4 * int(torch.Size(s.shape).numel()) for s in lm.layout.spec().values())


def _saved_bytes(lm: LoraModel, sequences: int, seq_len: int) -> tuple[int, int]:
    """(total, largest) bytes autograd saves for one client's step on ``sequences``
    sequences, parameters and the adapters themselves excluded."""
    excluded = {_storage(p)[0] for p in lm.module.parameters()}
    stacked = {
        n: torch.zeros((1, *s.shape), requires_grad=True) for n, s in lm.layout.spec().items()
    }
    excluded |= {_storage(t)[0] for t in stacked.values()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, size = _storage(t)
        if ptr not in excluded and size:
            saved[ptr] = max(size, saved.get(ptr, 0))
        return t

    ids = torch.full((sequences, seq_len), 1000, dtype=torch.long)
    mask = torch.ones_like(ids)
    task_labels = (sequences,) if lm.module.head is not None else (sequences, seq_len)
    labels = torch.zeros(task_labels, dtype=torch.long)
    scales = {m.module: torch.ones(1) for m in lm.layout.matrices}
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, client_batched(lm, 1, stacked, scales):
        loss = _client_losses(lm.module(ids, mask), labels, torch.ones(sequences), 1).sum()
    del loss
    return sum(saved.values()), max(saved.values(), default=0)


def optimizer_slots(program: LocalProgram) -> int:
    """Copies of the trainable arrays the gradient chain keeps (momentum: one)."""
    probe = {"w": torch.zeros(1)}
    return sum(len(t.init(probe)) for t in program.transforms)


def estimate_memory(
    lm: LoraModel, program: LocalProgram, clients: int, batch_size: int, seq_len: int
) -> MemoryEstimate:
    """The estimated peak of one batched step (see the module docstring)."""
    if clients < 1 or batch_size < 1 or seq_len < 1:
        raise ValueError("clients, batch_size and seq_len must be >= 1")
    one, largest_one = _saved_bytes(lm, 1, seq_len)
    two, largest_two = _saved_bytes(lm, 2, seq_len)
    sequences = clients * batch_size
    per_sequence = two - one
    largest = largest_one + (largest_two - largest_one) * (sequences - 1)
    adapters = clients * adapter_bytes(lm)
    return MemoryEstimate(
        base=base_bytes(lm),
        adapters=adapters,
        gradients=adapters,
        optimizer=adapters * optimizer_slots(program),
        activations=max(0, one - per_sequence) + per_sequence * sequences,
        transient=2 * largest,
        clients=clients,
        batch_size=batch_size,
        seq_len=seq_len,
    )


def available_memory() -> int:
    """Bytes this process may still use: the smaller of the system's available memory and
    the cgroup's remaining limit (when one is set)."""
    limits = []
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            limits.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    if not limits:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        limits.append(int(pages))
    return max(0, min(limits))


def largest_cohort(
    lm: LoraModel,
    program: LocalProgram,
    batch_size: int,
    seq_len: int,
    available: int,
    headroom: float = 0.9,
) -> int:
    """The most clients one batched step may train at once within ``headroom`` of
    ``available`` (0 if not even one fits): the estimate is affine in the client count."""
    one = estimate_memory(lm, program, 1, batch_size, seq_len).training
    two = estimate_memory(lm, program, 2, batch_size, seq_len).training
    per_client, fixed = two - one, 2 * one - two
    budget = int(available * headroom)
    return max(0, (budget - fixed) // max(1, per_client))


def check_fits(estimate: MemoryEstimate, available: int, headroom: float = 0.9) -> None:
    """Refuse a round whose estimated training memory exceeds ``headroom`` of ``available``
    (the base is already loaded when this runs), naming the estimate and what to lower."""
    budget = int(available * headroom)
    if estimate.training <= budget:
        return
    fit = budget // max(1, estimate.training // estimate.clients)  # training is ~linear
    raise ConfigError(
        f"{estimate.describe()} exceeds the {_size(budget)} available for training "
        f"({headroom:.0%} of {_size(available)}): lower the clients trained at once "
        f"(about {fit} fit), batch_size ({estimate.batch_size}), the sequence length "
        f"({estimate.seq_len}) or the LoRA rank"
    )
