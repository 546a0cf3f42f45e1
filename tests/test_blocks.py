"""BatchNorm2D, Dropout, GlobalAvgPool2D and Residual: loop references, finite differences,
PyTorch's BatchNorm, parity on every backend, and the checkers failing on broken code."""

from __future__ import annotations

import numpy as np
import pytest

import xcnn
from xcnn import normalization as N
from xcnn.backend import to_numpy
from xcnn.testing import check_gradients, check_parity

RNG = np.random.default_rng(0)


def _built(layer, case, dtype="float64", seed=0):
    return layer.build(case.resolve(), dtype, seed)


class _Replay:
    """A stand-in for ``model.rng`` that draws the same numbers every call (fixed masks)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def random(self, shape, dtype="float64"):
        return np.random.default_rng(self.seed).random(shape, dtype=dtype)


# -- loop references --------------------------------------------------------------


def _bn_loops(x, w, b, eps):
    """Per channel, per value: the textbook definition, in float64."""
    n, c, h, wd = x.shape
    y = np.empty_like(x)
    means, variances = np.empty(c), np.empty(c)
    for k in range(c):
        vals = [x[i, k, r, s] for i in range(n) for r in range(h) for s in range(wd)]
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / len(vals)
        means[k], variances[k] = mean, var
        for i in range(n):
            for r in range(h):
                for s in range(wd):
                    y[i, k, r, s] = w[k] * (x[i, k, r, s] - mean) / np.sqrt(var + eps) + b[k]
    return y, means, variances


def test_batch_norm_forward_and_running_stats_match_loops(backend):
    if not backend.float64:
        pytest.skip(f"{backend.id} has no float64")
    x = RNG.standard_normal((3, 2, 4, 5)) * 2 + 1
    layer = _built(xcnn.BatchNorm2D(2, momentum=0.1, eps=1e-5), backend)
    w, b = np.array([1.5, -0.5]), np.array([0.2, 0.3])
    bk = backend.resolve()
    layer.params = {"weight": bk.asarray(w, "float64"), "bias": bk.asarray(b, "float64")}
    y = to_numpy(layer.forward(bk.asarray(x, "float64"), train=True))
    ref, means, variances = _bn_loops(x, w, b, 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    m = 3 * 4 * 5
    np.testing.assert_allclose(to_numpy(layer.buffers["running_mean"]), 0.1 * means, rtol=1e-12)
    np.testing.assert_allclose(
        to_numpy(layer.buffers["running_var"]), 0.9 + 0.1 * variances * m / (m - 1), rtol=1e-12
    )
    # Evaluation: the running estimates, per value; independent of the batch.
    rm, rv = means * 0.1, 0.9 + 0.1 * variances * m / (m - 1)
    y_eval = to_numpy(layer.forward(bk.asarray(x[:1], "float64"), train=False))
    ref_eval = w[None, :, None, None] * (x[:1] - rm[None, :, None, None])
    ref_eval = ref_eval / np.sqrt(rv[None, :, None, None] + 1e-5) + b[None, :, None, None]
    np.testing.assert_allclose(y_eval, ref_eval, rtol=1e-12)


def test_global_avg_pool_and_dropout_match_loops(backend):
    if not backend.float64:
        pytest.skip(f"{backend.id} has no float64")
    bk = backend.resolve()
    x = RNG.standard_normal((2, 3, 4, 5))
    pool = _built(xcnn.GlobalAvgPool2D(), backend)
    y = to_numpy(pool.forward(bk.asarray(x, "float64")))
    ref = np.array([[sum(x[i, c].ravel()) / 20 for c in range(3)] for i in range(2)])
    np.testing.assert_allclose(y, ref, rtol=1e-12)

    drop = _built(xcnn.Dropout(0.25), backend)
    drop.rng = _Replay(5)
    y = to_numpy(drop.forward(bk.asarray(x, "float64"), train=True))
    u = _Replay(5).random(x.shape, dtype="float32")
    ref = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        ref[idx] = x[idx] / 0.75 if u[idx] >= 0.25 else 0.0
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    # Evaluation is the identity.
    np.testing.assert_array_equal(to_numpy(drop.forward(bk.asarray(x, "float64"), train=False)), x)


def test_dropout_statistics_and_inverted_scaling():
    model = xcnn.Sequential([xcnn.Dropout(0.3)], seed=1)
    x = model.asarray(np.ones((200, 500)))
    y = to_numpy(model.forward(x, train=True))
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.01  # 100k draws: the std of the mean is 0.0015
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)
    assert abs(y.mean() - 1) < 0.02  # E[y] = x
    assert not np.array_equal(y, to_numpy(model.forward(x, train=True)))  # fresh masks


def test_residual_matches_its_definition(backend):
    if not backend.float64:
        pytest.skip(f"{backend.id} has no float64")
    bk = backend.resolve()
    x = RNG.standard_normal((2, 3, 5, 5))
    branch = [xcnn.Conv2D(3, 4, 3, padding=1), xcnn.ReLU(), xcnn.Conv2D(4, 4, 3, padding=1)]
    proj = [xcnn.Conv2D(3, 4, 1)]
    block = _built(xcnn.Residual(branch, shortcut=proj), backend)
    y = to_numpy(block.forward(bk.asarray(x, "float64")))
    f = bk.asarray(x, "float64")
    for layer in branch:
        f = layer.forward(f)
    s = proj[0].forward(bk.asarray(x, "float64"))
    np.testing.assert_allclose(y, to_numpy(f) + to_numpy(s), rtol=1e-12)
    identity = _built(xcnn.Residual([xcnn.ReLU()]), backend)
    np.testing.assert_allclose(
        to_numpy(identity.forward(bk.asarray(x, "float64"))), np.maximum(x, 0) + x, rtol=1e-12
    )


# -- finite differences -----------------------------------------------------------

CASES = {
    "batchnorm": (lambda: xcnn.BatchNorm2D(3), (4, 3, 3, 2)),
    "batchnorm-1x1": (lambda: xcnn.BatchNorm2D(2), (5, 2, 1, 1)),
    "gap": (lambda: xcnn.GlobalAvgPool2D(), (2, 3, 4, 3)),
    "dropout": (lambda: xcnn.Dropout(0.4), (3, 4, 5)),
    "residual-identity": (
        # No bias before BatchNorm: its gradient is exactly zero (BN removes the mean),
        # so a relative error on it would only measure rounding noise.
        lambda: xcnn.Residual([xcnn.Conv2D(2, 2, 3, padding=1, bias=False), xcnn.BatchNorm2D(2)]),
        (3, 2, 4, 4),
    ),
    "residual-projection": (
        lambda: xcnn.Residual(
            [xcnn.Conv2D(2, 3, 3, padding=1), xcnn.ReLU(), xcnn.Conv2D(3, 3, 3, padding=1)],
            shortcut=[xcnn.Conv2D(2, 3, 1, bias=False), xcnn.BatchNorm2D(3)],
        ),
        (2, 2, 4, 4),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_backward_matches_finite_differences(backend, case):
    if not backend.float64:
        pytest.skip(f"{backend.id} has no float64")
    make, shape = CASES[case]
    # In a model, so the check runs on the backend's own device (strict-device1 too).
    model = backend.model([make()], dtype="float64", seed=3)
    layer = model.layers[0]
    if case == "dropout":
        layer.rng = _Replay(7)  # the same mask in every forward the check makes
    bk = backend.resolve()
    if "weight" in layer.params:  # non-trivial BatchNorm scale and shift
        c = layer.params["weight"].shape[0]
        layer.params["weight"] = bk.asarray(1 + RNG.random(c), "float64")
        layer.params["bias"] = bk.asarray(RNG.standard_normal(c), "float64")
    x = RNG.standard_normal(shape)
    result = check_gradients(model, x, max_entries=60)
    assert result.ok(1e-6), str(result)
    if case.startswith("residual"):  # the nested parameters were checked, by path
        assert any(k.startswith("0.layers.0.") for k in result.errors)
        if case == "residual-projection":
            assert "0.shortcut.1.weight" in result.errors


def test_gradient_check_fails_for_a_wrong_batch_norm_backward(monkeypatch):
    """Drop the terms from the batch mean and variance: the check must catch it."""
    layer = xcnn.BatchNorm2D(2).build("numpy", "float64")

    def wrong(dy, xhat, inv_std, w):
        dx = dy * N._per_channel(w * inv_std)  # as if mean and var were constants
        return dx, np.sum(dy * xhat, axis=(0, 2, 3)), np.sum(dy, axis=(0, 2, 3))

    monkeypatch.setattr(N, "batch_norm_backward", wrong)
    result = check_gradients(layer, RNG.standard_normal((3, 2, 2, 2)))
    assert not result.ok(1e-3) and result.worst[0] == "input"


def test_gradient_check_fails_for_a_residual_without_the_skip_gradient(monkeypatch):
    block = xcnn.Residual([xcnn.Conv2D(1, 1, 3, padding=1)]).build("numpy", "float64")
    monkeypatch.setattr(
        xcnn.Residual,
        "backward",
        lambda self, dy, need_dx=True: self.layers[0].backward(dy),  # forgets "+ dy"
    )
    assert not check_gradients(block, RNG.standard_normal((2, 1, 4, 4))).ok(1e-3)


# -- against PyTorch ---------------------------------------------------------------


def test_batch_norm_matches_torch():
    torch = pytest.importorskip("torch")
    x = RNG.standard_normal((6, 3, 4, 4)) * 3 + 2
    dy = RNG.standard_normal(x.shape)
    w, b = 1 + RNG.random(3), RNG.standard_normal(3)

    ref = torch.nn.BatchNorm2d(3, momentum=0.1, eps=1e-5).double()
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
        ref.bias.copy_(torch.from_numpy(b))
    model = xcnn.Sequential([xcnn.BatchNorm2D(3)], dtype="float64")
    model.layers[0].params = {"weight": model.asarray(w), "bias": model.asarray(b)}

    for step in range(3):  # the running estimates over several batches
        xs = x + step
        xt = torch.from_numpy(xs).requires_grad_(True)
        yt = ref(xt)
        yt.backward(torch.from_numpy(dy))
        y = model.forward(model.asarray(xs), train=True)
        dx = model.backward(model.asarray(dy))
        np.testing.assert_allclose(to_numpy(y), yt.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(to_numpy(dx), xt.grad.numpy(), rtol=1e-9, atol=1e-12)
        grads = model.layers[0].grads
        np.testing.assert_allclose(to_numpy(grads["weight"]), ref.weight.grad.numpy(), rtol=1e-9)
        np.testing.assert_allclose(to_numpy(grads["bias"]), ref.bias.grad.numpy(), rtol=1e-9)
        ref.weight.grad = ref.bias.grad = None
        state = model.state_dict()
        np.testing.assert_allclose(state["0.running_mean"], ref.running_mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(state["0.running_var"], ref.running_var.numpy(), rtol=1e-12)
    ref.eval()
    model.eval()
    y = model.forward(model.asarray(x))
    np.testing.assert_allclose(to_numpy(y), ref(torch.from_numpy(x)).detach().numpy(), rtol=1e-10)


# -- every backend against NumPy ------------------------------------------------------


def _net():
    return [
        xcnn.Conv2D(2, 4, 3, padding=1, bias=False),
        xcnn.BatchNorm2D(4),
        xcnn.ReLU(),
        xcnn.Residual(
            [xcnn.Conv2D(4, 6, 3, padding=1, bias=False), xcnn.BatchNorm2D(6), xcnn.ReLU()],
            shortcut=[xcnn.Conv2D(4, 6, 1)],
        ),
        xcnn.ReLU(),
        xcnn.GlobalAvgPool2D(),
        xcnn.Dropout(0.3),
        xcnn.Dense(6, 5),
    ]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parity_with_numpy(other_backend, dtype):
    if dtype == "float64" and not other_backend.float64:
        pytest.skip(f"{other_backend.id} has no float64")
    x = RNG.random((4, 2, 6, 5))
    report = check_parity(
        _net,
        x,
        labels=np.array([0, 3, 1, 4]),
        backends=["numpy", (other_backend.spec, other_backend.device)],
        dtype=dtype,
    )
    assert report.ok(), str(report)
    per = next(iter(report.diffs.values()))
    assert {"3.layers.0.weight", "3.shortcut.0.bias", "1.weight", "7.weight"} <= set(per)


def test_parity_check_fails_when_a_buffer_differs(other_backend):
    """Evaluation mode uses the running statistics: a changed one must show."""
    x = RNG.random((3, 2, 6, 5))
    ref = xcnn.Sequential(_net(), dtype="float32").eval()
    other = xcnn.Sequential(
        _net(), backend=other_backend.spec, device=other_backend.device, dtype="float32"
    ).eval()
    state = ref.state_dict()
    state["1.running_mean"] = state["1.running_mean"] + 0.5
    other.load_state_dict(state)
    a = to_numpy(ref.forward(ref.asarray(x)))
    b = to_numpy(other.forward(other.asarray(x)))
    assert np.abs(a - b).max() > 1e-3


def test_outputs_keep_namespace_device_and_dtype(backend):
    model = backend.model(_net(), dtype="float32")
    x = model.asarray(RNG.random((2, 2, 6, 5)))
    for train in (False, True):  # training last: backward needs its cache
        y = model.forward(x, train=train)
        assert model.backend.owns(y) and y.dtype == x.dtype and tuple(y.shape) == (2, 5)
    dx = model.backward(model.asarray(np.ones((2, 5))))
    assert model.backend.owns(dx) and tuple(dx.shape) == (2, 2, 6, 5)


def test_read_only_inputs_are_never_written():
    x = RNG.random((3, 2, 6, 5)).astype(np.float32)
    x.setflags(write=False)
    model = xcnn.Sequential(_net())
    y = model.forward(x, train=True)
    dy = np.ones(y.shape, np.float32)
    dy.setflags(write=False)
    model.backward(dy)
    model.forward(x, train=False)


# -- errors ------------------------------------------------------------------------------


def test_clear_errors():
    with pytest.raises(ValueError, match=r"Dropout: p must be in \[0, 1\)"):
        xcnn.Dropout(1.0)
    with pytest.raises(ValueError, match="BatchNorm2D: momentum"):
        xcnn.BatchNorm2D(3, momentum=0)
    bn = xcnn.BatchNorm2D(3).build()
    with pytest.raises(ValueError, match=r"BatchNorm2D\(3\): expected input \(N, C=3, H, W\)"):
        bn.forward(np.zeros((1, 2, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"GlobalAvgPool2D\(\): expected a 4-D input"):
        xcnn.GlobalAvgPool2D().build().forward(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="branch gives .* add a shortcut projection"):
        xcnn.Sequential(
            [xcnn.Residual([xcnn.Conv2D(out_channels=4, kernel_size=3, padding=1)])],
            input_shape=(2, 5, 5),
        )
    with pytest.raises(RuntimeError, match="backward\\(\\) called without a forward"):
        xcnn.Residual([xcnn.ReLU()]).build().backward(np.zeros((1, 2), np.float32))
