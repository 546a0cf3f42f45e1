"""The NumPy kernel set (xcnn/kernels/numpy.py) against the generic array-API code.

Every comparison runs the public function twice on identical NumPy arrays:
once as shipped (through the kernel seam) and once with the NumPy set
switched off (``kernels.disabled("numpy")``: the generic code every other
namespace runs). float64 results must agree to rounding; masks and routing
must agree exactly. One test registers a deliberately wrong kernel to show
the comparison catches it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xcnn
from xcnn import functional as F
from xcnn import kernels, recycler
from xcnn.kernels import numpy as npk

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-12


def generic(fn, *args, **kwargs):
    """Call ``fn`` with the NumPy kernel set switched off."""
    with kernels.disabled("numpy"):
        return fn(*args, **kwargs)


def close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-300)
    err = float(np.abs(a - b).max(initial=0.0)) / scale
    assert err <= rtol, f"relative difference {err:.2e} > {rtol:.0e}"


def readonly(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of one or two images, so the chunk loops and a ragged last chunk run."""
    monkeypatch.setattr(npk, "CHUNK_BYTES", 1)


# ----------------------------------------------------------------------------- convolution
CONV_CASES = [
    # (N, C, F, H, W, KH, KW, padding)
    (3, 1, 4, 7, 9, 3, 3, "valid"),  # single channel: transposed columns
    (3, 1, 2, 6, 5, 3, 3, "same"),
    (2, 5, 3, 7, 9, 3, 3, "valid"),
    (3, 2, 4, 8, 7, 3, 3, "same"),
    (2, 3, 2, 6, 6, 2, 3, "same"),  # even kernel: extra padding bottom/right
    (2, 3, 2, 5, 7, 3, 2, 1),
    (1, 4, 3, 5, 5, 5, 5, "valid"),  # output 1x1
    (2, 3, 5, 4, 6, 1, 1, "valid"),  # 1x1 kernel
    (5, 2, 3, 6, 6, 3, 3, 2),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunks", ["default", "small"])
def test_conv_fast_equals_generic(case, bias, chunks, request):
    if chunks == "small":
        request.getfixturevalue("small_chunks")
    n, c, f, h, w, kh, kw, padding = case
    rng = np.random.default_rng(hash(case) % 2**32)
    x = readonly(rng.standard_normal((n, c, h, w)))
    wt = readonly(rng.standard_normal((f, c, kh, kw)))
    b = readonly(rng.standard_normal(f)) if bias else None

    y, saved = F.conv2d(x, wt, b, padding=padding)
    y_ref, saved_ref = generic(F.conv2d, x, wt, b, padding=padding)
    assert saved.col is None and saved_ref.col is not None  # the kernel ran, then the generic
    close(y, y_ref)
    close(F.conv2d.generic(x, wt, b, padding=padding)[0], y_ref)

    dy = readonly(rng.standard_normal(y.shape))
    for need_dx in (True, False):
        dx, dw, db = F.conv2d_backward(dy, saved, wt, padding=padding, need_dx=need_dx)
        dx_ref, dw_ref, db_ref = generic(
            F.conv2d_backward, dy, saved_ref, wt, padding=padding, need_dx=need_dx
        )
        # Any backward takes any forward's saved state: the generic backward rebuilds
        # the windows from the input, the kernel ignores them.
        cross = F.conv2d_backward.generic(dy, saved, wt, padding=padding, need_dx=need_dx)
        close(cross[1], dw_ref)
        close(F.conv2d_backward(dy, saved_ref, wt, padding=padding, need_dx=need_dx)[1], dw_ref)
        close(dw, dw_ref)
        close(db, db_ref)
        if need_dx:
            close(dx, dx_ref)
        else:
            assert dx is None and dx_ref is None


def test_conv_strided_takes_the_generic_path():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 9, 9)), rng.standard_normal((4, 3, 3, 3))
    y, saved = F.conv2d(x, w, None, stride=2)
    assert saved.col is not None  # the kernel returned FALLBACK
    assert npk.conv2d(x, w, None, stride=2) is kernels.FALLBACK
    close(y, F.conv2d.generic(x, w, None, stride=2)[0])


