"""The CuPy kernel set, checked without a GPU.

1. Every CUDA source compiles with ``nvcc`` for sm_90 (the H100/H200), exactly
   as ``cupy.RawKernel`` receives it (skipped where nvcc is absent).
2. The same sources, compiled as C++ for the host (tests/cuda_host.py), run
   through the real Python of xcnn/kernels/cupy.py over a NumPy stand-in for
   CuPy, against the generic functions: convolution (forward, every gradient,
   several strides/paddings, forced chunking), max-pool with ties and NaN,
   ReLU, softmax cross-entropy and the three updates.
3. The index formulas of im2col, col2im and the pool argmax, written again in
   vectorised NumPy, against the generic ``windows``/``fold``: the layouts
   proven independently of any compiler.

Each checker is also shown to fail on a deliberately wrong kernel.
What needs a GPU is in tests/test_cuda_gpu.py.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
from typing import Any

import numpy as np
import pytest

import xcnn.functional as F
from tests import cuda_host
from xcnn.kernels import FALLBACK
from xcnn.kernels.cuda_sources import CTYPES, LABEL_CTYPES, SOURCES, cuda_source

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) not on PATH")
needs_cxx = pytest.mark.skipif(cuda_host.CXX is None, reason="no host C++ compiler (g++)")

VARIANTS = [(name, dtype, "int64") for name in SOURCES for dtype in CTYPES] + [
    ("xcnn_softmax_xent", dtype, "int32") for dtype in CTYPES
]


# ----------------------------------------------------------------------------- 1. nvcc
def _nvcc(source: str, tmp_path: Any) -> subprocess.CompletedProcess:
    cu = tmp_path / "k.cu"
    cu.write_text(source)
    cmd = [NVCC, "-cubin", "-arch=sm_90", "-Werror", "all-warnings", "-o", str(tmp_path / "k")]
    return subprocess.run([*cmd, str(cu)], capture_output=True, text=True)


@needs_nvcc
@pytest.mark.parametrize(("name", "dtype", "label"), VARIANTS, ids="-".join)
def test_source_compiles_for_sm90(name: str, dtype: str, label: str, tmp_path: Any) -> None:
    source = cuda_source(name, dtype, label)
    assert "#include" not in source  # NVRTC (CuPy's compiler) finds no host headers
    assert f'extern "C" __global__ void {name}(' in source  # RawKernel finds it by name
    res = _nvcc(source, tmp_path)
    assert res.returncode == 0, res.stderr


@needs_nvcc
def test_nvcc_check_can_fail(tmp_path: Any) -> None:
    broken = cuda_source("xcnn_relu", "float32").replace("mask[idx] = on;", "mask[idx] = on")
    assert _nvcc(broken, tmp_path).returncode != 0


def test_every_kernel_has_a_source_for_every_dtype() -> None:
    for name in SOURCES:
        for dtype in CTYPES:
            for label in LABEL_CTYPES:
                assert name in cuda_source(name, dtype, label)
    with pytest.raises(KeyError):
        cuda_source("xcnn_relu", "float16")


# ----------------------------------------------------------------------------- generic refs
#: Whether this checkout's generic conv2d has the seam's API (``(y, Conv2DSaved)``).
SEAM_CONV = hasattr(F, "Conv2DSaved")


@dataclasses.dataclass(frozen=True)
class _Saved:  # what xcnn.functional.Conv2DSaved holds (the seam), for checkouts without it
    x: Any
    col: Any
    workspace: Any = None


def _generic(name: str) -> Any:
    func = getattr(F, name)
    return getattr(func, "generic", func)


def generic_conv(x, w, b, stride, padding, dy):
    """(y, dx, dw, db) from the generic code, whichever conv2d API this checkout has."""
    y, saved = _generic("conv2d")(x, w, b, stride=stride, padding=padding)
    back = _generic("conv2d_backward")
    if SEAM_CONV:
        dx, dw, db = back(dy, saved, w, stride=stride, padding=padding)
    else:  # before the seam: conv2d returned the columns
        dx, dw, db = back(dy, saved, x.shape, w, stride=stride, padding=padding)
    return y, dx, dw, db


def generic_pool_mask(x: np.ndarray, k: int, s: int) -> np.ndarray:
    """The generic argmax mask (N, C, K*K, OH, OW), through ``windows`` (no fast path)."""
    oh, ow = (x.shape[2] - k) // s + 1, (x.shape[3] - k) // s + 1
    first = np.argmax(F.windows(x, k, k, s, oh, ow), axis=2)  # (N, C, OH, OW)
    return first[:, :, None] == np.arange(k * k)[:, None, None]


@pytest.fixture(scope="module")
def host(request) -> Any:
    """xcnn/kernels/cupy.py over the NumPy stand-in, with the seam's Conv2DSaved."""
    if cuda_host.CXX is None:
        pytest.skip("no host C++ compiler (g++)")
    registered: dict[str, Any] = {}
    mp = pytest.MonkeyPatch()
    if not hasattr(F, "Conv2DSaved"):
        mp.setattr(F, "Conv2DSaved", _Saved, raising=False)
    module = cuda_host.load_on_host(registered)
    module.registered = registered
    yield module
    mp.undo()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(b)), 1e-30)
    return float(np.max(np.abs(a - b)) / scale) if a.size else 0.0


