"""Pure array functions: the math of every layer, forward and backward side by side.

Each function finds the array namespace of its inputs (``array_api_compat``),
uses only array-API operations, keeps no state and never writes into an
array (updates go through ``array_api_extra.at``, which copies where a library's
arrays are immutable), so the same code runs on NumPy, CuPy, array_api_strict,
PyTorch, JAX or Dask.

Every op is decorated with :func:`xcnn.kernels.delegate`: a library with a
kernel set (NumPy's fast paths, CuPy's kernels) may answer first, with the
same signature and the same values, and the generic code below is what runs
otherwise (``F.<op>.generic`` calls it directly). The delegated call runs with
its first argument's device current.

Shape symbols used throughout: ``N, C, H, W`` input batch, channels, height,
width; ``F`` filters; ``KH, KW`` kernel; ``OH, OW`` output; ``S`` stride;
``K`` classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import array_api_extra as xpx
from array_api_compat import device as _device

from .backend import array_namespace
from .kernels import delegate

Array = Any
Padding = str | int

__all__ = [
    "pad_amounts",
    "windows",
    "fold",
    "conv2d",
    "conv2d_backward",
    "conv2d_relu",
    "conv2d_relu_backward",
    "conv2d_max_pool2d",
    "conv2d_max_pool2d_backward",
    "Conv2DSaved",
    "max_pool2d",
    "max_pool2d_values",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "dense",
    "dense_backward",
    "relu",
    "relu_backward",
    "softmax",
    "softmax_backward",
    "log_softmax",
    "softmax_cross_entropy",
]


# ---------------------------------------------------------------------------
# Sliding windows: the one piece of index arithmetic that convolution and
# pooling share. A k x k kernel visits the input through k*k shifted, strided
# views; stacking them gives the im2col "columns" without a loop over pixels.
# ---------------------------------------------------------------------------


def pad_amounts(
    h: int, w: int, kh: int, kw: int, stride: int, padding: Padding
) -> tuple[int, int, int, int]:
    """Zero padding ``(top, bottom, left, right)`` for ``"valid"``, ``"same"`` or an int.

    ``"same"`` follows TensorFlow: the output is ``ceil(H / S)`` by
    ``ceil(W / S)`` and an odd total padding puts the extra row/column at the
    bottom/right (so even kernels work too).
    """
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        th = max((math.ceil(h / stride) - 1) * stride + kh - h, 0)
        tw = max((math.ceil(w / stride) - 1) * stride + kw - w, 0)
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    p = int(padding)
    return p, p, p, p


def _pad(x: Array, pads: tuple[int, int, int, int]) -> Array:
    """Zero-pad the last two axes of ``x`` (N, C, H, W) -> (N, C, H+T+B, W+L+R)."""
    top, bottom, left, right = pads
    if not any(pads):
        return x
    xp = array_namespace(x)
    n, c, h, w = x.shape
    out = xp.zeros((n, c, h + top + bottom, w + left + right), dtype=x.dtype, device=_device(x))
    return xpx.at(out)[:, :, top : top + h, left : left + w].set(x)


@delegate
def windows(x: Array, kh: int, kw: int, stride: int, oh: int, ow: int) -> Array:
    """Stack the ``KH*KW`` shifted views of ``x`` that a kernel overlays.

    ``x`` (N, C, H, W) -> (N, C, KH*KW, OH, OW), where entry ``[n, c, i*KW + j, y, x]``
    is ``x[n, c, y*S + i, x*S + j]``: the input pixel under kernel offset (i, j)
    when the kernel sits on output pixel (y, x).
    """
    xp = array_namespace(x)
    last_h, last_w = stride * (oh - 1) + 1, stride * (ow - 1) + 1
    views = [
        x[:, :, i : i + last_h : stride, j : j + last_w : stride]  # (N, C, OH, OW)
        for i in range(kh)
        for j in range(kw)
    ]
    return xp.stack(views, axis=2)  # (N, C, KH*KW, OH, OW)


@delegate
def fold(cols: Array, shape: tuple[int, ...], kh: int, kw: int, stride: int) -> Array:
    """The adjoint of :func:`windows`: add each window entry back onto its input pixel.

    ``cols`` (N, C, KH*KW, OH, OW) -> (N, C, H, W) with ``shape = (N, C, H, W)``.
    Overlapping windows add up, pixels no window covers get zero. The loop is
    over the KH*KW kernel offsets only; each step adds a whole strided slice.
    """
    xp = array_namespace(cols)
    oh, ow = cols.shape[3], cols.shape[4]
    last_h, last_w = stride * (oh - 1) + 1, stride * (ow - 1) + 1
    out = xp.zeros(shape, dtype=cols.dtype, device=_device(cols))
    for i in range(kh):
        for j in range(kw):
            window = cols[:, :, i * kw + j, ...]  # (N, C, OH, OW)
            out = xpx.at(out)[:, :, i : i + last_h : stride, j : j + last_w : stride].add(window)
    return out


def _out_size(size: int, k: int, stride: int, pad_lo: int, pad_hi: int) -> int:
    return (size + pad_lo + pad_hi - k) // stride + 1


# ---------------------------------------------------------------------------
# Convolution: overlay the filter, multiply, sum -- for every output pixel at
# once, as one matrix product of the filters with the stacked windows.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Conv2DSaved:
    """What :func:`conv2d` keeps for :func:`conv2d_backward`.

    Attributes
    ----------
    x : (N, C, H, W) the input.
    col : (N, C*KH*KW, OH*OW) the stacked windows of the generic code, or None
        (a kernel that did not keep them): the generic backward rebuilds them from ``x``.
    workspace : anything a kernel set keeps for its own backward; only the
        kernel set that made it reads it, everything else ignores it.
    """

    x: Array
    col: Array | None = None
    workspace: Any = None

    @property
    def x_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape)


def _columns(x: Array, kh: int, kw: int, stride: int, padding: Padding) -> Array:
    """The stacked windows of ``x`` under a KHxKW kernel: (N, C*KH*KW, OH*OW)."""
    xp = array_namespace(x)
    n, c, h, wd = x.shape
    pads = pad_amounts(h, wd, kh, kw, stride, padding)
    oh = _out_size(h, kh, stride, pads[0], pads[1])
    ow = _out_size(wd, kw, stride, pads[2], pads[3])
    return xp.reshape(windows(_pad(x, pads), kh, kw, stride, oh, ow), (n, c * kh * kw, oh * ow))


@delegate
def conv2d(
    x: Array, w: Array, b: Array | None = None, *, stride: int = 1, padding: Padding = "valid"
) -> tuple[Array, Conv2DSaved]:
    """2-D cross-correlation (what deep learning calls convolution).

    Parameters
    ----------
    x : (N, C, H, W) input batch.
    w : (F, C, KH, KW) filters.
    b : (F,) bias, or None.
    stride, padding : see :class:`xcnn.Conv2D`.

    Returns
    -------
    y : (N, F, OH, OW) with ``OH = (H + PT + PB - KH) // S + 1`` (likewise OW).
    saved : :class:`Conv2DSaved`, what :func:`conv2d_backward` needs (generic
        code: the input and its stacked windows).
    """
    xp = array_namespace(x, w)
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    pads = pad_amounts(h, wd, kh, kw, stride, padding)
    oh = _out_size(h, kh, stride, pads[0], pads[1])
    ow = _out_size(wd, kw, stride, pads[2], pads[3])
    col = _columns(x, kh, kw, stride, padding)  # (N, C*KH*KW, OH*OW)
    y = xp.reshape(w, (f, c * kh * kw)) @ col  # (N, F, OH*OW)
    y = xp.reshape(y, (n, f, oh, ow))
    if b is not None:
        y = y + b[:, None, None]
    return y, Conv2DSaved(x=x, col=col)


@delegate
def conv2d_backward(
    dy: Array,
    saved: Conv2DSaved,
    w: Array,
    *,
    stride: int = 1,
    padding: Padding = "valid",
    need_dx: bool = True,
) -> tuple[Array | None, Array, Array]:
    """Gradients of :func:`conv2d` given ``dy = dL/dy`` (N, F, OH, OW) and its ``saved``.

    Each output pixel ``y[n, f, p] = sum_k w[f, k] * col[n, k, p]``, so

    - ``dL/dw[f, k] = sum_{n, p} dy[n, f, p] * col[n, k, p]``: the gradient of an
      output pixel with respect to a filter weight is the input pixel under it;
    - ``dL/dcol[n, k, p] = sum_f w[f, k] * dy[n, f, p]``, folded back onto the
      input pixels the windows came from (then the padding is cut off);
    - ``dL/db[f] = sum_{n, p} dy[n, f, p]``.

    Returns ``(dx (N, C, H, W) or None, dw (F, C, KH, KW), db (F,))``.
    """
    xp = array_namespace(dy, w)
    n, c, h, wd = saved.x_shape
    f, _, kh, kw = w.shape
    oh, ow = dy.shape[2], dy.shape[3]
    col = saved.col if saved.col is not None else _columns(saved.x, kh, kw, stride, padding)
    dy2 = xp.reshape(dy, (n, f, oh * ow))  # (N, F, OH*OW)
    # Per image dy2[n] @ col[n]^T, summed over the batch: a batched product reads col
    # transposed in place, where tensordot would first copy the (9x input) col.
    dw = xp.sum(dy2 @ xp.matrix_transpose(col), axis=0)  # (F, C*KH*KW)
    dw = xp.reshape(dw, w.shape)  # (F, C, KH, KW)
    db = xp.sum(dy2, axis=(0, 2))  # (F,)
    if not need_dx:
        return None, dw, db
    dcol = xp.matrix_transpose(xp.reshape(w, (f, c * kh * kw))) @ dy2  # (N, C*KH*KW, OH*OW)
    dcol = xp.reshape(dcol, (n, c, kh * kw, oh, ow))
    top, bottom, left, right = pad_amounts(h, wd, kh, kw, stride, padding)
    dx = fold(dcol, (n, c, h + top + bottom, wd + left + right), kh, kw, stride)
    return dx[:, :, top : top + h, left : left + wd], dw, db


@delegate
def conv2d_relu(
    x: Array, w: Array, b: Array | None = None, *, stride: int = 1, padding: Padding = "valid"
) -> tuple[Array, Conv2DSaved, Array]:
    """``relu(conv2d(x, w, b))`` as one op: ``(y, saved, mask)``, ``mask = conv > 0``.

    :class:`xcnn.Sequential` runs a :class:`~xcnn.Conv2D` followed by a
    :class:`~xcnn.ReLU` through this op, so that a kernel set can apply the
    ReLU to each chunk of the convolution's output while it is in cache
    (and, in :func:`conv2d_relu_backward`, the mask to each chunk of ``dy``).
    The generic code is exactly the two ops.
    """
    y, saved = conv2d(x, w, b, stride=stride, padding=padding)
    y, mask = relu(y)
    return y, saved, mask


@delegate
def conv2d_relu_backward(
    dy: Array,
    saved: Conv2DSaved,
    mask: Array,
    w: Array,
    *,
    stride: int = 1,
    padding: Padding = "valid",
    need_dx: bool = True,
) -> tuple[Array | None, Array, Array]:
    """Gradients of :func:`conv2d_relu`: :func:`conv2d_backward` of ``relu_backward(dy, mask)``."""
    dz = relu_backward(dy, mask)
    return conv2d_backward(dz, saved, w, stride=stride, padding=padding, need_dx=need_dx)


@delegate
def conv2d_max_pool2d(
    x: Array,
    w: Array,
    b: Array | None = None,
    *,
    stride: int = 1,
    padding: Padding = "valid",
    with_relu: bool = False,
    kernel_size: int = 2,
    pool_stride: int = 2,
) -> tuple[Array, Conv2DSaved, Array]:
    """``max_pool2d(conv2d(x, w, b))`` (of its ReLU ``with_relu``) as one op: ``(y, saved, route)``.

    :class:`xcnn.Sequential` runs a :class:`~xcnn.Conv2D` [-> :class:`~xcnn.ReLU`]
    -> :class:`~xcnn.MaxPool2D` through this op while training, so that a
    kernel set can pool each chunk of the convolution's output while it is in
    cache and never write the whole output out.

    ``x`` (N, C, H, W) -> ``y`` (N, F, PH, PW), ``PH = (OH - K) // S + 1`` for
    the convolution's (OH, OW); ``route`` (N, F, K*K, PH, PW) bool is the
    max-pool's mask (the first maximum of each window), and with the ReLU also
    False where the ReLU stops the gradient (a window whose maximum is not
    > 0), so the backward pass is one masked pass. The generic code is exactly
    the two or three ops in turn.
    """
    z, saved = conv2d(x, w, b, stride=stride, padding=padding)
    if with_relu:
        z, _ = relu(z)
    y, route = max_pool2d(z, kernel_size, pool_stride)
    if with_relu:
        # At a window's maximum the ReLU passed the gradient iff the maximum is > 0.
        route = route & (y > 0)[:, :, None, :, :]
    return y, saved, route


@delegate
def conv2d_max_pool2d_backward(
    dy: Array,
    saved: Conv2DSaved,
    route: Array,
    w: Array,
    *,
    stride: int = 1,
    padding: Padding = "valid",
    kernel_size: int = 2,
    pool_stride: int = 2,
    need_dx: bool = True,
) -> tuple[Array | None, Array, Array]:
    """Gradients of :func:`conv2d_max_pool2d`: ``dy`` (N, F, PH, PW) -> ``(dx or None, dw, db)``.

    :func:`conv2d_backward` of ``max_pool2d_backward(dy, route)``: the same
    values as the max-pool's, the ReLU's and the convolution's backward in turn.
    """
    n, _, h, wd = saved.x_shape
    f, _, kh, kw = w.shape
    top, bottom, left, right = pad_amounts(h, wd, kh, kw, stride, padding)
    oh, ow = _out_size(h, kh, stride, top, bottom), _out_size(wd, kw, stride, left, right)
    dz = max_pool2d_backward(dy, route, (n, f, oh, ow), kernel_size, pool_stride)
    return conv2d_backward(dz, saved, w, stride=stride, padding=padding, need_dx=need_dx)


# ---------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------


@delegate
def max_pool2d(x: Array, kernel_size: int, stride: int) -> tuple[Array, Array]:
    """Max over each KxK window. Rows/columns that don't fill a window are dropped.

    ``x`` (N, C, H, W) -> ``y`` (N, C, OH, OW), ``OH = (H - K) // S + 1``, and the
    argmax ``mask`` (N, C, K*K, OH, OW) bool: True at exactly one position per
    window, the first maximum in row-major order, so tied maxima never double
    a gradient.
    """
    xp = array_namespace(x)
    k = kernel_size
    oh, ow = _out_size(x.shape[2], k, stride, 0, 0), _out_size(x.shape[3], k, stride, 0, 0)
    win = windows(x, k, k, stride, oh, ow)  # (N, C, K*K, OH, OW)
    # argmax returns the first occurrence (array-API guarantee), i.e. row-major first.
    first = xp.argmax(win, axis=2)  # (N, C, OH, OW)
    mask = first[:, :, None, :, :] == xp.reshape(
        xp.arange(k * k, device=_device(x), dtype=first.dtype), (k * k, 1, 1)
    )
    return xp.max(win, axis=2), mask


@delegate
def max_pool2d_values(x: Array, kernel_size: int, stride: int) -> Array:
    """The ``y`` of :func:`max_pool2d` alone, for inference (no argmax mask to compute).

    ``x`` (N, C, H, W) -> (N, C, OH, OW), ``OH = (H - K) // S + 1``.
    """
    k = kernel_size
    oh, ow = _out_size(x.shape[2], k, stride, 0, 0), _out_size(x.shape[3], k, stride, 0, 0)
    return array_namespace(x).max(windows(x, k, k, stride, oh, ow), axis=2)


@delegate
def max_pool2d_backward(
    dy: Array, mask: Array, x_shape: tuple[int, ...], kernel_size: int, stride: int
) -> Array:
    """Route each window's gradient to its (first) maximum; everything else gets zero.

    ``dy`` (N, C, OH, OW), ``mask`` from :func:`max_pool2d` -> ``dx`` (N, C, H, W).
    """
    xp = array_namespace(dy, mask)
    cols = xp.where(mask, dy[:, :, None, :, :], xp.zeros((), dtype=dy.dtype, device=_device(dy)))
    return fold(cols, x_shape, kernel_size, kernel_size, stride)


@delegate
def avg_pool2d(x: Array, kernel_size: int, stride: int) -> Array:
    """Mean over each KxK window: (N, C, H, W) -> (N, C, OH, OW), ``OH = (H - K) // S + 1``."""
    xp = array_namespace(x)
    k = kernel_size
    oh, ow = _out_size(x.shape[2], k, stride, 0, 0), _out_size(x.shape[3], k, stride, 0, 0)
    return xp.mean(windows(x, k, k, stride, oh, ow), axis=2)


