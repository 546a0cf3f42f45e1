"""Reading images for ``xcnn predict`` and ``xcnn sobel``: PNG (or any Pillow format) or .npy.

(Moved here from the command line unchanged, so library users read images the way the
CLI does; the data branch's hardened version replaces this module when merged.)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

__all__ = ["read_image", "intensities"]


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """A 2-D grayscale image from a PNG (or any format Pillow reads) or a .npy file.

    Returns
    -------
    numpy.ndarray
        uint8 0..255 (integers) or float 0..1 (floats), singleton axes removed.

    Raises
    ------
    FileNotFoundError, OSError
        Missing or unreadable file (Pillow's unknown format is an OSError).
    ValueError
        Not a 2-D image, intensities out of range, unsupported dtype; names the file.
    ImportError
        A PNG without Pillow installed.
    """
    path = os.fspath(path)
    if Path(path).suffix.lower() == ".npy":
        if not Path(path).is_file():
            raise FileNotFoundError(2, "No such file or directory", path)
        try:
            _check_npy_size(path)
            image = np.load(path, allow_pickle=False)
        except (ValueError, EOFError) as e:
            raise ValueError(f"{path}: not a readable .npy array ({e})") from None
    else:
        try:
            from PIL import Image
        except ImportError:
            raise ImportError(
                f"{path}: reading PNG images needs Pillow: pip install 'xcnn[png]' "
                "(or save the image as a .npy array)"
            ) from None
        with Image.open(path) as img:  # a missing file or unknown format is an OSError
            image = np.asarray(img.convert("L"))
    image = np.squeeze(image)
    if image.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D grayscale image, got shape {image.shape}")
    if image.dtype.kind == "f":
        if image.size and not (np.isfinite(image).all() and 0 <= image.min() and image.max() <= 1):
            raise ValueError(f"{path}: float images must hold intensities in [0, 1]")
    elif image.dtype.kind in "iub":
        if image.size and (image.min() < 0 or image.max() > 255):
            raise ValueError(f"{path}: integer images must hold intensities in 0..255")
    else:
        raise ValueError(f"{path}: unsupported image dtype {image.dtype}")
    return image


def _check_npy_size(path: str) -> None:
    """Refuse a .npy whose header declares more data than the file holds, before np.load
    allocates it (a 100-byte file may declare terabytes)."""
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(fh)
        # numpy parses the header as a Python literal: tokenize and syntax errors too.
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"bad .npy header: {type(e).__name__}: {e}") from None
        declared = math.prod(shape) * dtype.itemsize
        available = os.fstat(fh.fileno()).st_size - fh.tell()
    if dtype.hasobject or declared != available:
        raise ValueError(
            f"header declares {declared} bytes of {dtype} {tuple(shape)}, file holds {available}"
        )


def intensities(image: np.ndarray) -> np.ndarray:
    """Any image from :func:`read_image` as float64 intensities 0..255."""
    x = image.astype(np.float64)
    return x * 255.0 if image.dtype.kind == "f" else x
