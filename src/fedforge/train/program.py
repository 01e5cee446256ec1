"""Local training written once, as pure functions over explicit state (``torch.func``).

A client's local work is ``epochs`` passes of minibatch SGD on an *objective* (the model's
loss plus optional terms such as FedProx's proximal term) whose gradient flows through a
chain of *gradient transforms* (weight decay, SCAFFOLD's control correction, momentum),
optax-style: each transform is an ``(init, update)`` pair with explicit state.

Every function here works on one client's tensors. The vectorized runtime calls
``vmap(LocalProgram.step)`` over a stack of clients (``torch.func`` gradients); the
sequential, worker, Ray and network runtimes train one client at a time with
:meth:`LocalProgram.eager_step`, the same objective and chain with the gradient from eager
autograd on the module's own parameters (cheaper per call for one client); the fused MLP
kernels apply the same chain analytically (:meth:`LocalProgram.affine`) or through
:meth:`LocalProgram.apply` on stacked tensors (every transform is elementwise and broadcasts,
so shared tensors broadcast against a leading client axis). All paths are tested equal.

``shared`` holds tensors every client of a round receives (the global model under its
parameter names, ``control/<name>`` for SCAFFOLD's server control variate); ``own`` holds the
client's persistent state (``control/<name>`` for its control variate).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value

from fedforge.core.rng import mix64, mix64_int, seed_words

Tensors = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_ONE, _GOLDEN = np.uint64(1), np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1

# Per-task inputs the runtimes hand to ``finish`` in ``own`` beside the client's state (not
# persisted): the global model's mean loss on the client's training data (q-FedAvg's F_k).
INITIAL_LOSS = "program/initial_loss"
# A task scalar (simulated stragglers): the local epochs this client runs this round.
WORK_EPOCHS = "work.epochs"


def shuffles(
    sizes: Sequence[int] | np.ndarray, epochs: Sequence[int], seeds: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Every client's example order over its epochs, reshuffled each epoch, for many clients
    at once: client ``i`` (``sizes[i]`` examples, ``epochs[i]`` passes, 128-bit ``seeds[i]``)
    gets ``order[starts[i] : starts[i] + sizes[i] * epochs[i]]``, local example indices.

    Each epoch's permutation sorts SplitMix64 draws keyed by (seed, epoch): a pure function
    of the client's seed, computed as arrays over the whole cohort."""
    n = np.asarray(sizes, np.int64)
    e = np.asarray(epochs, np.int64)
    counts = n * e
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    client = np.repeat(np.arange(len(n)), counts)
    position = np.arange(int(counts.sum()), dtype=np.int64) - starts[client]
    size = n[client]
    epoch, example = position // size, position % size
    lo, hi = seed_words(seeds)
    stream = mix64(lo[client] ^ mix64(hi[client] ^ (epoch.astype(np.uint64) + _ONE) * _GOLDEN))
    keys = mix64(stream + (example.astype(np.uint64) + _ONE) * _GOLDEN)
    order = np.lexsort((keys, epoch, client))
    return example[order], starts


