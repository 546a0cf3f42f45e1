"""Every layer: forward against slow obvious loops, backward against finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

import xcnn
from xcnn.testing import check_gradients

RTOL = 1e-6  # the bound for float64 central differences


# ---------------------------------------------------------------------------
# Slow, obviously correct references: the tutorial's loops, generalised.
# ---------------------------------------------------------------------------


def conv_loops(x, w, b, stride, pads):
    top, bottom, left, right = pads
    xpad = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, h, wd = xpad.shape
    f, _, kh, kw = w.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    y = np.zeros((n, f, oh, ow))
    for i in range(oh):
        for j in range(ow):
            region = xpad[:, :, i * stride : i * stride + kh, j * stride : j * stride + kw]
            y[:, :, i, j] = np.tensordot(region, w, axes=([1, 2, 3], [1, 2, 3]))
    return y + (0 if b is None else b[None, :, None, None])


def pool_loops(x, k, s, op):
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    y = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            y[:, :, i, j] = op(x[:, :, i * s : i * s + k, j * s : j * s + k], axis=(2, 3))
    return y


def built(layer, dtype="float64", backend="numpy", seed=0):
    return layer.build(backend, dtype=dtype, seed=seed)


# ---------------------------------------------------------------------------
# The tutorial's worked numbers
# ---------------------------------------------------------------------------


def test_tutorial_sobel_example():
    image = np.array([[0, 50, 0, 29], [0, 80, 31, 2], [33, 90, 0, 75], [0, 9, 0, 95]], float)
    sobel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float)
    conv = built(xcnn.Conv2D(1, 1, 3, bias=False))
    conv.params["weight"] = sobel[None, None]
    y = conv.forward(image[None, None])
    np.testing.assert_array_equal(y[0, 0], [[29, -192], [-35, -22]])


def test_tutorial_softmax_denominator():
    scores = np.array([[-1.0, 0.0, 3.0, 5.0]])
    denominator = sum(math.exp(s) for s in scores[0])
    assert round(denominator, 2) == 169.87
    p = built(xcnn.Softmax()).forward(scores)
    np.testing.assert_allclose(p[0], np.exp(scores[0]) / 169.87, rtol=1e-4)
    loss, _ = xcnn.softmax_cross_entropy(scores, np.array([3]))
    assert float(loss) == pytest.approx(-math.log(math.exp(5) / denominator))


def test_tutorial_shapes(backend):
    model = backend.model([xcnn.Conv2D(1, 8, 3), xcnn.MaxPool2D(2)], dtype="float32")
    x = model.asarray(np.zeros((2, 1, 28, 28), np.float32))
    y1 = model.layers[0].forward(x)
    assert tuple(y1.shape) == (2, 8, 26, 26)
    assert tuple(model.layers[1].forward(y1).shape) == (2, 8, 13, 13)


# ---------------------------------------------------------------------------
# Forward against loops
# ---------------------------------------------------------------------------

CONV_CASES = [
    # (C, F, (KH, KW), stride, padding, (H, W))
    (1, 8, (3, 3), 1, "valid", (9, 9)),
    (3, 4, (3, 3), 2, "valid", (11, 10)),
    (2, 3, (2, 2), 1, "same", (7, 8)),
    (2, 3, (4, 4), 1, "same", (9, 7)),
    (3, 2, (5, 5), 2, "same", (9, 11)),
    (2, 2, (3, 2), 1, 1, (6, 5)),
    (1, 2, (1, 1), 3, "valid", (7, 7)),
    (2, 3, (3, 3), 3, 2, (8, 9)),
]


@pytest.mark.parametrize("c,f,k,stride,padding,hw", CONV_CASES)
def test_conv_forward_matches_loops(c, f, k, stride, padding, hw):
    rng = np.random.default_rng(1)
    conv = built(xcnn.Conv2D(c, f, k, stride=stride, padding=padding), seed=2)
    conv.params["bias"] = rng.standard_normal(f)
    x = rng.standard_normal((3, c, *hw))
    pads = xcnn.functional.pad_amounts(*hw, *k, stride, padding)
    expected = conv_loops(x, conv.params["weight"], conv.params["bias"], stride, pads)
    np.testing.assert_allclose(conv.forward(x), expected, rtol=1e-12, atol=1e-12)


def test_same_padding_keeps_size():
    for k in (1, 2, 3, 4, 5):
        for s in (1, 2, 3):
            y = built(xcnn.Conv2D(1, 1, k, stride=s, padding="same")).forward(
                np.ones((1, 1, 10, 7))
            )
            assert tuple(y.shape[2:]) == (math.ceil(10 / s), math.ceil(7 / s)), (k, s)


@pytest.mark.parametrize(
    "k,s,hw", [(2, 2, (8, 8)), (2, 2, (9, 7)), (3, 2, (9, 10)), (3, 3, (10, 11))]
)
def test_pool_forward_matches_loops(k, s, hw):
    x = np.random.default_rng(0).standard_normal((2, 3, *hw))
    mp = built(xcnn.MaxPool2D(k, stride=s))
    ap = built(xcnn.AvgPool2D(k, stride=s))
    np.testing.assert_allclose(mp.forward(x), pool_loops(x, k, s, np.max), rtol=1e-15)
    np.testing.assert_allclose(ap.forward(x), pool_loops(x, k, s, np.mean), rtol=1e-14)


def test_maxpool_routes_ties_to_first_max_only(backend):
    model = backend.model([xcnn.MaxPool2D(2)], dtype="float32")
    # Window 1: all four equal; window 2: tie between (0,1) and (1,0); odd last row/col dropped.
    x = np.array([[[[5, 5, 1, 7, 9], [5, 5, 7, 2, 9], [9, 9, 9, 9, 9]]]], np.float32)
    y = model.forward(model.asarray(x))
    np.testing.assert_array_equal(xcnn.to_numpy(y), [[[[5, 7]]]])
    dx = xcnn.to_numpy(model.backward(model.asarray(np.array([[[[1.0, 2.0]]]]))))
    expected = np.zeros_like(x)
    expected[0, 0, 0, 0] = 1.0  # first of four tied maxima, row-major
    expected[0, 0, 0, 3] = 2.0  # (0, 1) of the window comes before (1, 0)
    np.testing.assert_array_equal(dx, expected)
    assert dx.sum() == 3.0  # ties never double a gradient


def test_dense_relu_flatten_forward():
    rng = np.random.default_rng(0)
    dense = built(xcnn.Dense(6, 4))
    x = rng.standard_normal((5, 6))
    np.testing.assert_allclose(dense.forward(x), x @ dense.params["weight"] + dense.params["bias"])
    np.testing.assert_array_equal(built(xcnn.ReLU()).forward(x), np.maximum(x, 0))
    x4 = rng.standard_normal((2, 3, 4, 5))
    np.testing.assert_array_equal(built(xcnn.Flatten()).forward(x4), x4.reshape(2, -1))


def test_softmax_cross_entropy_is_finite_for_huge_logits(backend):
    xp = backend.resolve().xp
    b = backend.resolve()
    logits = b.asarray(np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]]), "float32")
    labels = b.asarray(np.array([1, 0]))
    loss, d = xcnn.softmax_cross_entropy(logits, labels)
    assert bool(xp.isfinite(loss)) and bool(xp.all(xp.isfinite(d)))
    assert float(loss) == pytest.approx((2e4 + 2e4 + math.log(2)) / 2, rel=1e-6)


# ---------------------------------------------------------------------------
# Backward against float64 central differences
# ---------------------------------------------------------------------------


def _gradcheck(layer_or_model, x, backend_case=None):
    result = check_gradients(layer_or_model, x)
    assert result.ok(RTOL), str(result)
    return result


@pytest.mark.parametrize("c,f,k,stride,padding,hw", CONV_CASES)
def test_conv_backward_finite_differences(c, f, k, stride, padding, hw):
    rng = np.random.default_rng(3)
    conv = built(xcnn.Conv2D(c, f, k, stride=stride, padding=padding), seed=4)
    conv.params["bias"] = rng.standard_normal(f)
    _gradcheck(conv, rng.standard_normal((2, c, *hw)))


@pytest.mark.parametrize("cls", [xcnn.MaxPool2D, xcnn.AvgPool2D])
@pytest.mark.parametrize("k,s,hw", [(2, 2, (8, 8)), (2, 2, (7, 9)), (3, 2, (9, 8)), (2, 1, (5, 6))])
def test_pool_backward_finite_differences(cls, k, s, hw):
    x = np.random.default_rng(5).standard_normal((2, 3, *hw))
    _gradcheck(built(cls(k, stride=s)), x)


@pytest.mark.parametrize(
    "layer,shape",
    [
        (xcnn.Dense(7, 5), (4, 7)),
        (xcnn.ReLU(), (3, 4, 5)),
        (xcnn.Flatten(), (2, 3, 4, 5)),
        (xcnn.Softmax(), (4, 6)),
    ],
    ids=["dense", "relu", "flatten", "softmax"],
)
def test_simple_layers_backward_finite_differences(layer, shape):
    built_layer = built(layer)
    if "bias" in built_layer.params:
        built_layer.params["bias"] = np.random.default_rng(8).standard_normal(
            built_layer.params["bias"].shape
        )
    _gradcheck(built_layer, np.random.default_rng(6).standard_normal(shape))


def test_softmax_cross_entropy_gradient_finite_differences():
    rng = np.random.default_rng(7)
    logits, labels = rng.standard_normal((5, 4)) * 3, np.array([0, 3, 2, 2, 1])
    _, d = xcnn.softmax_cross_entropy(logits, labels)
    eps, num = 1e-6, np.zeros_like(logits)
    for idx in np.ndindex(logits.shape):
        hi, lo = logits.copy(), logits.copy()
        hi[idx] += eps
        lo[idx] -= eps
        num[idx] = (
            float(xcnn.softmax_cross_entropy(hi, labels)[0])
            - float(xcnn.softmax_cross_entropy(lo, labels)[0])
        ) / (2 * eps)
    assert np.abs(num - d).max() / np.abs(num).max() <= RTOL


def test_whole_model_finite_differences(backend):
    if not backend.float64:
        pytest.skip(f"{backend.id} has no float64")
    layers = [
        xcnn.Conv2D(2, 3, 3, padding="same"),
        xcnn.ReLU(),
        xcnn.Conv2D(3, 4, 2, stride=2),
        xcnn.MaxPool2D(2),
        xcnn.Flatten(),
        xcnn.Dense(4 * 2 * 2, 5),
        xcnn.ReLU(),
        xcnn.Dense(5, 3),
        xcnn.Softmax(),
    ]
    model = backend.model(layers, dtype="float64", seed=3)
    x = np.random.default_rng(9).standard_normal((2, 2, 9, 9))
    result = check_gradients(model, x, max_entries=40)
    assert result.ok(RTOL), str(result)


def test_gradient_checker_catches_a_wrong_backward(monkeypatch):
    """The checker must be able to fail: break ReLU's backward and watch it."""
    relu = built(xcnn.ReLU())
    monkeypatch.setattr(xcnn.ReLU, "backward", lambda self, dy, need_dx=True: dy)
    result = check_gradients(relu, np.random.default_rng(0).standard_normal((3, 4)))
    assert not result.ok(RTOL)
    assert result.worst[0] == "input" and result.worst[1] > 0.1


