"""The first local steps of a cohort of MLP clients without per-client weight copies.

With plain SGD and an affine gradient chain (weight decay ``alpha``, an offset ``O``: the
proximal term's ``-mu w_global``, SCAFFOLD's ``c - c_i``), a layer's weight after ``t`` steps is

    W_t = b^t W_0 - lr c_t O - lr sum_{s<t} b^(t-1-s) G_s^T H_s,    b = 1 - lr alpha,

with ``c_t = sum_{s<t} b^(t-1-s)``, ``G_s`` the gradients of the layer's outputs and ``H_s`` its
inputs at step ``s`` (one batch: a few rows). So a client's forward product is

    H_t W_t^T = H_t M_t^T - lr c_t H_t O_i^T - lr sum_s b^(t-1-s) (H_t H_s^T) G_s,

``M_t = b^t W_0 - lr c_t O_shared`` being one matrix for every client: the large products are
GEMMs of the whole cohort's rows against shared weights, the per-client ones only touch the
small Gram matrices of the client's batches (and a per-client offset, SCAFFOLD's ``c_i``), and
each client's weight is written once, at the end, by one product over all its steps. The
backward product ``G_t W_t`` decomposes the same way. The corrections grow with the number
of past steps, so after ``steps`` steps the weights are materialized and the explicit kernel
(:mod:`fedforge.train.cohort_mlp`) continues. The math is that of ``LocalProgram.step``
(tested equal to the explicit kernel and to the sequential runtime); only the order of
floating-point sums differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedforge.core.buffers import empty
from fedforge.train.cohort_mlp import DenseLayer, loss_and_grad


@dataclass(frozen=True)
class Chain:
    """A parameter's affine gradient chain, ``g + alpha w + gamma w_0 + shared + own_coef
    own_i``: ``w_0`` its global value, ``shared`` one tensor for every client, ``own`` stacked
    per client (FedProx: ``alpha = mu, gamma = -mu``; SCAFFOLD: ``shared = c, own = c_i,
    own_coef = -1``)."""

    alpha: float = 0.0
    gamma: float = 0.0
    shared: torch.Tensor | None = None
    own: torch.Tensor | None = None
    own_coef: float = 0.0


@dataclass(frozen=True)
class Schedule:
    """Every client's batches, client-major: row ``i`` holds client ``i``'s example indices,
    batch after batch, each padded to ``width`` (``mask`` 0 on padding). Clients are sorted
    by step count (``lengths``), most first."""

    index: torch.Tensor  # (clients, max steps * width) int64
    mask: torch.Tensor  # (clients, max steps * width) float32
    lengths: np.ndarray  # (clients,) int: steps of each client, descending
    width: int

    def active(self, step: int) -> int:
        """How many clients (a prefix) take step ``step``."""
        return int(np.count_nonzero(self.lengths > step))

    def rows(self, step: int) -> slice:
        return slice(step * self.width, (step + 1) * self.width)


def implicit_steps_cap(layers: list[DenseLayer], shapes: dict[str, torch.Size]) -> int:
    """Past batch rows up to which the implicit form moves less memory than per-client weights.

    Per step a client's explicit kernel reads its weights and reads and writes them again
    (3 sum(in * out)); the implicit one reads the past rows' inputs and gradients twice
    (2 rows sum(in + out)), on average half of them: rows <= 3 sum(in out) / sum(in + out)."""
    area = sum(shapes[layer.weight].numel() for layer in layers)
    perimeter = sum(sum(shapes[layer.weight]) for layer in layers)
    return max(1, (3 * area) // perimeter)


def _decay(beta: float, t: int) -> tuple[float, float]:
    """(beta^t, c_t = sum_{s<t} beta^(t-1-s))."""
    if beta == 1.0:
        return 1.0, float(t)
    power = beta**t
    return power, (1.0 - power) / (1.0 - beta)


class _Layer:
    """One dense layer's shared weight, chain and history over the implicit steps."""

    def __init__(
        self,
        layer: DenseLayer,
        shared: dict[str, torch.Tensor],
        chains: dict[str, Chain],
        lr: float,
        clients: int,
        rows: int,
        first: bool,
    ) -> None:
        self.spec, self.lr = layer, lr
        self.w0 = shared[layer.weight]
        self.chain = chains.get(layer.weight, Chain())
        self.beta = 1.0 - lr * self.chain.alpha
        out_dim, in_dim = self.w0.shape
        device, dtype = self.w0.device, self.w0.dtype
        self.g_hist = empty((clients, rows, out_dim), dtype, device)
        # The first layer's inputs are the data: its Gram matrices are computed up front.
        self.h_hist = None if first else empty((clients, rows, in_dim), dtype, device)
        self.bias: torch.Tensor | None = None
        if layer.bias:
            self.b0 = shared[layer.bias]
            self.bias = self.b0.expand(clients, *self.b0.shape).clone()
            self.b_chain = chains.get(layer.bias, Chain())

    def scales(self, t: int) -> tuple[float, float]:
        """``M_t = a W_0 + b O_shared`` after ``t`` steps: (a, b)."""
        power, c = _decay(self.beta, t)
        return power - self.lr * c * self.chain.gamma, -self.lr * c

    def shared_weight(self, t: int, delta: bool = False) -> torch.Tensor | None:
        """``M_t`` (minus ``W_0`` with ``delta``); None when it is zero."""
        a, b = self.scales(t)
        if delta:
            a -= 1.0
        shared = self.chain.shared
        if shared is None or b == 0.0:
            return None if a == 0.0 else self.w0 if a == 1.0 else self.w0 * a
        return shared * b if a == 0.0 else torch.add(self.w0 * a, shared, alpha=b)

    def own_scale(self, t: int) -> float:
        """The per-client offset's coefficient in ``W_t``."""
        return -self.lr * _decay(self.beta, t)[1] * self.chain.own_coef

    def coefficients(self, t: int, width: int) -> torch.Tensor | None:
        """``b^(t-1-s)`` for every past row (None when all are 1)."""
        if self.beta == 1.0:
            return None
        powers = self.beta ** torch.arange(t - 1, -1, -1, dtype=torch.float64)
        return powers.repeat_interleave(width).to(self.w0.dtype).to(self.w0.device)

    def step_bias(self, g: torch.Tensor, active: int) -> None:
        """``b <- (1 - lr alpha) b - lr (sum of the batch's output gradients + offsets)``."""
        if self.bias is None:
            return
        b, chain, lr = self.bias[:active], self.b_chain, self.lr
        if chain.alpha:
            b.mul_(1.0 - lr * chain.alpha)
        b.sub_(g.sum(dim=1), alpha=lr)
        if chain.gamma:
            b.sub_(self.b0, alpha=lr * chain.gamma)
        if chain.shared is not None:
            b.sub_(chain.shared, alpha=lr)
        if chain.own is not None:
            b.sub_(chain.own[:active], alpha=lr * chain.own_coef)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[index]`` shaped ``(*index.shape, features)``."""
    return torch.index_select(x, 0, index.reshape(-1)).view(*index.shape, x.shape[-1])


def implicit_steps(
    layers: list[DenseLayer],
    shared: dict[str, torch.Tensor],
    chains: dict[str, Chain],
    schedule: Schedule,
    steps: int,
    lr: float,
    x: torch.Tensor,
    y: torch.Tensor,
    out: dict[str, torch.Tensor],
    loss_sum: torch.Tensor,
) -> None:
    """Run steps ``[0, steps)`` of every client. Into ``out`` (stacks, row per client) go the
    change ``W - W_0`` of each client whose schedule ends within these steps and the weights
    after ``steps`` steps of the others (a prefix: they continue explicitly). Each step's
    summed batch loss is added to ``loss_sum``."""
    clients, width = len(schedule.lengths), schedule.width
    rows = steps * width
    state = [
        _Layer(layer, shared, chains, lr, clients, rows, i == 0) for i, layer in enumerate(layers)
    ]
    inputs, tables = _first_layer_tables(state[0], schedule, steps, x)
    for t in range(steps):
        active = schedule.active(t)
        now, past = schedule.rows(t), slice(0, t * width)
        index, mask = schedule.index[:active, now], schedule.mask[:active, now]
        pre: list[torch.Tensor] = []
        h = torch.empty(0)
        for i, layer in enumerate(state):
            own = layer.chain.own
            if i == 0 and "w0" in tables:  # (each step's rows are read once: summed in place)
                z = tables["w0"][:active, now]
                if layer.scales(t)[0] != 1.0:
                    z.mul_(layer.scales(t)[0])
            else:
                if i == 0:
                    h = _gather(x, index)
                z = _product(h, layer.shared_weight(t), transpose=True)
            if own is not None:
                if i == 0:
                    z.add_(tables["own"][:active, now], alpha=layer.own_scale(t))
                else:
                    z.baddbmm_(h, own[:active].transpose(1, 2), alpha=layer.own_scale(t))
            if layer.bias is not None:
                z.add_(layer.bias[:active].unsqueeze(1))
            if t > 0:
                if i == 0:
                    grams = tables["gram"][:active, now, past]
                else:
                    grams = _gram(h, layer.h_hist, active, t)
                coef = layer.coefficients(t, width)
                if coef is not None:
                    grams = grams * coef
                z.baddbmm_(grams, layer.g_hist[:active, past], alpha=-lr)
            pre.append(z)
            if i + 1 < len(state):
                nxt = state[i + 1].h_hist
                assert nxt is not None
                h = nxt[:active, now]
                if layer.spec.relu:
                    torch.clamp_min(z, 0.0, out=h)
                else:
                    h.copy_(z)
        losses, g = loss_and_grad(pre[-1], y[index], mask)
        loss_sum[:active] += losses.double() * mask.sum(dim=1).double()
        for i in range(len(state) - 1, -1, -1):
            layer = state[i]
            below = _below(state, i, g, pre, t, active, width) if i > 0 else None
            layer.g_hist[:active, now] = g
            layer.step_bias(g, active)
            if below is not None:
                g = below
    _materialize(state, schedule, steps, inputs, out, lr)


def _product(h: torch.Tensor, w: torch.Tensor | None, transpose: bool) -> torch.Tensor:
    """``h @ w^T`` (or ``h @ w``) for stacked rows ``h`` against one shared matrix."""
    assert w is not None  # (only a change's base can be zero)
    flat = h.reshape(-1, h.shape[-1])
    result = flat @ (w.t() if transpose else w)
    return result.view(*h.shape[:-1], -1)


def _gram(h: torch.Tensor, hist: torch.Tensor | None, active: int, t: int) -> torch.Tensor:
    assert hist is not None
    return torch.bmm(h, hist[:active, : t * h.shape[1]].transpose(1, 2))


def _below(
    state: list[_Layer],
    index: int,
    g: torch.Tensor,
    pre: list[torch.Tensor],
    t: int,
    active: int,
    width: int,
) -> torch.Tensor:
    """The gradient of layer ``index``'s input, through its weight before step ``t``."""
    layer = state[index]
    past = slice(0, t * width)
    weight = layer.shared_weight(t)
    assert weight is not None
    below = _product(g, weight, transpose=False)
    if layer.chain.own is not None:
        below.baddbmm_(g, layer.chain.own[:active], alpha=layer.own_scale(t))
    if t > 0:
        grams = torch.bmm(g, layer.g_hist[:active, past].transpose(1, 2))
        coef = layer.coefficients(t, width)
        if coef is not None:
            grams = grams * coef
        assert layer.h_hist is not None
        below.baddbmm_(grams, layer.h_hist[:active, past], alpha=-layer.lr)
    if state[index - 1].spec.relu:
        below.mul_(pre[index - 1] > 0)
    return below