def _one_shuffle(num_examples: int, epochs: int, seed: int) -> np.ndarray:
    """:func:`shuffles` of one client (the same numbers, without the cohort's bookkeeping)."""
    lo, hi, golden = seed & _MASK64, (seed >> 64) & _MASK64, int(_GOLDEN)
    parts = []
    for epoch in range(epochs):
        stream = mix64_int(lo ^ mix64_int(hi ^ (((epoch + 1) * golden) & _MASK64)))
        if num_examples <= 64:  # (Python integers beat array set-up for a few examples)
            keys = [mix64_int((stream + (j + 1) * golden) & _MASK64) for j in range(num_examples)]
            parts.append(np.array(sorted(range(num_examples), key=keys.__getitem__), np.int64))
        else:
            steps = (np.arange(num_examples, dtype=np.uint64) + _ONE) * _GOLDEN
            parts.append(np.argsort(mix64(np.uint64(stream) + steps), kind="stable"))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def batch_order(
    num_examples: int, batch_size: int, epochs: int, seed: int | np.random.Generator
) -> list[np.ndarray]:
    """Index batches for ``epochs`` passes, reshuffled each epoch (:func:`shuffles` with the
    task's seed); the last batch of an epoch may be short.

    ``batch_size`` 0 means full batch (FedSGD). Every runtime derives a client's batches
    from these functions, which is what makes all runtimes take identical steps. Given a
    NumPy generator instead of a seed, each epoch is ``rng.permutation`` (callers that keep
    their own generators).
    """
    if isinstance(seed, np.random.Generator):
        parts = [seed.permutation(num_examples) for _ in range(epochs)]
        order = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    else:
        order = _one_shuffle(num_examples, epochs, seed)
    size = batch_size or num_examples
    return [
        order[start + i : start + min(i + size, num_examples)]
        for start in range(0, num_examples * epochs, max(num_examples, 1))
        for i in range(0, num_examples, size)
    ]


def task_epochs(scalars: Mapping[str, float], local: LocalSGD) -> int:
    """The local epochs of one task: ``local.epochs``, or fewer for a simulated straggler."""
    return int(scalars.get(WORK_EPOCHS, local.epochs))


@dataclass(frozen=True)
class Affine:
    """A gradient contribution affine in the weight: ``alpha * w + sum(coef * t)``, each ``t``
    broadcasting against ``w`` (shared tensors) or stacked like it (per-client state). Kernels
    that do not run autograd apply it analytically, fused into their update."""

    alpha: float = 0.0
    offsets: tuple[tuple[torch.Tensor, float], ...] = ()

    def __add__(self, other: Affine) -> Affine:
        return Affine(self.alpha + other.alpha, self.offsets + other.offsets)


class Term(Protocol):
    """An objective term added to the model's loss; ``affine`` is its analytic gradient for
    parameter ``name`` (every term here is quadratic, so its gradient is affine)."""

    def value(self, params: Tensors, shared: Tensors, own: Tensors) -> torch.Tensor: ...

    def affine(self, name: str, shared: Tensors, own: Tensors) -> Affine: ...


@dataclass(frozen=True)
class Proximal:
    """FedProx's proximal term ``mu / 2 * ||w - w_global||^2`` (Li et al. 2020)."""

    mu: float

    def value(self, params: Tensors, shared: Tensors, own: Tensors) -> torch.Tensor:
        total = sum(((p - shared[n]) ** 2).sum() for n, p in params.items())
        return 0.5 * self.mu * torch.as_tensor(total)

    def affine(self, name: str, shared: Tensors, own: Tensors) -> Affine:
        return Affine(self.mu, ((shared[name], -self.mu),))


class GradTransform(Protocol):
    """``init`` makes the transform's state; ``update`` maps gradients to gradients.

    With ``inplace`` the transform may overwrite ``grads`` and its own state (the fused
    kernels own both); otherwise it is pure, as ``vmap`` and autograd need."""

    def init(self, params: Tensors) -> Tensors: ...

    def update(
        self,
        grads: Tensors,
        state: Tensors,
        params: Tensors,
        shared: Tensors,
        own: Tensors,
        inplace: bool = False,
    ) -> tuple[Tensors, Tensors]: ...

    def affine(self, name: str, shared: Tensors, own: Tensors) -> Affine | None:
        """The transform as an added affine term, or None if it is not one (momentum)."""
        ...


