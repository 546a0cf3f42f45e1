"""The NumPy kernel set: fast paths for the hot ops of :mod:`xcnn.functional`.

The generic array-API code in ``functional.py`` is the definition of every
operation and runs on every namespace. On NumPy (one CPU thread outside BLAS,
no kernel fusion) some of it is slow for reasons that have nothing to do with
the math, so these kernels are registered for NumPy arrays in the kernel seam
(:mod:`xcnn.kernels`): each has the generic function's signature and returns
:data:`~xcnn.kernels.FALLBACK` for inputs it does not take (not float32/float64
of one dtype, a strided convolution, a NaN). They compute the same values;
``tests/test_fast_paths.py`` compares both on the same inputs, and
``XCNN_FAST=0`` in the environment (or ``kernels.set_enabled("numpy", False)``)
turns them off. What was measured (2-core AMD EPYC, OpenBLAS; ``benchmarks/README.md``):

- **Layout.** A convolution's output is produced as NHWC memory (handed on as
  an NCHW view, so callers see the usual shape): the im2col matrix for the
  next convolution is then built from runs of C contiguous floats, its matrix
  product writes NHWC rows directly, and the element-wise layers after it
  (ReLU, max-pool) keep whatever layout they get.
- **Cache-sized chunks, nothing kept.** The im2col matrix of a whole batch is
  9x the input (85 MB for LeNet's second conv at batch 128); building and
  multiplying it a few images at a time keeps it in cache (2x faster), and
  backward rebuilds what it needs from the input instead of keeping it.
- **Backward without col2im.** For stride 1, on the "full-width grid" (the
  output computed at every input column, with the W - OW extra columns
  zero in dy) a kernel offset (i, j) is a shift of ``i*W + j`` rows of the
  flattened NHWC image. So ``dx`` is 9 small matrix products each added to one
  contiguous row range, and ``dW[i, j]`` is ``dy^T`` times a shifted view of the
  input (no copy). Scattering an im2col gradient instead costs 1.5x more.
- **Single channel.** For C = 1 (a first layer) each shifted image is one run
  of OW floats, so the columns are built transposed, (KH*KW, N*OH*OW), and
  BLAS reads them transposed.
- **Element-wise.** ``np.where`` and masked ``copyto`` are 6-8x slower than
  ``fmax`` and a multiply by a boolean mask; where a multiply would turn a
  non-finite gradient into NaN instead of 0, a cheap check falls back to the
  exact generic code.
- **No fresh pages.** Every array made here lives in memory recycled from
  earlier calls once nothing refers to it any more (:class:`xcnn.recycler.Recycler`):
  page faults and the kernel zeroing fresh pages cost as much as the math of
  an element-wise layer, and made the per-step time swing with the C
  allocator's state.
- **Inference.** Max-pooling without a mask takes the max of K rows, then of
  K columns: 2 passes instead of K*K - 1, one of them over long runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from xcnn.functional import Conv2DSaved, Padding, pad_amounts
from xcnn.recycler import memory_order, recycler

from . import FALLBACK, register

#: Bytes of im2col workspace per chunk of images: fits the L2/L3 caches of common CPUs.
CHUNK_BYTES = 2 << 20

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _takes(*arrays: Any) -> bool:
    """Whether these kernels take the arrays: NumPy float32/float64, all of one dtype."""
    dtype = None
    for a in arrays:
        if a is None:
            continue
        if type(a) is not np.ndarray or a.dtype not in _FLOATS or (dtype and a.dtype != dtype):
            return False
        dtype = a.dtype
    return True


def _out(size: int, k: int, stride: int) -> int:
    return (size - k) // stride + 1


def _chunk(n: int, row_bytes: int) -> int:
    """How many images make one chunk of about CHUNK_BYTES workspace."""
    return max(1, min(n, CHUNK_BYTES // max(row_bytes, 1)))


def _nhwc(x: np.ndarray, pads: tuple[int, int, int, int]) -> np.ndarray:
    """(N, C, H, W) -> zero-padded, C-contiguous (N, H+PT+PB, W+PL+PR, C); a view if possible."""
    top, bottom, left, right = pads
    xt = x.transpose(0, 2, 3, 1)  # (N, H, W, C)
    if not any(pads):
        return np.ascontiguousarray(xt)
    n, h, w, c = xt.shape
    out = np.zeros((n, h + top + bottom, w + left + right, c), dtype=x.dtype)
    out[:, top : top + h, left : left + w, :] = xt
    return out


def _shifted(flat: np.ndarray, kh: int, kw: int, row_w: int, rows: int) -> np.ndarray:
    """Read-only view (KH, KW, rows, C) of ``flat`` (R, C), [i, j] = ``flat[i*row_w + j:][:rows]``.

    On the full-width grid this is what kernel offset (i, j) sees, for every
    output position at once, without copying.
    """
    r, c = flat.strides
    return as_strided(flat, (kh, kw, rows, flat.shape[1]), (row_w * r, r, r, c), writeable=False)


# ---------------------------------------------------------------------------
# Convolution (stride 1; strided convolutions fall back to the generic code)
# ---------------------------------------------------------------------------


def _conv2d(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pads: tuple[int, ...]
) -> tuple[np.ndarray, Conv2DSaved]:
    """Stride-1 convolution: ``y`` (N, F, OH, OW), an NCHW view of NHWC memory, and ``saved``.

    ``saved`` keeps the input and, for a single channel, its transposed
    columns as workspace (only 9x a one-channel input); backward rebuilds
    everything else from the input.
    """
    f, c, kh, kw = w.shape
    colt = None
    xh = _nhwc(x, pads)  # (N, HP, WP, C)
    n, hp, wp, _ = xh.shape
    oh, ow = hp - kh + 1, wp - kw + 1
    wmat = w.transpose(2, 3, 1, 0).reshape(kh * kw * c, f)  # (KH*KW*C, F), rows (i, j, c)
    y = recycler.empty((n * oh * ow, f), x.dtype)  # rows (n, oh, ow): NHWC
    if c == 1:
        # Single channel: columns transposed, each row a copy of runs of OW floats,
        # plus a row of ones that multiplies the bias (no separate pass adding it).
        colt = _cols_t(xh, kh, kw, oh, ow)  # (KH*KW + 1, N*OH*OW)
        if b is None:
            np.matmul(colt[:-1].T, wmat, out=y)
        else:
            np.matmul(colt.T, np.concatenate([wmat, b[None]]), out=y)  # (KH*KW + 1, F)
    else:
        step = _chunk(n, oh * ow * kh * kw * c * x.itemsize)
        col = recycler.empty((step, oh, ow, kh, kw, c), x.dtype)  # reused by every chunk
        for n0 in range(0, n, step):
            n1 = min(n, n0 + step)
            for i in range(kh):
                for j in range(kw):
                    col[: n1 - n0, :, :, i, j, :] = xh[n0:n1, i : i + oh, j : j + ow, :]
            cols = col[: n1 - n0].reshape(-1, kh * kw * c)  # (B*OH*OW, KH*KW*C)
            rows = y[n0 * oh * ow : n1 * oh * ow]
            np.matmul(cols, wmat, out=rows)
            if b is not None:
                rows += b  # while the rows are in cache
    saved = Conv2DSaved(x=x, col=None, workspace=colt)
    return y.reshape(n, oh, ow, f).transpose(0, 3, 1, 2), saved  # y (N, F, OH, OW)


def _cols_t(xh: np.ndarray, kh: int, kw: int, oh: int, ow: int) -> np.ndarray:
    """Transposed columns of a single-channel (N, HP, WP, 1) batch and a row of ones.

    Returns (KH*KW + 1, N*OH*OW): row i*KW + j holds the pixels under kernel
    offset (i, j); the last row is all ones, the "pixel" a bias multiplies.
    """
    n = xh.shape[0]
    colt = recycler.empty((kh * kw + 1, n, oh, ow), xh.dtype)
    for i in range(kh):
        for j in range(kw):
            colt[i * kw + j] = xh[:, i : i + oh, j : j + ow, 0]
    colt[-1] = 1
    return colt.reshape(kh * kw + 1, n * oh * ow)


def _conv2d_backward(
    dy: np.ndarray,
    saved: Conv2DSaved,
    w: np.ndarray,
    pads: tuple[int, ...],
    need_dx: bool,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Gradients of :func:`_conv2d`: (dx (N, C, H, W) or None, dw (F, C, KH, KW), db (F,))."""
    x = saved.x
    f, c, kh, kw = w.shape
    n, _, h, wd = x.shape
    xh = _nhwc(x, pads)  # (N, HP, WP, C)
    _, hp, wp, _ = xh.shape
    oh, ow = hp - kh + 1, wp - kw + 1
    dyh = np.ascontiguousarray(dy.transpose(0, 2, 3, 1))  # (N, OH, OW, F)
    if c == 1 and not need_dx:
        # A first layer: dW = dy^T (F, N*OH*OW) @ columns (N*OH*OW, KH*KW), one product.
        # (Asked as dW^T = columns^T @ dy, OpenBLAS's two threads can spend seconds
        # waiting on each other when another process holds a core.)
        # The ones row of the columns makes the last column of the product db.
        colt = saved.workspace
        if not (isinstance(colt, np.ndarray) and colt.shape == (kh * kw + 1, n * oh * ow)):
            colt = _cols_t(xh, kh, kw, oh, ow)  # the forward was not this kernel's
        dwb = dyh.reshape(-1, f).T @ colt.T  # (F, KH*KW + 1)
        return None, dwb[:, :-1].reshape(f, 1, kh, kw), dwb[:, -1].copy()

    # dW on the full-width grid: dy placed at the top-left of each (HP, WP) image,
    # zeros elsewhere, so that dy row r and input row r + i*WP + j meet at offset (i, j).
    step = _chunk(n, kh * kw * hp * wp * c * x.itemsize)  # the size of z below
    dyfw = recycler.empty((step, hp, wp, f), x.dtype)
    dyfw[:, oh:] = 0  # the rows and columns beyond the output stay zero
    dyfw[:, :oh, ow:] = 0
    dwt = np.zeros((kh, kw, f, c), dtype=x.dtype)  # dW with the offsets first
    part = np.empty_like(dwt)
    db = np.zeros(f, dtype=x.dtype)
    xflat = xh.reshape(-1, c)  # (N*HP*WP, C)
    if need_dx:
        wt = w.transpose(2, 3, 0, 1)  # (KH, KW, F, C): the filters of each offset
        dxh = recycler.empty(xh.shape, x.dtype)  # (N, HP, WP, C)
        dxh.fill(0)
        dxflat = dxh.reshape(-1, c)
        z = recycler.empty((kh, kw, step * hp * wp, c), x.dtype)
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        d = dyh[n0:n1]  # (B, OH, OW, F)
        db += d.reshape(-1, f).sum(axis=0)
        dyfw[: n1 - n0, :oh, :ow, :] = d
        rows = (n1 - n0) * hp * wp
        valid = rows - (kh - 1) * wp - (kw - 1)  # the last real dy row is valid - 1
        dfw = dyfw[: n1 - n0].reshape(rows, f)[:valid]  # (valid, F)
        # dW[i, j] = sum_r dy[r] (x) x[r + i*WP + j]: all offsets in one batched product.
        np.matmul(dfw.T, _shifted(xflat[n0 * hp * wp :], kh, kw, wp, valid), out=part)
        dwt += part  # (KH, KW, F, C)
        if need_dx:
            # dx[r + i*WP + j] += dy[r] @ W[i, j]: one product per offset, each added
            # to one contiguous block of rows (faster than adding OH runs of OW*C
            # floats, though the grid has (HP*WP) / (OH*OW) times more rows).
            np.matmul(dfw, wt, out=z[:, :, :valid])  # (KH, KW, valid, C)
            for i in range(kh):
                for j in range(kw):
                    s = n0 * hp * wp + i * wp + j
                    dxflat[s : s + valid] += z[i, j, :valid]
    dw = np.ascontiguousarray(dwt.transpose(2, 3, 0, 1))  # (F, C, KH, KW)
    if not need_dx:
        return None, dw, db
    top, _, left, _ = pads
    dx = dxh[:, top : top + h, left : left + wd, :].transpose(0, 3, 1, 2)  # (N, C, H, W)
    return dx, dw, db


