"""The NumPy kernels' threads (xcnn/kernels/numpy_parallel.py), the fused Conv2D+ReLU and
Conv2D [+ ReLU] + MaxPool2D ops,
the split dense products and the optimizer-update kernels, against the generic code.

Every kernel here must give the generic code's result: bit for bit where the
operations are the same (updates, ReLU masks, chunk order), to rounding where
a product is split differently. Threads must not change a single bit between
runs or between thread counts.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest

import xcnn
from tests.test_fast_paths import _small_lenet
from xcnn import functional as F
from xcnn import kernels, updates
from xcnn.kernels import numpy as npk
from xcnn.kernels import numpy_parallel as par
from xcnn.kernels import numpy_updates as npu
from xcnn.layers import ShapeError


def generic(fn, *args, **kwargs):
    with kernels.disabled("numpy"):
        return fn(*args, **kwargs)


def close(a, b, rtol=1e-12):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-300)
    assert float(np.abs(a - b).max(initial=0.0)) / scale <= rtol


def close_pool_backward(dy, saved, route, saved_ref, route_ref, wt, rtol=1e-12, **how):
    """The fused conv + pool backward from ``saved`` against the generic one from ``saved_ref``.

    Both with and without dx (the generic code gives None for it without).
    """
    for need_dx in (True, False):
        got = F.conv2d_max_pool2d_backward(dy, saved, route, wt, need_dx=need_dx, **how)
        want = generic(
            F.conv2d_max_pool2d_backward, dy, saved_ref, route_ref, wt, need_dx=need_dx, **how
        )
        for g, e in zip(got, want, strict=True):
            if e is None:
                assert g is None
            else:
                close(g, e, rtol)


@pytest.fixture
def threads3(monkeypatch):
    """Three threads and chunks of one or two images: every chunk loop, ragged ends, slots."""
    monkeypatch.setattr(par, "THREADS", 3)
    monkeypatch.setattr(par, "BLAS_THREADED_WORK", 0)  # tiny products take the kernels too
    monkeypatch.setattr(npk, "CHUNK_BYTES", 1)
    monkeypatch.setattr(npk, "PASS_BYTES", 1)
    monkeypatch.setattr(npk, "DENSE_SPLIT_WORK", 1)
    monkeypatch.setattr(npk, "DENSE_CHUNK", 3)
    monkeypatch.setattr(npu, "MIN_SIZE", 1)
    monkeypatch.setattr(npu, "CHUNK", 7)


# ----------------------------------------------------------------------------- run_chunks
@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("n, step", [(1, 1), (7, 2), (10, 3), (6, 6)])
def test_every_chunk_runs_once_with_its_bounds(monkeypatch, threads, n, step):
    monkeypatch.setattr(par, "THREADS", threads)
    seen, slots = [], set()
    lock = threading.Lock()

    def work(k, a, b, slot):
        with lock:
            seen.append((k, a, b))
            slots.add(slot)

    par.run_chunks(n, step, work)
    chunks = par.chunk_count(n, step)
    assert sorted(seen) == [(k, k * step, min(n, (k + 1) * step)) for k in range(chunks)]
    assert slots <= set(range(min(threads, chunks)))


def test_an_error_in_a_chunk_is_raised_and_stops_the_rest(monkeypatch):
    monkeypatch.setattr(par, "THREADS", 2)
    ran = []

    def work(k, a, b, slot):
        ran.append(k)
        if k == 1:
            raise ValueError("chunk 1")

    with pytest.raises(ValueError, match="chunk 1"):
        par.run_chunks(1000, 1, work)
    assert len(ran) < 1000


_FORK_CHILD = """
import multiprocessing, sys
from xcnn.kernels import numpy_parallel as par
par.THREADS = 2
par.run_chunks(8, 1, lambda k, a, b, slot: None)  # the parent's pool has run
child = multiprocessing.get_context("fork").Process(
    target=par.run_chunks, args=(8, 1, lambda k, a, b, slot: None))
child.start()
child.join(timeout=30)
if child.is_alive():
    child.kill()
    sys.exit("run_chunks in a forked child waited on the parent's threads")
