"""Prepare a digit image the way MNIST's were made: crop, fit into 20x20, centre by mass.

MNIST's digits were "size normalized to fit in a 20x20 pixel box while preserving
their aspect ratio ... and centered in a 28x28 image by computing the center of
mass of the pixels, and translating the image so as to position this point at
the center of the 28x28 field" (LeCun, Cortes and Burges, the MNIST page). A
model trained on MNIST expects exactly that framing, so a digit drawn anywhere
on a large canvas, or photographed, is classified about as well as a test digit
only after the same steps: :func:`center_digit` does them.

"The center of the 28x28 field" is taken as MNIST has it, measured: in pixel
index coordinates (pixel ``i`` at coordinate ``i``) the centres of mass of the
embedded sample's 2,000 test digits lie in 13.5..14.5 on both axes (mean 13.99
rows, 14.01 columns), so MNIST put the centre of mass at index 14 with a whole-
pixel shift. :data:`CENTRE` is that point; placing it at the geometric 13.5
instead moves every digit half a pixel from where models trained on MNIST
expect it (thin strokes make that matter: it costs accuracy).

The resize is one fixed method, written here in NumPy so that the result is
the same with or without Pillow installed: a separable, antialiased linear
("triangle") filter whose support widens with the reduction factor, the
method of Pillow's ``Image.resize(..., BILINEAR)``. Each output pixel is a
normalised, non-negative weighted mean of input pixels, so values stay in
0..1 and a constant image stays constant.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FIELD", "BOX", "CENTRE", "INK", "center_digit", "resize"]

#: Side of the output field, in pixels.
FIELD = 28
#: Side of the box the digit's bounding box is fitted into, keeping its aspect ratio.
BOX = 20
#: Where the centre of mass goes, in pixel index coordinates (row, column): MNIST's.
CENTRE = FIELD / 2
#: Pixels brighter than this are ink (those that would round to a non-zero 8-bit value).
INK = 0.5 / 255


def _filter_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Weights (n_out, n_in) of a 1-D antialiased linear resize from n_in to n_out samples."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # widen the triangle when shrinking: antialiasing
    centres = (np.arange(n_out) + 0.5) * scale  # output pixel centres in input coordinates
    offsets = (np.arange(n_in) + 0.5)[None, :] - centres[:, None]  # (n_out, n_in)
    weights = np.clip(1.0 - np.abs(offsets) / support, 0.0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a 2-D float image with the antialiased linear filter (see module docstring).

    Parameters
    ----------
    image : numpy.ndarray (H, W), floating
    height, width : int
        Output size, each >= 1.

    Returns
    -------
    numpy.ndarray (height, width), float64
    """
    if height < 1 or width < 1:
        raise ValueError(f"resize: output size must be >= 1, got {height}x{width}")
    rows = _filter_matrix(image.shape[0], height)  # (height, H)
    cols = _filter_matrix(image.shape[1], width)  # (width, W)
    return rows @ np.asarray(image, dtype=np.float64) @ cols.T  # (height, width)


def _check(image: Any) -> np.ndarray:
    try:
        a = np.asarray(image)
    except (TypeError, ValueError) as e:  # ragged nested lists
        raise ValueError(f"center_digit: expected a 2-D image (H, W), not readable: {e}") from None
    if a.dtype.kind not in "fiu":
        raise ValueError(f"center_digit: expected a real-valued image (H, W), got dtype {a.dtype}")
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(
            f"center_digit: expected a non-empty 2-D image (H, W), got shape {a.shape}"
        )
    if a.dtype.kind != "f":
        raise ValueError(
            f"center_digit: expected floats 0..1, got integer dtype {a.dtype}; divide 8-bit "
            "images by 255 first"
        )
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError("center_digit: the image holds NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"center_digit: expected values in 0..1 (white digit on black), got {lo:g}..{hi:g}"
        )
    return a


def center_digit(image: Any) -> np.ndarray:
    """Frame a white-on-black digit as MNIST does: 20x20 box, centre of mass at the centre.

    Steps: crop to the bounding box of the ink (pixels > :data:`INK`); resize it so
    its longer side is 20 px and the shorter keeps the aspect ratio (at least 1 px),
    with the antialiased linear filter of :func:`resize`; paste it into a black
    28x28 field, shifted by whole pixels so that its centre of mass lands on the
    field's centre, :data:`CENTRE` = (14, 14) in pixel index coordinates as
    in MNIST, within half a pixel. (A digit whose mass lies very
    far off its box centre could be clipped by that shift; real digits never are.)

    Parameters
    ----------
    image : array-like (H, W) of floats in 0..1
        White (1) digit on black (0), any size. Invert black-on-white images
        first (``1 - image``).

    Returns
    -------
    numpy.ndarray (28, 28), float32, values in 0..1
        All zeros for an image without ink.

    Raises
    ------
    ValueError
        Not a non-empty 2-D array of finite floats in 0..1 (integer images
        must be divided by 255 first).

    Examples
    --------
    >>> import numpy as np
    >>> from xcnn.digits import center_digit
    >>> canvas = np.zeros((280, 280))
    >>> canvas[20:120, 200:250] = 1.0  # a bar in the top-right corner
    >>> out = center_digit(canvas)
    >>> out.shape, out.dtype
    ((28, 28), dtype('float32'))
    >>> rows, cols = np.nonzero(out > 0.5)
    >>> int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    (20, 10)
    """
    a = _check(image)
    rows = np.flatnonzero((a > INK).any(axis=1))
    cols = np.flatnonzero((a > INK).any(axis=0))
    if rows.size == 0:
        return np.zeros((FIELD, FIELD), dtype=np.float32)
    crop = a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # (h, w) bounding box
    h, w = crop.shape
    side = max(h, w)
    oh, ow = max(1, round(BOX * h / side)), max(1, round(BOX * w / side))
    digit = np.clip(resize(crop, oh, ow), 0.0, 1.0)  # (oh, ow), longer side 20
    # Centre of mass in pixel index coordinates, as CENTRE is.
    mass = digit.sum()
    cy = float((digit.sum(axis=1) * np.arange(oh)).sum() / mass)
    cx = float((digit.sum(axis=0) * np.arange(ow)).sum() / mass)
    top, left = int(np.floor(CENTRE - cy + 0.5)), int(np.floor(CENTRE - cx + 0.5))
    out = np.zeros((FIELD, FIELD), dtype=np.float32)
    # Paste with clipping at the field's edges (slices of the digit that stay inside).
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + oh, FIELD), min(left + ow, FIELD)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = digit[y0 - top : y1 - top, x0 - left : x1 - left]
    return out