def _groups(schedule: Schedule, steps: int) -> list[tuple[int, int, int]]:
    """(first, end, steps) runs of clients with the same step count within ``steps`` (the
    clients that go on past ``steps`` form the first run)."""
    lengths = schedule.lengths
    key = np.where(lengths > steps, steps + 1, lengths)
    out, start = [], 0
    for end in range(1, len(key) + 1):
        if end == len(key) or key[end] != key[start]:
            out.append((start, end, int(min(key[start], steps))))
            start = end
    return out


def _first_layer_tables(
    layer: _Layer, schedule: Schedule, steps: int, x: torch.Tensor
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Per run of equal step counts the clients' input rows; and over all clients the Gram
    matrices of their inputs (``gram``), their products with the shared weight (``w0``,
    unless a shared offset changes it step by step) and with a per-client offset (``own``):
    the first layer's inputs are known before training, so its large products are computed
    once, run by run."""
    clients, rows = len(schedule.lengths), steps * schedule.width
    w0, own = layer.w0, layer.chain.own

    def table(*shape: int) -> torch.Tensor:
        return empty((clients, *shape), w0.dtype, w0.device)

    tables = {"gram": table(rows, rows)}
    if layer.chain.shared is None:
        tables["w0"] = table(rows, w0.shape[0])
    if own is not None:
        tables["own"] = table(rows, w0.shape[0])
    inputs = []
    for start, end, count in _groups(schedule, steps):
        span = slice(0, count * schedule.width)
        xs = _gather(x, schedule.index[start:end, span])
        inputs.append(xs)
        tables["gram"][start:end, span, span] = torch.bmm(xs, xs.transpose(1, 2))
        if "w0" in tables:
            tables["w0"][start:end, span] = _product(xs, w0, transpose=True)
        if own is not None:
            tables["own"][start:end, span] = torch.bmm(xs, own[start:end].transpose(1, 2))
    return inputs, tables


def _materialize(
    state: list[_Layer],
    schedule: Schedule,
    steps: int,
    inputs: list[torch.Tensor],
    out: dict[str, torch.Tensor],
    lr: float,
) -> None:
    """Write each client's change (or, past ``steps``, its weights) into ``out``."""
    width = schedule.width
    for (start, end, count), first_inputs in zip(_groups(schedule, steps), inputs, strict=True):
        going_on = bool(schedule.lengths[start] > steps)  # continues with the explicit kernel
        span = slice(0, count * width)
        for i, layer in enumerate(state):
            target = out[layer.spec.weight][start:end]
            g = layer.g_hist[start:end, span]
            coef = layer.coefficients(count, width)
            if coef is not None:
                g = g * coef.view(1, -1, 1)
            h = first_inputs if i == 0 else layer.h_hist[start:end, span]  # type: ignore[index]
            base = layer.shared_weight(count, delta=not going_on)
            own = layer.chain.own
            if own is not None:  # the per-client offset as the product's input: one pass
                torch.baddbmm(
                    own[start:end],
                    g.transpose(1, 2),
                    h,
                    beta=layer.own_scale(count),
                    alpha=-lr,
                    out=target,
                )
                if base is not None:
                    target.add_(base)
            elif base is None:  # the product alone: -lr folded into the (small) gradients
                torch.bmm((g * -lr).transpose(1, 2), h, out=target)
            else:
                expanded = base.expand(end - start, *base.shape)
                torch.baddbmm(expanded, g.transpose(1, 2), h, alpha=-lr, out=target)
            if layer.bias is not None:
                assert layer.spec.bias is not None
                bias = out[layer.spec.bias][start:end]
                if going_on:
                    bias.copy_(layer.bias[start:end])
                else:
                    torch.sub(layer.bias[start:end], layer.b0, out=bias)
