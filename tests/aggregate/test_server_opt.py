import numpy as np

from fedforge.aggregate.server_opt import ServerSGD


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