def test_layers_never_write_into_inputs():
    """A read-only input catches hidden in-place writes."""
    rng = np.random.default_rng(0)
    model = xcnn.Sequential(
        [
            xcnn.Conv2D(1, 2, 3, padding="same"),
            xcnn.ReLU(),
            xcnn.MaxPool2D(2),
            xcnn.AvgPool2D(1),
            xcnn.Flatten(),
            xcnn.Dense(2 * 3 * 3, 3),
            xcnn.Softmax(),
        ],
        dtype="float64",
    )
    for layer in model.layers:
        for p in layer.params.values():
            p.flags.writeable = False
    x = rng.standard_normal((2, 1, 6, 6))
    x.flags.writeable = False
    out = model.forward(x)
    dy = rng.standard_normal(out.shape)
    dy.flags.writeable = False
    model.backward(dy)


def test_output_keeps_namespace_device_and_dtype(backend):
    import array_api_compat

    b = backend.resolve()
    model = backend.model(
        [
            xcnn.Conv2D(1, 2, 3),
            xcnn.ReLU(),
            xcnn.AvgPool2D(2),
            xcnn.Flatten(),
            xcnn.Dense(2 * 3 * 3, 4),
        ],
        dtype="float32",
    )
    x = model.asarray(np.random.default_rng(0).random((2, 1, 8, 8)))
    out = model.forward(x)
    dx = model.backward(out)
    for arr in [out, dx, *(g for lay in model.layers for g in lay.grads.values())]:
        assert array_api_compat.array_namespace(arr) is b.xp
        assert str(array_api_compat.device(arr)) == str(b.device)
        assert arr.dtype == b.dtype("float32")
