"""The Winograd F(2x2, 3x3) NumPy kernels (xcnn/kernels/numpy_winograd.py).

Each case runs the public ``conv2d`` / ``conv2d_backward`` three ways on the
same arrays: through the seam with Winograd on, with Winograd off (the direct
im2col kernels of xcnn/kernels/numpy.py), and with the NumPy set off (the
generic array-API code). float64 agrees to rounding; float32 stays within
1e-5 relative of a float64 direct convolution, as the issue asks.
"""

from __future__ import annotations

import numpy as np
import pytest

from xcnn import functional as F
from xcnn import kernels
from xcnn.kernels import numpy_winograd as wg


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max(initial=0.0) / max(np.abs(b).max(initial=0.0), 1e-300))


@pytest.fixture(autouse=True)
def _winograd_on(monkeypatch):
    """Winograd is opt-in (``XCNN_WINOGRAD=1``): these tests switch it on (and off where asked)."""
    monkeypatch.setattr(wg, "ENABLED", True)


@pytest.fixture
def winograd_off(monkeypatch):
    monkeypatch.setattr(wg, "ENABLED", False)


def run(x, w, b, dy, padding, need_dx=True):
    y, saved = F.conv2d(x, w, b, padding=padding)
    dx, dw, db = F.conv2d_backward(dy, saved, w, padding=padding, need_dx=need_dx)
    return y, dx, dw, db, saved


def generic(*args, **kwargs):
    with kernels.disabled("numpy"):
        return run(*args, **kwargs)


CASES = [
    # (N, C, F, H, W, padding): even and odd outputs, padding, ragged chunks
    (32, 32, 64, 26, 26, "valid"),  # LeNet's second convolution
    (3, 5, 4, 7, 9, "valid"),  # odd output: a partial tile
    (2, 6, 3, 8, 8, "same"),
    (2, 4, 2, 5, 6, 1),
    (1, 8, 5, 3, 3, "valid"),  # a single output pixel
]


