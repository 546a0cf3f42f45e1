"""Reading real pictures safely, and preparing them for a model's input.

Host-side NumPy and Pillow. :func:`read_image` turns any PNG/JPEG/BMP/... (any mode: 1-bit,
8- or 16-bit grey, palette, alpha, RGB, CMYK) or a ``.npy`` array into float32 intensities
in 0..1 with their full range, ``(H, W)`` for grey content or ``(H, W, 3)`` for colour.
:func:`prepare_image` fits one to a model's ``(C, H, W)``: for MNIST-shaped models
(``(1, 28, 28)``) the digit is centred the way MNIST was made
(:func:`xcnn.digits.center_digit`) after inverting dark-on-light pictures; other models get a
plain resize.

Hostile files end in :class:`ImageError` naming the file, never a Pillow traceback: the pixel
count in the header is checked against ``max_pixels`` *before* anything is decoded (so a
decompression bomb allocates nothing), and so is a ``.npy`` header's shape.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import DataError
from .digits import center_digit
from .digits import resize as _resize2d

__all__ = [
    "MAX_PIXELS",
    "ImageError",
    "open_image",
    "read_image",
    "to_grayscale",
    "is_dark_on_light",
    "resize",
    "prepare_image",
    "prepare_images",
    "predict_files",
    "intensities",
]

#: Largest picture read, in pixels (width x height): 8192 x 4096. Checked from the header
#: before decoding; a float32 RGB copy of the largest picture is 400 MB.
MAX_PIXELS = 8192 * 4096

# Pillow modes whose content is grey (one channel) and how they are scaled to 0..1.
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# ITU-R BT.601 luma, the weights Pillow's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class ImageError(DataError):
    """A picture cannot be read: unknown format, corrupt, too large, or unusable values."""


def _pillow(path: str) -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(
            f"{path}: reading PNG/JPEG images needs Pillow: pip install 'xcnn[png]' "
            "(or save the image as a .npy array)"
        ) from None
    return Image


def open_image(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS) -> Any:
    """Open a picture with Pillow, reading only its header; refuse one over ``max_pixels``.

    Returns the lazy ``PIL.Image.Image`` (close it, or use it in a ``with``); its pixels are
    decoded only by ``load()``/``convert()``. Pillow's own decompression-bomb error and
    warning become :class:`ImageError` too.

    Raises
    ------
    FileNotFoundError
        No such file.
    ImageError
        Not an image Pillow knows, a broken header, or more than ``max_pixels`` pixels.
    """
    name = os.fspath(path)
    Image = _pillow(name)
    if not Path(name).is_file():
        raise FileNotFoundError(2, "No such file or directory", name)
    with warnings.catch_warnings():
        # Pillow warns (and raises above twice its own cap) from open(); make both refusals.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(name)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"{name}: refused as a decompression bomb ({e})") from None
        # Pillow's format plugins raise many types on broken headers (SyntaxError, struct.error,
        # ValueError, ...): all mean "not a readable image", which is what the user must hear.
        except Exception as e:
            raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    width, height = img.size
    if width * height > max_pixels or width <= 0 or height <= 0:
        img.close()
        raise ImageError(
            f"{name}: refused: the header declares {width}x{height} = {width * height:,} "
            f"pixels, more than the cap of {max_pixels:,} (a decompression bomb?)"
        )
    return img


def _decode(img: Any, name: str) -> np.ndarray:
    """A checked, opened picture -> float32 0..1, (H, W) or (H, W, 3), alpha composited."""
    mode = img.mode
    if mode == "P" or mode == "PA":
        mode = "RGBA" if ("transparency" in img.info or mode == "PA") else "RGB"
        img = img.convert(mode)
    if mode == "1":
        return np.asarray(img, dtype=np.float32)
    if mode.startswith("I;16"):
        # 16-bit grey: the full 0..65535 range (convert("L") would clip it to 0/255).
        return np.asarray(img).astype(np.float32) / 65535.0
    if mode == "I":
        a = np.asarray(img)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageError(f"{name}: 32-bit integer image with values outside 0..65535")
        return a.astype(np.float32) / 65535.0
    if mode == "F":
        a = np.asarray(img, dtype=np.float32)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise ImageError(f"{name}: floating-point image with values outside [0, 1]")
        return a
    if mode == "L":
        return np.asarray(img).astype(np.float32) / 255.0
    if mode in ("LA", "La"):
        la = np.asarray(img.convert("LA")).astype(np.float32) / 255.0
        return _composite(la[..., :1], la[..., 1])[..., 0]
    if mode in ("RGBA", "RGBa") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA")).astype(np.float32) / 255.0
        return _composite(rgba[..., :3], rgba[..., 3])
    return np.asarray(img.convert("RGB")).astype(np.float32) / 255.0


def _composite(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Flatten onto the background that contrasts with the opaque strokes.

    A black pen on a transparent canvas is black on white (then inverted for digit models),
    a white pen is white on black; compositing always onto black would lose the first.
    """
    if alpha.min() >= 1.0:
        return colour
    grey = colour @ _LUMA if colour.shape[-1] == 3 else colour[..., 0]
    weight = float(alpha.sum())
    ink = float((grey * alpha).sum()) / weight if weight > 0 else 1.0
    background = 1.0 if ink < 0.5 else 0.0
    a = alpha[..., None]
    return (colour * a + background * (1.0 - a)).astype(np.float32)


