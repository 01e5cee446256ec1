"""The implicit-weight kernel equals the explicit one, whichever step it hands over at."""

import numpy as np
import pytest
import torch

from fedforge.train.cohort import ClientPlan, CohortTrainer
from fedforge.train.program import ControlCorrection, LocalProgram, LocalSGD, Proximal

SIZES = [23, 17, 17, 9, 4, 1]  # ragged: short last batches, clients finishing at every step


def three_layers() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 12),
        torch.nn.ReLU(),
        torch.nn.Linear(12, 5),
        torch.nn.ReLU(),
        torch.nn.Linear(5, 3),
    )


PROGRAMS = {
    "plain": LocalProgram(LocalSGD(lr=0.2, epochs=2, batch_size=5)),
    "decay": LocalProgram(LocalSGD(lr=0.2, epochs=2, batch_size=5, weight_decay=0.05)),
    "prox": LocalProgram(LocalSGD(lr=0.2, epochs=2, batch_size=5), terms=(Proximal(0.3),)),
    "scaffold": LocalProgram(
        LocalSGD(lr=0.2, epochs=2, batch_size=5, weight_decay=0.01),
        corrections=(ControlCorrection(),),
    ),
}


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_implicit_steps_equal_the_explicit_kernel(name: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((sum(SIZES), 8)).astype(np.float32)
    y = rng.integers(0, 3, sum(SIZES))
    bounds = np.cumsum([0, *SIZES])
    net = three_layers()
    shared = {n: p.detach().clone() for n, p in net.named_parameters()}
    shared.update({f"control/{n}": 0.1 * torch.randn(p.shape) for n, p in net.named_parameters()})
    own = {f"control/{n}": 0.1 * torch.randn(len(SIZES), *p.shape) for n, p in shared.items()}
    own = {k: v for k, v in own.items() if not k.startswith("control/control/")}
    results = {}
    # 0: explicit only; 5 rows: the first step implicit (batch 5); 10: two (clients go on
    # and end within the hand-over step); 1000: every step implicit.
    for rows in (0, 5, 10, 1000):
        trainer = CohortTrainer(three_layers(), PROGRAMS[name], x, y)
        trainer.implicit_rows_override = rows
        plans = [
            ClientPlan(i, np.arange(bounds[i], bounds[i + 1]), seed=1000 + i)
            for i in range(len(SIZES))
        ]
        result = trainer.train(shared, {k: v.clone() for k, v in own.items()}, plans)
        change = {
            k: v.clone() if result.is_delta else v - shared[k] for k, v in result.params.items()
        }
        results[rows] = change, result.train_loss
    reference, reference_loss = results.pop(0)
    for change, loss in results.values():
        for key, value in reference.items():
            torch.testing.assert_close(change[key], value, atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(loss, reference_loss, rtol=1e-6)
