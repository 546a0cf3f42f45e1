"""The CuPy kernel set: CUDA kernels and cuBLAS for the hot ops of :mod:`xcnn.functional`.

Loaded by :mod:`xcnn.kernels` on the first CuPy array that reaches a delegated
op, and **off unless** ``XCNN_CUDA_KERNELS=1``: until these kernels have passed
a run on a real GPU (``benchmarks/gpu_run.sh``), CuPy takes the generic
array-API path by default, so no user gets numbers from code that has not run.
Every kernel has exactly the generic function's signature and returns
:data:`~xcnn.kernels.FALLBACK` for inputs it does not cover (other dtypes,
mixed dtypes, a pool window of more than 255 positions, ...).

What each kernel does differently from the generic code (the CUDA sources,
with their index conventions, are in :mod:`xcnn.kernels.cuda_sources`):

- **Convolution** builds a GEMM-ready im2col matrix ``(C*KH*KW, NC*OH*OW)`` for a
  chunk of NC images with one kernel, multiplies it with cuBLAS
  (``cupy.matmul``, one product per chunk instead of one per image), and
  writes ``y`` (N, F, OH, OW) with the bias added in one more pass. The chunk
  bounds the matrix to :data:`WORKSPACE_BYTES`, so peak memory does not grow
  with 9x the input; nothing but the input is kept for backward.
- **Backward** rebuilds the chunk's columns from the input, ``dW`` accumulates
  ``dy^T @ col^T`` chunk by chunk in a fixed order, and ``dx`` is a *gather*
  (each input pixel sums its own contributions in the generic fold's order:
  no atomics, so runs repeat bit for bit).
- **Max-pool** returns, instead of the generic (N, C, K*K, OH, OW) bool mask,
  a compact uint8 argmax (N, C, OH, OW) (1 byte per output pixel, 4x less
  for 2x2 windows); its backward routes from it as a gather and falls back on
  a bool mask (which the generic forward made).
- **ReLU** writes ``y`` and its mask in one pass; **softmax cross-entropy**
  computes the log-sum-exp, the loss terms and ``dlogits`` in one pass per row.
- **Dense** layers: the product in cuBLAS, the bias in one pass.
- **SGD / momentum / Adam**: one element-wise kernel per parameter, with the
  generic update's order of operations and every product rounded on its own
  (no fused multiply-add), so they compute the generic update's bits.
- **Capture**: while :func:`capturing` is on (``xcnn.cuda_graph``), products
  call cuBLAS directly, because CuPy refuses cuBLAS calls during stream capture.

- **Conv2D -> ReLU** (:func:`conv2d_relu`): bias and ReLU fused into the
  pass that writes ``y``.

Not delegated by the seam yet, but ready here: :func:`dense_relu` (bias +
ReLU fused into the pass after cuBLAS).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
from typing import Any

import numpy as np

try:
    import cupy
except ImportError:  # only tools that import every module (doctests, docs) get here
    cupy = None

from xcnn import functional as F

from . import FALLBACK, register
from .cuda_sources import CTYPES, LABEL_CTYPES, cuda_source

__all__ = ["WORKSPACE_BYTES", "capturing", "conv2d_relu", "dense_relu"]

#: Most bytes an im2col chunk may take; sized to keep cuBLAS products large
#: (tens of thousands of columns) while peak memory stays far below the input's 9x.
WORKSPACE_BYTES = 256 << 20

_THREADS = 256
_MAX_BLOCKS = 1 << 16  # the kernels' grid-stride loops cover any size with these
_LIB = "cupy"


# ----------------------------------------------------------------------------- plumbing
@functools.cache
def _kernel(name: str, dtype: str, label_dtype: str = "int64") -> Any:
    """The compiled kernel (CuPy caches the binary on disk; this caches the object)."""
    return cupy.RawKernel(cuda_source(name, dtype, label_dtype), name)


def _launch(name: str, dtype: str, total: int, args: tuple, label_dtype: str = "int64") -> None:
    if total == 0:
        return
    blocks = min(-(-total // _THREADS), _MAX_BLOCKS)
    _kernel(name, dtype, label_dtype)((blocks,), (_THREADS,), args)


# ----------------------------------------------------------------------------- GEMM
# CuPy refuses every cuBLAS call while a stream is capturing (its cublas.setStream
# raises NotImplementedError), so a CUDA graph of a training step could hold no
# matrix product. While :func:`capturing` is active, the products here call cuBLAS
# directly (ctypes, the same library and handle CuPy loaded), with the handle's
# stream set to the capture stream before the capture begins.
_CAPTURE: dict[str, Any] = {"stream": None}
_ONE = {"float32": ctypes.c_float(1.0), "float64": ctypes.c_double(1.0)}
_ZERO = {"float32": ctypes.c_float(0.0), "float64": ctypes.c_double(0.0)}


@contextlib.contextmanager
def capturing(stream: Any) -> Any:
    """Inside ``with``: matrix products of this kernel set are capturable on ``stream``."""
    from cupy_backends.cuda.libs import cublas

    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, stream.ptr)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    _CAPTURE["stream"] = stream
    try:
        yield
    finally:
        _CAPTURE["stream"] = None


@functools.cache
def _cublas_lib() -> Any:
    """The libcublas CuPy loaded (found in this process's memory map)."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libcublas.so" in line}
    paths = {p for p in paths if "libcublasLt" not in p}
    if not paths:
        raise RuntimeError("libcublas is not loaded in this process")
    lib = ctypes.CDLL(sorted(paths)[0])
    for name in ("cublasSgemm_v2", "cublasDgemm_v2"):
        func = getattr(lib, name)
        func.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 5 + [ctypes.c_void_p] * 2
        func.argtypes += [ctypes.c_int, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 2
        func.argtypes += [ctypes.c_int]
        func.restype = ctypes.c_int
    return lib


def _operand(a: Any) -> tuple[Any, int, int]:
    """``a`` (rows, cols) as cuBLAS sees it: (array, 0 = row-major / 1 = column-major, ld)."""
    item = a.itemsize
    if min(a.shape) > 1:
        if a.strides[1] == item and a.strides[0] >= a.shape[1] * item:
            return a, 0, a.strides[0] // item
        if a.strides[0] == item and a.strides[1] >= a.shape[0] * item:
            return a, 1, a.strides[1] // item
    a = cupy.ascontiguousarray(a)
    return a, 0, max(1, a.shape[1])


def _gemm_captured(a: Any, b: Any) -> Any:
    """Row-major ``a (M, K) @ b (K, N)`` through cuBLAS directly (capture-safe)."""
    dtype = str(a.dtype)
    (m, k), n = a.shape, b.shape[1]
    c = cupy.empty((m, n), dtype=a.dtype)
    if c.size == 0 or k == 0:
        return cupy.zeros((m, n), dtype=a.dtype)
    a, op_a, lda = _operand(a)
    b, op_b, ldb = _operand(b)
    # Column-major C^T (N, M) = B^T (N, K) @ A^T (K, M); a row-major operand is already
    # its transpose in column-major terms (op N), a column-major one needs op T.
    gemm = getattr(_cublas_lib(), "cublasSgemm_v2" if dtype == "float32" else "cublasDgemm_v2")
    handle = cupy.cuda.device.get_cublas_handle()
    one, zero = ctypes.byref(_ONE[dtype]), ctypes.byref(_ZERO[dtype])
    status = gemm(handle, op_b, op_a, n, m, k, one, b.data.ptr, ldb, a.data.ptr, lda, zero,
                  c.data.ptr, n)  # fmt: skip
    if status != 0:
        raise RuntimeError(f"cuBLAS gemm failed with status {status}")
    return c


def _matmul(a: Any, b: Any) -> Any:
    """``a @ b``: cupy.matmul, or during capture the direct cuBLAS call (2-D only)."""
    if _CAPTURE["stream"] is None:
        return cupy.matmul(a, b)
    if a.ndim != 2 or b.ndim != 2:
        raise NotImplementedError("only 2-D products are capturable")
    return _gemm_captured(a, b)


def _float_dtype(*arrays: Any) -> str | None:
    """The common float dtype name of ``arrays`` (None entries skipped), or None if mixed."""
    names = {str(a.dtype) for a in arrays if a is not None}
    if len(names) != 1:
        return None
    (name,) = names
    return name if name in CTYPES else None


def _cont(a: Any) -> Any:
    return cupy.ascontiguousarray(a)


def _i32(v: int) -> np.int32:
    return np.int32(v)


def _i64(v: int) -> np.int64:
    return np.int64(v)


def _chunk(n: int, rows: int, cols_per_image: int, itemsize: int) -> int:
    """Images per im2col chunk: as many as fit :data:`WORKSPACE_BYTES` (at least one)."""
    per_image = rows * cols_per_image * itemsize
    return max(1, min(n, WORKSPACE_BYTES // max(per_image, 1)))


# ----------------------------------------------------------------------------- convolution
def _conv_geometry(x_shape: tuple[int, ...], w: Any, stride: int, padding: Any) -> tuple:
    n, c, h, wd = x_shape
    f, _, kh, kw = w.shape
    pt, pb, pl, pr = F.pad_amounts(h, wd, kh, kw, stride, padding)
    oh = (h + pt + pb - kh) // stride + 1
    ow = (wd + pl + pr - kw) // stride + 1
    return n, c, h, wd, f, kh, kw, pt, pl, oh, ow


def _im2col(x: Any, col: Any, dtype: str, n0: int, nc: int, geo: tuple, stride: int) -> None:
    _, c, h, wd, _, kh, kw, pt, pl, oh, ow = geo
    args = (x, col, _i64(col.size), _i32(n0), _i32(nc), _i32(c), _i32(h), _i32(wd))
    args += (_i32(kh), _i32(kw), _i32(stride), _i32(pt), _i32(pl), _i32(oh), _i32(ow))
    _launch("xcnn_im2col", dtype, col.size, args)


def _conv_forward(x: Any, w: Any, b: Any, stride: int, padding: Any, relu: bool) -> Any:
    """(y, mask or None) of conv2d (+ ReLU), or FALLBACK."""
    dtype = _float_dtype(x, w, b)
    if dtype is None or x.ndim != 4 or w.ndim != 4 or x.shape[1] != w.shape[1]:
        return FALLBACK
    geo = _conv_geometry(tuple(x.shape), w, stride, padding)
    n, c, _, _, f, kh, kw, _, _, oh, ow = geo
    if n == 0 or oh < 1 or ow < 1:
        return FALLBACK
    x, w2 = _cont(x), _cont(w).reshape(f, c * kh * kw)  # (F, C*KH*KW)
    b = None if b is None else _cont(b)
    p, ck = oh * ow, c * kh * kw
    y = cupy.empty((n, f, oh, ow), dtype=x.dtype)
    mask = cupy.empty((n, f, oh, ow), dtype=cupy.bool_) if relu else None
    step = _chunk(n, ck, p, x.itemsize)
    buf = cupy.empty(ck * step * p, dtype=x.dtype)
    for n0 in range(0, n, step):  # a few chunks per batch, never one per image
        nc = min(step, n - n0)
        col = buf[: ck * nc * p].reshape(ck, nc * p)  # (C*KH*KW, NC*OH*OW)
        _im2col(x, col, dtype, n0, nc, geo, stride)
        yt = _matmul(w2, col)  # (F, NC*OH*OW)
        total = nc * f * p
        args = (yt, b if b is not None else yt, y, mask if relu else y, _i64(total))
        args += (_i32(n0), _i32(nc), _i32(f), _i32(p), _i32(b is not None), _i32(relu))
        _launch("xcnn_bias_act", dtype, total, args)
    return y, mask


@register(_LIB, "conv2d")
def conv2d(x: Any, w: Any, b: Any | None = None, *, stride: int = 1, padding: Any = "valid") -> Any:
    """Chunked im2col + cuBLAS convolution; saves only ``x`` (``col=None``)."""
    out = _conv_forward(x, w, b, stride, padding, relu=False)
    if out is FALLBACK:
        return FALLBACK
    return out[0], F.Conv2DSaved(x=x, col=None, workspace=_LIB)


@register(_LIB, "conv2d_relu")
def conv2d_relu(
    x: Any, w: Any, b: Any | None = None, *, stride: int = 1, padding: Any = "valid"
) -> Any:
    """``relu(conv2d(x, w, b))`` in one output pass: ``(y, saved, mask)``, or FALLBACK.

    :class:`xcnn.Sequential` calls it for a Conv2D followed by a ReLU; the
    backward is the generic ``conv2d_relu_backward``, i.e. these kernels'
    ``relu_backward`` and ``conv2d_backward``.
    """
    out = _conv_forward(x, w, b, stride, padding, relu=True)
    if out is FALLBACK:
        return FALLBACK
    return out[0], F.Conv2DSaved(x=x, col=None, workspace=_LIB), out[1]


@register(_LIB, "conv2d_backward")
def conv2d_backward(
    dy: Any,
    saved: Any,
    w: Any,
    *,
    stride: int = 1,
    padding: Any = "valid",
    need_dx: bool = True,
) -> Any:
    """dW and db with cuBLAS per chunk; dx as a deterministic gather (col2im)."""
    x = saved.x
    dtype = _float_dtype(dy, x, w)
    if dtype is None or x.ndim != 4 or dy.ndim != 4:
        return FALLBACK
    geo = _conv_geometry(tuple(x.shape), w, stride, padding)
    n, c, h, wd, f, kh, kw, _, _, oh, ow = geo
    if tuple(dy.shape) != (n, f, oh, ow) or n == 0:
        return FALLBACK
    x, dy, w2 = _cont(x), _cont(dy), _cont(w).reshape(f, c * kh * kw)  # (F, C*KH*KW)
    p, ck = oh * ow, c * kh * kw
    step = _chunk(n, ck, p, x.itemsize)
    buf = cupy.empty(ck * step * p, dtype=x.dtype)
    dyt_buf = cupy.empty(f * step * p, dtype=x.dtype)
    dw = cupy.zeros((f, ck), dtype=x.dtype)
    dx = cupy.empty((n, c, h, wd), dtype=x.dtype) if need_dx else None
    w2t = w2.T  # (C*KH*KW, F), read transposed by cuBLAS
    for n0 in range(0, n, step):
        nc = min(step, n - n0)
        dyt = dyt_buf[: f * nc * p].reshape(f, nc * p)  # (F, NC*OH*OW)
        args = (dy, dyt, _i64(dyt.size), _i32(n0), _i32(nc), _i32(f), _i32(p))
        _launch("xcnn_nfp_to_fnp", dtype, dyt.size, args)
        col = buf[: ck * nc * p].reshape(ck, nc * p)  # (C*KH*KW, NC*OH*OW)
        _im2col(x, col, dtype, n0, nc, geo, stride)
        dw += _matmul(dyt, col.T)  # (F, C*KH*KW), chunks added in a fixed order
        if need_dx:
            dcol = _matmul(w2t, dyt)  # (C*KH*KW, NC*OH*OW)
            total = nc * c * h * wd
            _, _, _, _, _, _, _, pt, pl, _, _ = geo
            args = (dcol, dx, _i64(total), _i32(n0), _i32(nc), _i32(c), _i32(h), _i32(wd))
            args += (_i32(kh), _i32(kw), _i32(stride), _i32(pt), _i32(pl), _i32(oh), _i32(ow))
            _launch("xcnn_col2im", dtype, total, args)
    db = cupy.sum(dy, axis=(0, 2, 3))  # (F,)
    return dx, dw.reshape(w.shape), db


# ----------------------------------------------------------------------------- pooling
def _pool_geometry(x: Any, k: int, stride: int) -> tuple[int, int] | None:
    if x.ndim != 4 or k < 1 or stride < 1 or k * k > 255:
        return None
    oh, ow = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    return (oh, ow) if oh >= 1 and ow >= 1 else None


def _maxpool(x: Any, k: int, stride: int, want_arg: bool) -> Any:
    dtype, geo = _float_dtype(x), _pool_geometry(x, k, stride)
    if dtype is None or geo is None or x.size == 0:
        return FALLBACK
    oh, ow = geo
    x = _cont(x)
    n, c, h, wd = x.shape
    y = cupy.empty((n, c, oh, ow), dtype=x.dtype)
    arg = cupy.empty((n, c, oh, ow) if want_arg else (1,), dtype=cupy.uint8)
    args = (x, y, arg, _i64(y.size), _i32(h), _i32(wd), _i32(k), _i32(stride))
    args += (_i32(oh), _i32(ow), _i32(want_arg))
    _launch("xcnn_maxpool", dtype, y.size, args)
    return y, arg


@register(_LIB, "max_pool2d")
def max_pool2d(x: Any, kernel_size: int, stride: int) -> Any:
    """``(y, argmax)``: the argmax is uint8 (N, C, OH, OW), offset ``i*K + j`` of the first max."""
    return _maxpool(x, kernel_size, stride, want_arg=True)


@register(_LIB, "max_pool2d_values")
def max_pool2d_values(x: Any, kernel_size: int, stride: int) -> Any:
    out = _maxpool(x, kernel_size, stride, want_arg=False)
    return out if out is FALLBACK else out[0]


@register(_LIB, "max_pool2d_backward")
def max_pool2d_backward(
    dy: Any, mask: Any, x_shape: tuple[int, ...], kernel_size: int, stride: int
) -> Any:
    """Gather from the uint8 argmax; a bool mask (the generic forward's) falls back."""
    dtype, k = _float_dtype(dy), kernel_size
    if dtype is None or mask.dtype != cupy.uint8 or dy.ndim != 4 or len(x_shape) != 4:
        return FALLBACK
    n, c, h, wd = x_shape
    oh, ow = (h - k) // stride + 1, (wd - k) // stride + 1
    if tuple(dy.shape) != (n, c, oh, ow) or tuple(mask.shape) != (n, c, oh, ow):
        return FALLBACK
    dx = cupy.empty((n, c, h, wd), dtype=dy.dtype)
    args = (_cont(dy), _cont(mask), dx, _i64(dx.size), _i32(h), _i32(wd), _i32(k))
    args += (_i32(stride), _i32(oh), _i32(ow))
    _launch("xcnn_maxpool_back", dtype, dx.size, args)
    return dx


# ----------------------------------------------------------------------------- element-wise
@register(_LIB, "relu")
def relu(x: Any) -> Any:
    dtype = _float_dtype(x)
    if dtype is None:
        return FALLBACK
    x = _cont(x)
    y, mask = cupy.empty_like(x), cupy.empty(x.shape, dtype=cupy.bool_)
    _launch("xcnn_relu", dtype, x.size, (x, y, mask, _i64(x.size)))
    return y, mask


@register(_LIB, "relu_backward")
def relu_backward(dy: Any, mask: Any) -> Any:
    dtype = _float_dtype(dy)
    if dtype is None or mask.dtype != cupy.bool_ or mask.shape != dy.shape:
        return FALLBACK
    dx = cupy.empty(dy.shape, dtype=dy.dtype)
    _launch("xcnn_relu_back", dtype, dy.size, (_cont(dy), _cont(mask), dx, _i64(dy.size)))
    return dx


@register(_LIB, "dense")
def dense(x: Any, w: Any, b: Any | None = None) -> Any:
    """``x @ w + b`` (the bias in one pass); capturable in a CUDA graph."""
    dtype = _float_dtype(x, w, b)
    if dtype is None or x.ndim != 2 or w.ndim != 2:
        return FALLBACK
    z = _matmul(x, w)  # (N, O)
    if b is None:
        return z
    y = cupy.empty_like(z)
    args = (z, _cont(b), y, y, _i64(z.size), _i32(z.shape[1]), _i32(0))
    _launch("xcnn_rows_bias_act", dtype, z.size, args)
    return y


@register(_LIB, "dense_backward")
def dense_backward(dy: Any, x: Any, w: Any) -> Any:
    """``(dy @ w^T, x^T @ dy, sum_n dy)``; capturable in a CUDA graph."""
    dtype = _float_dtype(dy, x, w)
    if dtype is None or dy.ndim != 2 or x.ndim != 2 or w.ndim != 2:
        return FALLBACK
    return _matmul(dy, w.T), _matmul(x.T, dy), cupy.sum(dy, axis=0)


def dense_relu(x: Any, w: Any, b: Any | None = None) -> Any:
    """``relu(x @ w + b)`` with the bias and ReLU in one pass after cuBLAS: ``(y, mask)``.

    For a seam op the lead may add (a Dense followed by ReLU).
    """
    dtype = _float_dtype(x, w, b)
    if dtype is None or b is None or x.ndim != 2:
        return FALLBACK
    z = _matmul(x, w)  # (N, O)
    y, mask = cupy.empty_like(z), cupy.empty(z.shape, dtype=cupy.bool_)
    args = (z, _cont(b), y, mask, _i64(z.size), _i32(z.shape[1]), _i32(1))
    _launch("xcnn_rows_bias_act", dtype, z.size, args)
    return y, mask


@register(_LIB, "softmax_cross_entropy")
def softmax_cross_entropy(logits: Any, labels: Any) -> Any:
    """One pass per row; the mean stays a 0-d device array (no host read)."""
    dtype = _float_dtype(logits)
    label_dtype = str(labels.dtype)
    if dtype is None or logits.ndim != 2 or labels.ndim != 1 or label_dtype not in LABEL_CTYPES:
        return FALLBACK
    n, k = logits.shape
    if n == 0 or k == 0 or labels.shape[0] != n:
        return FALLBACK
    dlogits = cupy.empty((n, k), dtype=logits.dtype)
    picked = cupy.empty((n,), dtype=logits.dtype)
    args = (_cont(logits), _cont(labels), dlogits, picked, _i64(n), _i32(k))
    _launch("xcnn_softmax_xent", dtype, n, args, label_dtype)
    return -cupy.sum(picked) / n, dlogits


# ----------------------------------------------------------------------------- updates
def _scalar(dtype: str, v: float) -> Any:
    return np.dtype(dtype).type(v)


@register(_LIB, "sgd_update")
def sgd_update(p: Any, g: Any, *, lr: float, weight_decay: float = 0.0) -> Any:
    dtype = _float_dtype(p, g)
    if dtype is None or p.shape != g.shape:
        return FALLBACK
    out = cupy.empty(p.shape, dtype=p.dtype)
    t = lambda v: _scalar(dtype, v)  # noqa: E731
    args = (_cont(p), _cont(g), out, _i64(p.size), t(lr), t(weight_decay), _i32(weight_decay != 0))
    _launch("xcnn_sgd", dtype, p.size, args)
    return out


@register(_LIB, "momentum_update")
def momentum_update(
    p: Any, g: Any, velocity: Any, *, lr: float, momentum: float, weight_decay: float = 0.0
) -> Any:
    dtype = _float_dtype(p, g, velocity)
    if dtype is None or p.shape != g.shape or (velocity is not None and velocity.shape != p.shape):
        return FALLBACK
    p_out, v_out = cupy.empty(p.shape, dtype=p.dtype), cupy.empty(p.shape, dtype=p.dtype)
    v_in = g if velocity is None else _cont(velocity)
    t = lambda v: _scalar(dtype, v)  # noqa: E731
    args = (_cont(p), _cont(g), v_in, p_out, v_out, _i64(p.size))
    args += (t(lr), t(momentum), t(weight_decay), _i32(velocity is not None))
    args += (_i32(weight_decay != 0),)
    _launch("xcnn_momentum", dtype, p.size, args)
    return p_out, v_out


@register(_LIB, "adam_update")
def adam_update(
    p: Any,
    g: Any,
    m: Any,
    v: Any,
    *,
    lr: float,
    step: int,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> Any:
    dtype = _float_dtype(p, g, m, v)
    if dtype is None or p.shape != g.shape or (m is None) != (v is None) or step < 1:
        return FALLBACK
    if m is not None and (m.shape != p.shape or v.shape != p.shape):
        return FALLBACK
    outs = [cupy.empty(p.shape, dtype=p.dtype) for _ in range(3)]
    # Bias correction folded into the step size and eps (as the generic update does).
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    eps_hat = eps * math.sqrt(1 - beta2**step)
    t = lambda s: _scalar(dtype, s)  # noqa: E731
    m_in, v_in = (g, g) if m is None else (_cont(m), _cont(v))
    args = (_cont(p), _cont(g), m_in, v_in, *outs, _i64(p.size))
    args += (t(beta1), t(1 - beta1), t(beta2), t(1 - beta2), t(step_size), t(eps_hat))
    args += (t(lr * weight_decay), _i32(m is not None), _i32(weight_decay != 0))
    _launch("xcnn_adam", dtype, p.size, args)
    return tuple(outs)
