"""Vectorized local training: a whole cohort of clients as one batched program.

Per-client parameters are stacked along a leading axis; at every local step the clients that
still have a batch (a prefix of the stack: clients come sorted by step count, most first) take
``vmap(LocalProgram.step)``, the same step the sequential runtime takes one client at a time.
MLPs take the fused kernels of :mod:`fedforge.train.cohort_mlp` instead of autograd; a
head-first schedule (FedRep) passes each client's phase at the step (head-only while the step
index is below its head step count), on the generic path. A short last batch is padded and
masked, so each client's loss is the mean over its real examples.
Batch order comes from the same :func:`~fedforge.train.program.shuffles` as everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import vmap

from fedforge.train.cohort_lowrank import Chain, Schedule, implicit_steps, implicit_steps_cap
from fedforge.train.cohort_mlp import fused_grads, fused_sgd_step, mlp_structure
from fedforge.train.program import LocalProgram, Tensors, shuffles

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
    the task seed that orders its batches."""

    client_id: int
    indices: np.ndarray
    seed: int
    epochs: int | None = None  # fewer than the program's for a simulated straggler


@dataclass(frozen=True)
class CohortResult:
    """Stacked trained parameters (row i = plan i), and per-client loss and step count."""

    params: Tensors
    train_loss: np.ndarray
    steps: np.ndarray
    is_delta: bool = False  # params hold local - global (the fused kernels write changes)