sys.exit(child.exitcode)
"""


def test_a_forked_child_gets_threads_of_its_own():
    """The parent's pool has no threads in a fork: the child must not wait on it.

    In a fresh interpreter: other libraries of the test session (JAX) warn on fork.
    """
    import multiprocessing
    import subprocess
    import sys

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    out = subprocess.run(
        [sys.executable, "-c", _FORK_CHILD], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr


def test_blas_threads_restored_after_user_threads():
    """Several user threads inside kernels at once: the count before them comes back."""
    set_threads = par._blas_set_threads()
    if set_threads is None:
        pytest.skip("NumPy's BLAS is not the bundled OpenBLAS: nothing is switched")
    before = set_threads(2)
    set_threads(before)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 32, 12, 12)).astype(np.float32)
    w = rng.standard_normal((16, 32, 3, 3)).astype(np.float32)

    def job():
        for _ in range(10):
            y, saved = F.conv2d(x, w)
            F.conv2d_backward(np.ones_like(y), saved, w)

    jobs = [threading.Thread(target=job) for _ in range(3)]
    for t in jobs:
        t.start()
    for t in jobs:
        t.join()
    assert set_threads(before) == before


# ----------------------------------------------------------------------------- fused Conv2D + ReLU
FUSED_CASES = [(3, 1, 4, 7, 9, "valid"), (4, 3, 5, 8, 7, "same"), (2, 4, 3, 6, 6, 1)]


@pytest.mark.parametrize("case", FUSED_CASES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_relu_equals_the_two_generic_ops(case, bias, threads3):
    n, c, f, h, w, padding = case
    rng = np.random.default_rng(hash(case) % 2**32)
    x = rng.standard_normal((n, c, h, w))
    x[0, 0, 1, 1] = np.nan  # NaN -> 0 and mask False, as the generic ReLU
    wt = rng.standard_normal((f, c, 3, 3))
    b = rng.standard_normal(f) if bias else None
    y, saved, mask = F.conv2d_relu(x, wt, b, padding=padding)
    y_ref, saved_ref, mask_ref = generic(F.conv2d_relu, x, wt, b, padding=padding)
    assert saved.col is None and saved_ref.col is not None  # the kernel ran, then the generic
    np.testing.assert_array_equal(mask, mask_ref)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))
    close(np.nan_to_num(y), np.nan_to_num(y_ref))
    assert y.min() >= 0 and not np.isnan(y).any()

    x = rng.standard_normal((n, c, h, w))
    y, saved, mask = F.conv2d_relu(x, wt, b, padding=padding)
    y_ref, saved_ref, mask_ref = generic(F.conv2d_relu, x, wt, b, padding=padding)
    dy = rng.standard_normal(y.shape)
    for need_dx in (True, False):
        got = F.conv2d_relu_backward(dy, saved, mask, wt, padding=padding, need_dx=need_dx)
        want = generic(
            F.conv2d_relu_backward, dy, saved_ref, mask_ref, wt, padding=padding, need_dx=need_dx
        )
        for g, e in zip(got, want, strict=True):
            if e is None:
                assert g is None
            else:
                close(g, e)


def test_conv2d_relu_backward_with_a_non_finite_gradient_takes_the_generic_code():
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
    y, saved, mask = F.conv2d_relu(x, w)
    dy = rng.standard_normal(y.shape)
    dy[~mask] = np.inf  # only where the mask stops it: the generic where gives zeros there
    got = F.conv2d_relu_backward(dy, saved, mask, w)
    clean = np.where(mask, dy, 0.0)
    want = F.conv2d_backward(clean, saved, w)
    for g, e in zip(got, want, strict=True):
        assert np.isfinite(g).all()
        close(g, e)


# ---------------------------------------------------------------------------- fused conv + max-pool
# (n, c, f, h, w, padding, pool kernel, pool stride): one channel (the first-layer
# path), several; pools that tile, leave rows over, overlap (3, 2) and leave gaps (2, 3).
POOL_CASES = [
    (3, 1, 4, 8, 9, "valid", 2, 2),
    (4, 3, 5, 9, 8, "same", 2, 2),
    (2, 4, 3, 7, 7, 1, 3, 2),
    (3, 2, 4, 9, 10, "valid", 2, 3),
    (2, 3, 4, 11, 10, "valid", 3, 3),  # 3x3 windows in window order, a column over
    (2, 1, 3, 7, 6, "same", 3, 2),
]


def _unfused(x, wt, b, padding, relu, k, s, dy):
    """The layers' ops one at a time, forward and backward: (y, dx, dw, db)."""
    z, saved = F.conv2d(x, wt, b, padding=padding)
    if relu:
        z, mask = F.relu(z)
    y, pool_mask = F.max_pool2d(z, k, s)
    dz = F.max_pool2d_backward(dy, pool_mask, z.shape, k, s)
    if relu:
        dz = F.relu_backward(dz, mask)
    return (y, *F.conv2d_backward(dz, saved, wt, padding=padding))


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_max_pool2d_equals_the_generic_ops(case, relu, bias, threads3):
    n, c, f, h, w, padding, k, s = case
    rng = np.random.default_rng(hash(case) % 2**32)
    x = rng.standard_normal((n, c, h, w))
    x[0, 0, 1, :3] = 0.0  # ties and zero windows: the first maximum, no route at all
    wt = rng.standard_normal((f, c, 3, 3))
    wt[0] = 0.0  # a filter of zeros: every window ties (and, with the ReLU, routes nowhere)
    b = rng.standard_normal(f) if bias else None
    how = {"padding": padding, "with_relu": relu, "kernel_size": k, "pool_stride": s}
    y, saved, route = F.conv2d_max_pool2d(x, wt, b, **how)
    y_ref, saved_ref, route_ref = generic(F.conv2d_max_pool2d, x, wt, b, **how)
    assert saved.col is None and saved_ref.col is not None  # the kernel ran, then the generic
    np.testing.assert_array_equal(route, route_ref)
    close(y, y_ref)
    dy = rng.standard_normal(y.shape)
    del how["with_relu"]
    close_pool_backward(dy, saved, route, saved_ref, route_ref, wt, **how)


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
@pytest.mark.parametrize("relu", [True, False])
def test_generic_conv2d_max_pool2d_is_the_layers_ops_in_turn(case, relu):
    """The op's definition (the route folds the ReLU into the pool's mask) is exact."""
    n, c, f, h, w, padding, k, s = case
    rng = np.random.default_rng(7)
    x, wt, b = rng.standard_normal((n, c, h, w)), rng.standard_normal((f, c, 3, 3)), None
    with kernels.disabled("numpy"):
        how = {"padding": padding, "kernel_size": k, "pool_stride": s}
        y, saved, route = F.conv2d_max_pool2d(x, wt, b, with_relu=relu, **how)
        dy = rng.standard_normal(y.shape)
        got = (y, *F.conv2d_max_pool2d_backward(dy, saved, route, wt, **how))
        want = _unfused(x, wt, b, padding, relu, k, s, dy)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, e)  # the same operations: bit for bit


