"""A first layer's Conv2D [-> ReLU] -> MaxPool2D on NumPy, its im2col columns in window order.

A single-channel convolution builds its im2col matrix transposed, one row per
kernel offset and one column per output pixel (:mod:`xcnn.kernels.numpy`).
The columns may come in any order, and here, where a max-pool with
non-overlapping windows (``pool_stride == kernel_size``) follows, they come
by *window offset*: for each chunk of B images (the threads' unit), first
the pixel at offset (0, 0) of every window, then (0, 1), ..., each a
(B, PH, PW) block::

    cols (KH*KW + 1, chunks x [K*K x (B, PH, PW)])       the last row all ones (bias)
    z = wb (F, KH*KW + 1) @ cols  ->  (F, K*K, B, PH, PW)   per chunk

so every window offset's outputs are one contiguous (F, B, PH, PW) plane,
and the max-pool and its argmax (:func:`~xcnn.kernels.numpy._pool_views`)
are passes over contiguous planes instead of strided views of an NHWC
output. Backward is the same in reverse: the gradient of every offset's plane
is ``dy * route plane``, one broadcast product, and ``dW | db`` one product
``dz (F, cols) @ cols^T`` per chunk. Pixels that no window covers (the rows
and columns a pool leaves over) get no column: their gradient is zero, so
they add nothing to ``dW`` or ``db``.

The products have only KH*KW + 1 rows of columns, and OpenBLAS ran them
1.5x (forward) and 4x (``dW``) slower per column once a product's columns
and outputs outgrew the 1 MB L2 cache (about 16k columns for 8 filters);
so each runs in spans of :data:`SPAN` columns.

Measured in the seed net's training step (``Conv2D(1, 8, 3)`` ->
``MaxPool2D(2)``, 2-core AMD EPYC VM, 2026-12-01, the direct kernels and
these alternating in one process): at batch 32 the fused forward 0.47 ->
0.27 ms, its backward 0.35 -> 0.15 ms, the whole step 1.07 -> 0.63 ms; at
batch 128 the step 3.6 -> 2.4 ms. Of the forward, the pool and its argmax
went from 240-270 us over strided views of the NHWC output to 55-75 us; the
columns, copied from stride-K views, take about 30 us more to build.

Takes: stride 1, one input channel, a pool whose windows tile
(``pool_stride == kernel_size``), and a backward that needs no ``dx`` (a
first layer's); everything else goes to the direct kernels of
:mod:`xcnn.kernels.numpy`, and through them to the generic code (a NaN in a
window too). The outputs are laid out (F, N, PH, PW) in memory (``y`` an
NCHW view of it) and the route (K*K, F, N, PH, PW).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from xcnn.functional import Conv2DSaved, Padding
from xcnn.recycler import recycler

from . import FALLBACK, register
from . import numpy as direct
from . import numpy_parallel as par
from .numpy_parallel import chunk_count, run_chunks

#: Columns per matrix product: its columns and outputs stay in a 1 MB L2 cache.
SPAN = 8192


class WindowColumns(NamedTuple):
    """The forward's columns, kept in ``Conv2DSaved.workspace`` for its backward."""

    cols: np.ndarray  # (KH*KW + 1, N*K*K*PH*PW), in window order per chunk of images
    step: int  # images per chunk


def _spans(n: int) -> range:
    """Starts of the column ranges of at most :data:`SPAN` that ``n`` columns are multiplied in."""
    return range(0, n, SPAN)