def vectorization_blocker(module: torch.nn.Module, program: LocalProgram) -> str | None:
    """Why ``module`` trained by ``program`` cannot run vectorized, or None if it can."""
    if not program.uses_cross_entropy:
        return "a custom loss function (the batched path implements masked cross-entropy)"
    if any(not p.requires_grad for p in module.parameters()):
        return (
            "the model has frozen parameters (a LoRA base): the vectorized runtime stacks every "
            "parameter per client, a copy of the base each (fedforge.llm.batched trains LoRA "
            "cohorts over one base, but is not wired into the runtime yet)"
        )
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
        self.implicit_rows_override: int | None = None  # tests: force the explicit phase
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

    def implicit_rows(self) -> int:
        """Past batch rows up to which steps run in the implicit form (per-client weights are
        materialized after them); 0 where the fused kernels do not apply."""
        if self.layers is None or not self.program.stateless:
            return 0
        if self.implicit_rows_override is not None:
            return self.implicit_rows_override
        shapes = {n: p.shape for n, p in self.module.named_parameters()}
        return implicit_steps_cap(self.layers, shapes)

    def bytes_per_client(
        self, sample_params: dict[str, np.ndarray], own_bytes: int = 0, largest: int = 256
    ) -> int:
        """Rough peak memory one client adds to a chunk (params, grads, chain state, the
        implicit steps' history, activations). ``largest``: the most examples a client of
        the chunk holds, which bounds the batch width (full batch, or a batch size beyond
        every client's data)."""
        size = sum(a.nbytes for a in sample_params.values())
        program = self.program
        batch = min(self.program.local.batch_size or largest, largest)
        item = self.x.element_size()
        activations = 8 * batch * self.x.shape[1] * item
        if self.layers is not None and program.stateless:
            # The output stack and what finish makes of it (affine: a per-client offset more).
            copies = 2 if program.plain else 3
            # The implicit steps' history: per past row, every layer's inputs and output
            # gradients, the first layer's products, and the rows' Gram matrix.
            steps = program.num_steps(largest)
            rows = min(self.implicit_rows() // batch, steps) * batch
            shapes = [sample_params[layer.weight].shape for layer in self.layers]
            width = sum(out + inp for out, inp in shapes) + 3 * shapes[0][0] + rows
            activations += rows * width * item
        else:
            copies = 3 + len(program.transforms) + (0 if program.plain else 1)
        return copies * size + 2 * own_bytes + activations

    def _schedule(self, plans: Sequence[ClientPlan], epochs: list[int]) -> Schedule:
        """Every client's batches (:func:`shuffles`, as :func:`batch_order` cuts them for one
        client), laid out client-major and padded to the widest batch, for the whole chunk
        with array operations."""
        local = self.program.local
        sizes = np.array([len(p.indices) for p in plans], np.int64)
        order, starts = shuffles(sizes, epochs, [p.seed for p in plans])
        # Examples per batch: the batch size, or (full batch) the client's whole data.
        per_batch = np.maximum(sizes if not local.batch_size else local.batch_size, 1)
        per_batch = np.broadcast_to(per_batch, sizes.shape)
        batches = -(-sizes // per_batch) * np.asarray(epochs, np.int64)
        if np.any(np.diff(batches) > 0):
            raise ValueError("plans must be sorted by step count, most first")
        width = int(min(local.batch_size or sizes.max(), sizes.max())) if len(plans) else 1
        steps = int(batches[0]) if len(plans) else 0
        counts = sizes * np.asarray(epochs, np.int64)
        client = np.repeat(np.arange(len(plans)), counts)
        position = np.arange(len(order)) - starts[client]
        epoch, place = position // sizes[client], position % sizes[client]
        batch = epoch * -(-sizes[client] // per_batch[client]) + place // per_batch[client]
        column = batch * width + place % per_batch[client]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        pool = np.concatenate([p.indices for p in plans]) if len(plans) else np.zeros(0)
        examples = pool[offsets[client] + order].astype(np.int64)
        index = np.zeros((len(plans), steps * width), np.int64)
        mask = np.zeros((len(plans), steps * width), np.float32)
        # Padding repeats the batch's first example (masked out): fill every slot of a batch
        # with it, then write the real examples over it.
        first = place % per_batch[client] == 0
        heads = np.zeros((len(plans), steps), np.int64)
        heads[client[first], batch[first]] = examples[first]
        index[:] = np.repeat(heads, width, axis=1)
        index[client, column] = examples
        mask[client, column] = 1.0
        return Schedule(
            torch.from_numpy(index).to(self.device),
            torch.from_numpy(mask).to(self.device),
            batches,
            width,
        )

    def _chains(self, shared: Tensors, own: Tensors) -> dict[str, Chain]:
        """Per parameter, the affine chain split for the implicit steps: the offsets that are
        the parameter's own global value (FedProx) as a coefficient, the other shared ones
        summed, the per-client ones (stacked) with their coefficient (several are summed)."""
        out: dict[str, Chain] = {}
        for name in self.names:
            affine = self.program.affine(name, shared, own)
            assert affine is not None  # a stateless chain
            gamma, common, owned = 0.0, [], []
            for tensor, coef in affine.offsets:
                if tensor is shared[name]:
                    gamma += coef
                elif tensor.dim() == shared[name].dim():
                    common.append((tensor, coef))
                else:
                    owned.append((tensor, coef))
            total = None
            for tensor, coef in common:
                total = tensor * coef if total is None else total.add_(tensor, alpha=coef)
            own_tensor, own_coef = (owned[0][0], owned[0][1]) if len(owned) == 1 else (None, 0.0)
            if len(owned) > 1:
                own_tensor = owned[0][0] * owned[0][1]
                for tensor, coef in owned[1:]:
                    own_tensor.add_(tensor, alpha=coef)
                own_coef = 1.0
            out[name] = Chain(affine.alpha, gamma, total, own_tensor, own_coef)
        return out

    def train(self, shared: Tensors, own: Tensors, plans: Sequence[ClientPlan]) -> CohortResult:
        """Train every planned client from the global model in ``shared``. ``own`` holds the
        clients' stacked states; ``plans`` must be sorted by step count, most first. The
        returned parameters live in buffers the next call reuses: consume them first."""
        local = self.program.local
        # Passes over each client's data: its local epochs, plus FedRep's head-only ones.
        epochs = [
            self.program.passes(local.epochs if p.epochs is None else p.epochs) for p in plans
        ]
        schedule = self._schedule(plans, epochs)
        lengths = schedule.lengths
        count = len(plans)
        total_steps = int(lengths[0]) if count else 0
        loss_sum = torch.zeros(count, dtype=torch.float64, device=self.device)
        seen = torch.tensor(
            [len(p.indices) * e for p, e in zip(plans, epochs, strict=True)], dtype=torch.float64
        )
        base = self.program.base_name
        implicit = min(total_steps, self.implicit_rows() // schedule.width)
        stacked = {
            n: self._buffer(n, count, shared[base(n)], fill=implicit == 0) for n in self.names
        }
        first = 0
        if implicit:  # the first steps without per-client weights, deltas written directly
            chains = self._chains(shared, own)
            assert self.layers is not None
            implicit_steps(
                self.layers,
                shared,
                chains,
                schedule,
                implicit,
                local.lr,
                self.x,
                self.y,
                stacked,
                loss_sum,
            )
            first = implicit
        for name, key in self.program.starts(list(own)).items():
            stacked[name].copy_(own[key])  # FedPer's head, Ditto's personal copy
        state = self.program.init(stacked)
        affine = None
        if first < total_steps and self.layers is not None and not self.program.plain:
            affine = self._affine(shared, own)
        head_steps = np.array([self.program.head_steps(len(p.indices)) for p in plans])
        for step in range(first, total_steps):
            active = schedule.active(step)
            head_phase = None
            if self.program.head_first is not None:
                head_phase = torch.from_numpy(step < head_steps[:active]).to(self.device)
            now = schedule.rows(step)
            index, mask = schedule.index[:active, now], schedule.mask[:active, now]
            stacked, state = self._step(
                stacked, state, own, active, index, mask, head_phase, loss_sum, shared, affine
            )
        if implicit and total_steps > implicit:  # the explicit rows hold weights: to changes
            going_on = schedule.active(implicit)
            for name in self.names:
                stacked[name][:going_on].sub_(shared[base(name)])
        return CohortResult(
            stacked,
            (loss_sum.cpu() / seen).numpy(),
            lengths.astype(np.float64),
            is_delta=bool(implicit),
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
        index: torch.Tensor,
        mask: torch.Tensor,
        head_phase: torch.Tensor | None,
        loss_sum: torch.Tensor,
        shared: Tensors,
        affine: dict[str, tuple[float, torch.Tensor | None]] | None,
    ) -> tuple[Tensors, tuple[Tensors, ...]]:
        """One local step of the first ``active`` clients, whose batches are the example
        indices ``index`` (``mask`` 0 on padding). ``head_phase``: per client, whether it is in
        the head-only phase of a head-first schedule (only the generic path runs such
        schedules)."""
        x, y = self.x[index], self.y[index]
        whole = active == len(loss_sum)

        def head(d: Tensors) -> Tensors:
            return d if whole else {k: v[:active] for k, v in d.items()}

        params, sub_state, sub_own = head(stacked), tuple(head(s) for s in state), head(own)
        with torch.no_grad():
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
