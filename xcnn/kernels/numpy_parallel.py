"""The chunks of a batch on several threads, each product on one BLAS thread meanwhile.

NumPy runs every element-wise pass (an im2col copy, a ReLU, a max-pool) on
one core, and hands each matrix product to BLAS, which splits it over all
cores and ends it at a barrier. A LeNet step is half such passes, so with
BLAS alone one core idles for half the step. Here a kernel cuts its batch
into chunks of a few images and :func:`run_chunks` gives them to
:data:`THREADS` threads: each thread copies, multiplies (on one BLAS
thread) and applies the element-wise passes of its chunk while it is in
cache. NumPy releases the GIL inside ufuncs, copies and matrix products, so
the threads run side by side.

Measured on LeNet's second convolution forward (32 -> 64 channels, 26x26,
2-core AMD EPYC, OpenBLAS 0.3.31, 2026-12-01): batch 32 4.4 ms against
5.4 ms with OpenBLAS's two threads, batch 128 17.5 against 21.4 ms
(``benchmarks/README.md``).

Chunks are taken in order by whichever thread is free, so a thread that
shares its core with another process takes fewer of them instead of holding
up the rest. Results do not depend on which thread ran a chunk: a kernel
writes each chunk's output to that chunk's rows, and partial sums (weight
gradients) to a slot of their own per chunk, added in chunk order.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = ["THREADS", "run_chunks", "chunk_count", "slots", "one_blas_thread", "bundled_openblas"]

#: Threads that share a batch's chunks (``XCNN_THREADS``; default: the usable CPUs,
#: as many as PyTorch's default intra-op threads on such a machine). 1: no threads.
THREADS = int(os.environ.get("XCNN_THREADS", "0")) or len(os.sched_getaffinity(0))


#: Multiply-adds from which OpenBLAS splits a product over its threads
#: (``GEMM_MULTITHREAD_THRESHOLD`` 4 x 65536); below it a product wakes none.
BLAS_THREADED_WORK = 1 << 18


def chunk_count(n: int, step: int) -> int:
    """How many chunks of ``step`` images a batch of ``n`` makes."""
    return -(-n // step)


def slots(n: int, step: int) -> range:
    """The thread slots :func:`run_chunks` uses for chunks of ``step`` images of ``n``."""
    return range(max(1, min(THREADS, chunk_count(n, step))))


def run_chunks(
    n: int, step: int, work: Callable[[int, int, int, int], object], products: int = 0
) -> None:
    """Call ``work(k, start, stop, slot)`` for every chunk ``k`` = images [start, stop).

    Chunk ``k`` covers images ``k*step`` to ``min(n, (k+1)*step)``. ``slot``
    (``0 <= slot < min(THREADS, chunks)``) names the thread running it, for
    per-thread workspaces. Every product runs on one BLAS thread; a single
    chunk runs here, on one BLAS thread too if its ``products`` (the
    multiply-adds of its matrix products) are enough for BLAS to use its
    own threads (:data:`BLAS_THREADED_WORK`). With ``THREADS == 1``
    everything runs here with BLAS's own threads. An exception in any chunk
    is raised here after every thread has stopped.
    """
    chunks = chunk_count(n, step)
    threads = max(1, min(THREADS, chunks))
    if THREADS == 1:  # threads off: BLAS as it is
        for k in range(chunks):
            work(k, k * step, min(n, (k + 1) * step), 0)
        return
    if threads == 1:
        # Small work: no thread to wake, and one BLAS thread if BLAS would start its
        # own: once woken, its helper threads spin for a while after each product and
        # would take a core from the next kernel's threads.
        if products < BLAS_THREADED_WORK:
            work(0, 0, n, 0)
        else:
            with _ONE_BLAS_THREAD:
                work(0, 0, n, 0)
        return
    order = itertools.count()  # next() on a count is atomic under the GIL
    failed = threading.Event()

    def worker(slot: int) -> None:
        while not failed.is_set():
            k = next(order)
            if k >= chunks:
                return
            try:
                work(k, k * step, min(n, (k + 1) * step), slot)
            except BaseException:
                failed.set()  # the other threads stop at their next chunk
                raise

    with _ONE_BLAS_THREAD:
        futures = [_pool(threads).submit(worker, slot) for slot in range(1, threads)]
        try:
            worker(0)  # this thread is slot 0
        finally:
            errors = [f.exception() for f in futures]  # waits for every thread
    for error in errors:
        if error is not None:
            raise error


def _pool(threads: int) -> ThreadPoolExecutor:
    """The helper threads (``threads - 1`` of them) of this process.

    Keyed by process too: a child made by ``fork`` inherits the parent's pool
    object but none of its threads, and work handed to it would wait forever.
    """
    key = (os.getpid(), threads)
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = ThreadPoolExecutor(threads - 1, thread_name_prefix="xcnn-chunks")
    return pool


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


class one_blas_thread:  # noqa: N801  (used as a context manager, like a function)
    """``with one_blas_thread():`` BLAS on one thread while the block runs, then the count it had.

    The chunk threads already share the cores: letting each of their
    products start BLAS threads too would oversubscribe them, and on a
    loaded machine every product would wait at BLAS's barrier for a helper
    thread that is not running (measured: 2-3x slower LeNet steps).
    OpenBLAS's setting is process-wide, so the first of overlapping blocks
    (from several user threads) saves the count and the last restores it.
    (A class, not a generator: it is entered on every kernel call.)
    """

    def __enter__(self) -> None:
        set_threads = _blas_set_threads()
        if set_threads is not None:
            with _BLAS_LOCK:
                if _BLAS_SAVED[1] == 0:
                    _BLAS_SAVED[0] = set_threads(1)
                _BLAS_SAVED[1] += 1

    def __exit__(self, *exc: object) -> None:
        set_threads = _blas_set_threads()
        if set_threads is not None:
            with _BLAS_LOCK:
                _BLAS_SAVED[1] -= 1
                if _BLAS_SAVED[1] == 0:
                    set_threads(_BLAS_SAVED[0])


_ONE_BLAS_THREAD = one_blas_thread()  # (it holds no state of its own: one serves all)
_BLAS_LOCK = threading.Lock()
_BLAS_SAVED = [0, 0]  # [thread count before the outermost block, blocks running]


@functools.cache
def bundled_openblas() -> list[Any]:
    """The OpenBLAS libraries bundled with NumPy's wheel, loaded (``ctypes.CDLL``); [] if none."""
    import ctypes
    import glob

    libs = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*"))):
        if "openblas" in os.path.basename(path):
            try:
                libs.append(ctypes.CDLL(path))
            except OSError:
                continue
    return libs


@functools.cache
def _blas_set_threads() -> Callable[[int], int] | None:
    """``set(n) -> previous n`` for the OpenBLAS bundled with NumPy's wheel, or None.

    (``openblas_set_num_threads_local``, OpenBLAS >= 0.3.27, returns the
    previous count; despite its name it sets the count for the process.) Any
    other BLAS, or an older OpenBLAS, keeps its own thread count.
    """
    import ctypes

    for lib in bundled_openblas():
        func = getattr(lib, "openblas_set_num_threads_local", None)
        if func is not None:
            func.argtypes, func.restype = [ctypes.c_int], ctypes.c_int
            return func
    return None