@pytest.mark.parametrize("relu", [True, False])
def test_conv2d_max_pool2d_ties_route_to_each_windows_first_maximum(relu):
    """Zero images make every output the bias: tied windows, positive and negative."""
    rng = np.random.default_rng(10)
    x, w = rng.standard_normal((4, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3))
    b = np.array([0.5, -0.5, 0.0, 1.0])
    x[1:3] = 0  # two images whose outputs are all the bias
    x[0, :, :4] = 0  # and half of another
    got = F.conv2d_max_pool2d(x, w, b, with_relu=relu)
    want = generic(F.conv2d_max_pool2d, x, w, b, with_relu=relu)
    assert got[2][1:3].any() or not relu  # ties at a positive bias route somewhere
    close(got[0], want[0])
    np.testing.assert_array_equal(got[2], want[2])


def test_conv2d_max_pool2d_with_a_nan_gives_the_generic_route():
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3))
    x[1, 2, 3, 3] = np.nan
    y, saved, route = F.conv2d_max_pool2d(x, w)  # no ReLU: a NaN window, the generic argmax
    y_ref, _, route_ref = generic(F.conv2d_max_pool2d, x, w)
    np.testing.assert_array_equal(route, route_ref)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))
    # With the ReLU (NaN -> 0 first) the kernel, which pools before its ReLU, hands the
    # batch to the generic code.
    assert npk._conv2d_max_pool2d(x, w, None, (0,) * 4, True, 2, 2) is kernels.FALLBACK
    y, saved, route = F.conv2d_max_pool2d(x, w, with_relu=True)
    assert not np.isnan(y).any()
    np.testing.assert_array_equal(route, generic(F.conv2d_max_pool2d, x, w, with_relu=True)[2])


