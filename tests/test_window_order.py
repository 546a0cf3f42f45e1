"""A first layer's fused Conv2D [-> ReLU] -> MaxPool2D in window order
(xcnn/kernels/numpy_window_order.py), against the generic code.

The kernel reorders the im2col columns, so its forward must give the generic
route bit for bit and ``y`` to rounding; its backward ``dw`` and ``db`` to
rounding; and every input it does not take must still get the generic
results through the kernels it hands them to.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_numpy_parallel import close, close_pool_backward, generic
from xcnn import functional as F
from xcnn import kernels
from xcnn.kernels import numpy as npk
from xcnn.kernels import numpy_parallel as par
from xcnn.kernels import numpy_window_order as wo

# (n, f, h, w, conv kernel, padding, pool kernel): tiling pools that use every output,
# and ones that leave rows and columns over; "same" and explicit padding.
CASES = [
    (3, 4, 8, 8, 3, "valid", 2),
    (2, 5, 9, 8, 3, "valid", 2),
    (4, 3, 10, 11, 3, "same", 2),
    (2, 4, 11, 12, 3, "valid", 3),
    (3, 2, 9, 9, 3, 1, 3),
    (2, 3, 5, 6, 3, "valid", 1),  # a 1x1 pool: one window offset
    (2, 6, 32, 32, 5, 2, 2),  # LeNet-5's first layer
    (5, 8, 28, 28, 3, "valid", 2),  # the seed net's
]


@pytest.fixture(params=["one chunk", "chunks and spans"])
def split(request, monkeypatch):
    """As it runs, and with three threads, chunks of a few images and products in spans."""
    if request.param != "one chunk":
        monkeypatch.setattr(par, "THREADS", 3)
        monkeypatch.setattr(par, "BLAS_THREADED_WORK", 0)
        monkeypatch.setattr(npk, "PASS_BYTES", 1)  # chunks of one image
        monkeypatch.setattr(wo, "SPAN", 7)  # spans that end inside a window block
    return request.param


def _inputs(case, dtype, bias, seed=0):
    n, f, h, w, kh, padding, k = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, h, w)).astype(dtype)
    x[0, 0, 1, :3] = 0.0  # ties and zero windows
    wt = rng.standard_normal((f, 1, kh, kh)).astype(dtype)
    wt[0] = 0.0  # a filter of zeros: every window ties (with the ReLU: routes nowhere)
    b = rng.standard_normal(f).astype(dtype) if bias else None
    return x, wt, b, {"padding": padding, "kernel_size": k, "pool_stride": k}


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_window_order_equals_the_generic_op(case, relu, bias, dtype, split):
    x, wt, b, how = _inputs(case, dtype, bias)
    y, saved, route = F.conv2d_max_pool2d(x, wt, b, with_relu=relu, **how)
    assert isinstance(saved.workspace, wo.WindowColumns)  # this kernel ran
    y_ref, saved_ref, route_ref = generic(F.conv2d_max_pool2d, x, wt, b, with_relu=relu, **how)
    np.testing.assert_array_equal(route, route_ref)
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    close(y, y_ref, rtol)
    dy = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
    # need_dx=True is not this kernel's (no first layer needs dx): the direct one's.
    close_pool_backward(dy, saved, route, saved_ref, route_ref, wt, rtol, **how)


def test_a_read_only_strided_input_is_read_not_written():
    x, wt, b, how = _inputs(CASES[2], np.float64, True)
    xs = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # not C-contiguous
    xs.flags.writeable = False
    before = xs.copy()
    y, saved, route = F.conv2d_max_pool2d(xs, wt, b, with_relu=True, **how)
    assert isinstance(saved.workspace, wo.WindowColumns)
    y_ref, _, route_ref = generic(F.conv2d_max_pool2d, x, wt, b, with_relu=True, **how)
    np.testing.assert_array_equal(route, route_ref)
    close(y, y_ref)
    np.testing.assert_array_equal(xs, before)


def test_thread_count_and_chunks_change_no_bit(monkeypatch):
    x, wt, b, how = _inputs(CASES[-1], np.float32, True)
    runs = []
    for threads, pass_bytes in ((1, 1 << 30), (2, 1), (3, 1)):
        monkeypatch.setattr(par, "THREADS", threads)
        monkeypatch.setattr(npk, "PASS_BYTES", pass_bytes)
        y, saved, route = F.conv2d_max_pool2d(x, wt, b, with_relu=True, **how)
        dy = np.ones(y.shape, np.float32)
        _, dw, db = F.conv2d_max_pool2d_backward(dy, saved, route, wt, need_dx=False, **how)
        runs.append((y.copy(), route.copy(), dw, db))
        if pass_bytes == 1:
            assert saved.workspace.step == 1  # every image a chunk: the threads shared them
    for run in runs[1:]:
        np.testing.assert_array_equal(run[1], runs[0][1])
        np.testing.assert_array_equal(run[0], runs[0][0])
    # Chunks of one image sum dW per chunk: the same numbers in another order.
    for run in runs[1:]:
        close(run[2], runs[0][2], 1e-5)
    np.testing.assert_array_equal(runs[1][2], runs[2][2])  # 2 or 3 threads: the same order


@pytest.mark.parametrize(
    "c, k, s, stride",
    [(3, 2, 2, 1), (1, 3, 2, 1), (1, 2, 3, 1), (1, 2, 2, 2)],
    ids=["channels", "overlap", "gaps", "strided conv"],
)
def test_inputs_it_does_not_take_get_the_other_kernels(c, k, s, stride):
    rng = np.random.default_rng(3)
    x, wt = rng.standard_normal((2, c, 9, 9)), rng.standard_normal((3, c, 3, 3))
    how = {"stride": stride, "kernel_size": k, "pool_stride": s}
    y, saved, route = F.conv2d_max_pool2d(x, wt, **how)
    assert not isinstance(saved.workspace, wo.WindowColumns)
    y_ref, saved_ref, route_ref = generic(F.conv2d_max_pool2d, x, wt, **how)
    np.testing.assert_array_equal(route, route_ref)
    close(y, y_ref)
    dy = rng.standard_normal(y.shape)
    got = F.conv2d_max_pool2d_backward(dy, saved, route, wt, need_dx=False, **how)
    want = generic(F.conv2d_max_pool2d_backward, dy, saved_ref, route_ref, wt, need_dx=False, **how)
    close(got[1], want[1])
    close(got[2], want[2])


def test_a_nan_window_gets_the_generic_route():
    x, wt, _, how = _inputs(CASES[0], np.float64, False)
    x[1, 0, 3, 3] = np.nan
    for relu in (False, True):
        plan = npk._plan(x, wt, (0,) * 4)
        assert wo._forward(x, wt, None, (0,) * 4, plan, relu, 2) is kernels.FALLBACK
        y, saved, route = F.conv2d_max_pool2d(x, wt, with_relu=relu, **how)
        y_ref, _, route_ref = generic(F.conv2d_max_pool2d, x, wt, with_relu=relu, **how)
        np.testing.assert_array_equal(route, route_ref)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))


def test_a_non_finite_gradient_where_nothing_routes_gives_the_generic_zeros():
    x, wt, b, how = _inputs(CASES[0], np.float64, True)
    y, saved, route = F.conv2d_max_pool2d(x, wt, b, with_relu=True, **how)
    dy = np.random.default_rng(4).standard_normal(y.shape)
    dy[~route.any(axis=2)] = np.inf  # the generic where gives zeros there; a product NaN
    assert np.isinf(dy).any()
    assert wo._backward(dy, saved.workspace, route, wt) is kernels.FALLBACK
    got = F.conv2d_max_pool2d_backward(dy, saved, route, wt, need_dx=False, **how)
    finite = np.where(route.any(axis=2), dy, 0.0)
    want = F.conv2d_max_pool2d_backward(finite, saved, route, wt, need_dx=False, **how)
    for g, e in zip(got[1:], want[1:], strict=True):
        assert np.isfinite(g).all()
        close(g, e)


def test_a_saved_state_from_another_forward_is_not_taken():
    """A generic forward's saved state (no window columns) gets the direct backward."""
    x, wt, b, how = _inputs(CASES[1], np.float64, True)
    y, saved, route = generic(F.conv2d_max_pool2d, x, wt, b, **how)
    dy = np.random.default_rng(5).standard_normal(y.shape)
    got = F.conv2d_max_pool2d_backward(dy, saved, route, wt, need_dx=False, **how)
    want = generic(F.conv2d_max_pool2d_backward, dy, saved, route, wt, need_dx=False, **how)
    close(got[1], want[1])
    close(got[2], want[2])