# ---------------------------------------------------------------------------
# Max pooling: the window offsets as K*K strided views, compared element-wise
# ---------------------------------------------------------------------------


def _offset_views(x: np.ndarray, k: int, stride: int, oh: int, ow: int) -> list[np.ndarray]:
    """The K*K views (N, C, OH, OW) of ``x`` under each window offset, row-major."""
    last_h, last_w = stride * (oh - 1) + 1, stride * (ow - 1) + 1
    return [
        x[:, :, i : i + last_h : stride, j : j + last_w : stride]
        for i in range(k)
        for j in range(k)
    ]


def _max_pool2d(x: np.ndarray, k: int, stride: int, oh: int, ow: int) -> Any:
    """(y (N, C, OH, OW), mask (N, C, K*K, OH, OW)) exactly as the generic code gives them.

    The mask is True at the first maximum of each window in row-major order.
    Both results keep the memory layout of ``x`` (NHWC after a fast convolution).
    """
    views = _offset_views(x, k, stride, oh, ow)
    y = recycler.like(views[0])  # (N, C, OH, OW) laid out like x
    np.copyto(y, views[0])
    for v in views[1:]:
        np.maximum(y, v, out=y)
    if np.isnan(np.sum(y)):  # a NaN window: the generic argmax picks its first NaN
        return FALLBACK
    # One boolean plane per offset, laid out like y, so every step below is a
    # same-layout element-wise pass.
    order = memory_order(y)
    buf = recycler.empty((k * k,) + tuple(y.shape[a] for a in order), bool)
    back = tuple(order.index(a) for a in range(4))
    planes = [buf[r].transpose(back) for r in range(k * k)]  # each (N, C, OH, OW)
    np.equal(views[0], y, out=planes[0])
    taken = recycler.like(planes[0])  # windows whose maximum has a position already
    np.copyto(taken, planes[0])
    for v, plane in zip(views[1:-1], planes[1:-1], strict=True):
        np.equal(v, y, out=plane)
        # For booleans a > b is "a and not b": not where an earlier offset is the max.
        np.greater(plane, taken, out=plane)
        taken |= plane
    if len(planes) > 1:
        np.logical_not(taken, out=planes[-1])  # no NaN: the last offset holds the rest
    mask = buf.transpose(back[0] + 1, back[1] + 1, 0, back[2] + 1, back[3] + 1)
    return y, mask  # mask (N, C, K*K, OH, OW)