@delegate
def avg_pool2d_backward(
    dy: Array, x_shape: tuple[int, ...], kernel_size: int, stride: int
) -> Array:
    """Spread each window's gradient evenly, ``dy / K^2``, over its K*K pixels."""
    xp = array_namespace(dy)
    k = kernel_size
    n, c, oh, ow = dy.shape
    cols = xp.broadcast_to(dy[:, :, None, :, :] / (k * k), (n, c, k * k, oh, ow))
    return fold(cols, x_shape, k, k, stride)


# ---------------------------------------------------------------------------
# Dense and activations
# ---------------------------------------------------------------------------


@delegate
def dense(x: Array, w: Array, b: Array | None = None) -> Array:
    """Fully connected layer ``y = x @ w + b``: x (N, I), w (I, O), b (O,) -> (N, O)."""
    y = x @ w
    return y if b is None else y + b


@delegate
def dense_backward(dy: Array, x: Array, w: Array) -> tuple[Array, Array, Array]:
    """Gradients of :func:`dense`: ``dx = dy @ w.T``, ``dw = x.T @ dy``, ``db = sum_n dy``."""
    xp = array_namespace(dy, x, w)
    return dy @ xp.matrix_transpose(w), xp.matrix_transpose(x) @ dy, xp.sum(dy, axis=0)


