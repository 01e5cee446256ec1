"""Vectorized local training: a whole cohort of clients as one batched program.

Per-client parameters are stacked along a leading axis; at every local step the clients that
still have a batch (a prefix of the stack: clients come sorted by step count, most first) take
``vmap(LocalProgram.step)``, the same step the sequential runtime takes one client at a time.
MLPs take the fused kernels of :mod:`fedforge.train.cohort_mlp` instead of autograd; a
head-first schedule (FedRep) passes each client's phase at the step (head-only while the step
index is below its head step count), on the generic path. A short last batch is padded and
masked, so each client's loss is the mean over its real examples.
Batch order comes from the same :func:`~fedforge.train.program.batch_order` as everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import vmap

from fedforge.train.cohort_mlp import (
    fused_first_step,
    fused_grads,
    fused_sgd_step,
    mlp_structure,
)
from fedforge.train.program import LocalProgram, Tensors, batch_order

RANDOM_LAYERS = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
)


@dataclass(frozen=True)
class ClientPlan:
    """One client's local work: its example indices (into the shared training arrays) and
    the generator that orders its batches."""

    client_id: int
    indices: np.ndarray
    rng: np.random.Generator
    epochs: int | None = None  # fewer than the program's for a simulated straggler


@dataclass(frozen=True)
class CohortResult:
    """Stacked trained parameters (row i = plan i), and per-client loss and step count."""

    params: Tensors
    train_loss: np.ndarray
    steps: np.ndarray
    is_delta: bool = False  # params hold local - global (one-step chunks of the fused path)


def vectorization_blocker(module: torch.nn.Module, program: LocalProgram) -> str | None:
    """Why ``module`` trained by ``program`` cannot run vectorized, or None if it can."""
    if not program.uses_cross_entropy:
        return "a custom loss function (the batched path implements masked cross-entropy)"
    if any(True for _ in module.buffers()):
        return "the model has buffers (e.g. batch norm statistics), which are per-call state"
    if any(isinstance(m, RANDOM_LAYERS) for m in module.modules()):
        return "the model uses dropout (per-client randomness)"
    return None


def vmap_problem(module: torch.nn.Module, x: np.ndarray) -> str | None:
    """Why ``torch.func.vmap`` cannot batch gradient steps of ``module`` on examples like
    ``x`` (tried on two clients of one example each, labelled class 0: the probe is about the
    model, not the labels), or None when it can."""
    from torch.func import functional_call, grad

    if len(x) == 0:
        return None
    params = {
        n: p.detach().unsqueeze(0).repeat(2, *[1] * p.dim()) for n, p in module.named_parameters()
    }
    xs = torch.from_numpy(np.ascontiguousarray(x[:1])).unsqueeze(0).repeat(2, *[1] * x.ndim)
    ys = torch.zeros((2, 1), dtype=torch.int64)

    def loss(weights: Tensors, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(module, weights, (xb,)), yb)

    try:
        vmap(grad(loss), randomness="error")(params, xs, ys)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return f"torch.func.vmap cannot batch this model ({type(exc).__name__}: {first})"
    return None


class CohortTrainer:
    """Trains many clients of one model at once; math identical to ``LocalProgram.step``."""

    def __init__(
        self,
        module: torch.nn.Module,
        program: LocalProgram,
        train_x: np.ndarray,
        train_y: np.ndarray,
        device: torch.device | None = None,
    ) -> None:
        blocker = vectorization_blocker(module, program)
        if blocker:
            raise ValueError(f"cannot vectorize: {blocker}")
        self.device = device or torch.device("cpu")
        self.module = module.to(self.device)
        self.program = program
        self.names = program.trained_names([name for name, _ in module.named_parameters()])
        self.x = torch.from_numpy(train_x).to(self.device)
        self.y = torch.from_numpy(train_y).to(self.device)
        # Per-client starting weights (FedPer's head, Ditto's copy) and per-client phases
        # (FedRep's head-first schedule) take the generic path.
        generic = program.per_client_start or program.head_first is not None
        self.layers = None if generic else mlp_structure(module)
        self._stacks: Tensors = {}
        self._offsets: Tensors = {}
        self._grad_buffers: Tensors = {}
        if self.layers is None:
            self.kernel = "vmap(grad) of the client step"
        elif program.plain:
            self.kernel = "fused MLP kernel, plain SGD"
        elif program.stateless:
            self.kernel = "fused MLP kernel, affine gradient terms fused into the update"
        else:
            self.kernel = "fused MLP kernel, materialized gradients through the chain"

        def step(
            params: Tensors,
            state: tuple[Tensors, ...],
            own: Tensors,
            x: torch.Tensor,
            y: torch.Tensor,
            mask: torch.Tensor,
            head_phase: torch.Tensor | None,
            shared: Tensors,
        ) -> tuple[Tensors, tuple[Tensors, ...], torch.Tensor]:
            return program.step(self.module, params, state, shared, own, x, y, mask, head_phase)

        phase_dim = None if program.head_first is None else 0  # one phase flag per client
        self._vstep = vmap(step, in_dims=(0, 0, 0, 0, 0, 0, phase_dim, None), randomness="error")

    def _buffer(
        self, name: str, count: int, value: torch.Tensor, fill: bool = True
    ) -> torch.Tensor:
        """Rows ``[:count]`` of a stack reused across chunks and rounds (fresh multi-megabyte
        allocations cost page faults on every chunk), filled with ``value`` if ``fill``."""
        buf = self._stacks.get(name)
        if buf is None or len(buf) < count or buf.shape[1:] != value.shape:
            buf = torch.empty((count, *value.shape), dtype=value.dtype, device=self.device)
            self._stacks[name] = buf
            if self.layers is not None and not self.program.stateless:  # momentum's path
                self._grad_buffers[name] = torch.empty_like(buf)
        head = buf[:count]
        return head.copy_(value.expand(count, *value.shape)) if fill else head

    def _affine(
        self, shared: Tensors, own: Tensors
    ) -> dict[str, tuple[float, torch.Tensor | None]] | None:
        """Per parameter, the chain's affine gradient term (decay, summed offset tensor), or
        None if the chain is not affine. Offsets are summed once per chunk."""
        out: dict[str, tuple[float, torch.Tensor | None]] = {}
        for name in self.names:
            affine = self.program.affine(name, shared, own)
            if affine is None:
                return None
            if not affine.offsets:
                out[name] = (affine.alpha, None)
                continue
            # Offsets are shared (the parameter's shape) or stacked (one more leading axis).
            shape = max((t.shape for t, _ in affine.offsets), key=len)
            total = self._offsets.get(name)
            if total is None or total.shape != shape:  # reused across chunks of one size
                dtype = affine.offsets[0][0].dtype  # the model's dtype
                total = self._offsets[name] = torch.empty(shape, dtype=dtype, device=self.device)
            first, coef = affine.offsets[0]
            torch.mul(first.expand(shape), coef, out=total)
            for tensor, coef in affine.offsets[1:]:
                total.add_(tensor, alpha=coef)
            out[name] = (affine.alpha, total)
        return out

    def _head_affine(
        self, affine: dict[str, tuple[float, torch.Tensor | None]], active: int, whole: bool
    ) -> dict[str, tuple[float, torch.Tensor | None]]:
        """The affine terms of the first ``active`` clients (stacked offsets are sliced)."""
        if whole:
            return affine
        out = {}
        for name, (alpha, offset) in affine.items():
            stacked = offset is not None and offset.dim() > self._stacks[name].dim() - 1
            out[name] = (alpha, offset[:active] if stacked and offset is not None else offset)
        return out

    def bytes_per_client(
        self, sample_params: dict[str, np.ndarray], own_bytes: int = 0, largest: int = 256
    ) -> int:
        """Rough peak memory one client adds to a chunk (params, grads, chain state,
        activations). ``largest``: the most examples a client of the chunk holds, which
        bounds the batch width (full batch, or a batch size beyond every client's data)."""
        size = sum(a.nbytes for a in sample_params.values())
        program = self.program
        if self.layers is not None and program.stateless:
            copies = 3 if program.plain else 4  # affine chain: one summed offset per client
        else:
            copies = 3 + len(program.transforms) + (0 if program.plain else 1)
        batch = min(self.program.local.batch_size or largest, largest)
        activations = 8 * batch * self.x.shape[1] * self.x.element_size()
        return copies * size + 2 * own_bytes + activations

    def train(self, shared: Tensors, own: Tensors, plans: Sequence[ClientPlan]) -> CohortResult:
        """Train every planned client from the global model in ``shared``. ``own`` holds the
        clients' stacked states; ``plans`` must be sorted by step count, most first. The
        returned parameters live in buffers the next call reuses: consume them first."""
        local = self.program.local
        # Passes over each client's data: its local epochs, plus FedRep's head-only ones.
        epochs = [
            self.program.passes(local.epochs if p.epochs is None else p.epochs) for p in plans
        ]
        schedules = [
            [p.indices[b] for b in batch_order(len(p.indices), local.batch_size, e, p.rng)]
            for p, e in zip(plans, epochs, strict=True)
        ]
        head_steps = np.array([self.program.head_steps(len(p.indices)) for p in plans])
        lengths = [len(s) for s in schedules]
        if lengths != sorted(lengths, reverse=True):
            raise ValueError("plans must be sorted by step count, most first")
        count = len(plans)
        affine = self._affine(shared, own) if self.layers and not self.program.plain else None
        first_fused = self.layers is not None and (self.program.plain or affine is not None)
        one_step = first_fused and bool(plans) and lengths[0] == 1  # write deltas directly
        # The fused kernels write every client's first step straight into the stacks.
        base = self.program.base_name
        stacked = {
            n: self._buffer(n, count, shared[base(n)], fill=not first_fused) for n in self.names
        }
        for name, key in self.program.starts(list(own)).items():
            stacked[name].copy_(own[key])  # FedPer's head, Ditto's personal copy
        state = self.program.init(stacked)
        loss_sum = torch.zeros(count, dtype=torch.float64, device=self.device)
        width = max((len(b) for s in schedules for b in s), default=1)
        for step in range(lengths[0] if plans else 0):
            active = sum(1 for n in lengths if n > step)
            idx = np.zeros((active, width), dtype=np.int64)
            mask = np.zeros((active, width), dtype=np.float32)
            for row in range(active):
                batch = schedules[row][step]
                idx[row, : len(batch)] = batch
                idx[row, len(batch) :] = batch[0]  # pad with its own example, masked out
                mask[row, : len(batch)] = 1.0
            first = step == 0 and first_fused
            head_phase = None
            if self.program.head_first is not None:
                head_phase = torch.from_numpy(step < head_steps[:active]).to(self.device)
            stacked, state = self._step(
                stacked,
                state,
                own,
                active,
                idx,
                mask,
                head_phase,
                loss_sum,
                shared,
                affine,
                first,
                one_step,
            )
        seen = torch.tensor(
            [len(p.indices) * e for p, e in zip(plans, epochs, strict=True)], dtype=torch.float64
        )
        return CohortResult(
            stacked,
            (loss_sum.cpu() / seen).numpy(),
            np.asarray(lengths, dtype=np.float64),
            is_delta=one_step,
        )

    def initial_losses(self, shared: Tensors, plans: Sequence[ClientPlan]) -> torch.Tensor:
        """Each planned client's mean loss of the global model on its training examples."""
        indices = np.concatenate([p.indices for p in plans])
        owner = np.repeat(np.arange(len(plans)), [len(p.indices) for p in plans])
        model = {n: shared[n] for n, _ in self.module.named_parameters()}
        with torch.no_grad():
            idx = torch.from_numpy(indices).to(self.device)
            logits = torch.func.functional_call(self.module, model, (self.x[idx],))
            losses = torch.nn.functional.cross_entropy(logits, self.y[idx], reduction="none")
            sums = torch.zeros(len(plans), dtype=torch.float64, device=self.device)
            sums.index_add_(0, torch.from_numpy(owner).to(self.device), losses.double())
        sizes = torch.tensor([len(p.indices) for p in plans], dtype=torch.float64)
        return sums / sizes.to(self.device)

    def _step(
        self,
        stacked: Tensors,
        state: tuple[Tensors, ...],
        own: Tensors,
        active: int,
        idx_np: np.ndarray,
        mask_np: np.ndarray,
        head_phase: torch.Tensor | None,
        loss_sum: torch.Tensor,
        shared: Tensors,
        affine: dict[str, tuple[float, torch.Tensor | None]] | None,
        first: bool = False,
        as_delta: bool = False,
    ) -> tuple[Tensors, tuple[Tensors, ...]]:
        """One local step of the first ``active`` clients. ``first``: every client's first
        step, from the shared global weights into the stacks (as deltas with ``as_delta``).
        ``head_phase``: per client, whether it is in the head-only phase of a head-first
        schedule (only the generic path runs such schedules)."""
        idx = torch.from_numpy(idx_np).to(self.device)
        mask = torch.from_numpy(mask_np).to(self.device)
        x, y = self.x[idx], self.y[idx]
        whole = active == len(loss_sum)

        def head(d: Tensors) -> Tensors:
            return d if whole else {k: v[:active] for k, v in d.items()}

        params, sub_state, sub_own = head(stacked), tuple(head(s) for s in state), head(own)
        with torch.no_grad():
            if first:
                assert self.layers is not None
                lr = self.program.local.lr
                losses = fused_first_step(
                    self.layers, shared, stacked, x, y, mask, lr, affine, as_delta
                )
                loss_sum += losses.double() * mask.sum(dim=1).double()
                return stacked, state
            if self.layers is not None and (self.program.plain or affine is not None):
                # Plain SGD, or a chain of affine terms fused into the update: in place.
                sliced = None if affine is None else self._head_affine(affine, active, whole)
                lr = self.program.local.lr
                losses = fused_sgd_step(self.layers, params, x, y, mask, lr, sliced)
                loss_sum[:active] += losses.double() * mask.sum(dim=1).double()
                return stacked, state
            if self.layers is not None:
                # The kernel's gradients are fresh tensors and ``params``/``sub_state`` are
                # views of the stacks: the chain runs in place, nothing is copied back.
                out = {n: buf[:active] for n, buf in self._grad_buffers.items()}
                grads, losses = fused_grads(self.layers, params, x, y, mask, out)
                self.program.add_term_grads_(grads, params, shared, sub_own)
                self.program.apply(params, grads, sub_state, shared, sub_own, inplace=True)
                loss_sum[:active] += losses.double() * mask.sum(dim=1).double()
                return stacked, state
        new_params, new_state, losses = self._vstep(
            params, sub_state, sub_own, x, y, mask, head_phase, shared
        )
        with torch.no_grad():
            loss_sum[:active] += losses.detach().double() * mask.sum(dim=1).double()
            if whole:
                return {k: v.detach() for k, v in new_params.items()}, tuple(
                    {k: v.detach() for k, v in s.items()} for s in new_state
                )
            for name, value in new_params.items():
                if value is not stacked[name]:
                    stacked[name][:active] = value
            for full, new in zip(state, new_state, strict=True):
                for name, value in new.items():
                    full[name][:active] = value
        return stacked, state
