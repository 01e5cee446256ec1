"""Sample-level DP-SGD through Opacus: per-example clipping, noise scale, Poisson batches,
randomness, cleanup of the caller's module, and each client's accountant."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedforge.core.errors import ConfigError
from fedforge.privacy.dp_sgd import (
    DPSGDResult,
    SampleDP,
    client_epsilon,
    num_steps,
    sample_rate,
    train_dp_sgd,
)
from fedforge.train.program import LocalSGD
from tests.conftest import small_mlp

OPACUS_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample")
OPACUS_MODULE_ATTRS = ("activations", "max_batch_len", "autograd_grad_sample_hooks")
TINY_NOISE = 1e-9  # SampleDP refuses zero noise; this much is far below float32 resolution


def linear(d_in: int, d_out: int, seed: int = 0) -> torch.nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Linear(d_in, d_out)


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def zero_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A mean-reduced loss whose gradient is exactly zero: every update is pure noise."""
    return (out * 0.0).mean()


def blobs(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    direction = torch.randn(dim, generator=g)
    direction /= direction.norm()
    x = (2 * y - 1).float()[:, None] * 2.0 * direction + 0.5 * torch.randn(n, dim, generator=g)
    return x, y


def per_example_grads(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = []
    for i in range(len(x)):
        loss = F.cross_entropy(module(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(module.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def assert_clean(module: torch.nn.Module) -> None:
    """No trace of Opacus: no hooks, no per-sample attributes, no leftover gradients."""
    for p in module.parameters():
        for attr in (*OPACUS_PARAM_ATTRS, "summed_grad"):
            assert not hasattr(p, attr), attr
        assert p.grad is None
    for sub in module.modules():
        assert not sub._forward_hooks and not sub._forward_pre_hooks
        assert not sub._backward_hooks and not sub._backward_pre_hooks
        for attr in (*OPACUS_MODULE_ATTRS, "ft_compute_sample_grad"):
            assert attr not in sub.__dict__, attr


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": 0.0},
        {"noise_multiplier": -1.0},
        {"noise_multiplier": math.nan},
        {"max_grad_norm": 0.0},
        {"delta": 0.0},
        {"delta": 1.0},
        {"accountant": "moments"},
    ],
)
def test_sample_dp_rejects_invalid_settings(kwargs: dict[str, object]) -> None:
    settings: dict[str, object] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
    settings.update(kwargs)
    with pytest.raises(ConfigError):
        SampleDP(**settings)  # type: ignore[arg-type]


def test_sampling_rate_and_steps() -> None:
    assert sample_rate(10, 100) == 0.1
    assert sample_rate(0, 100) == sample_rate(500, 100) == 1.0
    assert num_steps(LocalSGD(epochs=3, batch_size=30), 100) == 3 * 4  # epochs * ceil(1/q)
    assert num_steps(LocalSGD(epochs=2, batch_size=0), 100) == 2
    with pytest.raises(ConfigError):
        sample_rate(10, 0)


# ---------------------------------------------------------------- the mechanism


def test_one_step_clips_each_example_then_averages_over_the_expected_batch() -> None:
    """Full batch, one step, negligible noise: the update is exactly
    -lr * mean_i(g_i * min(1, C / ||g_i||)), with each example clipped on its own."""
    x, y = blobs(16, 5, seed=1)
    x[:4] *= 40.0  # these examples have large gradients and are clipped; the others are not
    module, reference = linear(5, 2), linear(5, 2)
    grads = per_example_grads(reference, x, y)
    norms = grads.norm(dim=1)
    clip = 2.5
    assert norms.min() < clip < norms.max()
    clipped = grads * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]
    expected = flat(reference) - 0.3 * clipped.mean(dim=0)

    local = LocalSGD(lr=0.3, epochs=1, batch_size=0)
    result = train_dp_sgd(module, x, y, local, SampleDP(TINY_NOISE, clip, 1e-5), 0, True)

    assert result == DPSGDResult(steps=1, train_loss=result.train_loss, sample_rate=1.0)
    assert torch.allclose(flat(module), expected, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_one_record_moves_the_model_by_at_most_two_clip_norms(seed: int) -> None:
    """Replace one record by an outlier: with the same seed (same batch and noise, here
    real noise), the two results differ by at most lr * 2C / n, the sensitivity the
    accountant assumes, although the outlier's raw gradient is enormous."""
    x, y = blobs(20, 4, seed=seed)
    x_adj, y_adj = x.clone(), y.clone()
    x_adj[7] = 1e3 * torch.ones(4)
    with torch.no_grad():  # a label the model gets badly wrong: a huge gradient
        y_adj[7] = linear(4, 3, seed)(x_adj[7]).argmin()
    local, dp = LocalSGD(lr=0.5, epochs=1, batch_size=0), SampleDP(1.0, 0.2, 1e-5)
    bound = local.lr * 2 * dp.max_grad_norm / len(x)
    pair_x, pair_y = torch.stack([x[7], x_adj[7]]), torch.stack([y[7], y_adj[7]])
    raw = per_example_grads(linear(4, 3, seed), pair_x, pair_y)
    assert local.lr * (raw[0] - raw[1]).norm() / len(x) > 100 * bound  # SGD would leak it

    a, b = linear(4, 3, seed), linear(4, 3, seed)
    train_dp_sgd(a, x, y, local, dp, seed, True)
    train_dp_sgd(b, x_adj, y_adj, local, dp, seed, True)
    distance = (flat(a) - flat(b)).norm()
    assert 0 < distance <= bound * (1 + 1e-4)


@pytest.mark.parametrize(("n", "batch_size"), [(50, 0), (40, 2)])
def test_noise_std_is_z_times_c_over_the_expected_batch_size(n: int, batch_size: int) -> None:
    """With a zero gradient every update is noise: per coordinate, after s steps, std
    lr * z * C * sqrt(s) / (q n), whatever the realized (here often empty) batch sizes."""
    module = linear(40, 25)  # 1,025 coordinates: the std is estimated within ~2.2%
    before = flat(module)
    x, y = torch.randn(n, 40), torch.zeros(n, dtype=torch.long)
    local = LocalSGD(lr=0.1, epochs=1, batch_size=batch_size, loss_fn=zero_loss)
    dp = SampleDP(noise_multiplier=1.3, max_grad_norm=0.7, delta=1e-5)
    result = train_dp_sgd(module, x, y, local, dp, seed=11, seeded=True)

    expected_batch = batch_size or n
    std = local.lr * dp.noise_multiplier * dp.max_grad_norm * math.sqrt(result.steps)
    std /= expected_batch
    change = flat(module) - before
    assert result.steps == (1 if batch_size == 0 else n // batch_size)
    assert abs(float(change.std()) / std - 1) < 0.08
    assert abs(float(change.mean())) < 4 * std / math.sqrt(change.numel())


def test_batches_are_poisson_samples_and_empty_ones_are_noise_only_steps() -> None:
    sizes: list[int] = []

    def recording_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sizes.append(len(y))
        return F.cross_entropy(out, y)

    x, y = blobs(200, 4, seed=0)
    local = LocalSGD(lr=0.1, epochs=5, batch_size=20, loss_fn=recording_loss)
    result = train_dp_sgd(linear(4, 2), x, y, local, SampleDP(1.0, 1.0, 1e-5), 3, True)
    assert result.steps == len(sizes) == 50 and result.sample_rate == 0.1
    assert len(set(sizes)) > 3  # Poisson: the batch size varies
    assert abs(sum(sizes) / len(sizes) - 20) < 3  # around q n = 20 (std of the mean 0.6)

    sizes.clear()
    module = linear(4, 2)
    x, y = blobs(10, 4, seed=1)  # q = 0.1 of 10: a third of the batches are empty
    local = LocalSGD(lr=0.1, epochs=3, batch_size=1, loss_fn=recording_loss)
    result = train_dp_sgd(module, x, y, local, SampleDP(1.0, 1.0, 1e-5), 3, True)
    assert result.steps == 30 and 0 < len(sizes) < 30 and min(sizes) >= 1
    assert math.isfinite(result.train_loss) and torch.isfinite(flat(module)).all()


def test_momentum_and_weight_decay_act_as_in_torch_sgd() -> None:
    """Zero data gradient, negligible noise: the trajectory is torch.optim.SGD's with only
    weight decay pulling the weights, momentum included."""
    module, reference = linear(6, 3), linear(6, 3)
    x, y = torch.randn(8, 6), torch.zeros(8, dtype=torch.long)
    local = LocalSGD(
        lr=0.1, epochs=3, batch_size=0, momentum=0.9, weight_decay=0.5, loss_fn=zero_loss
    )
    train_dp_sgd(module, x, y, local, SampleDP(TINY_NOISE, 1.0, 1e-5), 0, True)

    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.5)
    for _ in range(3):
        for p in reference.parameters():
            p.grad = torch.zeros_like(p)
        sgd.step()
    assert not torch.allclose(flat(module), flat(linear(6, 3)))
    assert torch.allclose(flat(module), flat(reference), atol=1e-6)


# ---------------------------------------------------------------- randomness


def test_seeded_runs_reproduce_and_unseeded_runs_do_not() -> None:
    x, y = blobs(60, 4, seed=0)
    local, dp = LocalSGD(lr=0.2, epochs=2, batch_size=10), SampleDP(1.0, 1.0, 1e-5)

    def run(seed: int, seeded: bool) -> tuple[torch.Tensor, DPSGDResult]:
        module = linear(4, 2)
        result = train_dp_sgd(module, x, y, local, dp, seed, seeded)
        return flat(module), result

    first, again, other = run(5, True), run(5, True), run(6, True)
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(run(5, False)[0], run(5, False)[0])


def test_global_torch_rng_is_left_alone() -> None:
    module = small_mlp(4, 2)  # (seeds the global RNG itself)
    x, y = blobs(30, 4, seed=0)
    state = torch.random.get_rng_state()
    train_dp_sgd(module, x, y, LocalSGD(batch_size=5), SampleDP(1, 1, 1e-5), 1, True)
    assert torch.equal(torch.random.get_rng_state(), state)


# ---------------------------------------------------------------- the caller's module


def test_module_is_trained_in_place_and_left_a_plain_module() -> None:
    module = small_mlp(4, 2)
    params = list(module.parameters())
    before = flat(module)
    module.eval()
    x, y = blobs(40, 4, seed=0)
    local, dp = LocalSGD(lr=0.1, epochs=1, batch_size=8, momentum=0.5), SampleDP(1, 1, 1e-5)
    train_dp_sgd(module, x, y, local, dp, 0, True)

    after = list(module.parameters())
    assert len(after) == len(params) and all(a is b for a, b in zip(after, params, strict=True))
    assert not torch.equal(flat(module), before)
    assert not module.training  # the caller's mode is restored
    assert_clean(module)

    F.cross_entropy(module(x), y).backward()  # plain autograd: no per-sample gradients
    assert all(p.grad is not None and not hasattr(p, "grad_sample") for p in params)
    module.zero_grad(set_to_none=True)

    train_dp_sgd(module, x, y, local, dp, 1, True)  # a second client reuses the module
    assert_clean(module)


def test_module_is_cleaned_when_training_fails() -> None:
    calls = 0

    def failing_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    module = small_mlp(4, 2)
    x, y = blobs(40, 4, seed=0)
    dp = SampleDP(1, 1, 1e-5)
    with pytest.raises(RuntimeError, match="boom"):
        train_dp_sgd(module, x, y, LocalSGD(batch_size=10, loss_fn=failing_loss), dp, 0, True)
    assert_clean(module)
    train_dp_sgd(module, x, y, LocalSGD(batch_size=10), dp, 0, True)
    assert_clean(module)


def test_batch_norm_is_refused_with_advice_and_leaves_no_trace() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    x, y = blobs(20, 4, seed=0)
    with pytest.raises(ConfigError, match="GroupNorm"):
        train_dp_sgd(module, x, y, LocalSGD(), SampleDP(1, 1, 1e-5), 0, True)
    assert_clean(module)


def test_learns_a_separable_problem_under_moderate_noise() -> None:
    x, y = blobs(200, 4, seed=2)
    module = small_mlp(4, 2, seed=3)
    with torch.no_grad():
        loss_before = float(F.cross_entropy(module(x), y))
    local = LocalSGD(lr=0.5, epochs=10, batch_size=20)
    result = train_dp_sgd(module, x, y, local, SampleDP(1.0, 1.0, 1e-5), 4, True)
    with torch.no_grad():
        out = module(x)
    assert result.steps == 100
    assert float(F.cross_entropy(out, y)) < 0.5 * loss_before
    assert float((out.argmax(1) == y).float().mean()) > 0.95


# ---------------------------------------------------------------- the accountant


@pytest.mark.parametrize(("batch_size", "steps"), [(10, 50), (10, 2000), (0, 5)])
def test_client_epsilon_agrees_with_dp_accounting(batch_size: int, steps: int) -> None:
    n, z, delta = 1000, 1.1, 1e-6
    q = batch_size / n if batch_size else 1.0
    event = dp_event.GaussianDpEvent(z)
    if q < 1:
        event = dp_event.PoissonSampledDpEvent(q, event)
    local = LocalSGD(batch_size=batch_size)

    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(event, steps)
    ours = client_epsilon(steps, n, local, SampleDP(z, 1.0, delta, "rdp"))
    assert ours == pytest.approx(rdp.get_epsilon(delta), rel=1e-9)

    pld = pld_privacy_accountant.PLDAccountant()  # finer discretization than fedforge's
    pld.compose(event, steps)
    reference = pld.get_epsilon(delta)
    ours = client_epsilon(steps, n, local, SampleDP(z, 1.0, delta, "pld"))
    assert reference * (1 - 1e-3) <= ours <= reference * 1.03  # coarser: rounds up only


def test_client_epsilon_grows_with_steps_and_matches_the_published_value() -> None:
    local, dp = LocalSGD(batch_size=10), SampleDP(4.0, 1.0, 1e-5, "rdp")
    values = [client_epsilon(s, 1000, local, dp) for s in (0, 10, 100, 1000, 10_000)]
    assert values[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(1.035, abs=0.01)  # q = 0.01, sigma = 4, 10,000 steps
