"""Tests of the benchmark reference implementations (tutorial baseline, PyTorch twins)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(_ROOT))

from benchmarks import naive, torch_ref  # noqa: E402


# ----------------------------------------------------------------------------- helpers
def _xcnn_seed_weights(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    conv_w = rng.standard_normal((8, 1, 3, 3)) / 3  # (F, C, KH, KW)
    dense_w = rng.standard_normal((1352, 10)) / 10  # (C*H*W, K)
    dense_b = rng.standard_normal(10) / 10  # (K,)
    return conv_w, dense_w, dense_b


def _numpy_seed_logits(x: np.ndarray, conv_w: np.ndarray, conv_b, dense_w, dense_b):
    """Independent vectorised seed net in xcnn's layout: x (N, 1, H, W) -> logits (N, K)."""
    win = sliding_window_view(x[:, 0], (3, 3), axis=(1, 2))  # (N, H-2, W-2, 3, 3)
    conv = np.einsum("nijkl,fkl->nfij", win, conv_w[:, 0]) + conv_b[:, None, None]
    n, f, h, w = conv.shape
    pooled = conv.reshape(n, f, h // 2, 2, w // 2, 2).max(axis=(3, 5))  # (N, F, H/2, W/2)
    flat = pooled.reshape(n, -1)  # (N, F*H/2*W/2) in C, H, W order
    return conv, pooled, flat, flat @ dense_w + dense_b


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 255, size=(28, 28))  # (28, 28) raw pixels


# ----------------------------------------------------------------------------- naive
def test_naive_forward_matches_vectorised(image: np.ndarray) -> None:
    rng = np.random.default_rng(2)
    conv_w, dense_w, dense_b = _xcnn_seed_weights(rng)
    net = naive.NaiveNet(seed=0)
    net.set_weights(conv_w, dense_w, dense_b)

    label = 4
    out, loss, acc = net.forward(image, label)
    x = (image / 255 - 0.5)[None, None]  # (1, 1, 28, 28)
    _, _, _, logits = _numpy_seed_logits(x, conv_w, np.zeros(8), dense_w, dense_b)
    probs = _softmax(logits[0])
    np.testing.assert_allclose(out, probs, rtol=1e-10, atol=1e-12)
    assert loss == pytest.approx(-np.log(probs[label]), rel=1e-10)
    assert acc == int(np.argmax(probs) == label)


def test_naive_set_weights_permutes_chw_to_hwc(image: np.ndarray) -> None:
    conv_w, _, _ = _xcnn_seed_weights(np.random.default_rng(3))
    net = naive.NaiveNet()
    x = (image / 255 - 0.5)[None, None]
    _, pooled, _, _ = _numpy_seed_logits(x, conv_w, np.zeros(8), np.zeros((1352, 10)), 0)
    for c, h, w in [(0, 0, 1), (5, 7, 2), (7, 12, 12)]:
        dense_w = np.zeros((1352, 10))
        dense_w[c * 169 + h * 13 + w, 3] = 1.0  # xcnn row of feature (c, h, w)
        net.set_weights(conv_w, dense_w, np.zeros(10))
        net.forward(image, 0)
        # the tutorial's (h, w, c) flattening must pick up the same feature
        assert net.softmax.last_totals[3] == pytest.approx(pooled[0, c, h, w], rel=1e-12)
        assert np.count_nonzero(net.softmax.last_totals) == 1


def test_naive_set_weights_rejects_bad_input() -> None:
    net = naive.NaiveNet()
    conv_w, dense_w, dense_b = _xcnn_seed_weights(np.random.default_rng(0))
    with pytest.raises(ValueError, match="dense_w"):
        net.set_weights(conv_w, dense_w.T, dense_b)
    with pytest.raises(ValueError, match="no bias"):
        net.set_weights(conv_w, dense_w, dense_b, conv_b=np.ones(8))
    net.set_weights(conv_w, dense_w, dense_b, conv_b=np.zeros(8))


def test_naive_conv_gradient_matches_finite_differences(image: np.ndarray) -> None:
    net = naive.NaiveNet(seed=0)
    net.set_weights(*_xcnn_seed_weights(np.random.default_rng(4)))
    label = 7
    net.train_step(image, label, lr=0.0)  # lr=0: gradients only, no update
    grad = net.conv.last_d_L_d_filters
    assert grad is not None and grad.shape == (8, 3, 3)

    eps = 1e-6
    for idx in [(0, 0, 0), (3, 1, 2), (7, 2, 1), (5, 1, 1)]:
        orig = net.conv.filters[idx]
        net.conv.filters[idx] = orig + eps
        loss_p = net.forward(image, label)[1]
        net.conv.filters[idx] = orig - eps
        loss_m = net.forward(image, label)[1]
        net.conv.filters[idx] = orig
        fd = (loss_p - loss_m) / (2 * eps)
        assert grad[idx] == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_naive_maxpool_backprop_routes_to_max() -> None:
    pool = naive.MaxPool2()
    x = np.arange(4 * 4 * 2, dtype=float).reshape(4, 4, 2)  # max at bottom-right of each 2x2
    out = pool.forward(x)
    assert out.shape == (2, 2, 2)
    d_in = pool.backprop(np.ones((2, 2, 2)))
    assert d_in.shape == x.shape
    assert d_in.sum() == 8
    assert np.all(d_in[1::2, 1::2] == 1)