@dataclass(frozen=True)
class WeightDecay:
    """``g + weight_decay * w`` (L2 regularization, as ``torch.optim.SGD`` applies it)."""

    weight_decay: float

    def init(self, params: Tensors) -> Tensors:
        return {}

    def update(
        self,
        grads: Tensors,
        state: Tensors,
        params: Tensors,
        shared: Tensors,
        own: Tensors,
        inplace: bool = False,
    ) -> tuple[Tensors, Tensors]:
        if inplace:
            return {n: g.add_(params[n], alpha=self.weight_decay) for n, g in grads.items()}, state
        return {n: g + self.weight_decay * params[n] for n, g in grads.items()}, state

    def affine(self, name: str, shared: Tensors, own: Tensors) -> Affine:
        return Affine(self.weight_decay)


@dataclass(frozen=True)
class ControlCorrection:
    """SCAFFOLD's drift correction ``g - c_i + c`` (Karimireddy et al. 2020, Algorithm 1)."""

    prefix: str = "control/"

    def init(self, params: Tensors) -> Tensors:
        return {}

    def update(
        self,
        grads: Tensors,
        state: Tensors,
        params: Tensors,
        shared: Tensors,
        own: Tensors,
        inplace: bool = False,
    ) -> tuple[Tensors, Tensors]:
        p = self.prefix
        if inplace:
            return {n: g.add_(shared[p + n]).sub_(own[p + n]) for n, g in grads.items()}, state
        return {n: g + shared[p + n] - own[p + n] for n, g in grads.items()}, state

    def affine(self, name: str, shared: Tensors, own: Tensors) -> Affine:
        p = self.prefix
        return Affine(0.0, ((shared[p + name], 1.0), (own[p + name], -1.0)))


@dataclass(frozen=True)
class Momentum:
    """Heavy-ball momentum ``b = beta * b + g`` (``torch.optim.SGD``, dampening 0), reset
    every round because its state is created by ``init`` at the start of local training."""

    beta: float

    def init(self, params: Tensors) -> Tensors:
        return {n: torch.zeros_like(p) for n, p in params.items()}

    def update(
        self,
        grads: Tensors,
        state: Tensors,
        params: Tensors,
        shared: Tensors,
        own: Tensors,
        inplace: bool = False,
    ) -> tuple[Tensors, Tensors]:
        if inplace:
            new = {n: state[n].mul_(self.beta).add_(g) for n, g in grads.items()}
        else:
            new = {n: self.beta * state[n] + g for n, g in grads.items()}
        return new, new

    def affine(self, name: str, shared: Tensors, own: Tensors) -> None:
        return None


@dataclass(frozen=True)
class PersonalCopy:
    """Ditto (Li et al. 2021): a personal copy of the model, ``prefix + name``, trained on the
    same batches as the global copy on ``F_k(v) + lam / 2 ||v - w_global||^2``.

    The quadratic is applied as its exact proximal step after each gradient step on
    ``F_k`` (proximal SGD, stable for every ``lam``): ``v <- (v' + lr lam w) / (1 + lr lam)``,
    so ``lam = 0`` is purely local training and ``lam -> inf`` keeps ``v`` at the global model.
    """

    lam: float
    prefix: str = "personal/"

    def names(self, trainable: list[str]) -> list[str]:
        return [self.prefix + n for n in trainable]

    def base(self, name: str) -> str | None:
        """The model parameter a personal tensor copies, or None for a model parameter."""
        return name[len(self.prefix) :] if name.startswith(self.prefix) else None


@dataclass(frozen=True)
class HeadFirst:
    """FedRep's local schedule (Collins et al. 2021, Algorithm 1): ``epochs`` passes that
    train only the head (``names``, body frozen), then the round's local epochs that train
    only the body (head frozen at its new value), on one stream of batches.

    A frozen tensor does not move, and neither does its transform state: momentum is reset
    every round, so the body's starts at zero when its phase begins, and the head's stops
    when its phase ends."""

    names: tuple[str, ...]
    epochs: int

    def __post_init__(self) -> None:
        if not self.names or self.epochs < 1:
            raise ValueError("a head-first schedule needs head names and epochs >= 1")


