"""FedProx: the proximal term is an objective term; mu = 0 is FedAvg bit for bit."""

import numpy as np
import pytest
import torch

from fedforge.algorithms.fedavg import FedAvg
from fedforge.algorithms.fedprox import FedProx
from fedforge.core.params import params_equal
from fedforge.runtime.simulation import simulate
from fedforge.train.program import LocalProgram, LocalSGD, Proximal
from tests.conftest import small_mlp

LOCAL = LocalSGD(lr=0.1, epochs=2, batch_size=7, momentum=0.5)


@pytest.mark.parametrize("backend", ["sequential", "vectorized"])
def test_mu_zero_equals_fedavg_bit_for_bit(small_federated, backend: str) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(rounds=2, clients_per_round=6, seed=3, backend=backend)
    avg = simulate(small_mlp(), small_federated, FedAvg(local=LOCAL), **kwargs)  # type: ignore[arg-type]
    prox = simulate(small_mlp(), small_federated, FedProx(local=LOCAL, mu=0.0), **kwargs)  # type: ignore[arg-type]
    assert params_equal(avg.state.params, prox.state.params)


def test_proximal_gradient_is_mu_times_distance_to_global() -> None:
    params = {"w": torch.tensor([1.0, -2.0, 3.0], requires_grad=True)}
    shared = {"w": torch.tensor([0.5, 0.0, 3.0])}
    term = Proximal(mu=0.2)
    value = term.value(params, shared, {})
    assert float(value.detach()) == pytest.approx(0.1 * (0.25 + 4.0))
    (auto,) = torch.autograd.grad(value, params["w"])
    torch.testing.assert_close(auto, torch.tensor([0.1, -0.4, 0.0]))
    affine = term.affine("w", shared, {})  # the analytic form the fused kernels use
    ((offset, coef),) = affine.offsets
    torch.testing.assert_close(affine.alpha * params["w"].detach() + coef * offset, auto)


def test_proximal_term_pulls_clients_toward_the_global_model(small_federated) -> None:  # type: ignore[no-untyped-def]
    """A large mu keeps the update small: the round's change shrinks as mu grows."""
    model = small_mlp()
    start = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}

    def change(mu: float) -> float:
        r = simulate(model, small_federated, FedProx(local=LOCAL, mu=mu), rounds=1, seed=1)
        return float(sum(np.abs(r.state.params[n] - start[n]).sum() for n in start))

    assert change(10.0) < change(1.0) < change(0.0)


def test_program_with_terms_is_not_plain() -> None:
    assert LocalProgram(LocalSGD()).plain
    assert not FedProx(mu=0.1).program().plain