@delegate
def relu(x: Array) -> tuple[Array, Array]:
    """``y = max(x, 0)``; also returns the mask ``x > 0`` the backward pass needs."""
    xp = array_namespace(x)
    mask = x > 0
    return xp.where(mask, x, xp.zeros((), dtype=x.dtype, device=_device(x))), mask


@delegate
def relu_backward(dy: Array, mask: Array) -> Array:
    """The gradient passes where the input was positive and stops elsewhere."""
    xp = array_namespace(dy, mask)
    return xp.where(mask, dy, xp.zeros((), dtype=dy.dtype, device=_device(dy)))


# ---------------------------------------------------------------------------
# Softmax and cross-entropy
# ---------------------------------------------------------------------------


@delegate
def log_softmax(x: Array, axis: int = -1) -> Array:
    """``log(softmax(x))`` computed as ``z - log(sum(exp(z)))`` with ``z = x - max(x)``.

    Subtracting the max first (log-sum-exp) keeps ``exp`` from overflowing, so
    logits of +-1e4 still give finite results.
    """
    xp = array_namespace(x)
    z = x - xp.max(x, axis=axis, keepdims=True)
    return z - xp.log(xp.sum(xp.exp(z), axis=axis, keepdims=True))


@delegate
def softmax(x: Array, axis: int = -1) -> Array:
    """Turn scores into probabilities: ``exp(x_i) / sum_j exp(x_j)`` along ``axis``."""
    xp = array_namespace(x)
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


