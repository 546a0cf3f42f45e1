"""The threaded NumPy dense kernels (xcnn/kernels/numpy_threads.py) against the generic code."""

from __future__ import annotations

import numpy as np
import pytest

from xcnn import functional as F
from xcnn import kernels
from xcnn.kernels import numpy_threads as nt
from xcnn.kernels import numpy_winograd as wg


@pytest.fixture(autouse=True)
def _winograd_on(monkeypatch):
    """The threaded kernels are opt-in (``XCNN_WINOGRAD=1``): these tests switch them on."""
    monkeypatch.setattr(wg, "ENABLED", True)


@pytest.fixture
def threaded(monkeypatch):
    monkeypatch.setattr(nt, "MIN_WORK", 1)
    monkeypatch.setattr(wg, "THREADS", 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_matches_generic(threaded, dtype, bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 50)).astype(dtype)
    w = rng.standard_normal((50, 9)).astype(dtype)
    b = rng.standard_normal(9).astype(dtype) if bias else None
    dy = rng.standard_normal((7, 9)).astype(dtype)
    got = (F.dense(x, w, b), *F.dense_backward(dy, x, w))
    with kernels.disabled("numpy"):
        want = (F.dense(x, w, b), *F.dense_backward(dy, x, w))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for g, e in zip(got, want, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        np.testing.assert_allclose(g, e, rtol=tol, atol=tol * np.abs(e).max())


def test_blas_threads_restored(threaded):
    set_threads = wg._blas_set_threads()
    if set_threads is None:
        pytest.skip("NumPy's BLAS is not the bundled OpenBLAS: nothing is switched")
    before = set_threads(2)
    set_threads(before)
    rng = np.random.default_rng(1)
    x, w, dy = (
        rng.standard_normal((8, 40)),
        rng.standard_normal((40, 6)),
        rng.standard_normal((8, 6)),
    )
    F.dense_backward(dy, x, w)
    after = set_threads(before)
    assert after == before


def test_small_or_other_inputs_take_the_generic_code(monkeypatch):
    called = []
    monkeypatch.setattr(wg, "_one_blas_thread", lambda: called.append(1))
    x, w = np.ones((2, 3)), np.ones((3, 4))
    F.dense_backward(np.ones((2, 4)), x, w)  # below MIN_WORK
    F.dense(x.astype(np.float32), w)  # mixed dtypes
    assert not called


def test_blas_threads_restored_after_user_threads(threaded):
    """Several user threads inside kernels at once: the count before them comes back."""
    import threading

    set_threads = wg._blas_set_threads()
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

    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set_threads(before) == before


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_matches_generic(dtype, monkeypatch):
    monkeypatch.setattr(nt, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(wg, "THREADS", 3)
    rng = np.random.default_rng(3)
    x = np.ascontiguousarray(rng.standard_normal((5, 6, 7, 4)).astype(dtype)).transpose(0, 3, 1, 2)
    x[1, 2, 3, 4] = np.nan
    dy = rng.standard_normal(x.shape).astype(dtype)
    y, mask = F.relu(x)
    dx = F.relu_backward(dy, mask)
    with kernels.disabled("numpy"):
        y0, mask0 = F.relu(x)
        dx0 = F.relu_backward(dy, mask0)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(mask, mask0)
    np.testing.assert_array_equal(dx, dx0)
    dy[4, 0, 0, 0] = np.inf  # a non-finite gradient: the generic result, exactly
    with kernels.disabled("numpy"):
        want = F.relu_backward(dy, mask0)
    np.testing.assert_array_equal(F.relu_backward(dy, mask), want)
