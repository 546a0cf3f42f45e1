"""NumPy dense layers with their matrix products on threads of their own, BLAS on one thread.

Given to BLAS one after the other, each product is split over the cores and
ends at BLAS's barrier; on a machine where another process holds a core,
every barrier waits for a helper thread that is not running (measured: a
product several times slower than on one thread). Here independent work
runs side by side on :data:`xcnn.kernels.numpy_winograd.THREADS` threads,
each product on one BLAS thread (the mechanism of the Winograd chunks):

- ``dense``: the rows of ``x`` in as many blocks as threads;
- ``dense_backward``: ``dx = dy @ w.T`` on one thread, ``dw = x.T @ dy`` on another;
- ``relu`` / ``relu_backward``: the kernels of :mod:`xcnn.kernels.numpy` on
  blocks of the batch, one per thread (NumPy's element-wise passes use one
  core; PyTorch's use all).

Layers below :data:`MIN_WORK` multiply-adds run as the generic code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xcnn.recycler import recycler

from . import FALLBACK, register
from . import numpy_winograd as wg

#: Fewest multiply-adds per call for which threads pay for their start-up. 8M: the seed
#: net's 1352x10 dense layer at batch 128 (1.7M) ran slower split (29k against 35k img/s,
#: one quick run each on a quiet machine); LeNet's 9216x128 one (38M at batch 32) gains.
MIN_WORK = 1 << 23

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _takes(*arrays: Any) -> bool:
    return (
        wg.ENABLED
        and wg.THREADS >= 2
        and all(type(a) is np.ndarray and a.ndim in (1, 2) and a.dtype in _FLOATS for a in arrays)
        and len({a.dtype for a in arrays}) == 1
    )


@register("numpy", "dense")
def dense(x: Any, w: Any, b: Any = None) -> Any:
    arrays = (x, w) if b is None else (x, w, b)
    if not _takes(*arrays) or x.ndim != 2 or w.ndim != 2 or x.shape[0] * w.size < MIN_WORK:
        return FALLBACK
    n = x.shape[0]
    y = np.empty((n, w.shape[1]), x.dtype)  # (N, O)

    def rows(start: int, stop: int) -> None:
        np.matmul(x[start:stop], w, out=y[start:stop])
        if b is not None:
            y[start:stop] += b

    wg._spread(n, 1, rows)
    return y


@register("numpy", "dense_backward")
def dense_backward(dy: Any, x: Any, w: Any) -> Any:
    if not _takes(dy, x, w) or dy.ndim != 2 or dy.shape[0] * w.size < MIN_WORK:
        return FALLBACK
    pool = wg._pool(2)
    with wg._one_blas_thread():
        dx = pool.submit(np.matmul, dy, w.T)  # (N, I)
        dw = x.T @ dy  # (I, O)
        db = dy.sum(axis=0)  # (O,)
        return dx.result(), dw, db


#: Fewest elements for which the element-wise kernels split the batch over threads.
MIN_ELEMENTS = 1 << 18


def _split(x: Any) -> bool:
    return wg.THREADS >= 2 and x.ndim >= 1 and x.shape[0] >= 2 and x.size >= MIN_ELEMENTS


@register("numpy", "relu")
def relu(x: Any) -> Any:
    if type(x) is not np.ndarray or x.dtype not in _FLOATS or not _split(x):
        return FALLBACK
    y, mask = recycler.like(x), recycler.like(x, bool)

    def block(start: int, stop: int) -> None:
        np.fmax(x[start:stop], x.dtype.type(0), out=y[start:stop])  # NaN -> 0, as the generic
        np.greater(x[start:stop], 0, out=mask[start:stop])

    wg._spread(x.shape[0], 1, block)
    return y, mask


@register("numpy", "relu_backward")
def relu_backward(dy: Any, mask: Any) -> Any:
    if (
        type(dy) is not np.ndarray
        or dy.dtype not in _FLOATS
        or type(mask) is not np.ndarray
        or mask.shape != dy.shape
        or not _split(dy)
    ):
        return FALLBACK
    dx = recycler.like(dy)

    def block(start: int, stop: int) -> bool:
        np.multiply(dy[start:stop], mask[start:stop], out=dx[start:stop])
        return bool(np.isfinite(np.sum(dx[start:stop])))

    if not all(wg._spread(dy.shape[0], 1, block)):
        return FALLBACK  # a NaN/inf gradient: the generic ``where`` decides
    return dx
