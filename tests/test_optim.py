"""Optimizers against their formulas; parameters are rebound, never mutated."""

from __future__ import annotations

import numpy as np
import pytest

import xcnn


def one_dense(seed=0):
    return xcnn.Sequential([xcnn.Dense(3, 2)], dtype="float64", seed=seed)


def set_grads(model, g):
    layer = model.layers[0]
    layer.grads = {"weight": g["weight"], "bias": g["bias"]}


def test_sgd_is_the_tutorial_update_and_rebinds():
    model = one_dense()
    layer = model.layers[0]
    w0 = layer.params["weight"]
    w0_copy = w0.copy()
    g = {"weight": np.full((3, 2), 2.0), "bias": np.ones(2)}
    set_grads(model, g)
    xcnn.SGD(model, lr=0.5).step()
    np.testing.assert_allclose(layer.params["weight"], w0_copy - 1.0)
    assert layer.params["weight"] is not w0
    np.testing.assert_array_equal(w0, w0_copy)  # the old array is untouched


def test_momentum_matches_pytorch_form():
    model = one_dense()
    layer = model.layers[0]
    p = layer.params["weight"].copy()
    opt = xcnn.SGD(model, lr=0.1, momentum=0.9)
    v = np.zeros_like(p)
    for step in range(3):
        g = np.full((3, 2), float(step + 1))
        set_grads(model, {"weight": g, "bias": np.zeros(2)})
        opt.step()
        v = g if step == 0 else 0.9 * v + g
        p = p - 0.1 * v
    np.testing.assert_allclose(layer.params["weight"], p)


def test_adam_matches_its_formula():
    model = one_dense()
    layer = model.layers[0]
    p = layer.params["weight"].copy()
    opt = xcnn.Adam(model, lr=0.01)
    m = v = np.zeros_like(p)
    rng = np.random.default_rng(0)
    for t in range(1, 5):
        g = rng.standard_normal((3, 2))
        set_grads(model, {"weight": g, "bias": np.zeros(2)})
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        mhat, vhat = m / (1 - 0.9**t), v / (1 - 0.999**t)
        p = p - 0.01 * mhat / (np.sqrt(vhat) + 1e-8)
    np.testing.assert_allclose(layer.params["weight"], p, rtol=1e-12)


def test_user_assigned_parameter_is_used_and_not_mutated():
    model = one_dense()
    layer = model.layers[0]
    mine = np.ones((3, 2))
    mine.flags.writeable = False
    layer.params["weight"] = mine
    out = model.forward(np.ones((1, 3)))
    np.testing.assert_allclose(out, np.full((1, 2), 3.0) + layer.params["bias"])
    model.backward(np.ones((1, 2)))
    xcnn.Adam(model, lr=0.1).step()
    np.testing.assert_array_equal(mine, 1.0)
    assert not np.array_equal(layer.params["weight"], mine)


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal((3, 2)) for _ in range(4)]

    def run(split):
        model = one_dense()
        opt = xcnn.Adam(model, lr=0.05)
        for i, g in enumerate(grads):
            if i == split:
                state = opt.state_dict()
                opt = xcnn.Adam(model, lr=0.05)
                opt.load_state_dict(state)
            set_grads(model, {"weight": g, "bias": g[0]})
            opt.step()
        return model.layers[0].params["weight"]

    np.testing.assert_array_equal(run(split=2), run(split=99))


def test_optimizer_state_moves_with_the_model():
    model = one_dense()
    opt = xcnn.SGD(model, lr=0.1, momentum=0.9)
    set_grads(model, {"weight": np.ones((3, 2)), "bias": np.ones(2)})
    opt.step()
    model.to("array_api_strict", "device1")
    opt.to_device()
    b = model.backend
    x = b.asarray(np.ones((1, 3)), "float64")
    model.backward(model.forward(x))
    opt.step()
    assert b.owns(opt.state["0.weight"]["velocity"])


def test_make_optimizer_and_bad_values():
    model = one_dense()
    assert isinstance(xcnn.make_optimizer("adam", model, 1e-3), xcnn.Adam)
    assert xcnn.make_optimizer("momentum", model, 0.1).momentum == 0.9
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        xcnn.make_optimizer("rmsprop", model, 0.1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        xcnn.SGD(model, lr=0)
    with pytest.raises(ValueError, match="momentum must be in"):
        xcnn.SGD(model, lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="optimizer state is for 'SGD', not Adam"):
        xcnn.Adam(model).load_state_dict(xcnn.SGD(model).state_dict())
