"""Every backend against NumPy on identical inputs and weights; training on each backend."""

from __future__ import annotations

import numpy as np
import pytest

import xcnn
from xcnn.testing import check_parity, default_tolerance

NETS = {
    "tutorial": lambda: [
        xcnn.Conv2D(1, 8, 3),
        xcnn.MaxPool2D(2),
        xcnn.Flatten(),
        xcnn.Dense(13 * 13 * 8, 10),
    ],
    "deep": lambda: [
        xcnn.Conv2D(2, 4, 3, padding="same"),
        xcnn.ReLU(),
        xcnn.Conv2D(4, 6, 4, stride=2, padding="same"),
        xcnn.ReLU(),
        xcnn.MaxPool2D(3, stride=2),
        xcnn.AvgPool2D(2, stride=1),
        xcnn.Flatten(),
        xcnn.Dense(6 * 1 * 2, 7),
        xcnn.Softmax(),
    ],
}
SHAPES = {"tutorial": (4, 1, 28, 28), "deep": (3, 2, 11, 13)}


@pytest.mark.parametrize("net", NETS)
def test_forward_backward_parity_float32(other_backend, net):
    x = np.random.default_rng(0).random(SHAPES[net])
    labels = None
    if net == "tutorial":
        labels = np.array([3, 1, 4, 1])
    report = check_parity(
        NETS[net],
        x,
        labels=labels,
        backends=["numpy", (other_backend.spec, other_backend.device)],
        dtype="float32",
    )
    assert report.ok(), str(report)
    assert report.rtol == 1e-5
    per = next(iter(report.diffs.values()))
    assert {"output", "input_grad", "0.weight", "0.bias"} <= set(per)


def test_parity_float64_is_tight(other_backend):
    if not other_backend.float64:
        pytest.skip(f"{other_backend.id} has no float64")
    x = np.random.default_rng(1).random(SHAPES["deep"])
    report = check_parity(
        NETS["deep"],
        x,
        backends=["numpy", (other_backend.spec, other_backend.device)],
        dtype="float64",
    )
    assert report.ok(), str(report)


def test_parity_checker_can_fail():
    """Two different seeds must not pass as 'the same model'."""
    x = np.random.default_rng(0).random(SHAPES["tutorial"])
    report = check_parity(NETS["tutorial"], x, backends=["numpy", "numpy"])
    assert report.ok()
    a = xcnn.Sequential(NETS["tutorial"](), seed=0)
    b = xcnn.Sequential(NETS["tutorial"](), seed=1)
    assert not np.allclose(a.state_dict()["0.weight"], b.state_dict()["0.weight"])
    assert default_tolerance("float64") < default_tolerance("float32")


def test_same_seed_same_weights_and_first_step_loss(backend):
    x = np.random.default_rng(2).random((8, 1, 28, 28))
    y = np.arange(8) % 10
    ref = xcnn.Sequential(NETS["tutorial"](), seed=7)
    model = backend.model(NETS["tutorial"](), dtype="float32", seed=7)
    for key, value in ref.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[key], value)
    losses = []
    for m in (ref, model):
        loss, _ = xcnn.softmax_cross_entropy(m.forward(m.asarray(x)), m.asarray(y))
        losses.append(float(loss))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_a_few_training_steps_lower_the_loss(backend, opt):
    rng = np.random.default_rng(3)
    # A fixed small problem: the class is which quadrant holds a bright square.
    y = rng.integers(0, 4, 32)
    x = rng.random((32, 1, 12, 12)) * 0.1
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, 0, r * 6 + 1 : r * 6 + 5, c * 6 + 1 : c * 6 + 5] += 1.0
    model = backend.model(
        [
            xcnn.Conv2D(1, 4, 3),
            xcnn.ReLU(),
            xcnn.MaxPool2D(2),
            xcnn.Flatten(),
            xcnn.Dense(4 * 5 * 5, 4),
        ],
        dtype="float32",
        seed=0,
    )
    lr = {"sgd": 0.1, "momentum": 0.05, "adam": 0.01}[opt]
    optimizer = xcnn.make_optimizer(opt, model, lr)
    xd, yd = model.asarray(x), model.asarray(y)
    losses = []
    for _ in range(15):
        loss, d = xcnn.softmax_cross_entropy(model.forward(xd), yd)
        model.backward(d, input_grad=False)
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_model_to_moves_everything(backend):
    x = np.random.default_rng(4).random((2, 1, 28, 28))
    model = xcnn.Sequential(NETS["tutorial"](), seed=5)
    before = xcnn.to_numpy(model.forward(model.asarray(x)))
    model.to(backend.spec, backend.device)
    assert model.backend.name == backend.resolve().name
    after = xcnn.to_numpy(model.forward(model.asarray(x)))
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    model.to("numpy")
    np.testing.assert_array_equal(xcnn.to_numpy(model.forward(model.asarray(x))), before)


#: Done-when nets: the tutorial's, and one mixing "same" padding, an even kernel with
#: stride 2 and integer padding, and overlapping average pooling.
STEP_NETS = {
    "tutorial": (NETS["tutorial"], (4, 1, 28, 28), 10),
    "mixed": (
        lambda: [
            xcnn.Conv2D(2, 4, 3, padding="same"),
            xcnn.ReLU(),
            xcnn.Conv2D(4, 5, 4, stride=2, padding=1),
            xcnn.ReLU(),
            xcnn.AvgPool2D(3, stride=2),
            xcnn.MaxPool2D(2, stride=1),
            xcnn.Flatten(),
            xcnn.Dense(5 * 1 * 1, 4),
        ],
        (3, 2, 12, 12),
        4,
    ),
}


@pytest.mark.parametrize("net", STEP_NETS)
def test_float64_forward_gradients_and_three_sgd_steps_match_numpy(other_backend, net):
    """Within 1e-10 of NumPy on every library: outputs, loss, gradients, weights after each step."""
    if not other_backend.float64:
        pytest.skip(f"{other_backend.id} has no float64")
    make, shape, classes = STEP_NETS[net]
    rng = np.random.default_rng(5)
    x, y = rng.random(shape), rng.integers(0, classes, shape[0])
    models = [
        xcnn.Sequential(make(), dtype="float64", seed=3),
        other_backend.model(make(), dtype="float64", seed=3),
    ]
    optimizers = [xcnn.make_optimizer("sgd", m, 0.1) for m in models]
    worst = 0.0
    for _ in range(3):
        got = []
        for model, opt in zip(models, optimizers, strict=True):
            out = model.forward(model.asarray(x))
            loss, d = xcnn.softmax_cross_entropy(out, model.asarray(y))
            dx = model.backward(d)
            tensors = {"output": out, "loss": loss, "input_grad": dx}
            tensors.update({k: lay.grads[n] for k, lay, n in model.named_params()})
            opt.step()
            tensors.update({f"new {k}": lay.params[n] for k, lay, n in model.named_params()})
            got.append({k: xcnn.to_numpy(v) for k, v in tensors.items()})
        for key, ref in got[0].items():
            scale = max(float(np.abs(ref).max()), 1e-30)
            err = float(np.abs(got[1][key] - ref).max()) / scale
            worst = max(worst, err)
            assert err <= 1e-10, f"{other_backend.id} {key}: {err:.2e}"
    print(f"{other_backend.id} {net}: worst relative difference {worst:.1e}")