def test_naive_train_step_lowers_loss(image: np.ndarray) -> None:
    net = naive.NaiveNet(seed=0)
    label = 2
    loss0, _ = net.train_step(image, label)
    _, loss1, _ = net.forward(image, label)
    assert loss1 < loss0


# ----------------------------------------------------------------------------- torch_ref
def test_torch_ref_import_does_not_need_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import benchmarks.torch_ref as t\n"
        "assert not t.available()\n"
        "p = t.make_params('seed')\n"
        "try:\n"
        "    t.build('seed', p)\n"
        "except ImportError as e:\n"
        "    assert 'pip install torch==2.13.0' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=_ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr


def test_make_params_layout() -> None:
    params = torch_ref.make_params("lenet", seed=0)
    assert torch_ref.layer_kinds("lenet") == [
        "conv", "relu", "conv", "relu", "pool", "flatten", "dense", "relu", "dense"
    ]  # fmt: skip
    shapes = [{k: v.shape for k, v in p.items()} for p in params]
    assert shapes[0] == {"weight": (32, 1, 3, 3), "bias": (32,)}
    assert shapes[2] == {"weight": (64, 32, 3, 3), "bias": (64,)}
    assert shapes[6] == {"weight": (9216, 128), "bias": (128,)}
    assert shapes[8] == {"weight": (128, 10), "bias": (10,)}
    assert [shapes[i] for i in (1, 3, 4, 5, 7)] == [{}] * 5
    assert params[6]["weight"].std() == pytest.approx(np.sqrt(2 / 9216), rel=0.02)
    np.testing.assert_array_equal(params[2]["weight"], torch_ref.make_params("lenet")[2]["weight"])
    with pytest.raises(ValueError, match="unknown net"):
        torch_ref.make_params("resnet")


def test_torch_seed_matches_numpy_and_grads_layout() -> None:
    torch = pytest.importorskip("torch")
    params = torch_ref.make_params("seed", seed=0, dtype=np.float64)
    params[0]["bias"] = np.random.default_rng(5).standard_normal(8)  # exercise the biases
    params[3]["bias"] = np.random.default_rng(6).standard_normal(10)
    module = torch_ref.build("seed", params, dtype=torch.float64)

    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 1, 28, 28))  # (N, 1, 28, 28)
    y = np.array([0, 3, 9, 3])
    _, _, flat, logits = _numpy_seed_logits(
        x, params[0]["weight"], params[0]["bias"], params[3]["weight"], params[3]["bias"]
    )
    with torch.no_grad():
        out = module(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(out, logits, rtol=1e-10, atol=1e-10)

    loss, g = torch_ref.loss_and_grads(module, x, y)
    probs = _softmax(logits)
    assert loss == pytest.approx(-np.mean(np.log(probs[np.arange(4), y])), rel=1e-10)
    assert [sorted(d) for d in g] == [["bias", "weight"], [], [], ["bias", "weight"]]
    assert g[0]["weight"].shape == (8, 1, 3, 3) and g[0]["bias"].shape == (8,)
    dy = (probs - np.eye(10)[y]) / len(y)  # (N, K) d(mean CE)/d(logits)
    np.testing.assert_allclose(g[3]["weight"], flat.T @ dy, rtol=1e-9, atol=1e-12)  # (1352, 10)
    np.testing.assert_allclose(g[3]["bias"], dy.sum(axis=0), rtol=1e-9, atol=1e-12)


def test_torch_build_validates_and_grads_require_backward() -> None:
    torch = pytest.importorskip("torch")
    assert torch_ref.available()
    params = torch_ref.make_params("seed")
    bad = [dict(p) for p in params]
    bad[3]["weight"] = bad[3]["weight"].T  # torch layout instead of xcnn's
    with pytest.raises(ValueError, match="shape"):
        torch_ref.build("seed", bad)
    with pytest.raises(ValueError, match="parameter entries"):
        torch_ref.build("seed", params[:3])
    module = torch_ref.build("seed", params)
    assert module[3].weight.dtype == torch.float32
    np.testing.assert_array_equal(module[3].weight.detach().numpy(), params[3]["weight"].T)
    with pytest.raises(RuntimeError, match="backward"):
        torch_ref.grads(module)


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_torch_train_step_lowers_loss(opt: str) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch_ref.build("lenet", torch_ref.make_params("lenet", seed=1))
    rng = np.random.default_rng(8)
    x = torch.as_tensor(rng.uniform(0, 1, (8, 1, 28, 28)), dtype=torch.float32)  # MNIST-like
    y = torch.as_tensor(rng.integers(0, 10, size=8))
    step = torch_ref.train_step_fn(module, opt, lr=1e-4 if opt == "adam" else 1e-3)
    losses = [float(step(x, y)) for _ in range(3)]
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="unknown optimizer"):
        torch_ref.train_step_fn(module, "rmsprop", lr=0.1)