def _fill(part: np.ndarray, xh: np.ndarray, kh: int, kw: int, k: int, ph: int, pw: int) -> None:
    """Write the window-order columns of single-channel images ``xh`` (B, HP, WP) into ``part``.

    ``part`` (KH*KW + 1, B*K*K*PH*PW): row i*KW + j, column block (di, dj)
    holds pixel (2-d index) ``(i + K*ph + di, j + K*pw + dj)`` of every
    image, for every window (ph, pw); the last row is all ones.
    """
    b = xh.shape[0]
    s0, s1, s2 = xh.strides
    shape = (kh, kw, k, k, b, ph, pw)
    pixels = as_strided(xh, shape, (s1, s2, s1, s2, s0, k * s1, k * s2), writeable=False)
    np.copyto(part[:-1].reshape(shape), pixels)  # one call: (KH, KW, K, K, B, PH, PW)
    part[-1] = 1


def _forward(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pads: tuple[int, ...],
    plan: direct._Plan, relu: bool, k: int,
) -> Any:  # fmt: skip
    """``(y (N, F, PH, PW), saved, route (N, F, K*K, PH, PW))``, or FALLBACK for a NaN window."""
    n, oh, ow, f, step = plan
    _, _, kh, kw = w.shape
    ph, pw = oh // k, ow // k
    q = k * k * ph * pw  # columns per image
    xh = direct._nhwc(x, pads)[..., 0]  # (N, HP, WP)
    cols = recycler.empty((kh * kw + 1, n * q), x.dtype)
    wb = w.reshape(f, kh * kw)  # (F, KH*KW), columns (i, j)
    if b is not None:
        wb = np.concatenate([wb, b[:, None]], axis=1)  # (F, KH*KW + 1): the bias meets the ones
    y = recycler.empty((f, n, ph, pw), x.dtype)
    route = recycler.empty((k * k, f, n, ph, pw), bool)
    slots = par.slots(n, step)
    zs = [recycler.empty((f * step * q,), x.dtype) for _ in slots]
    takens = [recycler.empty((f * step * ph * pw,), bool) for _ in slots]
    nan: list[bool] = []

    def chunk(c: int, n0: int, n1: int, slot: int) -> None:
        part = cols[:, n0 * q : n1 * q]
        _fill(part, xh[n0:n1], kh, kw, k, ph, pw)
        z = zs[slot][: f * (n1 - n0) * q].reshape(f, -1)  # (F, K*K*B*PH*PW)
        for s in _spans(z.shape[1]):
            np.matmul(wb, part[: wb.shape[1], s : s + SPAN], out=z[:, s : s + SPAN])
        views = list(z.reshape(f, k * k, n1 - n0, ph, pw).transpose(1, 0, 2, 3, 4))
        taken = takens[slot][: f * (n1 - n0) * ph * pw].reshape(f, n1 - n0, ph, pw)
        if direct._pool_views(views, y[:, n0:n1], route[:, :, n0:n1], taken, relu):
            nan.append(True)

    run_chunks(n, step, chunk, n * q * wb.size)
    if nan:
        return FALLBACK
    saved = Conv2DSaved(x=x, workspace=WindowColumns(cols, step))
    return y.transpose(1, 0, 2, 3), saved, route.transpose(2, 1, 0, 3, 4)


