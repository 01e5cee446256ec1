"""Sample-level DP-SGD inside one client (Abadi et al. 2016), through Opacus.

For cross-silo federations where every *record* of a silo must be protected, not only the
silo as a whole. Each local step:

1. draws a Poisson batch: every one of the client's ``n`` examples independently with rate
   ``q = batch_size / n`` (``batch_size`` 0, or one of at least ``n``: ``q = 1``);
2. computes every example's gradient (Opacus's per-sample gradients, with the loss
   mean-reduced over the realized batch, as Opacus expects) and clips it to L2 norm ``C``;
3. sums the clipped gradients, adds Gaussian noise of standard deviation ``z * C`` per
   coordinate and divides by the *expected* batch size ``q * n``, a fixed denominator (the
   realized size would itself leak whether a record is present);
4. lets ``torch.optim.SGD`` apply weight decay and momentum to that noised gradient
   (post-processing: it costs no privacy).

A round takes ``epochs * ceil(n / batch_size)`` steps, a fixed number; a batch may be empty
and is then a noise-only step, as the accounting assumes. Each step is one
Poisson-subsampled Gaussian mechanism on the client's records, under add-or-remove-one-record
adjacency; :func:`client_epsilon` composes all the steps a client has taken, over every round
it trained in, with ``dp-accounting`` (PLD by default, RDP as an option).

What it protects: each record of a silo against everyone who sees what the silo sends (the
server, other silos, whoever reads the final model), with that silo's own (epsilon, delta).
What it does not: the silo as a whole (a silo's epsilon says nothing about whether the silo
took part; use client-level DP for that), and records that appear in several silos (each copy
is accounted by its own silo only).

Randomness. ``seeded=True`` derives the batch sampling and the noise from ``seed`` (a
reproducible research run: anyone who knows the seed can replay and subtract the noise, so it
must be labelled as seeded). ``seeded=False`` seeds both from ``os.urandom``: the seeds are
unpredictable, but the generators are torch's Mersenne Twister, which is not a
cryptographically secure generator (its state can in principle be recovered from enough of
its outputs). Batches are drawn from OS entropy too in that mode, because amplification by
sampling assumes nobody knows which records a step used, and the task seed is known to the
server.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedforge.core.errors import ConfigError
from fedforge.privacy.accounting import AccountantKind, SamplingScheme, epsilon
from fedforge.train.program import LocalSGD

if TYPE_CHECKING:
    from opacus import GradSampleModule

# What Opacus attaches to parameters (``GradSampleModule`` and ``DPOptimizer``, whose
# ``summed_grad`` its own cleanup forgets) and to submodules; all removed after training.
_PARAM_ATTRS = (
    "grad_sample",
    "_forward_counter",
    "_current_grad_sample",
    "_norm_sample",
    "summed_grad",
)
_MODULE_ATTRS = (
    "activations",
    "max_batch_len",
    "autograd_grad_sample_hooks",
    "ft_compute_sample_grad",
)

_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module"

_STREAM_TAG = 0x44505347  # "DPSG": keeps these streams apart from other uses of the seed


@dataclass(frozen=True)
class SampleDP:
    """DP-SGD settings: noise multiplier ``z``, per-example clip norm ``C``, and the
    ``delta`` at which each client's epsilon is reported; ``seeded`` draws batches and noise
    from the task seed (reproducible research runs) instead of OS entropy."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: AccountantKind = "pld"
    seeded: bool = False

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ConfigError(
                f"DP-SGD noise_multiplier must be > 0, got {self.noise_multiplier} "
                f"(without noise there is no privacy; train without DP-SGD instead)"
            )
        if not self.max_grad_norm > 0:
            raise ConfigError(
                f"DP-SGD max_grad_norm (the per-example clip norm) must be > 0, "
                f"got {self.max_grad_norm}"
            )
        if not 0 < self.delta < 1:
            raise ConfigError(
                f"DP-SGD delta must be in (0, 1), got {self.delta} "
                f"(usually well below 1 / the number of records of a silo)"
            )
        if self.accountant not in ("pld", "rdp"):
            raise ConfigError(f"DP-SGD accountant must be 'pld' or 'rdp', got {self.accountant!r}")