def _max_pool2d_values(x: np.ndarray, k: int, stride: int, oh: int, ow: int) -> np.ndarray:
    """Only ``y`` of :func:`max_pool2d`, for inference: no mask, and for ``stride == k``
    in two passes (the max of K rows, then of K columns) instead of K*K - 1.

    Of the two, one runs over long contiguous runs whatever the layout, which
    matters when C is small in NHWC memory (the other pass reads runs of C).
    """
    if stride != k:
        views = _offset_views(x, k, stride, oh, ow)
        y = recycler.like(views[0])
        np.copyto(y, views[0])
        for v in views[1:]:
            np.maximum(y, v, out=y)
        return y
    rows = [x[:, :, i : i + k * (oh - 1) + 1 : k, : ow * k] for i in range(k)]  # (N, C, OH, OW*K)
    b = recycler.like(rows[0])
    np.copyto(b, rows[0])
    for r in rows[1:]:
        np.maximum(b, r, out=b)
    cols = [b[..., j::k] for j in range(k)]  # (N, C, OH, OW)
    y = recycler.like(cols[0])
    np.copyto(y, cols[0])
    for col in cols[1:]:
        np.maximum(y, col, out=y)
    return y


def _max_pool2d_backward(
    dy: np.ndarray, mask: np.ndarray, x_shape: tuple[int, ...], k: int, stride: int
) -> Any:
    """``dx`` (N, C, H, W): each window's gradient on its mask position (FALLBACK: dy not finite).

    Multiplying by the mask would spread a NaN/inf gradient over the whole
    window (NaN * 0 = NaN); such rare batches run the generic code.
    """
    if not np.isfinite(np.sum(dy)):
        return FALLBACK
    oh, ow = dy.shape[2], dy.shape[3]
    plane0 = mask[:, :, 0]
    order = memory_order(plane0)
    shape = tuple(x_shape[a] for a in order)
    back = tuple(order.index(a) for a in range(4))
    dx = recycler.empty(shape, dy.dtype).transpose(back)  # (N, C, H, W), laid out like mask
    if stride == k:  # the windows tile the top-left; rows/columns beyond get zero
        dx[:, :, oh * k :, :] = 0
        dx[:, :, : oh * k, ow * k :] = 0
    else:  # gaps between windows, or overlaps to accumulate into
        dx.fill(0)
    dyl = recycler.empty(tuple(dy.shape[a] for a in order), dy.dtype).transpose(back)
    dyl[...] = dy  # dy in the mask's layout: one transposing copy, then aligned passes
    overlap = stride < k
    for r, view in enumerate(_offset_views(dx, k, stride, oh, ow)):
        if overlap:  # windows share pixels: accumulate
            view += dyl * mask[:, :, r]
        else:
            np.multiply(dyl, mask[:, :, r], out=view)
    return dx


