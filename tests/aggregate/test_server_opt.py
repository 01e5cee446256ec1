import numpy as np
import pytest

from fedforge.aggregate.server_opt import FedAdagrad, FedAdam, FedYogi, ServerSGD


def test_sgd_lr_one_adds_the_mean_delta() -> None:
    opt = ServerSGD()
    params = {"w": np.array([1.0, 2.0], np.float32)}
    new, state = opt.step(params, {"w": np.array([0.5, -1.0], np.float32)}, opt.init(params))
    np.testing.assert_array_equal(new["w"], [1.5, 1.0])
    assert new["w"].dtype == np.float32 and state == {}


def test_momentum_golden_values() -> None:
    opt = ServerSGD(lr=0.5, momentum=0.9)
    params = {"w": np.array([0.0])}
    state = opt.init(params)
    params, state = opt.step(params, {"w": np.array([1.0])}, state)  # v=1, w=0.5
    params, state = opt.step(params, {"w": np.array([1.0])}, state)  # v=1.9, w=1.45
    np.testing.assert_allclose(state["w"], [1.9])
    np.testing.assert_allclose(params["w"], [1.45])


@pytest.mark.parametrize(
    ("optimizer", "v1", "v2"),
    [
        # d1 = 1, d2 = -2; tau = 0.1, so v starts at 0.01; beta1 = 0.9, beta2 = 0.99.
        (FedAdam(lr=0.1, tau=0.1), 0.99 * 0.01 + 0.01 * 1.0, 0.99 * (0.99 * 0.01 + 0.01) + 0.04),
        (FedAdagrad(lr=0.1, tau=0.1), 0.01 + 1.0, 0.01 + 1.0 + 4.0),
        # Yogi: v - (1 - beta2) d^2 sign(v - d^2); v < d^2 both times, so v grows by 0.01 d^2.
        (FedYogi(lr=0.1, tau=0.1), 0.01 + 0.01 * 1.0, 0.01 + 0.01 + 0.01 * 4.0),
    ],
    ids=["adam", "adagrad", "yogi"],
)
def test_adaptive_optimizers_match_reddi_algorithm_2(optimizer, v1: float, v2: float) -> None:  # type: ignore[no-untyped-def]
    params = {"w": np.array([0.0], np.float32)}
    state = optimizer.init(params)
    np.testing.assert_allclose(state["v/w"], [0.01])
    params, state = optimizer.step(params, {"w": np.array([1.0], np.float32)}, state)
    m1 = 0.1 * 1.0
    x1 = 0.1 * m1 / (np.sqrt(v1) + 0.1)
    np.testing.assert_allclose(state["m/w"], [m1])
    np.testing.assert_allclose(state["v/w"], [v1])
    np.testing.assert_allclose(params["w"], [x1], rtol=1e-6)
    params, state = optimizer.step(params, {"w": np.array([-2.0], np.float32)}, state)
    m2 = 0.9 * m1 + 0.1 * -2.0
    np.testing.assert_allclose(state["v/w"], [v2])
    np.testing.assert_allclose(params["w"], [x1 + 0.1 * m2 / (np.sqrt(v2) + 0.1)], rtol=1e-6)
    assert params["w"].dtype == np.float32


def test_yogi_shrinks_v_when_the_update_is_small() -> None:
    opt = FedYogi(lr=0.1, tau=1.0)  # v starts at 1 > d^2 = 0.25
    state = opt.init({"w": np.zeros(1)})
    _, state = opt.step({"w": np.zeros(1)}, {"w": np.array([0.5])}, state)
    np.testing.assert_allclose(state["v/w"], [1.0 - 0.01 * 0.25])
