"""The loss users call: softmax cross-entropy with its inputs checked first."""

from __future__ import annotations

from typing import Any

from . import functional as F
from .backend import array_namespace, device_context

__all__ = ["softmax_cross_entropy", "check_labels"]


def check_labels(
    labels: Any, n: int, num_classes: int, *, where: str = "softmax_cross_entropy"
) -> None:
    """Raise a clear error unless ``labels`` is (n,) integers in ``[0, num_classes)``.

    The range check reads two numbers back from the device, so the training
    loop checks a whole dataset once instead of every batch.
    """
    xp = array_namespace(labels)
    if not xp.isdtype(labels.dtype, "integral"):
        raise TypeError(f"{where}: labels must be integer class indices, got dtype {labels.dtype}")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{where}: expected labels of shape ({n},), got {tuple(labels.shape)}")
    if n and (int(xp.min(labels)) < 0 or int(xp.max(labels)) >= num_classes):
        raise ValueError(
            f"{where}: labels must lie in [0, {num_classes}), got values in "
            f"[{int(xp.min(labels))}, {int(xp.max(labels))}]"
        )


def softmax_cross_entropy(logits: Any, labels: Any, *, check: bool = True) -> tuple[Any, Any]:
    """Mean cross-entropy ``-ln(p_correct)`` of ``softmax(logits)`` and ``dL/dlogits``.

    Parameters
    ----------
    logits : (N, K) floating array.
    labels : (N,) integer class indices in ``[0, K)``, on the same backend and device.
    check : bool
        Validate ``labels`` first (one small device read); the training loop
        turns this off after checking the whole dataset once.

    Returns
    -------
    loss : 0-d array on the device; ``float(loss)`` reads it.
    dlogits : (N, K), ready for ``model.backward``.

    Examples
    --------
    >>> import numpy as np, xcnn
    >>> loss, d = xcnn.softmax_cross_entropy(np.array([[-1.0, 0.0, 3.0, 5.0]]), np.array([3]))
    >>> round(float(loss), 4)  # -ln(e^5 / 169.87)
    0.135
    """
    try:
        xp = array_namespace(logits, labels)
    except TypeError as e:
        raise TypeError(
            f"softmax_cross_entropy: logits and labels must come from the same backend ({e})"
        ) from None
    if logits.ndim != 2:
        raise ValueError(
            f"softmax_cross_entropy: expected logits (N, K), got shape {tuple(logits.shape)}"
        )
    if not xp.isdtype(logits.dtype, "real floating"):
        raise TypeError(f"softmax_cross_entropy: logits must be floating, got dtype {logits.dtype}")
    with device_context(logits):  # the label check computes on the logits' device too
        if check:
            check_labels(labels, logits.shape[0], logits.shape[1])
        return F.softmax_cross_entropy(logits, labels)