def _backward(dy: np.ndarray, cols: WindowColumns, route: np.ndarray, w: np.ndarray) -> Any:
    """``(None, dw (F, 1, KH, KW), db (F,))`` of :func:`_forward`, or FALLBACK.

    FALLBACK where ``dy`` holds a NaN/inf that the route multiplies by False
    (NaN here, 0 in the generic code's ``where``): every such NaN reaches ``db``.
    """
    n, f, ph, pw = dy.shape
    _, _, kh, kw = w.shape
    kk = route.shape[2]
    q = kk * ph * pw
    step = cols.step
    planes = route.transpose(1, 2, 0, 3, 4)  # (F, K*K, N, PH, PW)
    slots = par.slots(n, step)
    dzs = [recycler.empty((f * step * q,), dy.dtype) for _ in slots]
    dys = [recycler.empty((f * step * ph * pw,), dy.dtype) for _ in slots]
    spans = [np.empty((f, kh * kw + 1), dy.dtype) for _ in slots]
    parts = np.zeros((chunk_count(n, step), f, kh * kw + 1), dy.dtype)  # dW | db per chunk

    def chunk(c: int, n0: int, n1: int, slot: int) -> None:
        dyc = dys[slot][: f * (n1 - n0) * ph * pw].reshape(f, 1, n1 - n0, ph, pw)
        dyc[:, 0] = dy[n0:n1].transpose(1, 0, 2, 3)  # one transposing copy
        dz = dzs[slot][: f * (n1 - n0) * q].reshape(f, kk, n1 - n0, ph, pw)
        with np.errstate(invalid="ignore"):  # inf * False: NaN, and the generic code runs
            np.multiply(dyc, planes[:, :, n0:n1], out=dz)
        dz2, colt = dz.reshape(f, -1), cols.cols[:, n0 * q : n1 * q].T  # (F, Q*B), (Q*B, KH*KW + 1)
        for s in _spans(dz2.shape[1]):
            np.matmul(dz2[:, s : s + SPAN], colt[s : s + SPAN], out=spans[slot])
            parts[c] += spans[slot]

    run_chunks(n, step, chunk, n * q * f * (kh * kw + 1))
    dwb = direct._total(parts)  # (F, KH*KW + 1)
    db = dwb[:, -1].copy()
    if not np.isfinite(db).all():
        return FALLBACK
    return None, np.ascontiguousarray(dwb[:, :-1]).reshape(f, 1, kh, kw), db


def _takes(x: Any, w: Any, b: Any, stride: int, k: int, pool_stride: int) -> bool:
    return (
        stride == 1
        and pool_stride == k
        and direct._takes(x, w, b)
        and x.ndim == 4
        and w.ndim == 4
        and x.shape[1] == w.shape[1] == 1
    )


@register("numpy", "conv2d_max_pool2d")
def conv2d_max_pool2d(
    x: Any,
    w: Any,
    b: Any = None,
    *,
    stride: int = 1,
    padding: Padding = "valid",
    with_relu: bool = False,
    kernel_size: int = 2,
    pool_stride: int = 2,
) -> Any:
    if _takes(x, w, b, stride, kernel_size, pool_stride):
        pads = direct._pads(x, w, padding)
        plan = direct._plan(x, w, pads)
        if min(plan.oh, plan.ow) >= kernel_size:  # (else the generic code's error)
            return _forward(x, w, b, pads, plan, with_relu, kernel_size)
    return direct.conv2d_max_pool2d(
        x, w, b, stride=stride, padding=padding, with_relu=with_relu,
        kernel_size=kernel_size, pool_stride=pool_stride,
    )  # fmt: skip


@register("numpy", "conv2d_max_pool2d_backward")
def conv2d_max_pool2d_backward(
    dy: Any,
    saved: Conv2DSaved,
    route: Any,
    w: Any,
    *,
    stride: int = 1,
    padding: Padding = "valid",
    kernel_size: int = 2,
    pool_stride: int = 2,
    need_dx: bool = True,
) -> Any:
    cols, x, k = saved.workspace, saved.x, kernel_size
    if (
        not need_dx
        and isinstance(cols, WindowColumns)
        and _takes(x, w, None, stride, k, pool_stride)
        and direct._takes(dy, x)
    ):
        n, oh, ow, f, _ = direct._plan(x, w, direct._pads(x, w, padding))
        shape = (n, f, oh // k, ow // k)
        if (
            dy.shape == shape
            and direct._takes_mask(route, (n, f, k * k, *shape[2:]))
            and cols.cols.shape == (w.shape[2] * w.shape[3] + 1, n * k * k * shape[2] * shape[3])
        ):  # (the columns' dtype is x's, and so dy's)
            return _backward(dy, cols, route, w)
    return direct.conv2d_max_pool2d_backward(
        dy, saved, route, w, stride=stride, padding=padding, kernel_size=k,
        pool_stride=pool_stride, need_dx=need_dx,
    )  # fmt: skip