TOL = {"float32": 2e-6, "float64": 1e-13}


# ----------------------------------------------------------------------------- 2. host runs
def test_registers_exactly_the_seam_ops(host) -> None:
    expected = {
        "conv2d",
        "conv2d_backward",
        "conv2d_relu",
        "dense",
        "dense_backward",
        "max_pool2d",
        "max_pool2d_values",
        "max_pool2d_backward",
        "relu",
        "relu_backward",
        "softmax_cross_entropy",
        "sgd_update",
        "momentum_update",
        "adam_update",
    }
    assert set(host.registered) == expected
    # Exactly the generic signatures (the seam checks this too, but only on a GPU).
    import xcnn.kernels as seam

    try:
        from xcnn import updates
    except ImportError:
        updates = None
    checked = 0
    for op, func in host.registered.items():
        generic = getattr(F, op, None) or getattr(updates, op, None)
        generic = getattr(generic, "generic", None)  # only delegated ops have one
        if generic is not None:
            assert seam._signature(func) == seam._signature(generic), op
            checked += 1
    if SEAM_CONV:  # with the seam every registered op is a delegated one
        assert checked == len(expected)


CONV_CASES = [
    # (N, C, H, W, F, KH, KW, stride, padding)
    (3, 1, 9, 8, 4, 3, 3, 1, "valid"),
    (2, 3, 8, 9, 5, 3, 3, 1, "same"),
    (2, 2, 9, 9, 3, 3, 2, 2, "valid"),
    (2, 2, 10, 7, 3, 4, 4, 2, "same"),
    (1, 2, 6, 6, 2, 3, 3, 3, 1),
    (4, 2, 5, 5, 3, 1, 1, 1, "valid"),
]


