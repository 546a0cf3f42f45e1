"""Recycled NumPy memory for the kernels' outputs and workspaces.

The NumPy kernel set (:mod:`xcnn.kernels.numpy`) makes every large array it
returns in memory handed back by :class:`Recycler` once nothing refers to it
any more: page faults and the kernel zeroing fresh pages cost as much as the
arithmetic of an element-wise layer, and made the per-step time swing with
the C allocator's state.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
from typing import Any

import numpy as np

__all__ = ["Recycler", "recycler", "release_memory", "memory_order"]


def memory_order(a: np.ndarray) -> tuple[int, ...]:
    """Axes of ``a`` from the largest stride to the smallest: its layout in memory."""
    return _orders(a.strides)[0]


@functools.lru_cache(maxsize=256)
def _orders(strides: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(memory order, its inverse permutation) for an array's strides.

    Cached: the kernels ask for the same few layouts on every call, and the
    sort costs more than some of their element-wise passes on small batches.
    """
    order = tuple(sorted(range(len(strides)), key=lambda ax: -abs(strides[ax])))
    return order, tuple(order.index(ax) for ax in range(len(strides)))


def _refs(buffers: list[np.ndarray], i: int) -> int:
    """The reference count of ``buffers[i]`` (the list's reference included)."""
    return sys.getrefcount(buffers[i])


#: What :func:`_refs` reports for a buffer that only its list holds (2 on CPython 3.10-3.13);
#: -1 (never reuse) where reference counts are not exact: other Pythons, free-threaded CPython.
_UNHELD = (
    _refs([np.empty(1, np.uint8)], 0)
    if sys.implementation.name == "cpython" and getattr(sys, "_is_gil_enabled", lambda: True)()
    else -1
)


class Recycler(threading.local):
    """Memory for the arrays the NumPy kernels make, reused once nothing else refers to it.

    A training step allocates the same large outputs every time (about 190 MB
    for LeNet at batch 128), and fresh memory costs a page fault and the
    kernel zeroing each page: on a VM as much time as the arithmetic of an
    element-wise layer. A buffer is handed out again only when its CPython
    reference count shows that this list is its only holder, so no array a
    caller still holds (or any view of it) ever changes. Buffers are kept per
    thread and by size (a request looks only at buffers of its size); beyond
    ``max_buffers`` the least recently used buffer of the size first asked
    for is forgotten (and freed when its last user lets go).
    """

    max_buffers = 64

    def __init__(self) -> None:
        # Buffers by size in bytes, each list most recently used last; the sizes in
        # the order first asked for (a dict keeps insertion order).
        self.sizes: dict[int, list[np.ndarray]] = {}  # nbytes -> 1-D uint8 arrays
        self.count = 0

    @property
    def buffers(self) -> list[np.ndarray]:
        """Every buffer held, of every size."""
        return [buf for bufs in self.sizes.values() for buf in bufs]

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised C-contiguous array, in recycled memory when possible."""
        dtype = np.dtype(dtype)
        nbytes = dtype.itemsize * math.prod(shape)
        bufs = self.sizes.get(nbytes)
        if bufs is None:
            bufs = self.sizes[nbytes] = []
        for i in range(len(bufs)):  # (no loop variable: it would hold a reference)
            if _refs(bufs, i) == _UNHELD:
                if i != len(bufs) - 1:
                    bufs.append(bufs.pop(i))
                break
        else:
            bufs.append(np.empty(nbytes, np.uint8))
            self.count += 1
            if self.count > self.max_buffers:
                self._forget_oldest()
        return bufs[-1].view(dtype).reshape(shape)

    def _forget_oldest(self) -> None:
        """Drop the least recently used buffer of the size first asked for."""
        first = next(iter(self.sizes))
        bufs = self.sizes[first]
        del bufs[0]
        self.count -= 1
        if not bufs:
            del self.sizes[first]

    def clear(self) -> None:
        """Forget every buffer (each is freed once nothing else refers to it)."""
        self.sizes.clear()
        self.count = 0

    def like(self, a: np.ndarray, dtype: Any = None) -> np.ndarray:
        """An uninitialised array shaped like ``a`` with ``a``'s axis order in memory.

        Element-wise passes over operands with one layout run over contiguous
        memory; mixing an NHWC operand with an NCHW one would not.
        """
        dtype = a.dtype if dtype is None else dtype
        if a.flags.c_contiguous:
            return self.empty(a.shape, dtype)
        order, back = _orders(a.strides)
        shape = a.shape
        return self.empty(tuple(shape[ax] for ax in order), dtype).transpose(back)


#: The recycler of this process (its buffers are per thread).
recycler = Recycler()


def release_memory() -> None:
    """Forget the recycled buffers of this thread (they are freed once unused)."""
    recycler.clear()