def _read_npy(name: str, max_pixels: int) -> np.ndarray:
    if not Path(name).is_file():
        raise FileNotFoundError(2, "No such file or directory", name)
    fmt = np.lib.format
    try:
        with open(name, "rb") as fh:
            # The header alone first: shape and dtype are checked before any data is read.
            version = fmt.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy version {version}")
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(fh)
            count = int(np.prod(shape, dtype=object))
            if dtype.hasobject:
                raise ValueError("it holds Python objects (pickles are refused)")
            if count > 4 * max_pixels:
                raise ImageError(
                    f"{name}: refused: shape {shape} is more than {max_pixels:,} pixels"
                )
            available = os.fstat(fh.fileno()).st_size - fh.tell()
            if count * dtype.itemsize != available:
                raise ValueError(
                    f"header declares {count * dtype.itemsize} bytes, file holds {available}"
                )
            a = np.fromfile(fh, dtype=dtype, count=count).reshape(
                shape, order="F" if fortran else "C"
            )
    except ImageError:
        raise
    # numpy's header parser raises many types on hostile bytes; all mean "not a .npy array".
    except Exception as e:
        raise ImageError(f"{name}: not a readable .npy array ({type(e).__name__}: {e})") from None
    if a.dtype == np.bool_:
        raise ImageError(
            f"{name}: a bool array is a mask, not intensities: save it as uint8 0/255 "
            "(a.astype(np.uint8) * 255)"
        )
    while a.ndim > 2 and 1 in (a.shape[0], a.shape[-1]):  # (1, H, W), (H, W, 1), (1, 1, H, W)
        a = a[0] if a.shape[0] == 1 else a[..., 0]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)  # (C, H, W) -> (H, W, C)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)) or 0 in a.shape:
        raise ImageError(
            f"{name}: expected an image (H, W), (H, W, 3) or (3, H, W), got shape {a.shape}"
        )
    if a.dtype.kind == "f":
        if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise ImageError(f"{name}: float images must hold intensities in [0, 1]")
        return a.astype(np.float32)
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if a.dtype.kind in "iu":
        if a.min() < 0 or a.max() > 255:
            raise ImageError(f"{name}: integer images must hold intensities in 0..255")
        return a.astype(np.float32) / 255.0
    raise ImageError(f"{name}: unsupported image dtype {a.dtype}")