def test_conv2d_max_pool2d_backward_with_a_non_finite_gradient_takes_the_generic_code():
    rng = np.random.default_rng(9)
    x, w = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3))
    y, saved, route = F.conv2d_max_pool2d(x, w, with_relu=True)
    dy = rng.standard_normal(y.shape)
    dy[~route.any(axis=2)] = np.inf  # only where nothing routes: the generic where gives zeros
    assert np.isinf(dy).any()
    got = F.conv2d_max_pool2d_backward(dy, saved, route, w)
    want = F.conv2d_max_pool2d_backward(np.where(route.any(axis=2), dy, 0.0), saved, route, w)
    for g, e in zip(got, want, strict=True):
        assert np.isfinite(g).all()
        close(g, e)


def _layer_by_layer(model, x, d):
    """The unfused pass: each layer's own forward and backward, in order."""
    for layer in model.layers:
        x = layer.forward(x)
    for i in range(len(model.layers) - 1, -1, -1):
        d = model.layers[i].backward(d)
    return x, d


@pytest.mark.parametrize("fast", [True, False])
def test_sequential_fuses_conv_relu_with_the_results_of_the_two_layers(fast, threads3):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 1, 12, 12))
    d = rng.standard_normal((5, 3))

    def run(fused):
        model = xcnn.Sequential(_small_lenet(), dtype="float64", seed=3)
        if fused:
            out = model.forward(x)
            dx = model.backward(d)
            assert model.layers[1].cache == {"fused": True}  # the ReLU's mask was the conv's
        else:
            out, dx = _layer_by_layer(model, x, d)
            assert "mask" in model.layers[1].cache
        return [out, dx] + [g for lay in model.layers for g in lay.grads.values()]

    with contextlib.nullcontext() if fast else kernels.disabled("numpy"):
        fused, plain = run(True), run(False)
    for a, b in zip(fused, plain, strict=True):
        close(a, b)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_sequential_fuses_conv_pool_with_the_results_of_the_layers(fast, relu, threads3):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((5, 2, 11, 11))
    d = rng.standard_normal((5, 3))
    layers = [xcnn.Conv2D(2, 4, 3), xcnn.MaxPool2D(3, stride=2), xcnn.Flatten(), xcnn.Dense(3)]
    if relu:
        layers.insert(1, xcnn.ReLU())

    def run(fused):
        model = xcnn.Sequential(layers, input_shape=(2, 11, 11), dtype="float64", seed=3)
        if fused:
            out = model.forward(x)
            dx = model.backward(d)
            assert "route" in model.layers[0].cache
            assert all(lay.cache == {"fused": True} for lay in model.layers[1 : 2 + relu])
        else:
            out, dx = _layer_by_layer(model, x, d)
            assert "mask" in model.layers[1 + relu].cache
        return [out, dx] + [g for lay in model.layers for g in lay.grads.values()]

    with contextlib.nullcontext() if fast else kernels.disabled("numpy"):
        fused, plain = run(True), run(False)
    for a, b in zip(fused, plain, strict=True):
        close(a, b)


def test_inference_does_not_fuse_the_pool_and_gives_the_training_values():
    model = xcnn.models.build_model("lenet", input_shape=(1, 14, 14), dtype="float64", seed=0)
    x = np.random.default_rng(11).standard_normal((3, 1, 14, 14))
    trained = model.forward(x, train=True)
    assert "route" in model.layers[2].cache
    inferred = model.forward(x, train=False)
    assert model.layers[4].cache == {}  # the pool's own inference pass (no mask made)
    close(inferred, trained)


def test_a_pool_too_large_for_the_convolution_raises_the_pools_error():
    conv, pool = xcnn.Conv2D(1, 2, 3), xcnn.MaxPool2D(4)
    model = xcnn.Sequential([conv, xcnn.ReLU(), pool], dtype="float64", seed=0)
    with pytest.raises(ShapeError, match=r"MaxPool2D\(4\).*H, W >= 4"):
        model.forward(np.ones((1, 1, 5, 5)))


def test_a_conv2d_subclass_with_its_own_forward_is_not_fused():
    calls = []

    class Logged(xcnn.Conv2D):
        def forward(self, x, *, train=True):
            calls.append(1)
            return super().forward(x, train=train)

    model = xcnn.Sequential([Logged(1, 2, 3), xcnn.ReLU()], dtype="float64", seed=0)
    model.forward(np.ones((1, 1, 5, 5)))
    assert calls == [1] and "mask" in model.layers[1].cache