@dataclass(frozen=True)
class LocalSGD:
    """Client optimizer settings: ``epochs`` passes of minibatch SGD (``batch_size`` 0 is
    full batch). Momentum state is created fresh each round, as in FedAvg."""

    lr: float = 0.05
    epochs: int = 1
    batch_size: int = 10
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss_fn: LossFn = F.cross_entropy

    def num_steps(self, num_examples: int) -> int:
        """Local SGD steps a client with ``num_examples`` examples takes per round."""
        return self.epochs * self.batches(num_examples)

    def batches(self, num_examples: int) -> int:
        """Minibatches in one pass over ``num_examples`` examples."""
        return -(-num_examples // (self.batch_size or num_examples))


@dataclass(frozen=True)
class LocalProgram:
    """The objective and the gradient chain of one algorithm's local training."""

    local: LocalSGD
    terms: tuple[Term, ...] = ()
    corrections: tuple[GradTransform, ...] = ()
    transforms: tuple[GradTransform, ...] = field(init=False)
    # FedPer: the client state holds ``own_start + name`` for its personal parameters, and
    # local training starts them from there instead of from the global model.
    own_start: str | None = None
    personal: PersonalCopy | None = None  # Ditto's personal copy, trained beside the model
    initial_loss: bool = False  # finish needs own[INITIAL_LOSS] (q-FedAvg)
    head_first: HeadFirst | None = None  # FedRep: head-only steps, then body-only steps

    def __post_init__(self) -> None:
        if self.head_first is not None and self.personal is not None:
            raise ValueError("a head-first schedule cannot train a personal copy")
        chain: list[GradTransform] = []
        if self.local.weight_decay:
            chain.append(WeightDecay(self.local.weight_decay))
        chain.extend(self.corrections)
        if self.local.momentum:
            chain.append(Momentum(self.local.momentum))
        object.__setattr__(self, "transforms", tuple(chain))

    @property
    def plain(self) -> bool:
        """True for plain SGD on the loss alone (the fused kernel's fastest case)."""
        return not self.terms and not self.transforms and self.personal is None

    @property
    def per_client_start(self) -> bool:
        """True when some trained tensors start from the client's state, not the global model."""
        return self.own_start is not None or self.personal is not None

    def passes(self, epochs: int) -> int:
        """Passes over the local data in a round of ``epochs`` local (body) epochs, counting
        the head-only ones of a head-first schedule."""
        return epochs + (self.head_first.epochs if self.head_first else 0)

    def head_steps(self, num_examples: int) -> int:
        """The leading steps that train only the head (0 without a head-first schedule)."""
        return self.head_first.epochs * self.local.batches(num_examples) if self.head_first else 0

    def num_steps(self, num_examples: int, epochs: int | None = None) -> int:
        """Local steps in a round of ``epochs`` (default: the configured) local epochs, the
        head-only steps included: the step count of the virtual clock and of FedNova."""
        body = self.local.epochs if epochs is None else epochs
        return self.passes(body) * self.local.batches(num_examples)

    def trains(self, name: str, head_phase: bool) -> bool:
        """Whether ``name`` is updated in the given phase of a head-first schedule."""
        return self.head_first is None or (name in self.head_first.names) == head_phase

    def trained_names(self, trainable: list[str]) -> list[str]:
        """Every tensor local training updates: the model's parameters and personal copies."""
        return trainable + (self.personal.names(trainable) if self.personal else [])

    def starts(self, own_keys: list[str]) -> dict[str, str]:
        """Trained tensor name -> the client-state key its local training starts from."""
        out = {}
        for key in own_keys:
            if self.own_start is not None and key.startswith(self.own_start):
                out[key[len(self.own_start) :]] = key
            elif self.personal is not None and self.personal.base(key) is not None:
                out[key] = key
        return out

    def base_name(self, name: str) -> str:
        """The model parameter a trained tensor belongs to (itself, or the one it copies)."""
        base = self.personal.base(name) if self.personal else None
        return base if base is not None else name

    @property
    def stateless(self) -> bool:
        """True when no gradient transform keeps state across steps (no momentum): the chain
        is then affine and the fused kernels apply it inside their update."""
        probe = {"w": torch.zeros(1)}
        return not any(t.init(probe) for t in self.transforms)

    @property
    def uses_cross_entropy(self) -> bool:
        return self.local.loss_fn is F.cross_entropy

    def init(self, params: Tensors) -> tuple[Tensors, ...]:
        return tuple(t.init(params) for t in self.transforms)

    def objective(
        self,
        logits: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None,
        params: Tensors,
        shared: Tensors,
        own: Tensors,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective to differentiate, model loss to report) of a batch. With ``mask``, the
        loss is the mean over the real examples of a padded batch (the vectorized runtime
        pads short batches)."""
        if mask is None:
            loss = self.local.loss_fn(logits, y)
        else:
            loss = (F.cross_entropy(logits, y, reduction="none") * mask).sum() / mask.sum()
        total = loss
        for term in self.terms:
            total = total + term.value(params, shared, own)
        return total, loss.detach()

    def apply(
        self,
        params: Tensors,
        grads: Tensors,
        state: tuple[Tensors, ...],
        shared: Tensors,
        own: Tensors,
        inplace: bool = False,
        head_phase: torch.Tensor | None = None,
    ) -> tuple[Tensors, tuple[Tensors, ...]]:
        """Run the gradient chain and take the SGD step. Pure (returns new tensors) unless
        ``inplace``, which updates ``params``, ``grads`` and ``state`` where they are.

        ``head_phase`` (a boolean scalar, one per client under ``vmap``) runs a head-first
        schedule's phase: the frozen tensors and their transform state keep their values."""
        if self.head_first is not None and head_phase is not None:
            unfrozen, unfrozen_state = self.apply(params, grads, state, shared, own)
            return self._freeze(params, unfrozen, state, unfrozen_state, head_phase)
        new_state = []
        for transform, sub in zip(self.transforms, state, strict=True):
            grads, sub = transform.update(grads, sub, params, shared, own, inplace)
            new_state.append(sub)
        lr = self.local.lr
        if inplace:
            new = {n: p.sub_(grads[n], alpha=lr) for n, p in params.items()}
        else:
            new = {n: p - lr * grads[n] for n, p in params.items()}
        if self.personal is not None:
            new = self._personal_prox(new, shared, inplace)
        return new, tuple(new_state)

    def _freeze(
        self,
        params: Tensors,
        new: Tensors,
        state: tuple[Tensors, ...],
        new_state: tuple[Tensors, ...],
        head_phase: torch.Tensor,
    ) -> tuple[Tensors, tuple[Tensors, ...]]:
        """Keep the old value of every tensor (and its transform state) frozen in this phase."""
        assert self.head_first is not None
        head = set(self.head_first.names)

        def keep(name: str, old: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            trains = head_phase if name in head else ~head_phase
            return torch.where(trains, value, old)

        params_out = {n: keep(n, params[n], v) for n, v in new.items()}
        state_out = tuple(
            {n: keep(n, old[n], v) if n in params else v for n, v in sub.items()}
            for old, sub in zip(state, new_state, strict=True)
        )
        return params_out, state_out

    def _personal_prox(self, params: Tensors, shared: Tensors, inplace: bool) -> Tensors:
        """Ditto's proximal step toward the global model on the personal copy."""
        assert self.personal is not None
        eta = self.local.lr * self.personal.lam
        out = dict(params)
        for name, p in params.items():
            base = self.personal.base(name)
            if base is None:
                continue
            if inplace:
                out[name] = p.add_(shared[base], alpha=eta).div_(1.0 + eta)
            else:
                out[name] = (p + eta * shared[base]) / (1.0 + eta)
        return out

    def step(
        self,
        module: torch.nn.Module,
        params: Tensors,
        state: tuple[Tensors, ...],
        shared: Tensors,
        own: Tensors,
        x: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor,
        head_phase: torch.Tensor | None = None,
    ) -> tuple[Tensors, tuple[Tensors, ...], torch.Tensor]:
        """One local SGD step on one client, ``module`` evaluated at ``params``: (new params,
        new chain state, batch loss). ``head_phase``: see :meth:`apply`."""

        def objective(weights: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
            model, personal = self.split(weights)
            logits = functional_call(module, model, (x,))
            total, loss = self.objective(logits, y, mask, model, shared, own)
            if personal:
                p_logits = functional_call(module, personal, (x,))
                total = total + self.objective(p_logits, y, mask, personal, shared, own)[0]
            return total, loss

        grads, (_, loss) = grad_and_value(objective, has_aux=True)(params)
        new_params, new_state = self.apply(params, grads, state, shared, own, head_phase=head_phase)
        return new_params, new_state, loss

    def eager_step(
        self,
        module: torch.nn.Module,
        params: Tensors,
        state: tuple[Tensors, ...],
        shared: Tensors,
        own: Tensors,
        x: torch.Tensor,
        y: torch.Tensor,
        head_phase: bool = False,
    ) -> tuple[tuple[Tensors, ...], torch.Tensor]:
        """:meth:`step` for one client whose weights are ``module``'s own parameters (and Ditto's
        personal copy, leaf tensors beside them): the same
        objective and chain, with the gradient from eager autograd and the update in place
        (one client at a time, torch.func's per-call set-up costs more than the step).

        ``head_phase`` picks a head-first schedule's phase: only the tensors it trains get a
        gradient and go through the chain, the others and their state are left as they are."""
        model, personal = self.split(params)
        total, loss = self.objective(module(x), y, None, model, shared, own)
        if personal:
            p_logits = functional_call(module, personal, (x,))
            total = total + self.objective(p_logits, y, None, personal, shared, own)[0]
        trained, sub_state = params, state
        if self.head_first is not None:
            trained = {n: p for n, p in params.items() if self.trains(n, head_phase)}
            sub_state = tuple({n: s[n] for n in trained if n in s} for s in state)
        grads = torch.autograd.grad(total, list(trained.values()))
        with torch.no_grad():
            weights = {n: p.detach() for n, p in trained.items()}
            _, new_sub = self.apply(
                weights, dict(zip(trained, grads, strict=True)), sub_state, shared, own, True
            )
        if self.head_first is None:
            return new_sub, loss
        return tuple({**s, **sub} for s, sub in zip(state, new_sub, strict=True)), loss

    def split(self, weights: Tensors) -> tuple[Tensors, Tensors]:
        """(model parameters, the personal copy under the model's names)."""
        if self.personal is None:
            return weights, {}
        model, personal = {}, {}
        for name, w in weights.items():
            base = self.personal.base(name)
            if base is None:
                model[name] = w
            else:
                personal[base] = w
        return model, personal

    def add_term_grads_(
        self, grads: Tensors, params: Tensors, shared: Tensors, own: Tensors
    ) -> None:
        """Add every term's analytic gradient to ``grads`` in place."""
        for name, g in grads.items():
            for term in self.terms:
                affine = term.affine(name, shared, own)
                g.add_(params[name], alpha=affine.alpha)
                for tensor, coef in affine.offsets:
                    g.add_(tensor, alpha=coef)

    def affine(self, name: str, shared: Tensors, own: Tensors) -> Affine | None:
        """Terms plus transforms as one affine gradient contribution for parameter ``name``,
        or None when the chain has a stateful transform (momentum)."""
        total = Affine()
        for term in self.terms:
            total = total + term.affine(name, shared, own)
        for transform in self.transforms:
            part = transform.affine(name, shared, own)
            if part is None:
                return None
            total = total + part
        return total
