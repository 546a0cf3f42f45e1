"""Optimizer updates as pure functions: new parameter (and state) from old, nothing mutated.

:mod:`xcnn.optim` keeps the state and the step count; the arithmetic is
here, delegated like every op (:mod:`xcnn.kernels`), so a library's kernel
set may fuse an update into one pass. A state of None means the first step
(the state is then zeros, so it is not needed).

``weight_decay`` is decoupled (Loshchilov & Hutter's AdamW): the parameter
shrinks by ``lr * weight_decay * p`` in the same expression as the step, and
the decay never passes through the momentum or Adam's normalisation.
"""

from __future__ import annotations

import math
from typing import Any

from .backend import array_namespace
from .kernels import delegate

Array = Any

__all__ = ["sgd_update", "momentum_update", "adam_update"]


@delegate
def sgd_update(p: Array, g: Array, *, lr: float, weight_decay: float = 0.0) -> Array:
    """Plain gradient descent, the tutorial's ``p <- p - lr * g`` (minus ``lr * wd * p``)."""
    if weight_decay:
        return p - lr * (g + weight_decay * p)
    return p - lr * g


@delegate
def momentum_update(
    p: Array,
    g: Array,
    velocity: Array | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float = 0.0,
) -> tuple[Array, Array]:
    """Heavy-ball momentum in PyTorch's form: ``v <- mu * v + g``, ``p <- p - lr * v``.

    Returns ``(p, velocity)``; the first step (``velocity=None``) takes ``v = g``.
    """
    v = g if velocity is None else momentum * velocity + g
    if weight_decay:
        return p - lr * (v + weight_decay * p), v
    return p - lr * v, v


@delegate
def adam_update(
    p: Array,
    g: Array,
    m: Array | None,
    v: Array | None,
    *,
    lr: float,
    step: int,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[Array, Array, Array]:
    """Adam with bias-corrected moments; ``step`` counts from 1. Returns ``(p, m, v)``.

    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
    ``p <- p - lr * m_hat / (sqrt(v_hat) + eps) - lr * weight_decay * p``.
    """
    xp = array_namespace(p, g)
    b1, b2 = beta1, beta2
    m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g
    v = (1 - b2) * g * g if v is None else b2 * v + (1 - b2) * g * g
    # Bias correction folded into the step size: one scalar instead of two arrays.
    size = lr * math.sqrt(1 - b2**step) / (1 - b1**step)
    eps_hat = eps * math.sqrt(1 - b2**step)
    if weight_decay:
        return p - (size * m / (xp.sqrt(v) + eps_hat) + (lr * weight_decay) * p), m, v
    return p - size * m / (xp.sqrt(v) + eps_hat), m, v