# ---------------------------------------------------------------------------
# ReLU
# ---------------------------------------------------------------------------


def _relu(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(max(x, 0), x > 0)``; ``fmax`` maps NaN to 0 like the generic ``where``."""
    y, mask = recycler.like(x), recycler.like(x, bool)
    np.fmax(x, x.dtype.type(0), out=y)
    np.greater(x, 0, out=mask)
    return y, mask


def _relu_backward(dy: np.ndarray, mask: np.ndarray) -> Any:
    """``dy * mask``, or FALLBACK when dy holds a NaN/inf (the generic ``where`` then decides)."""
    if not np.isfinite(np.sum(dy)):
        return FALLBACK
    return np.multiply(dy, mask, out=recycler.like(dy))


# ---------------------------------------------------------------------------
# The registered kernels: the generic functions' signatures, FALLBACK when
# the inputs are not theirs.
# ---------------------------------------------------------------------------


@register("numpy", "conv2d")
def conv2d(x: Any, w: Any, b: Any = None, *, stride: int = 1, padding: Padding = "valid") -> Any:
    if stride != 1 or not _takes(x, w, b):
        return FALLBACK
    return _conv2d(x, w, b, pad_amounts(x.shape[2], x.shape[3], w.shape[2], w.shape[3], 1, padding))


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
    if stride != 1 or not _takes(dy, x, w):
        return FALLBACK
    pads = pad_amounts(x.shape[2], x.shape[3], w.shape[2], w.shape[3], 1, padding)
    return _conv2d_backward(dy, saved, w, pads, need_dx)


@register("numpy", "max_pool2d")
def max_pool2d(x: Any, kernel_size: int, stride: int) -> Any:
    if not _takes(x):
        return FALLBACK
    k = kernel_size
    return _max_pool2d(x, k, stride, _out(x.shape[2], k, stride), _out(x.shape[3], k, stride))


@register("numpy", "max_pool2d_values")
def max_pool2d_values(x: Any, kernel_size: int, stride: int) -> Any:
    if not _takes(x):
        return FALLBACK
    k = kernel_size
    oh, ow = _out(x.shape[2], k, stride), _out(x.shape[3], k, stride)
    return _max_pool2d_values(x, k, stride, oh, ow)


@register("numpy", "max_pool2d_backward")
def max_pool2d_backward(
    dy: Any, mask: Any, x_shape: tuple[int, ...], kernel_size: int, stride: int
) -> Any:
    if not _takes(dy) or type(mask) is not np.ndarray:
        return FALLBACK
    return _max_pool2d_backward(dy, mask, x_shape, kernel_size, stride)


@register("numpy", "relu")
def relu(x: Any) -> Any:
    return _relu(x) if _takes(x) else FALLBACK


@register("numpy", "relu_backward")
def relu_backward(dy: Any, mask: Any) -> Any:
    if not _takes(dy) or type(mask) is not np.ndarray:
        return FALLBACK
    return _relu_backward(dy, mask)


# Winograd F(2x2, 3x3) for 3x3 stride-1 layers with several channels: replaces the
# conv2d / conv2d_backward kernels above for those inputs and hands them the rest.
from . import numpy_winograd  # noqa: E402, F401, I001
from . import numpy_threads  # noqa: E402, F401  (dense layers on threads of their own)