# ----------------------------------------------------------------------------- bit for bit
def _lenet_step(x, labels):
    model = xcnn.models.build_model("lenet", input_shape=(1, 14, 14), dtype="float32", seed=0)
    opt = xcnn.SGD(model, 0.05, momentum=0.9)
    out = []
    for _ in range(2):
        loss, d = xcnn.softmax_cross_entropy(model.forward(x), labels)
        model.backward(d)
        opt.step()
        out.append(np.array(loss))
    return out + [np.array(v) for v in model.state_dict().values()]


def test_threads_change_no_bit(monkeypatch):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, 1, 14, 14)).astype(np.float32)
    labels = rng.integers(0, 10, 9)
    monkeypatch.setattr(npk, "CHUNK_BYTES", 1)
    runs = []
    for threads in (1, 3, 3):
        monkeypatch.setattr(par, "THREADS", threads)
        runs.append(_lenet_step(x, labels))
    for one, three, again in zip(*runs, strict=True):
        np.testing.assert_array_equal(three, again)  # two runs with threads: identical
        np.testing.assert_allclose(three, one, rtol=1e-5, atol=1e-6)  # BLAS's own threads


# ----------------------------------------------------------------------------- dense
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_split_dense_matches_generic(threads3, dtype, bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 50)).astype(dtype)
    w = rng.standard_normal((50, 9)).astype(dtype)
    b = rng.standard_normal(9).astype(dtype) if bias else None
    dy = rng.standard_normal((7, 9)).astype(dtype)
    got = (F.dense(x, w, b), *F.dense_backward(dy, x, w))
    want = generic(lambda: (F.dense(x, w, b), *F.dense_backward(dy, x, w)))
    for g, e in zip(got, want, strict=True):
        close(g, e, 1e-5 if dtype == np.float32 else 1e-12)


def test_dense_of_other_inputs_takes_the_generic_code():
    x, w = np.ones((2, 3)), np.ones((3, 4), np.float32)
    assert kernels.kernel("numpy", "dense")(x, w) is kernels.FALLBACK  # mixed dtypes
    assert kernels.kernel("numpy", "dense")(np.ones(3), np.ones((3, 4))) is kernels.FALLBACK


# ----------------------------------------------------------------------------- updates
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_updates_equal_the_generic_expressions_bit_for_bit(threads3, dtype, weight_decay):
    rng = np.random.default_rng(1)
    p, g, v = (rng.standard_normal((30, 11)).astype(dtype) for _ in range(3))
    got = updates.sgd_update(p, g, lr=0.03, weight_decay=weight_decay)
    np.testing.assert_array_equal(
        got, generic(updates.sgd_update, p, g, lr=0.03, weight_decay=weight_decay)
    )
    assert got.dtype == dtype
    for velocity in (None, v):
        kw = dict(lr=0.03, momentum=0.9, weight_decay=weight_decay)
        got = updates.momentum_update(p, g, velocity, **kw)
        want = generic(updates.momentum_update, p, g, velocity, **kw)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_updates_of_small_or_strided_parameters_take_the_generic_code(threads3):
    sgd = kernels.kernel("numpy", "sgd_update")
    p = np.ones((4, 6))
    assert sgd(p[:, ::2], p[:, ::2], lr=0.1) is kernels.FALLBACK  # not contiguous
    assert sgd(p, p.astype(np.float32), lr=0.1) is kernels.FALLBACK  # mixed dtypes


def test_zeros_like_gives_read_only_zeros_laid_out_like_its_argument():
    a = np.empty((4, 3, 5, 6), np.float32).transpose(0, 3, 1, 2)[1:3]  # an NHWC chunk
    z = npk._zeros_like(a)
    assert z.shape == a.shape and z.strides == a.strides and z.dtype == a.dtype
    assert not z.flags.writeable and not z.any()
    big = npk._zeros_like(np.empty((50, 70), np.float64))  # grows the float64 buffer
    assert not big.any() and not npk._zeros_like(np.empty((2, 2), np.float64)).any()
    x = np.array([[-1.0, np.nan, 0.0, 2.0]], np.float32)
    np.testing.assert_array_equal(F.relu(x)[0], generic(F.relu, x)[0])  # NaN -> 0 too
