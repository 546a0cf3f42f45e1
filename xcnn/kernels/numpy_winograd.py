"""Winograd F(2x2, 3x3) convolution for NumPy: the 3x3 stride-1 layers with several channels.

A 3x3 convolution computed directly costs 9 multiply-adds per output, input
channel and filter. Winograd's minimal filtering (Lavin and Gray, "Fast
Algorithms for Convolutional Neural Networks", 2015) computes a 2x2 block of
outputs from a 4x4 tile of input with 16 products instead of 36::

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (* element-wise, per channel pair)

    B^T = [[1, 0,-1, 0],   G = [[ 1,   0,   0],   A^T = [[1, 1, 1, 0],
           [0, 1, 1, 0],        [1/2, 1/2, 1/2],         [0, 1,-1,-1]]
           [0,-1, 1, 0],        [1/2,-1/2, 1/2],
           [0, 1, 0,-1]]        [ 0,   0,   1]]

Summed over input channels, each of the 16 tile positions ``k`` is one matrix
product ``M[k] = V[k] @ U[k]``, (tiles, C) @ (C, F): 2.25x fewer multiplies
than im2col, in 16 products of the same shape. The transforms are a few
additions each, done as whole-array passes over a few images at a time so
they stay in cache.

Backward is the same algebra transposed (the gradient of ``V @ U`` and of the
fixed linear transforms):

- ``dM = A dY A^T`` per 2x2 block of ``dy`` (one transform, shared by both
  gradients);
- ``dU[k] = dM[k]^T @ V[k]`` summed over tiles, then ``dw = G^T dU G``; the
  forward's ``V`` is kept for this (4x the input's size);
- ``dV[k] = dM[k] @ U[k]^T``, then ``dd = B dV B^T``, added back into the
  overlapping 4x4 tiles (stride 2) of ``dx``.

Rounding: the transforms only add, subtract and halve, so float32 results are
within a few ulps of the direct convolution's (tests/test_winograd.py checks
1e-5 relative on LeNet's shapes against a float64 reference).

Measured on LeNet's second convolution (32 -> 64 channels, 26x26, batch 32,
one thread, minimum CPU time of 12 interleaved runs): forward 8.0 ms and
backward 13.4 ms, against 8.8 and 19.8 ms for the im2col kernels of
:mod:`xcnn.kernels.numpy` (PyTorch: 7.2 ms and 21.9 ms for both). The chunks
of a batch are shared by :data:`THREADS` threads, with BLAS on one thread
meanwhile (see :func:`xcnn.kernels.numpy_parallel.one_blas_thread`); ``docs/performance.md`` has the
whole-step figures.

These kernels replace the ``numpy`` set's ``conv2d`` and ``conv2d_backward``
(not the fused ``conv2d_relu`` and ``conv2d_max_pool2d``, which
:class:`xcnn.Sequential` uses for a Conv2D followed by a ReLU or a max-pool)
in the kernel seam (this module is imported at the end of
:mod:`xcnn.kernels.numpy`) and hand every input they do not take (another
kernel size, a stride, one input channel, ``XCNN_WINOGRAD=0``) to the direct
kernels there, which in turn fall back to the generic code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from xcnn.functional import Conv2DSaved, Padding
from xcnn.recycler import recycler

from . import FALLBACK, register
from . import numpy as direct
from . import numpy_parallel as par
from .numpy_parallel import _pool, one_blas_thread

#: Whether the Winograd (and the threaded dense/ReLU) kernels run: opt-in,
#: ``XCNN_WINOGRAD=1``. On a quiet 2-core machine (2026-12-01, ``benchmarks.throughput``)
#: the im2col kernels with OpenBLAS's own two threads trained LeNet at 1,119 / 1,168 img/s
#: (batch 32 / 128) against 948 / 1,058 with these, and the seed net at batch 32 at 28.6k
#: against 18.3k img/s; under load these win (docs/performance.md). Off until they also
#: win on a quiet machine.
ENABLED = os.environ.get("XCNN_WINOGRAD", "0") == "1"

#: Fewest input channels worth the transforms: below this the direct kernel is as fast.
MIN_CHANNELS = 4

#: Threads that share a batch's chunks (``XCNN_WINOGRAD_THREADS``; default: those of the
#: other NumPy kernels, :data:`xcnn.kernels.numpy_parallel.THREADS`).
THREADS = int(os.environ.get("XCNN_WINOGRAD_THREADS", "0")) or par.THREADS

#: Bytes of tile workspace per chunk of images (V and M of a chunk stay in cache).
CHUNK_BYTES = 2 << 20

_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


def set_enabled(on: bool) -> None:
    """Switch the Winograd kernels on or off for this process (tests compare both)."""
    global ENABLED
    ENABLED = bool(on)


@dataclass(frozen=True)
class WinogradWorkspace:
    """What the Winograd forward keeps for backward (``Conv2DSaved.workspace``).

    ``v`` holds the transformed input until the first backward takes it: a
    layer keeps its saved state until its next forward, and two of these
    (4x the input each) would otherwise be alive then. A second backward from
    the same state transforms the input again.
    """

    v: list[np.ndarray]  # [(16, N*TH*TW, C)]: B^T d B of every input tile, or [] once taken
    th: int  # tiles down: ceil(OH / 2)
    tw: int  # tiles across: ceil(OW / 2)


def _takes(x: Any, w: Any, stride: int) -> bool:
    return (
        ENABLED
        and stride == 1
        and type(w) is np.ndarray
        and w.ndim == 4
        and w.shape[2:] == (3, 3)
        and w.shape[1] >= MIN_CHANNELS
    )


def _tiled_input(x: np.ndarray, pads: tuple[int, int, int, int]) -> tuple[np.ndarray, int, int]:
    """``x`` as zero-padded NHWC (N, 2*TH+2, 2*TW+2, C) and the tile counts (TH, TW).

    An odd output size gets one more row/column of zeros, so that every tile is whole.
    """
    top, bottom, left, right = pads
    n, c, h, w = x.shape
    oh, ow = h + top + bottom - 2, w + left + right - 2
    th, tw = (oh + 1) // 2, (ow + 1) // 2
    bottom += 2 * th - oh
    right += 2 * tw - ow
    return direct._nhwc(x, (top, bottom, left, right)), th, tw  # (N, 2TH+2, 2TW+2, C)


def _filters(w: np.ndarray) -> np.ndarray:
    """U = G g G^T of every filter pair: (16, C, F), position k = 4a + b."""
    f, c = w.shape[:2]
    g = _G.astype(w.dtype)
    u = np.einsum("ai,bj,fcij->abcf", g, g, w, optimize=True)  # (4, 4, C, F)
    return np.ascontiguousarray(u).reshape(16, c, f)


def _input_transform(xh: np.ndarray, th: int, tw: int, v: np.ndarray) -> None:
    """B^T d B of each 4x4 tile (stride 2) of ``xh`` (B, HP, WP, C) into ``v`` (16, B*TH*TW, C)."""
    cols = [xh[:, :, b : b + 2 * tw : 2, :] for b in range(4)]  # (B, HP, TW, C) each
    p = recycler.empty((4,) + cols[0].shape, xh.dtype)  # B^T along the width
    np.subtract(cols[0], cols[2], out=p[0])
    np.add(cols[1], cols[2], out=p[1])
    np.subtract(cols[2], cols[1], out=p[2])
    np.subtract(cols[1], cols[3], out=p[3])
    r = [p[:, :, a : a + 2 * th : 2] for a in range(4)]  # (4 b, B, TH, TW, C) each
    out = v.reshape(4, 4, *r[0].shape[1:])  # (4 a, 4 b, B, TH, TW, C)
    np.subtract(r[0], r[2], out=out[0])
    np.add(r[1], r[2], out=out[1])
    np.subtract(r[2], r[1], out=out[2])
    np.subtract(r[1], r[3], out=out[3])


def _output_transform(m: np.ndarray, y: np.ndarray) -> None:
    """Write A^T m A of ``m`` (4, 4, B, TH, TW, F) into ``y`` (B, TH, 2, TW, 2, F)."""
    t = recycler.empty((2,) + m.shape[1:], m.dtype)  # A^T along the height
    np.add(m[0], m[1], out=t[0])
    t[0] += m[2]
    np.subtract(m[1], m[2], out=t[1])
    t[1] -= m[3]
    for a in range(2):
        ya = y[:, :, a]  # (B, TH, TW, 2, F)
        np.add(t[a, 0], t[a, 1], out=ya[:, :, :, 0])
        ya[:, :, :, 0] += t[a, 2]
        np.subtract(t[a, 1], t[a, 2], out=ya[:, :, :, 1])
        ya[:, :, :, 1] -= t[a, 3]


def _grad_transform(dyt: np.ndarray, dm: np.ndarray) -> None:
    """A dy A^T of each 2x2 block of ``dyt`` (B, TH, 2, TW, 2, F) into ``dm`` (4, 4, B, TH, TW, F).

    A = A^T transposed maps (q0, q1) to (q0, q0 + q1, q0 - q1, -q1).
    """
    q0, q1 = dyt[:, :, :, :, 0], dyt[:, :, :, :, 1]  # (B, TH, 2, TW, F)
    s = recycler.empty((4,) + q0.shape, dyt.dtype)  # A along the width
    np.copyto(s[0], q0)
    np.add(q0, q1, out=s[1])
    np.subtract(q0, q1, out=s[2])
    np.negative(q1, out=s[3])
    r0, r1 = s[:, :, :, 0], s[:, :, :, 1]  # (4 b, B, TH, TW, F)
    np.copyto(dm[0], r0)
    np.add(r0, r1, out=dm[1])
    np.subtract(r0, r1, out=dm[2])
    np.negative(r1, out=dm[3])


def _tile_grad_add(dv: np.ndarray, dxt: np.ndarray) -> None:
    """Add B dv B^T of ``dv`` (4, 4, B, TH, TW, C) into the overlapping tiles of ``dxt``.

    ``dxt`` is (B, TH+1, 2, TW+1, 2, C), the padded input as 2x2 blocks: tile
    (ty, tx) covers blocks ty..ty+1 and tx..tx+1. B = B^T transposed maps
    (v0, v1, v2, v3) to (v0, v1 - v2 + v3, v1 + v2 - v0, -v3).
    """
    th, tw = dv.shape[3], dv.shape[4]
    # Along the width: tile column b lands in block column tx + b // 2, position b % 2.
    rows = recycler.empty((4, dv.shape[2], th, tw + 1, 2, dv.shape[-1]), dv.dtype)
    left, right = rows[:, :, :, :tw], rows[:, :, :, 1:]  # (4 a, B, TH, TW, 2, C) each
    np.copyto(left[..., 0, :], dv[:, 0])
    np.subtract(dv[:, 1], dv[:, 2], out=left[..., 1, :])
    left[..., 1, :] += dv[:, 3]
    rows[:, :, :, tw] = 0  # the last block column has only the right halves of tiles
    right[..., 1, :] -= dv[:, 3]
    tmp = recycler.empty(dv.shape[:1] + dv.shape[2:], dv.dtype)  # (4 a, B, TH, TW, C)
    np.add(dv[:, 1], dv[:, 2], out=tmp)
    tmp -= dv[:, 0]
    right[..., 0, :] += tmp
    # Along the height, the same map into block rows ty (a = 0, 1) and ty + 1 (a = 2, 3).
    top, bottom = dxt[:, :th], dxt[:, 1:]  # (B, TH, 2, TW+1, 2, C) each
    top[:, :, 0] += rows[0]
    top[:, :, 1] += rows[1]
    top[:, :, 1] -= rows[2]
    top[:, :, 1] += rows[3]
    bottom[:, :, 0] += rows[1]
    bottom[:, :, 0] += rows[2]
    bottom[:, :, 0] -= rows[0]
    bottom[:, :, 1] -= rows[3]


def _spread(n: int, step: int, images: Callable[[int, int], Any]) -> list[Any]:
    """``images(start, stop)`` over ranges of the ``n`` images, on up to THREADS threads.

    NumPy runs element-wise passes on one thread; the transforms are half of
    the time here, so whole chunks go to threads of their own instead (NumPy
    releases the GIL inside ufuncs and matrix products). The ranges are fixed
    by ``n``, ``step`` and the thread count, so results repeat bit for bit.
    """
    chunks = -(-n // step)
    k = max(1, min(THREADS, chunks))
    if k == 1:
        return [images(0, n)]
    bounds = [min(n, (chunks * i // k) * step) for i in range(k + 1)]
    pool = _pool(k)
    with one_blas_thread():
        futures = [pool.submit(images, bounds[i], bounds[i + 1]) for i in range(1, k)]
        first = images(bounds[0], bounds[1])  # this thread takes the first range
        return [first] + [fut.result() for fut in futures]


def _forward(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pads: tuple[int, int, int, int]
) -> tuple[np.ndarray, Conv2DSaved]:
    f, c = w.shape[:2]
    xh, th, tw = _tiled_input(x, pads)  # (N, 2TH+2, 2TW+2, C)
    n = xh.shape[0]
    oh, ow = x.shape[2] + pads[0] + pads[1] - 2, x.shape[3] + pads[2] + pads[3] - 2
    u = _filters(w)  # (16, C, F)
    t = th * tw
    v = recycler.empty((16, n * t, c), x.dtype)  # kept for backward
    y = recycler.empty((n, th, 2, tw, 2, f), x.dtype)  # NHWC, 2x2 blocks
    step = max(1, min(n, CHUNK_BYTES // (16 * t * (c + f) * x.itemsize)))

    def images(start: int, stop: int) -> None:
        m = recycler.empty((16, step * t, f), x.dtype)  # this thread's workspace
        for n0 in range(start, stop, step):
            n1 = min(stop, n0 + step)
            vc = v[:, n0 * t : n1 * t]  # (16, B*T, C)
            mc = m[:, : (n1 - n0) * t]
            _input_transform(xh[n0:n1], th, tw, vc)
            np.matmul(vc, u, out=mc)  # (16, B*T, F)
            yc = y[n0:n1]
            _output_transform(mc.reshape(4, 4, n1 - n0, th, tw, f), yc)
            if b is not None:
                yc += b  # while the rows are in cache

    _spread(n, step, images)
    y = y.reshape(n, 2 * th, 2 * tw, f)  # (N, 2TH, 2TW, F)
    if (2 * th, 2 * tw) != (oh, ow):
        y = np.ascontiguousarray(y[:, :oh, :ow])  # (N, OH, OW, F)
    saved = Conv2DSaved(x=x, col=None, workspace=WinogradWorkspace([v], th, tw))
    return y.transpose(0, 3, 1, 2), saved  # (N, F, OH, OW), NHWC memory


def _backward(
    dy: np.ndarray,
    saved: Conv2DSaved,
    w: np.ndarray,
    pads: tuple[int, int, int, int],
    need_dx: bool,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    x = saved.x
    f, c = w.shape[:2]
    n, _, h, wd = x.shape
    oh, ow = dy.shape[2], dy.shape[3]
    ws = saved.workspace
    if isinstance(ws, WinogradWorkspace) and ws.v and ws.v[0].shape[1] == n * ws.th * ws.tw:
        v, th, tw = ws.v.pop(), ws.th, ws.tw  # taken: its memory is recycled once we are done
    else:  # another kernel's forward, or a second backward: transform the input again
        xh, th, tw = _tiled_input(x, pads)
        v = recycler.empty((16, n * th * tw, c), x.dtype)
        _input_transform(xh, th, tw, v)
    t = th * tw
    dyh = dy.transpose(0, 2, 3, 1)  # (N, OH, OW, F)
    if (2 * th, 2 * tw) != (oh, ow):  # zeros at the extra outputs of the whole tiles
        full = np.zeros((n, 2 * th, 2 * tw, f), dy.dtype)
        full[:, :oh, :ow] = dyh
        dyh = full
    dyt = dyh.reshape(n, th, 2, tw, 2, f)  # (N, TH, 2, TW, 2, F); a copy if dy is not NHWC
    step = max(1, min(n, CHUNK_BYTES // (16 * t * (c + f) * x.itemsize)))
    db = dyh.reshape(-1, f).sum(axis=0) if oh * ow else np.zeros(f, x.dtype)
    if need_dx:
        ut = _filters(w).transpose(0, 2, 1)  # (16, F, C)
        dxt = recycler.empty((n, th + 1, 2, tw + 1, 2, c), x.dtype)  # padded dx, 2x2 blocks
        dxt.fill(0)

    def images(start: int, stop: int) -> np.ndarray:
        dm = recycler.empty((16, step * t, f), x.dtype)  # this thread's workspace
        part = recycler.empty((16, f, c), x.dtype)
        du = np.zeros((16, f, c), x.dtype)
        if need_dx:
            dv = recycler.empty((16, step * t, c), x.dtype)
        for n0 in range(start, stop, step):
            n1 = min(stop, n0 + step)
            rows = (n1 - n0) * t
            dmc = dm[:, :rows]
            _grad_transform(dyt[n0:n1], dmc.reshape(4, 4, n1 - n0, th, tw, f))
            np.matmul(dmc.transpose(0, 2, 1), v[:, n0 * t : n1 * t], out=part)  # (16, F, C)
            du += part
            if need_dx:
                dvc = dv[:, :rows]
                np.matmul(dmc, ut, out=dvc)  # (16, B*T, C)
                _tile_grad_add(dvc.reshape(4, 4, n1 - n0, th, tw, c), dxt[n0:n1])
        return du

    du = sum(_spread(n, step, images))  # (16, F, C)
    g = _G.astype(x.dtype)
    dw = np.einsum("ai,bj,abfc->fcij", g, g, du.reshape(4, 4, f, c), optimize=True)
    dw = np.ascontiguousarray(dw)  # (F, C, 3, 3)
    if not need_dx:
        return None, dw, db
    top, _, left, _ = pads
    dxh = dxt.reshape(n, 2 * th + 2, 2 * tw + 2, c)  # (N, HP, WP, C)
    dx = dxh[:, top : top + h, left : left + wd, :].transpose(0, 3, 1, 2)  # (N, C, H, W)
    return dx, dw, db


@register("numpy", "conv2d")
def conv2d(x: Any, w: Any, b: Any = None, *, stride: int = 1, padding: Padding = "valid") -> Any:
    if not _takes(x, w, stride) or not direct._takes(x, w, b) or not np.isfinite(np.sum(x)):
        # (a NaN/inf input would spread over whole tiles: the direct kernel's values)
        return direct.conv2d(x, w, b, stride=stride, padding=padding)
    return _forward(x, w, b, direct._pads(x, w, padding))


@register("numpy", "conv2d_backward")
def conv2d_backward(
    dy: Any,
    saved: Conv2DSaved,
    w: Any,
    *,
    stride: int = 1,
    padding: Padding = "valid",
    need_dx: bool = True,
) -> Any:
    x = saved.x
    if not _takes(x, w, stride) or not direct._takes(dy, x, w):
        return direct.conv2d_backward(dy, saved, w, stride=stride, padding=padding, need_dx=need_dx)
    if not np.isfinite(np.sum(dy)):
        return FALLBACK  # a NaN/inf gradient: the generic code's values, exactly
    return _backward(dy, saved, w, direct._pads(x, w, padding), need_dx)
