"""Data augmentation on the device: random shifts (crops with padding), flips, small rotations.

Every transform is one affine map from output to source pixel coordinates, so one function,
:func:`warp`, does them all together: bilinear sampling through computed index grids
(``take`` on the flattened batch), zero outside the picture, with no loop over samples or
pixels. The random parameters of each sample are drawn on the host from the
``numpy.random.Generator`` that ``fit`` passes (its shuffle generator), built into an
``(N, 2, 3)`` matrix and moved to the device once per batch. So the augmentation is seeded
and identical on every backend, and a checkpoint that saves the shuffle generator's state
(as ``xcnn train --save`` does) resumes it exactly: nothing else holds random state.

A random shift by up to ``s`` pixels with zero fill is the same as padding by ``s`` and
cropping back to the original size at a random offset (the usual "random crop").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from array_api_compat import device as device_of

from .backend import array_namespace

Array = Any

__all__ = ["Augment", "parse_augment", "warp"]


def warp(x: Array, theta: Array) -> Array:
    """Resample each image through its affine map, bilinear, zero outside.

    Parameters
    ----------
    x : array (N, C, H, W)
        Any real dtype; integer images come back rounded to their dtype.
    theta : array (N, 2, 3), float32, any namespace (host NumPy is moved to ``x``'s device)
        Row ``k`` maps output coordinates (row, column) measured from the centre,
        ``(i - (H-1)/2, j - (W-1)/2, 1)``, to source coordinates from the centre.

    Returns
    -------
    array (N, C, H, W), like ``x``: ``y[n, c, i, j] = x[n, c, src(i, j)]``.

    **Shapes**: the output has the input's shape; ``OH = H``, ``OW = W``.
    """
    xp = array_namespace(x)
    dev = device_of(x)
    n, c, h, w = (int(d) for d in x.shape)
    f32 = xp.float32
    # The namespace's own index dtype: int64 where it has one (JAX without x64 has int32).
    index = xp.__array_namespace_info__().default_dtypes(device=dev)["indexing"]
    t = xp.asarray(np.asarray(theta, dtype=np.float32), device=dev)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    rows = xp.reshape(xp.arange(h, dtype=f32, device=dev) - cy, (1, h, 1))  # (1, H, 1)
    cols = xp.reshape(xp.arange(w, dtype=f32, device=dev) - cx, (1, 1, w))  # (1, 1, W)

    def coeff(r: int, k: int) -> Array:
        return xp.reshape(t[:, r, k], (n, 1, 1))  # (N, 1, 1)

    src_y = coeff(0, 0) * rows + coeff(0, 1) * cols + (coeff(0, 2) + cy)  # (N, H, W)
    src_x = coeff(1, 0) * rows + coeff(1, 1) * cols + (coeff(1, 2) + cx)  # (N, H, W)
    y0, x0 = xp.floor(src_y), xp.floor(src_x)
    wy, wx = src_y - y0, src_x - x0
    flat = xp.reshape(x, (n * c * h * w,))
    # Offset of each (sample, channel) plane in the flattened batch.
    base = xp.reshape(xp.arange(n * c, dtype=index, device=dev) * (h * w), (n, c, 1))
    out = xp.zeros((n, c, h * w), dtype=f32, device=dev)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):  # the four bilinear neighbours
        yi, xi = y0 + dy, x0 + dx
        inside = (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
        weight = (wy if dy else 1 - wy) * (wx if dx else 1 - wx)
        weight = xp.where(inside, weight, xp.zeros_like(weight))  # zero fill outside
        yc = xp.astype(xp.clip(yi, 0, h - 1), index)
        xc = xp.astype(xp.clip(xi, 0, w - 1), index)
        idx = base + xp.reshape(yc * w + xc, (n, 1, h * w))  # (N, C, H*W)
        vals = xp.take(flat, xp.reshape(idx, (n * c * h * w,)), axis=0)
        vals = xp.reshape(xp.astype(vals, f32), (n, c, h * w))
        out = out + vals * xp.reshape(weight, (n, 1, h * w))
    out = xp.reshape(out, (n, c, h, w))  # (N, C, H, W)
    if xp.isdtype(x.dtype, "integral"):
        return xp.astype(xp.round(out), x.dtype)
    return xp.astype(out, x.dtype)


class Augment:
    """Random shifts, horizontal flips and rotations, applied per sample on the device.

    Use as ``fit(..., augment=Augment(shift=2, rotate=10))``: ``fit`` calls it on every
    training batch (before scaling) as ``augment(xb, rng)``.

    Parameters
    ----------
    shift : int
        Largest shift in pixels, drawn uniformly in ``-shift..shift`` per axis (a random crop
        of the picture padded by ``shift``).
    flip : bool
        Mirror left-right with probability 1/2. Off by default: wrong for digits and text.
    rotate : float
        Largest rotation in degrees, drawn uniformly in ``[-rotate, rotate]``.
    """

    def __init__(self, *, shift: int = 0, flip: bool = False, rotate: float = 0.0) -> None:
        if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
            raise ValueError(f"Augment: shift must be an integer >= 0, got {shift!r}")
        if not (math.isfinite(rotate) and 0 <= rotate <= 180):
            raise ValueError(f"Augment: rotate must be in [0, 180] degrees, got {rotate!r}")
        self.shift, self.flip, self.rotate = shift, bool(flip), float(rotate)

    def matrices(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draw ``n`` samples' parameters: float32 (N, 2, 3) output->source maps (host)."""
        theta = np.zeros((n, 2, 3))
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        if self.rotate:
            a = np.deg2rad(rng.uniform(-self.rotate, self.rotate, n))
            cos, sin = np.cos(a), np.sin(a)
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        if self.flip:
            mirror = np.where(rng.random(n) < 0.5, -1.0, 1.0)
            theta[:, :, 1] *= mirror[:, None]  # source column = -(output column)
        if self.shift:
            # Content moves by +t, so the source is the output minus t.
            theta[:, :, 2] = -rng.integers(-self.shift, self.shift + 1, size=(n, 2))
        return theta.astype(np.float32)

    def __call__(self, xb: Array, rng: np.random.Generator) -> Array:
        if not (self.shift or self.flip or self.rotate):
            return xb
        return warp(xb, self.matrices(int(xb.shape[0]), rng))

    def spec(self) -> str:
        """The ``--augment`` text that rebuilds this (see :func:`parse_augment`)."""
        parts = [f"shift={self.shift}"] if self.shift else []
        parts += ["flip"] if self.flip else []
        parts += [f"rotate={self.rotate:g}"] if self.rotate else []
        return ",".join(parts)

    def __repr__(self) -> str:
        return f"Augment(shift={self.shift}, flip={self.flip}, rotate={self.rotate:g})"


#: Values of a bare ``shift`` / ``rotate`` in :func:`parse_augment`.
DEFAULT_SHIFT, DEFAULT_ROTATE = 2, 10.0


def parse_augment(text: str) -> Augment:
    """``"shift,rotate"``, ``"shift=4,flip"``, ``"rotate=15"`` -> :class:`Augment`.

    A bare ``shift`` is 2 pixels, a bare ``rotate`` 10 degrees; ``flip`` takes no value.
    """
    kw: dict[str, Any] = {}
    for item in (s.strip() for s in text.split(",")):
        name, _, value = item.partition("=")
        try:
            if name == "shift":
                kw["shift"] = int(value) if value else DEFAULT_SHIFT
            elif name == "rotate":
                kw["rotate"] = float(value) if value else DEFAULT_ROTATE
            elif name == "flip" and not value:
                kw["flip"] = True
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"bad --augment item {item!r}: use shift[=PIXELS], rotate[=DEGREES] or flip, "
                "comma-separated"
            ) from None
    return Augment(**kw)