def test_the_comparison_catches_columns_out_of_window_order(monkeypatch):
    """The checker can fail: columns filled in plain (row-major) order give a wrong route."""
    x, wt, b, how = _inputs(CASES[0], np.float64, True)

    def plain_order(part, xh, kh, kw, k, ph, pw):  # rows i*KW + j, columns (b, oh, ow)
        grid = part[:-1].reshape(kh * kw, xh.shape[0], k * ph, k * pw)
        for i in range(kh):
            for j in range(kw):
                grid[i * kw + j] = xh[:, i : i + k * ph, j : j + k * pw]
        part[-1] = 1

    monkeypatch.setattr(wo, "_fill", plain_order)
    y, _, route = F.conv2d_max_pool2d(x, wt, b, **how)
    y_ref, _, route_ref = generic(F.conv2d_max_pool2d, x, wt, b, **how)
    assert not np.array_equal(route, route_ref)
    with pytest.raises(AssertionError):
        close(y, y_ref)


def test_the_seed_nets_training_step_takes_this_kernel():
    """Through Sequential (Conv2D -> MaxPool2D fused), with the generic step's gradients."""
    import xcnn

    def step(model, x, labels):
        _, dlogits = xcnn.softmax_cross_entropy(model.forward(x, train=True), labels)
        model.backward(dlogits, input_grad=False)
        return {
            f"{i}.{k}": g for i, layer in enumerate(model.layers) for k, g in layer.grads.items()
        }

    rng = np.random.default_rng(6)
    x, labels = rng.random((8, 1, 28, 28)), rng.integers(0, 10, 8)
    model = xcnn.models.build_model("seed", backend="numpy", dtype="float64", seed=0)
    got = step(model, x, labels)
    assert isinstance(model.layers[0].cache["saved"].workspace, wo.WindowColumns)
    with kernels.disabled("numpy"):
        want = step(
            xcnn.models.build_model("seed", backend="numpy", dtype="float64", seed=0), x, labels
        )
    assert got.keys() == want.keys()
    for name in got:
        close(got[name], want[name])