def test_conv_accepts_any_input_layout():
    """Non-contiguous inputs and gradients (reversed, transposed views) give the same values."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal((7, 6, 3, 2))  # (W, H, C, N) in memory
    x = base.transpose(3, 2, 1, 0)[:, :, :, ::-1]  # (N, C, H, W), strides all over the place
    w = rng.standard_normal((4, 3, 3, 3))
    y, saved = F.conv2d(x, w, None)
    y_ref, saved_ref = generic(F.conv2d, x, w, None)
    close(y, y_ref)
    dy = np.asfortranarray(rng.standard_normal(y.shape))
    for got, ref in zip(
        F.conv2d_backward(dy, saved, w),
        generic(F.conv2d_backward, dy, saved_ref, w),
        strict=True,
    ):
        close(got, ref)


def test_conv_float32_is_float32_and_accurate():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 10, 10))
    w, b = rng.standard_normal((5, 3, 3, 3)), rng.standard_normal(5)
    f32 = [a.astype(np.float32) for a in (x, w, b)]
    y, saved = F.conv2d(*f32)
    assert y.dtype == np.float32
    close(y.astype(np.float64), F.conv2d(x, w, b)[0], rtol=1e-6)
    dx, dw, db = F.conv2d_backward(np.ones(y.shape, np.float32), saved, f32[1])
    assert dx.dtype == dw.dtype == db.dtype == np.float32


def test_conv_mixed_dtypes_use_the_generic_path():
    x = np.ones((1, 1, 5, 5), np.float32)
    w = np.ones((2, 1, 3, 3), np.float64)
    y, saved = F.conv2d(x, w)
    assert saved.col is not None and y.dtype == np.float64
    assert npk.conv2d(x, w) is kernels.FALLBACK
    assert npk.relu(np.ones(3, np.float16)) is kernels.FALLBACK


# ----------------------------------------------------------------------------- max pooling
@pytest.mark.parametrize(
    "k,s,hw",
    [
        (2, 2, (6, 8)),
        (2, 2, (7, 5)),
        (3, 3, (7, 8)),
        (3, 2, (7, 7)),
        (2, 1, (5, 4)),
        (1, 1, (3, 3)),
        (3, 1, (4, 6)),
    ],
)
@pytest.mark.parametrize("values", ["random", "ties"])
def test_maxpool_fast_equals_generic(k, s, hw, values):
    rng = np.random.default_rng(k * 10 + s)
    shape = (3, 4, *hw)
    x = rng.standard_normal(shape) if values == "random" else rng.integers(0, 3, shape) * 1.0
    x = readonly(x)
    y, mask = F.max_pool2d(x, k, s)
    y_ref, mask_ref = generic(F.max_pool2d, x, k, s)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(mask, mask_ref)  # first max only, row-major
    assert mask.sum() == y.size  # exactly one position per window

    dy = readonly(rng.standard_normal(y.shape))
    dx = F.max_pool2d_backward(dy, mask, x.shape, k, s)
    dx_ref = generic(F.max_pool2d_backward, dy, mask_ref, x.shape, k, s)
    close(dx, dx_ref)
    if s >= k:  # rows/columns that fill no window get exactly zero
        oh, ow = (hw[0] - k) // s + 1, (hw[1] - k) // s + 1
        assert not dx[:, :, (oh - 1) * s + k :, :].any()
        assert not dx[:, :, :, (ow - 1) * s + k :].any()


@pytest.mark.parametrize(
    "k,s,hw",
    [
        (2, 2, (6, 8)),
        (2, 2, (7, 5)),
        (3, 3, (8, 7)),
        (3, 2, (7, 7)),
        (1, 1, (3, 4)),
        (2, 3, (8, 8)),
    ],
)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_maxpool_values_equal_max_pool2d(k, s, hw, layout):
    rng = np.random.default_rng(k * 7 + s)
    x = rng.standard_normal((2, 5, *hw))
    if layout == "nhwc":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    x = readonly(x)
    y = F.max_pool2d_values(x, k, s)
    np.testing.assert_array_equal(y, generic(F.max_pool2d_values, x, k, s))
    np.testing.assert_array_equal(y, generic(F.max_pool2d, x, k, s)[0])


def test_maxpool_layer_inference_gives_the_training_values():
    x = np.random.default_rng(5).standard_normal((3, 4, 9, 9))
    pool = xcnn.MaxPool2D(3).build()
    y_infer = pool.forward(x, train=False)
    assert pool.cache == {}
    np.testing.assert_array_equal(y_infer, pool.forward(x, train=True))


def test_maxpool_all_equal_window_routes_to_top_left():
    x = np.zeros((1, 1, 4, 4))
    _, mask = F.max_pool2d(x, 2, 2)
    assert mask[0, 0, 0].all() and not mask[0, 0, 1:].any()
    dx = F.max_pool2d_backward(np.ones((1, 1, 2, 2)), mask, x.shape, 2, 2)
    np.testing.assert_array_equal(
        dx[0, 0], [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    )


def test_maxpool_keeps_an_nhwc_layout_and_its_values():
    """After a fast convolution the input is NHWC memory seen as NCHW: same answers."""
    rng = np.random.default_rng(3)
    nhwc = rng.standard_normal((2, 6, 6, 5))
    x = nhwc.transpose(0, 3, 1, 2)  # (N, C, H, W) view of NHWC memory
    y, mask = F.max_pool2d(x, 2, 2)
    y_ref, mask_ref = generic(F.max_pool2d, np.ascontiguousarray(x), 2, 2)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(mask, mask_ref)
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous  # layout kept for the next layer
    dy = rng.standard_normal(y.shape)
    close(
        F.max_pool2d_backward(dy, mask, x.shape, 2, 2),
        generic(F.max_pool2d_backward, dy, mask_ref, x.shape, 2, 2),
    )


def test_maxpool_nan_and_inf_match_the_generic_code():
    x = np.arange(32.0).reshape(1, 2, 4, 4)
    x[0, 0, 1, 1] = np.nan  # a NaN window: the generic argmax picks the NaN
    y, mask = F.max_pool2d(x, 2, 2)
    y_ref, mask_ref = generic(F.max_pool2d, x, 2, 2)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(mask, mask_ref)
    dy = np.ones(y.shape)
    dy[0, 1, 0, 0] = np.inf  # must reach only its window's max, not NaN the others
    dx = F.max_pool2d_backward(dy, mask, x.shape, 2, 2)
    np.testing.assert_array_equal(dx, generic(F.max_pool2d_backward, dy, mask_ref, x.shape, 2, 2))
    assert np.isinf(dx).sum() == 1 and not np.isnan(dx).any()


# ----------------------------------------------------------------------------- ReLU
def test_relu_fast_equals_generic_including_nan_and_signed_zero():
    x = readonly([[-1.0, -0.0, 0.0, 2.0, np.nan, np.inf, -np.inf, 1e-300]])
    y, mask = F.relu(x)
    y_ref, mask_ref = generic(F.relu, x)
    np.testing.assert_array_equal(y, y_ref)  # NaN -> 0 in both
    np.testing.assert_array_equal(mask, mask_ref)
    dy = readonly([[np.nan, np.inf, 1.0, 2.0, 3.0, np.nan, 5.0, 6.0]])
    np.testing.assert_array_equal(F.relu_backward(dy, mask), generic(F.relu_backward, dy, mask_ref))
    dy = readonly(np.random.default_rng(0).standard_normal(x.shape))
    np.testing.assert_array_equal(F.relu_backward(dy, mask), generic(F.relu_backward, dy, mask))
    assert F.relu(x.astype(np.float32))[0].dtype == np.float32


# ----------------------------------------------------------------------------- whole models
def _small_lenet():
    return [
        xcnn.Conv2D(1, 4, 3),
        xcnn.ReLU(),
        xcnn.Conv2D(4, 6, 3, padding="same"),
        xcnn.ReLU(),
        xcnn.MaxPool2D(2),
        xcnn.Flatten(),
        xcnn.Dense(6 * 5 * 5, 7),
        xcnn.ReLU(),
        xcnn.Dense(7, 3),
    ]


@pytest.mark.parametrize("input_grad", [True, False])
def test_model_step_fast_equals_generic(input_grad, small_chunks):
    rng = np.random.default_rng(4)
    x = readonly(rng.standard_normal((5, 1, 12, 12)))
    labels = rng.integers(0, 3, 5)

    def run():
        model = xcnn.Sequential(_small_lenet(), dtype="float64", seed=1)
        loss, d = xcnn.softmax_cross_entropy(model.forward(x), labels)
        dx = model.backward(d, input_grad=input_grad)
        return loss, dx, [dict(layer.grads) for layer in model.layers]

    loss, dx, grads = run()
    loss_ref, dx_ref, grads_ref = generic(run)
    close(loss, loss_ref)
    if input_grad:
        close(dx, dx_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.keys() == g_ref.keys()
        for key in g:
            close(g[key], g_ref[key])


def test_fast_paths_off_by_environment():
    code = (
        "import numpy as np; from xcnn import kernels, functional as F; "
        "F.relu(np.ones(2)); print(kernels.enabled('numpy'), kernels.kernel('numpy', 'relu'), "
        "kernels.enabled('cupy'))"
    )
    for env, want in (({"XCNN_FAST": "0"}, "False None False"), ({}, "True <function")):
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={"PATH": "", "PYTHONPATH": str(ROOT), **env},
            check=True,
        )
        assert out.stdout.startswith(want), out.stdout


def test_other_namespaces_never_take_the_fast_path():
    xps = pytest.importorskip("array_api_strict")
    x = xps.ones((1, 1, 5, 5))
    w = xps.ones((2, 1, 3, 3))
    y, saved = F.conv2d(x, w)
    assert saved.col is not None and kernels.kernel("array_api_strict", "conv2d") is None


# ----------------------------------------------------------------------------- the seam itself
def test_the_comparison_catches_a_wrong_kernel():
    """A deliberately wrong NumPy kernel (ReLU that lets negatives through) is caught."""
    x = readonly(np.random.default_rng(9).standard_normal((2, 3, 4, 4)))
    original = kernels.kernel("numpy", "relu")

    @kernels.register("numpy", "relu")
    def leaky(x):
        return np.where(x > 0, x, 0.01 * x), x > 0

    try:
        assert F.relu(x)[0].min() < 0  # the seam really calls the registered kernel
        with pytest.raises(AssertionError, match="relative difference"):
            close(F.relu(x)[0], generic(F.relu, x)[0])
    finally:
        kernels.register("numpy", "relu")(original)
    close(F.relu(x)[0], generic(F.relu, x)[0])


def test_a_kernel_must_have_the_generic_signature():
    original = kernels.kernel("numpy", "relu_backward")
    kernels.register("numpy", "relu_backward")(lambda dy, m: dy)
    try:
        with pytest.raises(TypeError, match="does not have the signature"):
            F.relu_backward(np.ones(2), np.ones(2, bool))
    finally:
        kernels.register("numpy", "relu_backward")(original)
    with pytest.raises(ValueError, match="unknown op"):
        kernels.register("numpy", "no_such_op")


def test_every_delegated_op_is_in_the_docstring_list():
    from xcnn import updates

    for op in kernels.OPS:
        func = getattr(F, op, None) or getattr(updates, op)
        assert func.generic.__name__ == op
        assert f"    {op}(" in kernels.__doc__


# ----------------------------------------------------------------------------- recycled memory
def test_recycled_memory_never_changes_an_array_someone_holds():
    rng = np.random.default_rng(6)
    x1, x2 = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((2, 3, 8, 8))
    y1, mask1 = F.relu(x1)
    view = F.relu(x1)[0][0, 1]  # only a view of the second result survives
    keep = y1.copy(), mask1.copy(), view.copy()
    for _ in range(3):
        F.relu(x2)  # results dropped at once: their memory is free to reuse
    np.testing.assert_array_equal(y1, keep[0])
    np.testing.assert_array_equal(mask1, keep[1])
    np.testing.assert_array_equal(view, keep[2])


@pytest.mark.skipif(
    sys.implementation.name != "cpython", reason="reuse relies on CPython refcounts"
)
def test_recycled_memory_is_reused_once_dropped():
    recycler.release_memory()  # no free buffer of this size left over from other tests
    x = np.random.default_rng(7).standard_normal((4, 6, 10, 10))
    y = F.relu(x)[0]
    address = y.__array_interface__["data"][0]
    del y
    y = F.relu(x)[0]
    assert y.__array_interface__["data"][0] == address
    np.testing.assert_array_equal(y, np.fmax(x, 0))


def test_recycler_forgets_old_buffers_and_threads_do_not_share():
    import threading

    for size in range(1, 2 * recycler.Recycler.max_buffers):
        recycler.recycler.empty((size,), np.float64)
    assert len(recycler.recycler.buffers) <= recycler.Recycler.max_buffers
    seen = []
    t = threading.Thread(target=lambda: seen.append(len(recycler.recycler.buffers)))
    t.start()
    t.join()
    assert seen == [0]
    recycler.release_memory()
    assert recycler.recycler.buffers == []


def test_training_twice_gives_identical_results():
    """Recycled buffers hold stale values: every output must be fully written."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 1, 12, 12))
    labels = rng.integers(0, 3, 3)

    def run():
        model = xcnn.Sequential(_small_lenet(), dtype="float64", seed=2)
        loss, d = xcnn.softmax_cross_entropy(model.forward(x), labels)
        dx = model.backward(d)
        return [np.array(loss), dx.copy()] + [
            g.copy() for lay in model.layers for g in lay.grads.values()
        ]

    first = run()
    for got, want in zip(run(), first, strict=True):
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- the benchmark
@pytest.mark.slow
def test_benchmark_gpu_code_path_dry_run(tmp_path):
    """The GPU benchmark's code path (syncs, both PyTorch modes, children) on NumPy / torch CPU."""
    out = tmp_path / "dry.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.throughput",
            "--dry-run",
            "--device",
            "gpu",
            "--no-memory",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "DRY RUN" in res.stdout and "Targets" in res.stdout
    import json

    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["training"]] == [2, 4, 2, 4]
    if "torch" in data["env"] and "not installed" not in str(data["env"]["torch"]):
        assert all(c["ok"] for c in data["checks"].values())
        assert {"xcnn", "torch-fp32", "torch-default"} <= set(data["training"][0])
