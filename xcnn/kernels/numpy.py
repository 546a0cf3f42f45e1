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
- **Chunks on threads.** The im2col matrix of a whole batch is 9x the input
  (85 MB for LeNet's second conv at batch 128); building and multiplying it
  a few images at a time keeps it in cache (2x faster), and backward
  rebuilds what it needs from the input instead of keeping it. The chunks
  run on :mod:`.numpy_parallel`'s threads, each product on one BLAS thread,
  so the copies and element-wise passes use every core too, not only BLAS.
  Window rows are runs of KW*C floats in NHWC memory (:func:`_windows`).
- **Fusion.** ``conv2d_relu`` applies the ReLU to each chunk of output rows
  while they are in cache, and its backward masks each chunk of ``dy`` as
  it is read (:class:`xcnn.Sequential` uses it for Conv2D -> ReLU).
  ``conv2d_max_pool2d`` goes further (Conv2D [-> ReLU] -> MaxPool2D while
  training): each chunk's output rows are pooled in a per-thread workspace
  and never written out, and backward builds each chunk's ``dy`` from the
  pooled gradient and the route mask in cache (LeNet's second convolution at
  batch 32: forward 6.4 -> 6.0 ms, backward 12.2 -> 11.6 ms).
- **Ones column.** The im2col rows carry a column of ones, so the bias rides
  in the forward product and ``db`` comes out of the ``dW`` product: no pass
  over the rows for either.
- **dx without col2im.** For stride 1, on the "full-width grid" (the
  output computed at every input column, with the W - OW extra columns
  zero in dy) a kernel offset (i, j) is a shift of ``i*W + j`` rows of the
  flattened NHWC image. So ``dx`` is 9 small matrix products each added to one
  contiguous row range; scattering an im2col gradient instead costs 1.5x more.
  ``dW`` is one product of ``dy^T`` with the chunk's im2col rows.
- **Single channel.** For C = 1 (a first layer) each shifted image is one run
  of OW floats, so the columns are built transposed, (KH*KW, N*OH*OW), and
  BLAS reads them transposed. Followed by a max-pool whose windows tile,
  the columns come in window order instead, so that every window offset's
  outputs are one contiguous plane (:mod:`.numpy_window_order`; the seed
  net's training step 1.7x faster at batch 32).
- **Dense.** The products are split over output columns (forward) or input
  features (backward), so each thread reads its own part of the weights.
- **Element-wise.** ``np.where`` and masked ``copyto`` are 6-8x slower than
  ``fmax`` and a multiply by a boolean mask; where a multiply would turn a
  non-finite gradient into NaN instead of 0, a cheap check falls back to the
  exact generic code. ``fmax`` gets an array of zeros, not a scalar 0, which
  NumPy runs 2.5x slower (:func:`_zeros_like`; a ReLU pass 1.55x faster).
- **No fresh pages.** Every array made here lives in memory recycled from
  earlier calls once nothing refers to it any more (:class:`xcnn.recycler.Recycler`):
  page faults and the kernel zeroing fresh pages cost as much as the math of
  an element-wise layer, and made the per-step time swing with the C
  allocator's state. (Per-thread workspaces are made before the threads start.)
- **Inference.** Max-pooling without a mask takes the max of K rows, then of
  K columns: 2 passes instead of K*K - 1, one of them over long runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from xcnn.functional import Conv2DSaved, Padding, pad_amounts
from xcnn.recycler import memory_order, recycler

from . import FALLBACK, register
from . import numpy_parallel as par
from .numpy_parallel import chunk_count, run_chunks

#: Bytes of im2col workspace per chunk of images: fits the L2/L3 caches of common CPUs.
CHUNK_BYTES = 2 << 20

#: Bytes of input (output, for a single-channel convolution) per chunk of an
#: element-wise pass: a batch small enough for one chunk stays on one thread (waking
#: a sleeping one takes 50-180 us on the 2-core VM), a larger one splits for two.
PASS_BYTES = 1 << 20

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


def _pads(x: np.ndarray, w: np.ndarray, padding: Padding) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zeros of a stride-1 convolution of x (N, C, H, W) by w."""
    return pad_amounts(x.shape[2], x.shape[3], w.shape[2], w.shape[3], 1, padding)


def _takes_mask(mask: Any, shape: tuple[int, ...]) -> bool:
    """Whether ``mask`` is a boolean NumPy array of this shape (a ReLU's mask, a pool's route)."""
    return type(mask) is np.ndarray and mask.dtype == bool and mask.shape == shape


def _zeros_like(a: np.ndarray) -> np.ndarray:
    """Read-only zeros with the shape and strides of ``a``: the ReLU's second ``fmax`` operand.

    NumPy 2.4's ``fmax`` and ``maximum`` take their SIMD loops only for two
    array operands: against a scalar 0 they ran 2.5-3x slower here (238,000
    float32: 82 against 32 us). The zeros are views of one buffer per dtype,
    made by ``np.zeros`` and never written: untouched pages all read the
    kernel's one zero page, so they cost neither memory nor cache.
    """
    if min(a.strides, default=0) < 0 or a.size == 0:
        return np.zeros_like(a)  # (no kernel here makes such an array)
    extent = sum((n - 1) * s for n, s in zip(a.shape, a.strides, strict=True)) + a.itemsize
    buf = _ZEROS.get(a.dtype)
    if buf is None or buf.nbytes < extent:
        with _ZEROS_LOCK:  # (chunk threads may ask at once)
            buf = _ZEROS.get(a.dtype)
            if buf is None or buf.nbytes < extent:
                buf = np.zeros(2 * extent // a.itemsize + 1, a.dtype)  # room to grow
                buf.flags.writeable = False
                _ZEROS[a.dtype] = buf
    return np.ndarray(a.shape, a.dtype, buffer=buf, strides=a.strides)


_ZEROS: dict[np.dtype, np.ndarray] = {}
_ZEROS_LOCK = threading.Lock()


def _out(size: int, k: int, stride: int) -> int:
    return (size - k) // stride + 1


def _chunk(n: int, row_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Images per chunk: about ``chunk_bytes`` of workspace, the batch in equal chunks."""
    step = max(1, min(n, chunk_bytes // max(row_bytes, 1)))
    return -(-n // chunk_count(n, step))  # 32 images in chunks of 11, 11, 10, not 12, 12, 8


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


# ---------------------------------------------------------------------------
# Convolution (stride 1; strided convolutions fall back to the generic code)
# ---------------------------------------------------------------------------


def _windows(xh: np.ndarray, kh: int, kw: int, oh: int, ow: int) -> np.ndarray:
    """Read-only view (N, OH, OW, KH, KW*C) of an NHWC batch: the window of each output.

    In NHWC memory a window row (KW pixels of C channels) is one run of KW*C
    floats, so copying this view into an im2col matrix moves runs of KW*C
    floats, not of C (1.3x faster for LeNet's second convolution).
    """
    # xh is C-contiguous, so a channel step is one item (NumPy may report any
    # stride for an axis of length 1, as it does for C = 1: it is not read).
    s = xh.strides
    n, _, _, c = xh.shape
    shape, strides = (n, oh, ow, kh, kw * c), (s[0], s[1], s[2], s[1], xh.itemsize)
    return as_strided(xh, shape, strides, writeable=False)


class _Plan(NamedTuple):
    """The shape of a stride-1 convolution's chunked run."""

    n: int  # images
    oh: int  # output rows
    ow: int  # output columns
    f: int  # filters
    step: int  # images per chunk


def _plan(x: np.ndarray, w: np.ndarray, pads: tuple[int, ...]) -> _Plan:
    """Output size and forward chunk of a stride-1 convolution of ``x`` (N, C, H, W) by ``w``.

    One-channel layers (their columns are KH*KW floats a pixel) are chunked by
    output bytes like an element-wise pass; the rest by im2col workspace.
    """
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    oh, ow = h + pads[0] + pads[1] - kh + 1, wd + pads[2] + pads[3] - kw + 1
    if c == 1:
        step = _chunk(n, oh * ow * f * x.itemsize, PASS_BYTES)
    else:
        step = _chunk(n, oh * ow * kh * kw * c * x.itemsize)
    return _Plan(n, oh, ow, f, step)


Rows = Callable[[int, int, int], np.ndarray]  # (start, stop, slot) -> (B*OH*OW, F) rows
Then = Callable[[int, int, np.ndarray, int], None]  # (start, stop, rows, slot)


def _conv2d_rows(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pads: tuple[int, ...], plan: _Plan,
    rows_of: Rows, then: Then,
) -> Conv2DSaved:  # fmt: skip
    """Run a stride-1 convolution chunk by chunk of images (``plan``), on the threads.

    Each chunk of images [n0, n1) copies its im2col rows, multiplies them
    into ``rows_of(n0, n1, slot)`` (B*OH*OW, F), rows (n, oh, ow) as in NHWC
    memory, adds the bias and calls ``then(n0, n1, rows, slot)`` while the
    rows are in cache. Returns the ``saved`` of the convolution: the input
    and, for a single channel, its transposed columns as workspace (only 9x
    a one-channel input); backward rebuilds everything else.
    """
    f, c, kh, kw = w.shape
    n, oh, ow, _, step = plan
    xh = _nhwc(x, pads)  # (N, HP, WP, C)
    m = oh * ow  # output rows per image
    wmat = w.transpose(2, 3, 1, 0).reshape(kh * kw * c, f)  # (KH*KW*C, F), rows (i, j, c)
    colt = None
    if c == 1:
        # Single channel: columns transposed, each row a copy of runs of OW floats,
        # plus a row of ones that multiplies the bias (no separate pass adding it).
        colt = recycler.empty((kh * kw + 1, n * m), x.dtype)  # (KH*KW + 1, N*OH*OW)
        wb = wmat if b is None else np.concatenate([wmat, b[None]])  # (KH*KW [+ 1], F)

        def chunk(k: int, n0: int, n1: int, slot: int) -> None:
            part = colt[:, n0 * m : n1 * m]
            _fill_cols_t(part, xh[n0:n1], kh, kw, oh, ow)
            rows = rows_of(n0, n1, slot)
            np.matmul(part[: len(wb)].T, wb, out=rows)
            then(n0, n1, rows, slot)

        run_chunks(n, step, chunk, n * m * wb.size)
    else:
        windows = _windows(xh, kh, kw, oh, ow)  # (N, OH, OW, KH, KW*C)
        cols = [_ones_columns(step, oh, ow, kh, kw, c, x.dtype) for _ in par.slots(n, step)]
        wb = wmat if b is None else np.concatenate([wmat, b[None]])  # (KH*KW*C [+ 1], F)

        def chunk(k: int, n0: int, n1: int, slot: int) -> None:
            col = cols[slot][: n1 - n0]  # (B, OH, OW, KH*KW*C + 1)
            np.copyto(_window_part(col, kh, kw, c), windows[n0:n1])
            rows = rows_of(n0, n1, slot)
            np.matmul(col.reshape(-1, kh * kw * c + 1)[:, : len(wb)], wb, out=rows)
            then(n0, n1, rows, slot)

        run_chunks(n, step, chunk, n * m * f * kh * kw * c)
    return Conv2DSaved(x=x, col=None, workspace=colt)


def _ones_columns(step: int, oh: int, ow: int, kh: int, kw: int, c: int, dtype: Any) -> np.ndarray:
    """im2col workspace (STEP, OH, OW, KH*KW*C + 1) whose last column is all ones.

    The ones column multiplies the bias in the forward product and makes
    ``db`` a column of the ``dW`` product in backward: no separate pass over
    the rows for either (the single-channel path's ones row does the same).
    """
    cols = recycler.empty((step, oh, ow, kh * kw * c + 1), dtype)
    cols[..., -1] = 1
    return cols


def _window_part(cols: np.ndarray, kh: int, kw: int, c: int) -> np.ndarray:
    """The window columns of :func:`_ones_columns` as (B, OH, OW, KH, KW*C), a view."""
    b, oh, ow, _ = cols.shape
    s = cols.strides  # (spelt out: a reshape of the strided view might copy it)
    return as_strided(cols, (b, oh, ow, kh, kw * c), (*s[:3], kw * c * cols.itemsize, s[3]))


def _conv2d(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pads: tuple[int, ...], relu: bool = False
) -> tuple[np.ndarray, Conv2DSaved, np.ndarray | None]:
    """Stride-1 convolution: ``y`` (N, F, OH, OW), an NCHW view of NHWC memory, ``saved``, mask.

    With ``relu`` each chunk's rows become ``max(rows, 0)`` and the mask
    ``rows > 0`` (laid out like ``y``) in the same visit (fmax maps NaN to
    0, as the generic ReLU's ``where`` does).
    """
    plan = _plan(x, w, pads)
    n, oh, ow, f, _ = plan
    m = oh * ow
    y = recycler.empty((n * m, f), x.dtype)  # rows (n, oh, ow): NHWC
    mask = recycler.empty((n * m, f), bool) if relu else None

    zero = _zeros_like(y) if relu else None

    def then(n0: int, n1: int, rows: np.ndarray, slot: int) -> None:
        if mask is not None:
            np.fmax(rows, zero[n0 * m : n1 * m], out=rows)
            np.greater(rows, 0, out=mask[n0 * m : n1 * m])

    saved = _conv2d_rows(x, w, b, pads, plan, lambda n0, n1, slot: y[n0 * m : n1 * m], then)
    if mask is not None:
        mask = mask.reshape(n, oh, ow, f).transpose(0, 3, 1, 2)  # (N, F, OH, OW)
    return y.reshape(n, oh, ow, f).transpose(0, 3, 1, 2), saved, mask  # y (N, F, OH, OW)


def _conv2d_max_pool2d(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pads: tuple[int, ...], relu: bool,
    k: int, stride: int,
) -> Any:  # fmt: skip
    """``(y (N, F, PH, PW), saved, route (N, F, K*K, PH, PW))`` of the fused op, or FALLBACK.

    The convolution's rows of each chunk go to a per-thread workspace and
    are pooled there (:func:`_pool_chunk`, which applies the ReLU to the
    pooled values) while in cache; the whole convolution output is never
    written out. FALLBACK for a NaN in a window (the generic argmax picks
    its first NaN, or the ReLU maps it to 0), and for an output no window
    fits (the generic code's error).
    """
    plan = _plan(x, w, pads)
    n, oh, ow, f, step = plan
    if min(oh, ow) < k:
        return FALLBACK
    ph, pw = _out(oh, k, stride), _out(ow, k, stride)
    y = recycler.empty((n, ph, pw, f), x.dtype).transpose(0, 3, 1, 2)  # (N, F, PH, PW), NHWC
    route = recycler.empty((k * k, n, ph, pw, f), bool)
    planes = route.transpose(0, 1, 4, 2, 3)  # (K*K, N, F, PH, PW): each plane laid out like y
    slots = par.slots(n, step)
    zs = [recycler.empty((step * oh * ow, f), x.dtype) for _ in slots]
    takens = [recycler.empty((step, ph, pw, f), bool).transpose(0, 3, 1, 2) for _ in slots]
    nan: list[bool] = []

    def then(n0: int, n1: int, rows: np.ndarray, slot: int) -> None:
        z = rows.reshape(n1 - n0, oh, ow, f).transpose(0, 3, 1, 2)  # (B, F, OH, OW)
        if _pool_chunk(z, y[n0:n1], planes[:, n0:n1], takens[slot][: n1 - n0], k, stride, relu):
            nan.append(True)

    def rows_of(n0: int, n1: int, slot: int) -> np.ndarray:  # this thread's workspace
        return zs[slot][: (n1 - n0) * oh * ow]

    saved = _conv2d_rows(x, w, b, pads, plan, rows_of, then)
    if nan:
        return FALLBACK
    return y, saved, route.transpose(1, 4, 0, 2, 3)  # route (N, F, K*K, PH, PW)


def _fill_cols_t(colt: np.ndarray, xh: np.ndarray, kh: int, kw: int, oh: int, ow: int) -> None:
    """Write the transposed columns of a single-channel (B, HP, WP, 1) batch into ``colt``.

    ``colt`` (KH*KW + 1, B*OH*OW): row i*KW + j holds the pixels under kernel
    offset (i, j); the last row is all ones, the "pixel" a bias multiplies.
    """
    b = xh.shape[0]
    # Splitting colt's contiguous last axis always gives a view (colt may be a
    # column range of a larger array: its rows are then not adjacent).
    grid = colt.reshape(kh * kw + 1, b, oh, ow)
    for i in range(kh):
        for j in range(kw):
            grid[i * kw + j] = xh[:, i : i + oh, j : j + ow, 0]
    grid[-1] = 1


Grad = Callable[[int, int, int], np.ndarray]  # (start, stop, slot) -> dy (B, OH, OW, F)


def _backward_step(x: np.ndarray, w: np.ndarray, pads: tuple[int, ...], need_dx: bool) -> int:
    """Images per chunk of :func:`_conv2d_backward` (the forward's for a first layer)."""
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    if c == 1 and not need_dx:
        return _plan(x, w, pads).step
    hp, wp = h + pads[0] + pads[1], wd + pads[2] + pads[3]
    return _chunk(n, kh * kw * hp * wp * c * x.itemsize)  # the size of z below


def _conv2d_backward(
    saved: Conv2DSaved, w: np.ndarray, pads: tuple[int, ...], need_dx: bool, grad: Grad,
    checked: bool = False,
) -> Any:  # fmt: skip
    """Gradients of :func:`_conv2d`: (dx (N, C, H, W) or None, dw (F, C, KH, KW), db (F,)).

    ``grad(n0, n1, slot)`` gives the gradient of the convolution's output for
    images [n0, n1) as NHWC rows (B, OH, OW, F), chunked by
    :func:`_backward_step`. Each chunk adds its share of ``dw`` and ``db`` to
    a slot of its own (summed in chunk order at the end) and writes its own
    rows of ``dx``. ``checked``: ``grad`` applied a mask, which turns a
    NaN/inf of ``dy`` under a False mask into NaN where the generic ``where``
    gives 0; every such NaN reaches ``db``, and a non-finite ``db`` gives
    FALLBACK (the generic code decides).
    """
    x = saved.x
    f, c, kh, kw = w.shape
    n, _, h, wd = x.shape
    xh = _nhwc(x, pads)  # (N, HP, WP, C)
    _, hp, wp, _ = xh.shape
    oh, ow = hp - kh + 1, wp - kw + 1
    m = oh * ow
    step = _backward_step(x, w, pads, need_dx)

    if c == 1 and not need_dx:
        # A first layer: dW^T = columns (KH*KW + 1, B*OH*OW) @ dy (B*OH*OW, F) per chunk;
        # the ones row of the columns makes the last row of the product db. On one
        # BLAS thread this is 2x faster than dW = dy^T @ columns^T; with BLAS's own
        # threads (XCNN_THREADS=1) the latter, as the former can leave OpenBLAS's
        # two threads waiting on each other for seconds when another process holds a core.
        colt = saved.workspace
        if not (isinstance(colt, np.ndarray) and colt.shape == (kh * kw + 1, n * m)):
            colt = None  # the forward was not this kernel's: build the columns per chunk
        parts = np.empty((chunk_count(n, step), kh * kw + 1, f), x.dtype)

        def first(k: int, n0: int, n1: int, slot: int) -> None:
            cols = colt[:, n0 * m : n1 * m] if colt is not None else _cols_t(xh[n0:n1], kh, kw)
            d = grad(n0, n1, slot).reshape(-1, f)
            if par.THREADS > 1:
                np.matmul(cols, d, out=parts[k])  # (KH*KW + 1, F)
            else:
                np.matmul(d.T, cols.T, out=parts[k].T)

        run_chunks(n, step, first, n * m * f * (kh * kw + 1))
        dwb = _total(parts).T  # (F, KH*KW + 1)
        db = dwb[:, -1].copy()
        if checked and not np.isfinite(db).all():
            return FALLBACK
        return None, dwb[:, :-1].reshape(f, 1, kh, kw), db

    # dW from im2col rows rebuilt per chunk: one product (F, B*OH*OW) @ (B*OH*OW, KH*KW*C).
    # dx on the full-width grid: dy placed at the top-left of each (HP, WP) image,
    # zeros elsewhere, so that dy row r and input row r + i*WP + j meet at offset (i, j).
    slots = par.slots(n, step)
    windows = _windows(xh, kh, kw, oh, ow)  # (N, OH, OW, KH, KW*C)
    cols = [_ones_columns(step, oh, ow, kh, kw, c, x.dtype) for _ in slots]
    # dW | db of each chunk: rows (f), columns (i, j, c) and the bias's ones column
    dwbs = np.empty((chunk_count(n, step), f, kh * kw * c + 1), x.dtype)
    if need_dx:
        wt = w.transpose(2, 3, 0, 1)  # (KH, KW, F, C): the filters of each offset
        dxh = recycler.empty(xh.shape, x.dtype)  # (N, HP, WP, C)
        dxflat = dxh.reshape(-1, c)
        dyfws = [recycler.empty((step, hp, wp, f), x.dtype) for _ in slots]
        zs = [recycler.empty((kh, kw, step * hp * wp, c), x.dtype) for _ in slots]
        for dyfw in dyfws:
            dyfw[:, oh:] = 0  # the rows and columns beyond the output stay zero
            dyfw[:, :oh, ow:] = 0

    def chunk(k: int, n0: int, n1: int, slot: int) -> None:
        b = n1 - n0
        d = grad(n0, n1, slot)  # (B, OH, OW, F)
        col = cols[slot][:b]  # (B, OH, OW, KH*KW*C + 1)
        np.copyto(_window_part(col, kh, kw, c), windows[n0:n1])
        np.matmul(d.reshape(-1, f).T, col.reshape(-1, kh * kw * c + 1), out=dwbs[k])
        if not need_dx:
            return
        dyfw = dyfws[slot]
        dyfw[:b, :oh, :ow, :] = d
        rows = b * hp * wp
        valid = rows - (kh - 1) * wp - (kw - 1)  # the last real dy row is valid - 1
        dfw = dyfw[:b].reshape(rows, f)[:valid]  # (valid, F)
        # dx[r + i*WP + j] += dy[r] @ W[i, j]: one product per offset, each added
        # to one contiguous block of rows (faster than adding OH runs of OW*C
        # floats, though the grid has (HP*WP) / (OH*OW) times more rows).
        z = zs[slot]
        np.matmul(dfw, wt, out=z[:, :, :valid])  # (KH, KW, valid, C)
        base = n0 * hp * wp
        # Offset (0, 0) writes rows [base, base + valid); the chunk's other rows start at 0.
        dxflat[base : base + valid] = z[0, 0, :valid]
        dxflat[base + valid : base + rows] = 0
        for i in range(kh):
            for j in range(kw):
                if i or j:
                    s = base + i * wp + j
                    dxflat[s : s + valid] += z[i, j, :valid]

    run_chunks(n, step, chunk, (2 if need_dx else 1) * n * hp * wp * f * kh * kw * c)
    dwb = _total(dwbs)  # (F, KH*KW*C + 1)
    db = dwb[:, -1].copy()
    if checked and not np.isfinite(db).all():
        return FALLBACK
    dw = np.ascontiguousarray(dwb[:, :-1].reshape(f, kh, kw, c).transpose(0, 3, 1, 2))
    if not need_dx:
        return None, dw, db
    top, _, left, _ = pads
    dx = dxh[:, top : top + h, left : left + wd, :].transpose(0, 3, 1, 2)  # (N, C, H, W)
    return dx, dw, db


def _plain_grad(dy: np.ndarray) -> Grad:
    """``grad`` for :func:`_conv2d_backward` of an unmasked ``dy`` (N, F, OH, OW)."""
    return lambda n0, n1, slot: np.ascontiguousarray(dy[n0:n1].transpose(0, 2, 3, 1))


def _relu_grad(dy: np.ndarray, mask: np.ndarray, step: int) -> Grad:
    """``grad`` for :func:`_conv2d_backward`: ``dy * mask`` per chunk, into per-thread buffers."""
    n, f, oh, ow = dy.shape
    bufs = [recycler.empty((step, oh, ow, f), dy.dtype) for _ in par.slots(n, step)]

    def grad(n0: int, n1: int, slot: int) -> np.ndarray:
        out = bufs[slot][: n1 - n0]
        with np.errstate(invalid="ignore"):  # inf * False: NaN, and the generic code runs
            np.multiply(dy[n0:n1].transpose(0, 2, 3, 1), mask[n0:n1].transpose(0, 2, 3, 1), out=out)
        return out

    return grad


def _pool_grad(
    dy: np.ndarray, route: np.ndarray, z_shape: tuple[int, ...], k: int, stride: int, step: int
) -> Grad:
    """``grad`` for :func:`_conv2d_backward`: the max-pool's backward of ``dy`` per chunk.

    ``dy`` (N, F, PH, PW) is copied into the layout of ``route``'s planes,
    then each window's gradient goes to its route position (:func:`_unpool_chunk`)
    in a per-thread buffer (B, OH, OW, F).
    """
    n, f, oh, ow = z_shape
    planes = route.transpose(2, 0, 1, 3, 4)  # (K*K, N, F, PH, PW)
    slots = par.slots(n, step)
    bufs = [recycler.empty((step, oh, ow, f), dy.dtype) for _ in slots]
    dys = [recycler.like(planes[0][:step], dy.dtype) for _ in slots]

    def grad(n0: int, n1: int, slot: int) -> np.ndarray:
        out, dyc = bufs[slot][: n1 - n0], dys[slot][: n1 - n0]
        dyc[...] = dy[n0:n1]  # one transposing copy, then passes in one layout
        with np.errstate(invalid="ignore"):  # inf * False: NaN, and the generic code runs
            _unpool_chunk(out.transpose(0, 3, 1, 2), dyc, planes[:, n0:n1], k, stride)
        return out

    return grad


def _total(parts: np.ndarray) -> np.ndarray:
    """The sum of per-chunk partial results (K, ...) in chunk order; no pass for one chunk."""
    return parts[0] if len(parts) == 1 else parts.sum(axis=0)


def _cols_t(xh: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """The transposed columns (KH*KW + 1, B*OH*OW) of a single-channel (B, HP, WP, 1) batch."""
    b, hp, wp, _ = xh.shape
    oh, ow = hp - kh + 1, wp - kw + 1
    colt = np.empty((kh * kw + 1, b * oh * ow), xh.dtype)
    _fill_cols_t(colt, xh, kh, kw, oh, ow)
    return colt


# ---------------------------------------------------------------------------
# Max pooling: the window offsets as K*K strided views, compared element-wise,
# in chunks of images on threads
# ---------------------------------------------------------------------------


def _pass_chunk(x: np.ndarray) -> int:
    """Images per chunk of an element-wise pass over ``x`` (N, ...)."""
    return _chunk(x.shape[0], x[:1].nbytes, PASS_BYTES)


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
    n = x.shape[0]
    y = recycler.like(x[:, :, :oh, :ow])  # (N, C, OH, OW) laid out like x
    # One boolean plane per offset, laid out like y, so every step below is a
    # same-layout element-wise pass.
    order = memory_order(y)
    buf = recycler.empty((k * k,) + tuple(y.shape[a] for a in order), bool)
    back = tuple(order.index(a) for a in range(4))
    planes = buf.transpose(0, *(a + 1 for a in back))  # (K*K, N, C, OH, OW), each like y
    step = _pass_chunk(x)
    takens = [recycler.like(y[:step], bool) for _ in par.slots(n, step)]
    nan: list[bool] = []  # True appended by a chunk with a NaN window

    def chunk(c: int, n0: int, n1: int, slot: int) -> None:
        if _pool_chunk(x[n0:n1], y[n0:n1], planes[:, n0:n1], takens[slot][: n1 - n0], k, stride):
            nan.append(True)

    run_chunks(n, step, chunk)
    if nan:
        return FALLBACK
    mask = buf.transpose(back[0] + 1, back[1] + 1, 0, back[2] + 1, back[3] + 1)
    return y, mask  # mask (N, C, K*K, OH, OW)


def _window_view(x: np.ndarray, k: int, stride: int, oh: int, ow: int) -> np.ndarray:
    """View (K, K, B, C, OH, OW) of ``x`` (B, C, H, W): ``[i, j]``, offset (i, j) of every window.

    Writeable only where windows do not overlap (``stride >= k``), so that
    no two of its elements are the same memory. (As the operand of one
    element-wise call for all offsets it saves the calls, each taking the GIL
    twice, that two threads would otherwise contend for; for the forward's
    comparisons it was no faster than one call per offset.)
    """
    sb, sc, sh, sw = x.strides
    shape = (k, k, x.shape[0], x.shape[1], oh, ow)
    strides = (sh, sw, sb, sc, sh * stride, sw * stride)
    return as_strided(x, shape, strides, writeable=x.flags.writeable and stride >= k)


def _pool_chunk(
    x: np.ndarray, y: np.ndarray, planes: np.ndarray, taken: np.ndarray, k: int, stride: int,
    relu: bool = False,
) -> bool:  # fmt: skip
    """Max-pool ``x`` (B, C, H, W) into ``y`` (B, C, OH, OW) and its argmax ``planes``.

    ``planes`` (K*K, B, C, OH, OW) bool: ``planes[r]`` is True where window
    offset ``r`` holds the window's first maximum (row-major). The rest as
    :func:`_pool_views`, which does the work on the K*K offset views of ``x``.
    """
    views = _offset_views(x, k, stride, y.shape[2], y.shape[3])
    return _pool_views(views, y, planes, taken, relu)


def _pool_views(
    views: list[np.ndarray], y: np.ndarray, planes: np.ndarray, taken: np.ndarray, relu: bool
) -> bool:
    """Write the element-wise max of the ``views`` to ``y``, its argmax to ``planes``.

    ``planes[r]`` (like ``y``) is True where ``views[r]`` holds the first
    maximum, in the order of ``views``. ``relu``: a ReLU comes first, so
    ``y`` is ``max(window max, 0)`` and a window whose maximum is <= 0 gets no
    position at all (the ReLU stops its gradient). The ReLU is applied to the
    pooled values only, 1/K^2 of the input: for a window with a maximum > 0
    its argmax is the same either way. ``taken`` (like ``y``) is workspace.
    Returns True, with the planes unfinished, if a window holds a NaN (the
    generic code picks its first NaN, or a ReLU first maps it to 0).
    """
    np.copyto(y, views[0])
    for v in views[1:]:
        np.maximum(y, v, out=y)
    if np.isnan(np.sum(y)):
        return True
    # For booleans a > b is "a and not b": not where an earlier offset is the max
    # (or, with the ReLU, where the window's maximum is <= 0). The strided
    # comparisons cost the most, so the last plane is what no other took.
    np.equal(views[0], y, out=planes[0])
    if relu:
        np.less_equal(y, 0, out=taken)
        np.greater(planes[0], taken, out=planes[0])
        taken |= planes[0]
    else:
        np.copyto(taken, planes[0])
    for v, plane in zip(views[1:-1], planes[1:-1], strict=True):
        np.equal(v, y, out=plane)
        np.greater(plane, taken, out=plane)
        taken |= plane
    if len(planes) > 1:
        np.logical_not(taken, out=planes[-1])  # no NaN: the last offset holds the rest
    if relu:
        np.fmax(y, _zeros_like(y), out=y)
    return False


def _unpool_chunk(dx: np.ndarray, dy: np.ndarray, planes: np.ndarray, k: int, stride: int) -> None:
    """Max-pool backward of a chunk: ``dx`` (B, C, H, W) from ``dy`` (B, C, OH, OW) and ``planes``.

    ``planes`` (K*K, B, C, OH, OW) as :func:`_pool_chunk` makes them. Each
    window's gradient goes where its plane is True; pixels no window covers
    get zero, and overlapping windows (stride < K) add up.
    """
    oh, ow = dy.shape[2], dy.shape[3]
    if stride == k:  # the windows tile the top-left; rows/columns beyond get zero
        dx[:, :, oh * k :, :] = 0
        dx[:, :, : oh * k, ow * k :] = 0
    else:  # gaps between windows, or overlaps to accumulate into
        dx.fill(0)
    if stride >= k:  # every pixel in at most one window: one product for all offsets
        routes = planes.reshape(k, k, *planes.shape[1:])
        np.multiply(dy, routes, out=_window_view(dx, k, stride, oh, ow))
        return
    for view, plane in zip(_offset_views(dx, k, stride, oh, ow), planes, strict=True):
        view += dy * plane  # windows share pixels: accumulate


def _max_pool2d_values(x: np.ndarray, k: int, stride: int, oh: int, ow: int) -> np.ndarray:
    """Only ``y`` of :func:`max_pool2d`, for inference: no mask, and for ``stride == k``
    in two passes (the max of K rows, then of K columns) instead of K*K - 1.

    Of the two, one runs over long contiguous runs whatever the layout, which
    matters when C is small in NHWC memory (the other pass reads runs of C).
    """
    n = x.shape[0]
    y = recycler.like(x[:, :, :oh, :ow])  # (N, C, OH, OW) laid out like x
    step = _pass_chunk(x)
    if stride != k:

        def chunk(c: int, n0: int, n1: int, slot: int) -> None:
            views = _offset_views(x[n0:n1], k, stride, oh, ow)
            np.copyto(y[n0:n1], views[0])
            for v in views[1:]:
                np.maximum(y[n0:n1], v, out=y[n0:n1])

    else:
        row_max = [recycler.like(x[:step, :, :oh, : ow * k]) for _ in par.slots(n, step)]

        def chunk(c: int, n0: int, n1: int, slot: int) -> None:
            xc = x[n0:n1]
            rows = [xc[:, :, i : i + k * (oh - 1) + 1 : k, : ow * k] for i in range(k)]
            b = row_max[slot][: n1 - n0]  # (B, C, OH, OW*K)
            np.copyto(b, rows[0])
            for r in rows[1:]:
                np.maximum(b, r, out=b)
            yc = y[n0:n1]
            np.copyto(yc, b[..., 0::k])
            for j in range(1, k):
                np.maximum(yc, b[..., j::k], out=yc)

    run_chunks(n, step, chunk)
    return y


def _max_pool2d_backward(
    dy: np.ndarray, mask: np.ndarray, x_shape: tuple[int, ...], k: int, stride: int
) -> Any:
    """``dx`` (N, C, H, W): each window's gradient on its mask position (FALLBACK: dy not finite).

    Multiplying by the mask would spread a NaN/inf gradient over the whole
    window (NaN * 0 = NaN); such rare batches run the generic code.
    """
    n = dy.shape[0]
    plane0 = mask[:, :, 0]
    order = memory_order(plane0)
    shape = tuple(x_shape[a] for a in order)
    back = tuple(order.index(a) for a in range(4))
    dx = recycler.empty(shape, dy.dtype).transpose(back)  # (N, C, H, W), laid out like mask
    dyl = recycler.empty(tuple(dy.shape[a] for a in order), dy.dtype).transpose(back)
    step = _pass_chunk(dx)
    finite: list[bool] = []  # False appended by a chunk whose dy is not finite

    def chunk(c: int, n0: int, n1: int, slot: int) -> None:
        if not np.isfinite(np.sum(dy[n0:n1])):
            finite.append(False)
            return
        dyc = dyl[n0:n1]
        dyc[...] = dy[n0:n1]  # dy in the mask's layout: one transposing copy, then aligned passes
        _unpool_chunk(dx[n0:n1], dyc, mask[n0:n1].transpose(2, 0, 1, 3, 4), k, stride)

    run_chunks(n, step, chunk)
    return FALLBACK if finite else dx


# ---------------------------------------------------------------------------
# ReLU, in chunks of images on threads
# ---------------------------------------------------------------------------


def _relu(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(max(x, 0), x > 0)``; ``fmax`` maps NaN to 0 like the generic ``where``."""
    y, mask = recycler.like(x), recycler.like(x, bool)
    zero = _zeros_like(y)

    def chunk(c: int, n0: int, n1: int, slot: int) -> None:
        np.fmax(x[n0:n1], zero[n0:n1], out=y[n0:n1])
        np.greater(x[n0:n1], 0, out=mask[n0:n1])

    run_chunks(x.shape[0], _pass_chunk(x), chunk)
    return y, mask


def _relu_backward(dy: np.ndarray, mask: np.ndarray) -> Any:
    """``dy * mask``, or FALLBACK when the product holds a NaN/inf (the generic ``where`` decides).

    (A NaN/inf of ``dy`` under a False mask would give NaN here and 0 there.)
    """
    dx = recycler.like(dy)
    step = _pass_chunk(dy)
    finite: list[bool] = []

    def chunk(c: int, n0: int, n1: int, slot: int) -> None:
        with np.errstate(invalid="ignore"):  # inf * False: NaN, and the generic code runs
            np.multiply(dy[n0:n1], mask[n0:n1], out=dx[n0:n1])
        if not np.isfinite(np.sum(dx[n0:n1])):
            finite.append(False)

    run_chunks(dy.shape[0], step, chunk)
    return FALLBACK if finite else dx


# ---------------------------------------------------------------------------
# Dense: the products split over output columns (forward) or input features
# (backward), so each thread reads its own part of the weights
# ---------------------------------------------------------------------------

#: Fewest multiply-adds for which a dense product is split over threads; below it
#: one thread does all (the seed net's 1352x10 layer; LeNet's 9216x128 one splits).
DENSE_SPLIT_WORK = 1 << 22

#: Weight columns (forward) or rows (backward) per chunk when split.
DENSE_CHUNK = 64


def _dense(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """``x @ w + b``, x (N, I), w (I, O) -> y (N, O), in chunks of output columns."""
    n, o = x.shape[0], w.shape[1]
    y = np.empty((n, o), x.dtype)
    step = o if n * w.size < DENSE_SPLIT_WORK else _chunk(o, 1, DENSE_CHUNK)

    def chunk(c: int, o0: int, o1: int, slot: int) -> None:
        np.matmul(x, w[:, o0:o1], out=y[:, o0:o1])
        if b is not None:
            y[:, o0:o1] += b[o0:o1]

    run_chunks(o, step, chunk, n * w.size)
    return y


def _dense_backward(
    dy: np.ndarray, x: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dy @ w.T, x.T @ dy, sum_n dy)``, in chunks of input features (rows of ``w``)."""
    i = w.shape[0]
    dx = np.empty(x.shape, x.dtype)  # (N, I)
    dw = np.empty(w.shape, x.dtype)  # (I, O)
    step = i if dy.shape[0] * w.size < DENSE_SPLIT_WORK else _chunk(i, 1, 16 * DENSE_CHUNK)

    def chunk(c: int, i0: int, i1: int, slot: int) -> None:
        np.matmul(dy, w[i0:i1].T, out=dx[:, i0:i1])
        np.matmul(x[:, i0:i1].T, dy, out=dw[i0:i1])

    run_chunks(i, step, chunk, 2 * dy.shape[0] * w.size)
    return dx, dw, dy.sum(axis=0)


# ---------------------------------------------------------------------------
# The registered kernels: the generic functions' signatures, FALLBACK when
# the inputs are not theirs.
# ---------------------------------------------------------------------------


@register("numpy", "conv2d")
def conv2d(x: Any, w: Any, b: Any = None, *, stride: int = 1, padding: Padding = "valid") -> Any:
    if stride != 1 or not _takes(x, w, b):
        return FALLBACK
    return _conv2d(x, w, b, _pads(x, w, padding))[:2]


@register("numpy", "conv2d_relu")
def conv2d_relu(
    x: Any, w: Any, b: Any = None, *, stride: int = 1, padding: Padding = "valid"
) -> Any:
    if stride != 1 or not _takes(x, w, b):
        return FALLBACK
    return _conv2d(x, w, b, _pads(x, w, padding), relu=True)


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
    return _conv2d_backward(saved, w, _pads(x, w, padding), need_dx, _plain_grad(dy))


@register("numpy", "conv2d_relu_backward")
def conv2d_relu_backward(
    dy: Any,
    saved: Conv2DSaved,
    mask: Any,
    w: Any,
    *,
    stride: int = 1,
    padding: Padding = "valid",
    need_dx: bool = True,
) -> Any:
    x = saved.x
    if stride != 1 or not _takes(dy, x, w) or not _takes_mask(mask, dy.shape):
        return FALLBACK
    pads = _pads(x, w, padding)
    grad = _relu_grad(dy, mask, _backward_step(x, w, pads, need_dx))
    return _conv2d_backward(saved, w, pads, need_dx, grad, checked=True)


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
    if stride != 1 or not _takes(x, w, b):
        return FALLBACK
    return _conv2d_max_pool2d(x, w, b, _pads(x, w, padding), with_relu, kernel_size, pool_stride)


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
    x, k = saved.x, kernel_size
    if stride != 1 or not _takes(dy, x, w):
        return FALLBACK
    pads = _pads(x, w, padding)
    n, oh, ow, f, _ = _plan(x, w, pads)
    ph, pw = _out(oh, k, pool_stride), _out(ow, k, pool_stride)
    if dy.shape != (n, f, ph, pw) or not _takes_mask(route, (n, f, k * k, ph, pw)):
        return FALLBACK
    step = _backward_step(x, w, pads, need_dx)
    grad = _pool_grad(dy, route, (n, f, oh, ow), k, pool_stride, step)
    return _conv2d_backward(saved, w, pads, need_dx, grad, checked=True)


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


@register("numpy", "dense")
def dense(x: Any, w: Any, b: Any = None) -> Any:
    if not _takes(x, w, b) or x.ndim != 2 or w.ndim != 2 or (b is not None and b.ndim != 1):
        return FALLBACK
    if x.shape[0] * w.size < par.BLAS_THREADED_WORK:
        return FALLBACK  # one small product that wakes no BLAS thread: ``x @ w + b`` as it is
    return _dense(x, w, b)


@register("numpy", "dense_backward")
def dense_backward(dy: Any, x: Any, w: Any) -> Any:
    if not _takes(dy, x, w) or dy.ndim != 2 or x.ndim != 2 or w.ndim != 2:
        return FALLBACK
    return _dense_backward(dy, x, w)


@register("numpy", "relu")
def relu(x: Any) -> Any:
    return _relu(x) if _takes(x) and x.ndim >= 1 else FALLBACK


@register("numpy", "relu_backward")
def relu_backward(dy: Any, mask: Any) -> Any:
    if not _takes(dy) or dy.ndim < 1 or not _takes_mask(mask, dy.shape):
        return FALLBACK
    return _relu_backward(dy, mask)


# Winograd F(2x2, 3x3) for 3x3 stride-1 layers with several channels: replaces the
# conv2d / conv2d_backward kernels above for those inputs and hands them the rest.
from . import numpy_winograd  # noqa: E402, F401, I001
from . import numpy_updates  # noqa: E402, F401  (optimizer updates in chunks on threads)
from . import numpy_window_order  # noqa: E402, F401  (a first layer's conv + pool in window order)