@dataclass(frozen=True)
class DPSGDResult:
    """One round of DP-SGD: the steps taken (each one release for the accountant), the mean
    loss over the steps whose batch was not empty (0.0 if all were), and the sampling rate."""

    steps: int
    train_loss: float
    sample_rate: float


def sample_rate(batch_size: int, num_examples: int) -> float:
    """The Poisson rate ``q``: ``batch_size / n``, or 1 for full batch (``batch_size`` 0)."""
    if num_examples < 1:
        raise ConfigError("DP-SGD needs a client with at least one training example")
    if batch_size < 0:
        raise ConfigError(f"local batch_size must be >= 0, got {batch_size}")
    if batch_size == 0 or batch_size >= num_examples:
        return 1.0
    return batch_size / num_examples


def num_steps(local: LocalSGD, num_examples: int) -> int:
    """Steps per round: ``epochs * ceil(1 / q)``, each on one Poisson batch."""
    q = sample_rate(local.batch_size, num_examples)
    per_epoch = 1 if q == 1.0 else -(-num_examples // local.batch_size)
    return local.epochs * per_epoch


def client_epsilon(total_steps: int, num_examples: int, local: LocalSGD, dp: SampleDP) -> float:
    """The client's cumulative epsilon at ``dp.delta`` after ``total_steps`` DP-SGD steps
    (all its rounds together, at one rate and noise multiplier): the Poisson-subsampled
    Gaussian composed ``total_steps`` times, from ``dp-accounting``."""
    q = sample_rate(local.batch_size, num_examples)
    scheme = SamplingScheme("poisson", population=num_examples, rate=q)
    return epsilon(scheme, dp.noise_multiplier, total_steps, dp.delta, dp.accountant)


def add_steps(ledger: np.ndarray, rate: float, noise_multiplier: float, steps: int) -> np.ndarray:
    """A client's DP-SGD ledger, rows ``(rate, noise multiplier, steps)``, with ``steps`` more
    at this rate and multiplier (a resumed run may change either: each keeps its own row)."""
    rows = ledger.reshape(-1, 3).astype(np.float64)
    same = (rows[:, 0] == rate) & (rows[:, 1] == noise_multiplier)
    if same.any():
        rows = rows.copy()
        rows[np.flatnonzero(same)[0], 2] += steps
        return rows
    return np.concatenate([rows, [[rate, noise_multiplier, float(steps)]]])


def ledger_epsilon(ledger: np.ndarray, num_examples: int, dp: SampleDP) -> float:
    """Epsilon at ``dp.delta`` of every step in a client's ledger, each row's steps the
    Poisson-subsampled Gaussian of its rate and multiplier, composed by ``dp-accounting``."""
    from fedforge.privacy import ledger as central_ledger

    steps = {
        central_ledger.Release(SamplingScheme("poisson", num_examples, rate=float(q)), float(z)): (
            int(n)
        )
        for q, z, n in ledger.reshape(-1, 3)
    }
    return central_ledger.ledger_epsilon(steps, dp.delta, dp.accountant)


def _generator_seeds(seed: int, seeded: bool) -> tuple[int, int]:
    """Seeds of the batch-sampling and the noise generators."""
    if not seeded:
        return (int.from_bytes(os.urandom(8), "little"), int.from_bytes(os.urandom(8), "little"))
    streams = np.random.SeedSequence([seed & (2**64 - 1), _STREAM_TAG]).spawn(2)
    sampling, noise = (int(s.generate_state(1, np.uint64)[0]) for s in streams)
    return sampling, noise


def _strip_opacus(module: torch.nn.Module) -> None:
    """Remove every attribute Opacus may have left on ``module`` and its parameters."""
    for p in module.parameters():
        for attr in _PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
    for sub in module.modules():
        for attr in _MODULE_ATTRS:
            if attr in sub.__dict__:
                delattr(sub, attr)


def _require_opacus() -> None:
    if importlib.util.find_spec("opacus") is None:  # pragma: no cover - depends on extras
        raise ConfigError("sample-level DP-SGD needs Opacus: pip install 'fedforge[dp-sgd]'")


def _wrap(module: torch.nn.Module) -> GradSampleModule:
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(module, strict=False)
    if problems:
        raise ConfigError(
            f"this model cannot be trained with per-example DP-SGD: {problems}; replace "
            f"BatchNorm with GroupNorm or LayerNorm (opacus.validators.ModuleValidator.fix "
            f"does it) and nn.LSTM/GRU with opacus.layers.DPLSTM/DPGRU"
        )
    try:
        return GradSampleModule(module, loss_reduction="mean", strict=True)
    except NotImplementedError as exc:
        raise ConfigError(
            f"this model cannot be trained with per-example DP-SGD: {exc} (layers with "
            f"buffers, such as BatchNorm, mix examples: use GroupNorm or LayerNorm)"
        ) from exc


def train_dp_sgd(
    module: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    local: LocalSGD,
    dp: SampleDP,
    seed: int,
    seeded: bool,
) -> DPSGDResult:
    """One round of DP-SGD on ``(x, y)``, training ``module`` in place.

    ``local.loss_fn`` must reduce by the mean over the batch (as ``F.cross_entropy`` does by
    default). Afterwards the module carries no Opacus hooks or attributes, its gradients are
    None, and its train/eval mode is as before; the same module can train the next client.
    Dropout draws from a private torch stream seeded from ``seed`` (the global RNG is left
    untouched). See the module docstring for the randomness of batches and noise.
    """
    _require_opacus()
    from opacus.optimizers import DPOptimizer

    # Opacus's backward hooks need only the gradients of each layer's *output*; torch warns
    # about exactly that when no input requires grad (the data never does). Silenced
    # narrowly (re-adding an identical filter replaces it), and not with catch_warnings,
    # which is not thread-safe.
    warnings.filterwarnings("ignore", message=_HOOK_WARNING, category=UserWarning)

    n = len(x)
    if len(y) != n:
        raise ConfigError(f"DP-SGD got {n} inputs but {len(y)} labels")
    q = sample_rate(local.batch_size, n)
    steps = num_steps(local, n)
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("DP-SGD needs a model with at least one trainable parameter")
    device = trainable[0].device
    sampling_seed, noise_seed = _generator_seeds(seed, seeded)
    sampling = torch.Generator().manual_seed(sampling_seed)
    noise = torch.Generator(device=device).manual_seed(noise_seed)

    was_training = module.training
    module.train()
    losses: list[float] = []
    with ExitStack() as cleanup:
        cleanup.callback(module.train, was_training)
        cleanup.callback(_strip_opacus, module)
        gsm = _wrap(module)
        cleanup.callback(gsm.to_standard_module)  # removes the hooks (runs first)
        optimizer = DPOptimizer(
            torch.optim.SGD(
                trainable,
                lr=local.lr,
                momentum=local.momentum,
                weight_decay=local.weight_decay,
            ),
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=n if q == 1.0 else local.batch_size,
            loss_reduction="mean",
            generator=noise,
        )
        cleanup.callback(optimizer.zero_grad, set_to_none=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed & ((1 << 63) - 1))  # dropout: the client's own stream
            for _ in range(steps):
                idx = (torch.rand(n, generator=sampling) < q).nonzero().squeeze(1)
                optimizer.zero_grad(set_to_none=True)
                if len(idx):
                    idx = idx.to(x.device)
                    loss = local.loss_fn(gsm(x[idx]), y[idx])
                    torch.autograd.backward(loss)
                    losses.append(float(loss.detach()))
                else:  # an empty Poisson batch: a noise-only step
                    for p in trainable:  # what Opacus's hooks would have stored
                        setattr(p, "grad_sample", p.new_zeros((0, *p.shape)))  # noqa: B010
                optimizer.step()
    train_loss = math.fsum(losses) / len(losses) if losses else 0.0
    return DPSGDResult(steps=steps, train_loss=train_loss, sample_rate=q)


def dp_sgd_labels(dp: SampleDP) -> dict[str, str]:
    """What the history records about a DP-SGD run (mode, sampling, accountant, noise)."""
    noise = "SEEDED from task seeds: reproducible and predictable, for research only"
    return {
        "dp.mode": "sample (DP-SGD in each client, Opacus)",
        "dp.sampling": "Poisson batches, q = batch_size / client examples",
        "dp.accountant": dp.accountant,
        "dp.delta": f"{dp.delta:g}",
        "dp.adjacency": "add/remove one example of a client's data",
        "dp.noise": noise if dp.seeded else "os-entropy seeds",
    }
