"""Pure functions of the layers beyond the tutorial's: batch norm, dropout, global average.

Like :mod:`xcnn.functional`: each function finds the namespace of its inputs,
uses only array-API operations, keeps no state and never writes into an
input; forward and backward sit side by side with the calculus in a comment.
The layers that call them are in :mod:`xcnn.blocks`.

Shape symbols: ``N, C, H, W``; ``M = N * H * W``, the number of values each
channel's batch statistics are taken over.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import device as _device

from .backend import array_namespace

Array = Any

__all__ = [
    "batch_norm_train",
    "batch_norm_backward",
    "batch_norm_eval",
    "running_stats",
    "dropout",
    "dropout_backward",
    "global_avg_pool2d",
    "global_avg_pool2d_backward",
]

_AXES = (0, 2, 3)  # every axis but the channel's


def _per_channel(v: Array) -> Array:
    """(C,) -> (1, C, 1, 1), to broadcast against an NCHW batch."""
    xp = array_namespace(v)
    return xp.reshape(v, (1, -1, 1, 1))  # (1, C, 1, 1)


# ---------------------------------------------------------------------------
# Batch normalisation (Ioffe & Szegedy, 2015)
# ---------------------------------------------------------------------------


def batch_norm_train(
    x: Array, w: Array, b: Array, eps: float
) -> tuple[Array, Array, Array, Array, Array]:
    """Normalise each channel with the batch's own mean and variance, then scale and shift.

    ``mu = mean(x)``, ``var = mean((x - mu)^2)`` over (N, H, W) per channel
    (the biased variance, as the normalisation uses it),
    ``xhat = (x - mu) / sqrt(var + eps)``, ``y = w * xhat + b``.

    Parameters
    ----------
    x : (N, C, H, W)
    w, b : (C,) scale ``gamma`` and shift ``beta``.
    eps : float, keeps the division finite for a constant channel.

    Returns
    -------
    y : (N, C, H, W)
    xhat : (N, C, H, W), saved for the backward.
    inv_std : (C,) ``1 / sqrt(var + eps)``, saved for the backward.
    mean, var : (C,) the batch statistics (biased variance), for the running estimates.
    """
    xp = array_namespace(x, w, b)
    mean = xp.mean(x, axis=_AXES)  # (C,)
    centred = x - _per_channel(mean)
    var = xp.mean(centred * centred, axis=_AXES)  # (C,); two passes: no cancellation
    inv_std = 1.0 / xp.sqrt(var + eps)
    xhat = centred * _per_channel(inv_std)
    return _per_channel(w) * xhat + _per_channel(b), xhat, inv_std, mean, var


def batch_norm_backward(
    dy: Array, xhat: Array, inv_std: Array, w: Array
) -> tuple[Array, Array, Array]:
    """Gradients of :func:`batch_norm_train` (batch statistics depend on x too).

    With ``g = dL/dxhat = w * dy`` and ``M`` values per channel:
    ``dxhat_i/dx_j = (delta_ij - 1/M - xhat_i xhat_j / M) * inv_std``
    (the ``1/M`` from the mean, the ``xhat xhat / M`` from the variance), so

    ``dx = inv_std * (g - mean(g) - xhat * mean(g * xhat))``,
    ``dw = sum(dy * xhat)``, ``db = sum(dy)``, sums and means over (N, H, W).

    Returns
    -------
    dx : (N, C, H, W); dw, db : (C,)
    """
    xp = array_namespace(dy, xhat, inv_std, w)
    db = xp.sum(dy, axis=_AXES)  # (C,)
    dw = xp.sum(dy * xhat, axis=_AXES)  # (C,)
    m = dy.shape[0] * dy.shape[2] * dy.shape[3]
    # mean(g) = w * db / M and mean(g * xhat) = w * dw / M: reuse the two sums.
    scale = _per_channel(w * inv_std)  # (1, C, 1, 1)
    dx = scale * (dy - _per_channel(db / m) - xhat * _per_channel(dw / m))
    return dx, dw, db


def batch_norm_eval(
    x: Array, w: Array, b: Array, running_mean: Array, running_var: Array, eps: float
) -> Array:
    """Inference: the same normalisation with the running statistics, one affine map.

    ``y = w * (x - running_mean) / sqrt(running_var + eps) + b``; each output
    depends on its own input only, so evaluation never depends on the batch.
    """
    xp = array_namespace(x, w, b, running_mean, running_var)
    scale = w / xp.sqrt(running_var + eps)  # (C,)
    return x * _per_channel(scale) + _per_channel(b - running_mean * scale)


def running_stats(
    running_mean: Array, running_var: Array, mean: Array, var: Array, m: int, momentum: float
) -> tuple[Array, Array]:
    """PyTorch's update of the running estimates after one training batch.

    ``running = (1 - momentum) * running + momentum * batch``, where the
    variance entering the estimate is the unbiased one, ``var * M / (M - 1)``
    (``M`` values per channel; ``M = 1`` uses the biased one, as there is no other).
    """
    unbiased = var * (m / (m - 1)) if m > 1 else var
    new_mean = (1.0 - momentum) * running_mean + momentum * mean
    new_var = (1.0 - momentum) * running_var + momentum * unbiased
    return new_mean, new_var


# ---------------------------------------------------------------------------
# Dropout (Srivastava et al., 2014), inverted: the scaling happens in training
# ---------------------------------------------------------------------------


def dropout(x: Array, keep: Array, p: float) -> Array:
    """Zero the entries where ``keep`` is False, scale the rest by ``1 / (1 - p)``.

    The scaling keeps ``E[y] = x``, so evaluation is the identity. ``keep`` is
    a boolean array of ``x``'s shape (drawn by the caller: the array API has no RNG).
    """
    xp = array_namespace(x, keep)
    return xp.where(keep, x * (1.0 / (1.0 - p)), xp.zeros((), dtype=x.dtype, device=_device(x)))


def dropout_backward(dy: Array, keep: Array, p: float) -> Array:
    """``y = x * keep / (1 - p)`` is linear in x: ``dx = dy * keep / (1 - p)``."""
    return dropout(dy, keep, p)


# ---------------------------------------------------------------------------
# Global average pooling
# ---------------------------------------------------------------------------


def global_avg_pool2d(x: Array) -> Array:
    """Mean of each channel's whole map: (N, C, H, W) -> (N, C)."""
    return array_namespace(x).mean(x, axis=(2, 3))


def global_avg_pool2d_backward(dy: Array, x_shape: tuple[int, ...]) -> Array:
    """Every pixel of a map contributed ``1 / (H W)`` of its mean: ``dx = dy / (H W)``, spread.

    dy (N, C) -> dx (N, C, H, W).
    """
    xp = array_namespace(dy)
    n, c, h, w = x_shape
    spread = xp.reshape(dy / (h * w), (n, c, 1, 1))  # (N, C, 1, 1)
    return xp.broadcast_to(spread, (n, c, h, w))