@pytest.mark.parametrize("dtype", list(CTYPES))
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunked"])
def test_conv2d_matches_generic(host, case, dtype, chunked, monkeypatch) -> None:
    n, c, h, w_, f, kh, kw, s, pad = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w_)).astype(dtype)
    w = rng.standard_normal((f, c, kh, kw)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    if chunked:  # one image per chunk: the chunk loop and its offsets run
        monkeypatch.setattr(host, "WORKSPACE_BYTES", 1)
    y, saved = host.conv2d(x, w, b, stride=s, padding=pad)
    assert saved.col is None and saved.x is x  # nothing but the input is kept
    dy = rng.standard_normal(y.shape).astype(dtype)
    ry, rdx, rdw, rdb = generic_conv(x, w, b, s, pad, dy)
    assert y.dtype == ry.dtype and y.shape == ry.shape
    assert _rel(y, ry) < TOL[dtype]
    dx, dw, db = host.conv2d_backward(dy, saved, w, stride=s, padding=pad)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    assert _rel(dx, rdx) < TOL[dtype]
    assert _rel(dw, rdw) < TOL[dtype]
    assert _rel(db, rdb) < TOL[dtype]
    none, dw2, _ = host.conv2d_backward(dy, saved, w, stride=s, padding=pad, need_dx=False)
    assert none is None and np.array_equal(dw2, dw)
    # no bias, and the fused ReLU variant
    y0, _ = host.conv2d(x, w, None, stride=s, padding=pad)
    assert _rel(y0, ry - b[:, None, None]) < 10 * TOL[dtype]
    yr, _, mask = host.conv2d_relu(x, w, b, stride=s, padding=pad)
    assert np.array_equal(mask, y > 0) and np.array_equal(yr, np.where(y > 0, y, 0))


def test_conv2d_falls_back_where_it_does_not_apply(host) -> None:
    x = np.zeros((2, 1, 5, 5), np.float32)
    w = np.zeros((2, 1, 3, 3), np.float64)  # mixed dtypes
    assert host.conv2d(x, w) is FALLBACK
    assert host.conv2d(x.astype(np.float16), w.astype(np.float16)) is FALLBACK
    assert host.conv2d(x, np.zeros((2, 1, 7, 7), np.float32)) is FALLBACK  # no output pixel


def test_conv_checker_can_fail(host, monkeypatch) -> None:
    """A kernel that swaps the kernel offsets (i, j) is caught by the comparison above."""
    right = "const int i = r / KW, j = r % KW;"
    assert right in SOURCES["xcnn_im2col"]
    wrong = SOURCES["xcnn_im2col"].replace(right, "const int j = r / KW, i = r % KW;")
    monkeypatch.setitem(SOURCES, "xcnn_im2col", wrong)
    host._kernel.cache_clear()
    try:
        rng = np.random.default_rng(1)
        x, w = rng.standard_normal((2, 2, 7, 7)), rng.standard_normal((3, 2, 3, 3))
        y, _ = host.conv2d(x, w)
        ry, *_ = generic_conv(x, w, None, 1, "valid", np.zeros((2, 3, 5, 5)))
        assert _rel(y, ry) > 1e-3
    finally:
        host._kernel.cache_clear()


POOL_CASES = [(2, 2), (3, 2), (2, 1), (3, 3)]  # (K, S): tiled, overlapping, dense, tiled


@pytest.mark.parametrize("dtype", list(CTYPES))
@pytest.mark.parametrize(("k", "s"), POOL_CASES)
def test_max_pool_matches_generic(host, k, s, dtype) -> None:
    rng = np.random.default_rng(2)
    # Small integers: many ties, so "first maximum in row-major order" is exercised.
    x = rng.integers(0, 3, size=(2, 3, 9, 8)).astype(dtype)
    x[0, 0, 0, 1] = np.nan  # a NaN is the maximum of its windows (as argmax/max)
    y, arg = host.max_pool2d(x, k, s)
    mask = generic_pool_mask(x, k, s)
    ry = np.max(F.windows(x, k, k, s, y.shape[2], y.shape[3]), axis=2)
    assert arg.dtype == np.uint8 and arg.shape == y.shape
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(arg, np.argmax(mask, axis=2))
    np.testing.assert_array_equal(host.max_pool2d_values(x, k, s), ry)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = host.max_pool2d_backward(dy, arg, x.shape, k, s)
    rdx = _generic("max_pool2d_backward")(dy, mask, x.shape, k, s)
    assert dx.shape == x.shape
    assert _rel(dx, rdx) < TOL[dtype]
    if s >= k:  # windows do not overlap: each pixel gets at most one term, exactly
        np.testing.assert_array_equal(dx, rdx)
    # A bool mask (the generic forward's) goes to the generic backward.
    assert host.max_pool2d_backward(dy, mask, x.shape, k, s) is FALLBACK


def test_max_pool_falls_back_for_windows_over_255(host) -> None:
    x = np.zeros((1, 1, 16, 16), np.float32)
    assert host.max_pool2d(x, 16, 16) is FALLBACK  # 256 positions do not fit a uint8


def test_max_pool_checker_can_fail(host, monkeypatch) -> None:
    """Taking the last maximum instead of the first is caught."""
    wrong = SOURCES["xcnn_maxpool"].replace("if (v > best ||", "if (v >= best ||")
    monkeypatch.setitem(SOURCES, "xcnn_maxpool", wrong)
    host._kernel.cache_clear()
    try:
        x = np.ones((1, 1, 4, 4), np.float32)
        _, arg = host.max_pool2d(x, 2, 2)
        assert not np.array_equal(arg, np.argmax(generic_pool_mask(x, 2, 2), axis=2))
    finally:
        host._kernel.cache_clear()


@pytest.mark.parametrize("dtype", list(CTYPES))
def test_relu_matches_generic(host, dtype) -> None:
    x = np.array([[-1.0, 0.0, 2.0, np.nan, -0.0, np.inf]], dtype)
    y, mask = host.relu(x)
    ry, rmask = _generic("relu")(x)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(mask, rmask)
    dy = np.array([[1.0, 2.0, np.nan, 4.0, np.inf, 6.0]], dtype)
    np.testing.assert_array_equal(
        host.relu_backward(dy, mask), _generic("relu_backward")(dy, rmask)
    )
    z = np.random.default_rng(3).standard_normal((4, 5)).astype(dtype)
    w = np.random.default_rng(4).standard_normal((5, 3)).astype(dtype)
    b = np.random.default_rng(5).standard_normal(3).astype(dtype)
    yd, md = host.dense_relu(z, w, b)
    ref = z @ w + b
    assert _rel(yd, np.maximum(ref, 0)) < TOL[dtype] and np.array_equal(md, ref > 0)


@pytest.mark.parametrize("dtype", list(CTYPES))
def test_dense_matches_generic(host, dtype) -> None:
    rng = np.random.default_rng(12)
    x, w = rng.standard_normal((6, 5)).astype(dtype), rng.standard_normal((5, 4)).astype(dtype)
    b, dy = rng.standard_normal(4).astype(dtype), rng.standard_normal((6, 4)).astype(dtype)
    assert _rel(host.dense(x, w, b), _generic("dense")(x, w, b)) < TOL[dtype]
    assert _rel(host.dense(x, w), x @ w) < TOL[dtype]
    mine, ref = host.dense_backward(dy, x, w), _generic("dense_backward")(dy, x, w)
    assert all(_rel(a, r) < TOL[dtype] for a, r in zip(mine, ref, strict=True))


def _column_major(a: np.ndarray, rows: int, cols: int, ld: int) -> np.ndarray:
    """How cuBLAS reads ``a``'s memory: a column-major (rows, cols) matrix, leading dim ld."""
    return np.lib.stride_tricks.as_strided(a, (rows, cols), (a.itemsize, ld * a.itemsize))


@pytest.mark.parametrize("ta", [False, True], ids=["a", "a.T"])
@pytest.mark.parametrize("tb", [False, True], ids=["b", "b.T"])
@pytest.mark.parametrize(("m", "k", "n"), [(3, 4, 5), (1, 4, 5), (3, 1, 2), (6, 5, 1)])
def test_captured_gemm_operand_math(host, ta, tb, m, k, n) -> None:
    """The op/ld choice of the direct cuBLAS call, replayed on NumPy memory."""
    rng = np.random.default_rng(13)
    a = rng.standard_normal((k, m)).T if ta else rng.standard_normal((m, k))  # (M, K)
    b = rng.standard_normal((n, k)).T if tb else rng.standard_normal((k, n))  # (K, N)
    a2, op_a, lda = host._operand(a)
    b2, op_b, ldb = host._operand(b)
    # gemm(op_b, op_a, n, m, k, B, ldb, A, lda, C, ldc=n): C^T (N, M) = op(B) @ op(A)
    bm = _column_major(b2, n, k, ldb) if op_b == 0 else _column_major(b2, k, n, ldb).T
    am = _column_major(a2, k, m, lda) if op_a == 0 else _column_major(a2, m, k, lda).T
    assert lda >= (k if op_a == 0 else m) and ldb >= (n if op_b == 0 else k)
    np.testing.assert_allclose((bm @ am).T, a @ b, rtol=1e-12)


@pytest.mark.parametrize("label_dtype", list(LABEL_CTYPES))
@pytest.mark.parametrize("dtype", list(CTYPES))
def test_softmax_cross_entropy_matches_generic(host, dtype, label_dtype) -> None:
    rng = np.random.default_rng(6)
    logits = (rng.standard_normal((7, 10)) * 30).astype(dtype)
    logits[0, 3] = 1e4  # log-sum-exp keeps it finite
    labels = rng.integers(0, 10, size=7).astype(label_dtype)
    loss, d = host.softmax_cross_entropy(logits, labels)
    rloss, rd = _generic("softmax_cross_entropy")(logits, labels)
    assert np.ndim(loss) == 0 and np.isfinite(loss)
    assert _rel(loss, rloss) < TOL[dtype]
    assert _rel(d, rd) < TOL[dtype]
    bad = host.softmax_cross_entropy(logits, labels.astype(np.uint8))
    assert bad is FALLBACK


def _generic_updates():
    """The generic updates: xcnn.updates (the seam) or, before it, the same expressions.

    Written with Python-float hyperparameters, as the generic code is, so NumPy
    rounds every operation in the array's dtype (NEP 50) like CuPy's kernels do.
    """
    try:
        from xcnn import updates
    except ImportError:
        updates = None
    if updates is not None:
        return tuple(getattr(f, "generic", f) for f in (
            updates.sgd_update, updates.momentum_update, updates.adam_update
        ))  # fmt: skip

    def sgd(p, g, *, lr, weight_decay=0.0):
        return p - lr * (g + weight_decay * p) if weight_decay else p - lr * g

    def momentum(p, g, velocity, *, lr, momentum, weight_decay=0.0):
        v = g if velocity is None else momentum * velocity + g
        return (p - lr * (v + weight_decay * p) if weight_decay else p - lr * v), v

    def adam(p, g, m, v, *, lr, step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        b1, b2 = beta1, beta2
        m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g
        v = (1 - b2) * g * g if v is None else b2 * v + (1 - b2) * g * g
        size = lr * math.sqrt(1 - b2**step) / (1 - b1**step)
        eps_hat = eps * math.sqrt(1 - b2**step)
        upd = size * m / (np.sqrt(v) + eps_hat)
        return (p - (upd + (lr * weight_decay) * p) if weight_decay else p - upd), m, v

    return sgd, momentum, adam


@pytest.mark.parametrize("dtype", list(CTYPES))
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_updates_match_generic_bit_for_bit(host, dtype, wd) -> None:
    """Each product rounded on its own (mul_rn): the same bits as the generic updates."""
    sgd, momentum, adam = _generic_updates()
    rng = np.random.default_rng(7)
    p, g, v0, m0 = (rng.standard_normal((3, 4)).astype(dtype) for _ in range(4))
    v0 = np.abs(v0)
    lr, mu = 0.05, 0.9
    np.testing.assert_array_equal(
        host.sgd_update(p, g, lr=lr, weight_decay=wd), sgd(p, g, lr=lr, weight_decay=wd)
    )
    for vel in (None, v0):
        mine = host.momentum_update(p, g, vel, lr=lr, momentum=mu, weight_decay=wd)
        ref = momentum(p, g, vel, lr=lr, momentum=mu, weight_decay=wd)
        for a, r in zip(mine, ref, strict=True):
            np.testing.assert_array_equal(a, r)
    for m, v, step in ((None, None, 1), (m0, v0, 5)):
        mine = host.adam_update(p, g, m, v, lr=lr, step=step, weight_decay=wd)
        ref = adam(p, g, m, v, lr=lr, step=step, weight_decay=wd)
        for a, r in zip(mine, ref, strict=True):
            assert a.dtype == r.dtype
            np.testing.assert_array_equal(a, r)


def test_update_checker_can_fail(host, monkeypatch) -> None:
    right = "out[idx] = pi - mul_rn(lr, gi);"
    assert right in SOURCES["xcnn_sgd"]
    wrong = SOURCES["xcnn_sgd"].replace(right, "out[idx] = pi + mul_rn(lr, gi);")
    monkeypatch.setitem(SOURCES, "xcnn_sgd", wrong)
    host._kernel.cache_clear()
    try:
        p, g = np.ones(4, np.float32), np.ones(4, np.float32)
        assert _rel(host.sgd_update(p, g, lr=0.1), p - np.float32(0.1) * g) > 0.1
    finally:
        host._kernel.cache_clear()


# ----------------------------------------------------------------------------- 3. index math
def emulate_im2col(x: np.ndarray, kh: int, kw: int, s: int, pt: int, pl: int, oh: int, ow: int):
    """xcnn_im2col's formulas, vectorised over idx: col (C*KH*KW, N*OH*OW)."""
    n, c, h, w = x.shape
    p, cols = oh * ow, n * oh * ow
    idx = np.arange(c * kh * kw * cols)
    q, k = idx % cols, idx // cols
    img, pix = q // p, q % p
    oy, ox = pix // ow, pix % ow
    ch, r = k // (kh * kw), k % (kh * kw)
    i, j = r // kw, r % kw
    yy, xx = oy * s + i - pt, ox * s + j - pl
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    flat = ((img * c + ch) * h + np.clip(yy, 0, h - 1)) * w + np.clip(xx, 0, w - 1)
    return np.where(inside, x.reshape(-1)[flat], 0).reshape(c * kh * kw, cols)


def emulate_col2im(dcol, shape, kh, kw, s, pt, pl, oh, ow):
    """xcnn_col2im's gather, vectorised over idx (the loop over i, j as in the kernel)."""
    n, c, h, w = shape
    p, cols = oh * ow, n * oh * ow
    idx = np.arange(n * c * h * w)
    xx, yy = idx % w, (idx // w) % h
    ch, img = (idx // (w * h)) % c, idx // (w * h * c)
    acc = np.zeros(idx.shape, dcol.dtype)
    for i in range(kh):
        ty = yy + pt - i
        for j in range(kw):
            tx = xx + pl - j
            ok = (ty >= 0) & (ty % s == 0) & (ty // s < oh) & (tx >= 0) & (tx % s == 0)
            ok &= tx // s < ow
            k = ch * kh * kw + i * kw + j
            src = k * cols + img * p + np.where(ok, ty // s, 0) * ow + np.where(ok, tx // s, 0)
            acc = acc + np.where(ok, dcol.reshape(-1)[src], 0)
    return acc.reshape(shape)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_im2col_col2im_index_math(case) -> None:
    n, c, h, w, f, kh, kw, s, pad = case
    x = np.random.default_rng(8).standard_normal((n, c, h, w))
    pt, pb, pl, pr = F.pad_amounts(h, w, kh, kw, s, pad)
    oh, ow = (h + pt + pb - kh) // s + 1, (w + pl + pr - kw) // s + 1
    padded = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    win = F.windows(padded, kh, kw, s, oh, ow)  # (N, C, KH*KW, OH, OW)
    col = emulate_im2col(x, kh, kw, s, pt, pl, oh, ow)
    ref = win.reshape(n, c * kh * kw, oh * ow).transpose(1, 0, 2).reshape(c * kh * kw, -1)
    np.testing.assert_array_equal(col, ref)  # the GEMM-ready layout
    dcol = np.random.default_rng(9).standard_normal(col.shape)
    dx = emulate_col2im(dcol, x.shape, kh, kw, s, pt, pl, oh, ow)
    cols5 = dcol.reshape(c, kh * kw, n, oh, ow).transpose(2, 0, 1, 3, 4)  # (N, C, KH*KW, OH, OW)
    shape_padded = (n, c, h + pt + pb, w + pl + pr)
    folded = _generic("fold")(cols5, shape_padded, kh, kw, s)[:, :, pt : pt + h, pl : pl + w]
    np.testing.assert_allclose(dx, folded, rtol=1e-13, atol=1e-13)
    # the checker can fail: swapping i and j in the formula breaks the layout (non-square
    # kernels or asymmetric inputs)
    if kh * kw > 1:
        bad = emulate_im2col(x.transpose(0, 1, 3, 2), kw, kh, s, pl, pt, ow, oh)
        assert bad.shape != ref.shape or not np.array_equal(bad, ref)


@pytest.mark.parametrize(("k", "s"), POOL_CASES)
def test_pool_index_math(k, s) -> None:
    x = np.random.default_rng(10).integers(0, 3, size=(2, 2, 9, 7)).astype(np.float64)
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    # xcnn_maxpool: the window's base pixel and offset r -> (r // K, r % K), strict ">".
    idx = np.arange(n * c * oh * ow)
    ox, oy, plane = idx % ow, (idx // ow) % oh, idx // (ow * oh)
    base = plane * h * w + oy * s * w + ox * s
    best, arg = x.reshape(-1)[base], np.zeros(idx.shape, np.int64)
    for r in range(1, k * k):
        v = x.reshape(-1)[base + (r // k) * w + r % k]
        take = v > best
        best, arg = np.where(take, v, best), np.where(take, r, arg)
    mask = generic_pool_mask(x, k, s)
    np.testing.assert_array_equal(arg.reshape(n, c, oh, ow), np.argmax(mask, axis=2))
    # xcnn_maxpool_back: the windows covering (y, x) and the offset test.
    dy = np.random.default_rng(11).standard_normal((n, c, oh, ow))
    pix = np.arange(n * c * h * w)
    xx, yy, pl_ = pix % w, (pix // w) % h, pix // (w * h)
    oy_lo = np.where(yy >= k, (yy - k) // s + 1, 0)
    oy_hi = np.minimum(yy // s, oh - 1)
    ox_lo = np.where(xx >= k, (xx - k) // s + 1, 0)
    ox_hi = np.minimum(xx // s, ow - 1)
    acc = np.zeros(pix.shape)
    for a in range(-(-k // s) + 1):  # at most ceil(K/S) windows per axis cover a pixel
        for b in range(-(-k // s) + 1):
            wy, wx = oy_hi - a, ox_hi - b
            ok = (wy >= oy_lo) & (wx >= ox_lo)
            o = pl_ * oh * ow + np.where(ok, wy, 0) * ow + np.where(ok, wx, 0)
            hit = ok & (arg[o] == (yy - wy * s) * k + (xx - wx * s))
            acc = acc + np.where(hit, dy.reshape(-1)[o], 0)
    ref = _generic("max_pool2d_backward")(dy, mask, x.shape, k, s)
    np.testing.assert_allclose(acc.reshape(x.shape), ref, rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------------------------- graphs (CPU)
def test_training_step_is_the_eager_step_off_cupy(monkeypatch) -> None:
    """Off CuPy (or with graphs off) training_step is exactly fit's eager step."""
    import xcnn
    from xcnn import cuda_graph

    monkeypatch.setenv("XCNN_CUDA_GRAPHS", "1")
    assert cuda_graph.graphs_enabled()
    monkeypatch.setenv("XCNN_CUDA_GRAPHS", "0")
    assert not cuda_graph.graphs_enabled()
    rng = np.random.default_rng(14)
    x, y = rng.random((8, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, size=8)

    def run(use_step: bool) -> dict:
        model = xcnn.models.build_model("seed", seed=3)
        opt = xcnn.SGD(model, 0.1, momentum=0.9)
        step = cuda_graph.training_step(model, opt, graphs=True)
        assert not isinstance(step, cuda_graph.GraphStep)  # NumPy: never a graph
        for _ in range(3):
            if use_step:
                loss, logits = step(x, y)
                assert logits.shape == (8, 10) and np.ndim(loss) == 0
            else:
                logits = model.forward(x, train=True)
                _, d = xcnn.softmax_cross_entropy(logits, y, check=False)
                model.backward(d, input_grad=False)
                opt.step()
        return model.state_dict()

    a, b = run(True), run(False)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
