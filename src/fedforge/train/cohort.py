"""Vectorized local SGD: a whole cohort of clients trained as one batched program.

Per-client parameters are stacked along a leading axis and every local step runs
``vmap(grad(loss))`` over the clients that still have a batch at that step. Clients are
ordered by their number of steps (most first), so the clients active at any step are a
prefix of the stack and no work is spent on clients that are done. Plain MLPs take a fused
path (:mod:`fedforge.train.cohort_mlp`) that never materializes gradients. A short last batch is
padded and masked, so each client's loss is the mean over its real examples, exactly as in
:class:`~fedforge.train.local_sgd.LocalSGD`. Batch order comes from the same
:func:`~fedforge.train.local_sgd.batch_order`, so the steps equal the sequential runtime's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from fedforge.train.cohort_mlp import fused_sgd_step, mlp_structure
from fedforge.train.local_sgd import LocalSGD, batch_order


@dataclass(frozen=True)
class ClientPlan:
    """One client's local work: its example indices (into the shared training arrays) and
    the generator that orders its batches."""

    client_id: int
    indices: np.ndarray
    rng: np.random.Generator


@dataclass(frozen=True)
class TrainedClient:
    client_id: int
    params: dict[str, np.ndarray]
    num_examples: int
    train_loss: float


def vectorization_blocker(module: torch.nn.Module, local: LocalSGD) -> str | None:
    """Why ``module`` trained with ``local`` cannot run vectorized, or None if it can."""
    if local.loss_fn is not F.cross_entropy:
        return "a custom loss function (the batched path implements masked cross-entropy)"
    if any(True for _ in module.buffers()):
        return "the model has buffers (e.g. batch norm statistics), which are per-call state"
    random_layers = (
        torch.nn.Dropout,
        torch.nn.Dropout1d,
        torch.nn.Dropout2d,
        torch.nn.AlphaDropout,
    )
    if any(isinstance(m, random_layers) for m in module.modules()):
        return "the model uses dropout (per-client randomness)"
    return None


class CohortTrainer:
    """Trains many clients of one model at once; math identical to ``LocalSGD.train``."""

    def __init__(
        self,
        module: torch.nn.Module,
        local: LocalSGD,
        train_x: np.ndarray,
        train_y: np.ndarray,
        device: torch.device | None = None,
    ) -> None:
        blocker = vectorization_blocker(module, local)
        if blocker:
            raise ValueError(f"cannot vectorize: {blocker}")
        self.device = device or torch.device("cpu")
        self.module = module.to(self.device)
        self.local = local
        self.names = [name for name, _ in module.named_parameters()]
        self.x = torch.from_numpy(train_x).to(self.device)
        self.y = torch.from_numpy(train_y).to(self.device)

        def masked_loss(
            params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, m: torch.Tensor
        ) -> torch.Tensor:
            logits = functional_call(self.module, params, (x,))
            return (F.cross_entropy(logits, y, reduction="none") * m).sum() / m.sum()

        self._grads = vmap(grad_and_value(masked_loss), randomness="error")
        self._mlp = mlp_structure(module)

    def bytes_per_client(self, sample_params: dict[str, np.ndarray]) -> int:
        """Rough peak memory one client adds to a chunk (params, grads, momentum, activations)."""
        size = sum(a.nbytes for a in sample_params.values())
        copies = 4 if self.local.momentum else 3
        activations = 8 * self.local.batch_size * self.x.shape[1] * self.x.element_size()
        return copies * size + activations

    def train(
        self, global_params: dict[str, np.ndarray], plans: Sequence[ClientPlan]
    ) -> list[TrainedClient]:
        """Train every planned client from ``global_params``; return them in plan order."""
        local = self.local
        schedules = [
            [
                p.indices[b]
                for b in batch_order(len(p.indices), local.batch_size, local.epochs, p.rng)
            ]
            for p in plans
        ]
        order = sorted(range(len(plans)), key=lambda i: -len(schedules[i]))  # stable
        count = len(plans)
        stacked = {
            name: torch.from_numpy(global_params[name])
            .to(self.device)
            .unsqueeze(0)
            .repeat(count, *([1] * global_params[name].ndim))
            for name in self.names
        }
        momentum = {n: torch.zeros_like(t) for n, t in stacked.items()} if local.momentum else {}
        loss_sum = torch.zeros(count, dtype=torch.float64, device=self.device)
        steps = len(schedules[order[0]]) if plans else 0
        for step in range(steps):
            active = sum(1 for i in order if len(schedules[i]) > step)
            idx = np.zeros((active, local.batch_size), dtype=np.int64)
            mask = np.zeros((active, local.batch_size), dtype=np.float32)
            for row, i in enumerate(order[:active]):
                batch = schedules[i][step]
                idx[row, : len(batch)] = batch
                mask[row, : len(batch)] = 1.0
            self._step(stacked, momentum, loss_sum, active, idx, mask)
        seen = torch.tensor(
            [len(plans[i].indices) * local.epochs for i in order], dtype=torch.float64
        )
        return self._unstack(plans, order, stacked, loss_sum.cpu() / seen)

    def _step(
        self,
        stacked: dict[str, torch.Tensor],
        momentum: dict[str, torch.Tensor],
        loss_sum: torch.Tensor,
        active: int,
        idx_np: np.ndarray,
        mask_np: np.ndarray,
    ) -> None:
        local = self.local
        idx = torch.from_numpy(idx_np).to(self.device)
        mask = torch.from_numpy(mask_np).to(self.device)
        x, y = self.x[idx], self.y[idx]
        params = {n: t[:active] for n, t in stacked.items()}
        if self._mlp is not None:
            with torch.no_grad():
                buffers = {n: t[:active] for n, t in momentum.items()}
                losses = fused_sgd_step(
                    self._mlp,
                    params,
                    buffers,
                    x,
                    y,
                    mask,
                    local.lr,
                    local.momentum,
                    local.weight_decay,
                )
                loss_sum[:active] += losses.double() * mask.sum(dim=1).double()
            return
        grads, losses = self._grads(params, x, y, mask)
        with torch.no_grad():
            loss_sum[:active] += losses.double() * mask.sum(dim=1).double()
            for name, p in params.items():
                g = grads[name]
                if local.weight_decay:
                    g = g.add(p, alpha=local.weight_decay)
                if local.momentum:
                    buf = momentum[name][:active]
                    buf.mul_(local.momentum).add_(g)
                    g = buf
                p.sub_(g, alpha=local.lr)

    def _unstack(
        self,
        plans: Sequence[ClientPlan],
        order: list[int],
        stacked: dict[str, torch.Tensor],
        mean_loss: torch.Tensor,
    ) -> list[TrainedClient]:
        """Row r of the stack (and of ``mean_loss``) holds client ``order[r]``; return the
        clients in plan order."""
        cpu = {n: t.cpu().numpy() for n, t in stacked.items()}
        row_of = {i: r for r, i in enumerate(order)}
        return [
            TrainedClient(
                client_id=p.client_id,
                # Views into this chunk's own result tensors: no copy needed.
                params={n: cpu[n][row_of[i]] for n in self.names},
                num_examples=len(p.indices),
                train_loss=float(mean_loss[row_of[i]]),
            )
            for i, p in enumerate(plans)
        ]