@delegate
def softmax_backward(dy: Array, y: Array, axis: int = -1) -> Array:
    """Jacobian-vector product of softmax, given its output ``y``.

    ``dp_i/dx_j = p_i (delta_ij - p_j)``, hence
    ``dL/dx_j = p_j (dL/dp_j - sum_i dL/dp_i p_i)``.
    """
    xp = array_namespace(dy, y)
    return y * (dy - xp.sum(dy * y, axis=axis, keepdims=True))


@delegate
def softmax_cross_entropy(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Mean cross-entropy ``L = -ln(p_correct)`` of softmax probabilities, and its gradient.

    Parameters
    ----------
    logits : (N, K) float scores.
    labels : (N,) integer class indices in ``[0, K)``, same namespace and device.

    Returns
    -------
    loss : 0-d array, the mean over the batch (stays on the device).
    dlogits : (N, K), ``(softmax(logits) - onehot(labels)) / N``: the fused
        gradient is far simpler (and more stable) than softmax's Jacobian
        times the gradient of ``-ln p``.
    """
    xp = array_namespace(logits, labels)
    n, k = logits.shape
    logp = log_softmax(logits)  # (N, K)
    onehot = labels[:, None] == xp.arange(k, dtype=labels.dtype, device=_device(labels))  # (N, K)
    zero = xp.zeros((), dtype=logp.dtype, device=_device(logp))
    loss = -xp.sum(xp.where(onehot, logp, zero)) / n
    dlogits = (xp.exp(logp) - xp.astype(onehot, logp.dtype)) / n
    return loss, dlogits