def read_image(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read a picture (any format and mode Pillow reads) or a ``.npy`` array.

    Parameters
    ----------
    path : path-like
        ``.npy``: uint8 0..255, uint16 0..65535, other integers 0..255 or floats 0..1, shaped
        ``(H, W)``, ``(H, W, 3)`` or ``(3, H, W)`` (outer singleton axes dropped); bool
        masks are refused. Anything else is decoded by Pillow: 16-bit grey keeps its 65536
        levels, palettes are expanded, and transparent pixels take the background colour
        that contrasts with the opaque ones.
    max_pixels : int
        Refuse a picture whose header declares more pixels (checked before decoding).

    Returns
    -------
    numpy.ndarray
        float32 intensities in 0..1: ``(H, W)`` when the content is grey (also an RGB file
        whose three channels are equal), else ``(H, W, 3)``.

    Raises
    ------
    ImageError
        Unreadable, corrupt, too large, a bool mask, or values out of range; names the file.
    FileNotFoundError, ImportError
        No such file; Pillow missing for a non-``.npy`` file.
    """
    name = os.fspath(path)
    if Path(name).suffix.lower() == ".npy":
        image = _read_npy(name, max_pixels)
    else:
        with open_image(name, max_pixels=max_pixels) as img:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # e.g. Pillow's warnings on odd chunks
                    image = _decode(img, name)
            except ImageError:
                raise
            # As in open_image: any decoder failure (truncated data, bad chunk) is the file's.
            except Exception as e:
                raise ImageError(f"{name}: cannot decode ({type(e).__name__}: {e})") from None
    if image.ndim == 3 and (image == image[..., :1]).all():
        image = image[..., 0]
    return np.ascontiguousarray(image, dtype=np.float32)


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """(H, W) stays; (H, W, 3) -> (H, W) by BT.601 luma (as Pillow's ``convert("L")``)."""
    return image if image.ndim == 2 else (image @ _LUMA).astype(np.float32)


def is_dark_on_light(image: np.ndarray) -> bool:
    """True when the picture's border (its background) is brighter than mid-grey.

    MNIST digits are white on black; a digit drawn with a dark pen on paper is the opposite.
    The border ring (a tenth of the shorter side, at least one pixel) stands for the background.
    """
    grey = to_grayscale(image)
    h, w = grey.shape
    k = max(1, min(h, w) // 10)
    ring = np.concatenate(
        [grey[:k].ravel(), grey[-k:].ravel(), grey[:, :k].ravel(), grey[:, -k:].ravel()]
    )
    return float(np.median(ring)) > 0.5


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased linear resize of (H, W) or (H, W, C) pixels (:func:`xcnn.digits.resize`).

    NumPy only, the method of Pillow's ``resize(..., BILINEAR)``; float32 out.
    """
    if image.shape[:2] == (height, width):
        return image.astype(np.float32, copy=False)
    if image.ndim == 2:
        return _resize2d(image, height, width).astype(np.float32)
    # At most 3 channels: a loop over colours, not pixels.
    planes = [_resize2d(image[..., k], height, width) for k in range(image.shape[-1])]
    return np.stack(planes, axis=-1).astype(np.float32)


def prepare_image(
    image: np.ndarray,
    input_shape: Sequence[int],
    *,
    invert: bool | None = None,
    digit: bool | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Fit a picture from :func:`read_image` to a model's input.

    Parameters
    ----------
    image : (H, W) or (H, W, 3) float array, intensities 0..1
    input_shape : (C, H, W)
        The model's input; ``C`` is 1 (grey) or 3 (RGB).
    invert : bool, optional
        ``True``/``False`` forces it; ``None`` (default) inverts dark-on-light pictures for
        digit models, with a note, and never for others.
    digit : bool, optional
        Prepare as MNIST was made (centre the digit with :func:`xcnn.digits.center_digit`);
        default: when ``input_shape`` is ``(1, 28, 28)``. A picture already 28x28 is used
        as given (it is in MNIST's format).

    Returns
    -------
    (numpy.ndarray, list of str)
        float32 ``(C, H, W)`` intensities in 0..1, and notes for the user (e.g. "inverted").
    """
    c, h, w = (int(d) for d in input_shape)
    if c not in (1, 3):
        raise ValueError(f"cannot prepare a picture for {c}-channel input {tuple(input_shape)}")
    digit = (c, h, w) == (1, 28, 28) if digit is None else digit
    notes = []
    if invert is None and digit and is_dark_on_light(image):
        invert = True
        notes.append("dark on light: inverted to white on black as in MNIST (--no-invert keeps it)")
    if invert:
        image = 1.0 - image
    if c == 1:
        image = to_grayscale(image)
    elif image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if digit and c == 1 and image.shape != (28, 28):
        image = resize(center_digit(image), h, w)
    else:
        image = resize(image, h, w)
    chw = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)  # (C, H, W)
    return np.ascontiguousarray(chw, dtype=np.float32), notes


def prepare_images(
    paths: Sequence[str | os.PathLike[str]],
    input_shape: Sequence[int],
    *,
    invert: bool | None = None,
    max_pixels: int = MAX_PIXELS,
) -> tuple[np.ndarray, list[list[str]]]:
    """Read and prepare several pictures: float32 ``(N, C, H, W)`` in 0..1, and notes per file.

    Files are read one at a time, so memory holds one full-size picture at once.
    """
    c, h, w = (int(d) for d in input_shape)
    x = np.empty((len(paths), c, h, w), dtype=np.float32)  # filled file by file (host buffer)
    notes = []
    for i, path in enumerate(paths):
        x[i], note = prepare_image(
            read_image(path, max_pixels=max_pixels), (c, h, w), invert=invert
        )
        notes.append(note)
    return x, notes


def predict_files(
    model: Any,
    paths: Sequence[str | os.PathLike[str]],
    *,
    input_shape: Sequence[int] | None = None,
    invert: bool | None = None,
    scale: str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> tuple[np.ndarray, list[list[str]]]:
    """Class probabilities of picture files: :func:`prepare_images`, scaling, ``predict``.

    Parameters
    ----------
    model : Sequential
    paths : sequence of path-like
    input_shape : (C, H, W), optional
        Default: ``model.input_shape``, else MNIST's ``(1, 28, 28)``.
    invert : bool, optional
        As for :func:`prepare_image`.
    scale : str, optional
        Input scaling (:data:`xcnn.training.SCALES`); default ``model.scale``, else
        ``"centered"``.

    Returns
    -------
    (numpy.ndarray, list of list of str)
        Probabilities ``(N, K)`` and the notes of each file (e.g. that it was inverted).
    """
    from .training import predict, scale_images  # noqa: PLC0415 (training is heavier)

    shape = input_shape or getattr(model, "input_shape", None) or (1, 28, 28)
    x, notes = prepare_images(paths, shape, invert=invert, max_pixels=max_pixels)
    scale = scale or getattr(model, "scale", None) or "centered"
    # Scaled here, as in training, so predict() takes the floats as given.
    x = scale_images(x * 255.0, scale, np.dtype(model.dtype))
    return predict(model, x), notes


def intensities(image: np.ndarray) -> np.ndarray:
    """A picture from :func:`read_image` (0..1) as float64 intensities 0..255."""
    return np.asarray(image, dtype=np.float64) * 255.0