def _data(case, dtype, seed=0):
    n, c, f, h, wd, padding = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, wd)).astype(dtype)
    w = (rng.standard_normal((f, c, 3, 3)) / 3).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    oh, ow = F.conv2d.generic(x[:1, :, :, :], w, padding=padding)[0].shape[2:]
    dy = rng.standard_normal((n, f, oh, ow)).astype(dtype)
    return x, w, b, dy, padding


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize(
    "chunk, threads", [(wg.CHUNK_BYTES, 1), (1, 1), (1, 3)], ids=["chunked", "one-image", "threads"]
)
def test_float64_matches_generic_and_direct(case, chunk, threads, monkeypatch):
    monkeypatch.setattr(wg, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(wg, "THREADS", threads)
    x, w, b, dy, padding = _data(case, np.float64)
    out = run(x, w, b, dy, padding)
    assert isinstance(out[4].workspace, wg.WinogradWorkspace)  # the Winograd path ran
    ref = generic(x, w, b, dy, padding)
    monkeypatch.setattr(wg, "ENABLED", False)
    direct = run(x, w, b, dy, padding)
    assert not isinstance(direct[4].workspace, wg.WinogradWorkspace)
    for got, want, other in zip(out[:4], ref[:4], direct[:4], strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert rel(got, want) < 1e-12
        assert rel(other, want) < 1e-12


@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_float32_within_1e5_of_direct(case):
    """float32 Winograd against the float64 direct convolution of the same float32 inputs."""
    x, w, b, dy, padding = _data(case, np.float32, seed=1)
    y, dx, dw, db, saved = run(x, w, b, dy, padding)
    assert isinstance(saved.workspace, wg.WinogradWorkspace)
    ref = generic(*(a.astype(np.float64) for a in (x, w, b, dy)), padding)
    for got, want in zip((y, dx, dw, db), ref[:4], strict=True):
        assert got.dtype == np.float32
        assert rel(got, want) < 1e-5


def test_backward_without_dx_and_from_another_forward():
    x, w, b, dy, padding = _data(CASES[1], np.float64)
    ref = generic(x, w, b, dy, padding)
    _, saved = F.conv2d.generic(x, w, b, padding=padding)  # no Winograd workspace
    dx, dw, db = F.conv2d_backward(dy, saved, w, padding=padding, need_dx=True)
    assert rel(dx, ref[1]) < 1e-12 and rel(dw, ref[2]) < 1e-12 and rel(db, ref[3]) < 1e-12
    none, dw2, _ = run(x, w, b, dy, padding, need_dx=False)[1:4]
    assert none is None and rel(dw2, ref[2]) < 1e-12


def test_inputs_it_does_not_take_go_to_the_direct_kernels():
    rng = np.random.default_rng(3)
    for w_shape, stride in [((4, 5, 5, 5), 1), ((4, 5, 3, 3), 2), ((4, 1, 3, 3), 1)]:
        x = rng.standard_normal((2, w_shape[1], 9, 9))
        w = rng.standard_normal(w_shape)
        y, saved = F.conv2d(x, w, stride=stride)
        assert not isinstance(saved.workspace, wg.WinogradWorkspace)
        assert rel(y, F.conv2d.generic(x, w, stride=stride)[0]) < 1e-12


def test_non_finite_values_give_the_direct_results():
    """A NaN/inf would spread over a whole tile: those inputs take the exact paths."""
    x, w, b, dy, padding = _data(CASES[1], np.float64)
    x[0, 0, 2, 3] = np.nan
    y, saved = F.conv2d(x, w, b, padding=padding)
    assert not isinstance(saved.workspace, wg.WinogradWorkspace)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(generic(x, w, b, dy, padding)[0]))
    x, w, b, dy, padding = _data(CASES[1], np.float64)
    dy[1, 2, 0, 0] = np.inf
    _, saved = F.conv2d(x, w, b, padding=padding)
    dx = F.conv2d_backward(dy, saved, w, padding=padding)[0]
    np.testing.assert_array_equal(np.isnan(dx), np.isnan(generic(x, w, b, dy, padding)[1]))


def test_a_wrong_transform_is_caught(monkeypatch):
    """The comparison above can fail: a sign error in one transform is far outside 1e-12."""
    g = wg._G.copy()
    g[1, 2] = -g[1, 2]
    monkeypatch.setattr(wg, "_G", g)
    x, w, b, dy, padding = _data(CASES[1], np.float64)
    assert rel(run(x, w, b, dy, padding)[0], generic(x, w, b, dy, padding)[0]) > 1e-3


def test_switch_turns_it_off(winograd_off):
    x, w, b, dy, padding = _data(CASES[1], np.float64)
    assert not isinstance(run(x, w, b, dy, padding)[4].workspace, wg.WinogradWorkspace)


def test_threads_repeat_bit_for_bit(monkeypatch):
    """Each thread count fixes how the batch is split, so a step repeats exactly."""
    monkeypatch.setattr(wg, "CHUNK_BYTES", 1)
    monkeypatch.setattr(wg, "THREADS", 2)
    x, w, b, dy, padding = _data(CASES[0], np.float32)
    first = run(x, w, b, dy, padding)[:4]
    again = run(x, w, b, dy, padding)[:4]
    for a, c in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, c)


def test_second_backward_from_the_same_state():
    """The first backward takes the kept transform (memory); a second one rebuilds it."""
    x, w, b, dy, padding = _data(CASES[0], np.float64)
    _, saved = F.conv2d(x, w, b, padding=padding)
    first = F.conv2d_backward(dy, saved, w, padding=padding)
    assert saved.workspace.v == []  # taken
    again = F.conv2d_backward(dy, saved, w, padding=padding)
    for a, c in zip(first, again, strict=True):
        assert rel(a, c) < 1e-13
