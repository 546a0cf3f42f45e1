"""One name for any data: :func:`load_data` resolves the CLI's ``--data``; :func:`load_npz`.

``--data`` takes ``sample``, ``mnist``, ``fashion-mnist``, ``cifar-10``, a directory (the four
MNIST-format IDX files, the CIFAR-10 binary files, or a folder of pictures: detected in that
order), or an ``.npz`` file of arrays.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from . import datasets
from .cifar import _DIR as _CIFAR_DIR
from .cifar import _TRAIN as _CIFAR_TRAIN
from .cifar import cifar10
from .datasets import DataError, Splits
from .image_folder import image_folder, is_image_folder

__all__ = [
    "FASHION_MNIST_CLASSES",
    "NAMES",
    "describe",
    "load_data",
    "load_npz",
    "num_classes",
]

#: Dataset names ``load_data`` knows (besides paths).
NAMES = ("sample", "mnist", "fashion-mnist", "cifar-10")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_headers(name: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an ``.npz``, from the headers alone.

    A declared size larger than the member's uncompressed size is refused here, before
    ``np.load`` allocates it.
    """
    out = {}
    try:
        with zipfile.ZipFile(name) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(fh)
                key = info.filename[: -len(".npy")]
                if dtype.hasobject:
                    raise DataError(f"{name}: {key} holds Python objects (pickles are refused)")
                declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if declared > info.file_size:
                    raise DataError(
                        f"{name}: {key} declares {shape} {dtype} ({declared:,} bytes) but holds "
                        f"{info.file_size:,} bytes"
                    )
                out[key] = (tuple(shape), dtype)
    except DataError:
        raise
    # zipfile and numpy's header parser raise many types on a damaged file; all mean the same.
    except Exception as e:
        raise DataError(f"{name}: not a readable .npz file ({type(e).__name__}: {e})") from None
    return out


def load_npz(path: str | os.PathLike[str]) -> Splits:
    """Load ``x_train, y_train, x_test, y_test`` (and optionally ``classes``) from an ``.npz``.

    Images are ``(N, C, H, W)`` or ``(N, H, W)`` (one channel) integers in 0..255; labels
    ``(N,)`` integers in ``0..K-1``; ``classes`` a 1-D string array of at least ``K`` names.
    Read without pickle (``allow_pickle=False``) and after checking every header.

    Returns
    -------
    Splits
        ``x_*`` uint8 ``(N, C, H, W)``, ``y_*`` int64, ``classes`` tuple of str or None.

    Raises
    ------
    DataError
        A missing key, wrong shapes or dtypes, out-of-range values, or a damaged file; the
        message names the file and the array.
    """
    name = os.fspath(path)
    if not Path(name).is_file():
        raise FileNotFoundError(2, "No such file or directory", name)
    headers = _npz_headers(name)
    missing = [k for k in _NPZ_KEYS if k not in headers]
    if missing:
        raise DataError(
            f"{name}: missing {', '.join(missing)} (an .npz for --data holds x_train, y_train, "
            "x_test, y_test and optionally classes)"
        )
    with np.load(name, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in (*_NPZ_KEYS, "classes") if k in headers}
    xs = {}
    for k in ("x_train", "x_test"):
        x = arrays[k]
        if x.ndim == 3:
            x = x[:, None]  # (N, H, W) -> (N, 1, H, W)
        if x.ndim != 4 or x.dtype.kind not in "iu":
            raise DataError(
                f"{name}: {k} must be integer images (N, C, H, W) or (N, H, W) in 0..255, got "
                f"{x.dtype} of shape {x.shape}"
            )
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{name}: {k} values must be in 0..255, found {x.min()}..{x.max()}")
        xs[k] = x.astype(np.uint8, copy=False)
    if xs["x_train"].shape[1:] != xs["x_test"].shape[1:]:
        raise DataError(
            f"{name}: x_train images are {xs['x_train'].shape[1:]} but x_test's are "
            f"{xs['x_test'].shape[1:]}"
        )
    ys = {}
    for k, xk in (("y_train", "x_train"), ("y_test", "x_test")):
        y = arrays[k]
        if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(xs[xk]):
            raise DataError(
                f"{name}: {k} must be integer labels ({len(xs[xk])},), got {y.dtype} of "
                f"shape {y.shape}"
            )
        if y.size and y.min() < 0:
            raise DataError(f"{name}: {k} has negative labels")
        ys[k] = y.astype(np.int64)
    classes = None
    if "classes" in arrays:
        c = arrays["classes"]
        if c.ndim != 1 or c.dtype.kind != "U":
            raise DataError(
                f"{name}: classes must be a 1-D array of strings, got {c.dtype} {c.shape}"
            )
        classes = tuple(str(s) for s in c)
        top = max((int(y.max()) for y in ys.values() if y.size), default=-1)
        if top >= len(classes):
            raise DataError(f"{name}: label {top} but only {len(classes)} classes are named")
    return Splits(xs["x_train"], ys["y_train"], xs["x_test"], ys["y_test"], classes)


def _is_idx_dir(root: Path) -> bool:
    return not datasets._find(root)[1]


def load_data(
    spec: str | os.PathLike[str],
    *,
    download: bool = True,
    progress: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    size: int | tuple[int, int] | None = None,
    color: str = "auto",
    test_split: float | None = None,
    seed: int = 0,
) -> Splits:
    """Load the data ``spec`` names: the one resolver behind every ``--data``.

    Parameters
    ----------
    spec : str or path-like
        ``"sample"`` (embedded MNIST subset), ``"mnist"``, ``"fashion-mnist"``, ``"cifar-10"``
        (downloaded into the cache when missing), a directory (MNIST-format IDX files,
        CIFAR-10 binary files, or a folder of pictures, detected in that order) or an
        ``.npz`` file (:func:`load_npz`).
    download, progress, cache_dir
        For the named downloadable datasets (as :func:`xcnn.datasets.mnist`).
    size, color, test_split, seed
        For a folder of pictures (as :func:`xcnn.datasets.image_folder`).

    Returns
    -------
    Splits
        uint8 ``(N, C, H, W)`` images, int64 labels, and ``classes`` where known (the digits
        "0".."9" are implied for MNIST).
    """
    text = os.fspath(spec)
    net = {"download": download, "progress": progress, "cache_dir": cache_dir}
    if text == "sample":
        return datasets.sample()
    if text == "mnist":
        return datasets.mnist(**net)
    if text == "fashion-mnist":
        return datasets.fashion_mnist(**net)._replace(classes=FASHION_MNIST_CLASSES)
    if text in ("cifar-10", "cifar10"):
        return cifar10(**net)
    path = Path(text)
    if path.is_file() and path.suffix.lower() == ".npz":
        return load_npz(path)
    if path.is_file() and text.endswith((".tar.gz", ".tgz")):
        return cifar10(path)
    if path.is_dir():
        if _is_idx_dir(path):
            return datasets.mnist(path)
        if (path / _CIFAR_DIR / _CIFAR_TRAIN[0]).is_file() or (path / _CIFAR_TRAIN[0]).is_file():
            return cifar10(path)
        if is_image_folder(path):
            return image_folder(path, size=size, color=color, test_split=test_split, seed=seed)
        raise DataError(
            f"{text}: not a dataset directory: missing {', '.join(datasets._find(path)[1])} "
            "(MNIST-format IDX files), no CIFAR-10 binary files and no class subfolders "
            "holding .png/.jpg/.bmp pictures"
        )
    if path.exists():
        raise DataError(f"{text}: not a dataset (expected a directory or an .npz file)")
    raise ValueError(
        f"unknown dataset {text!r}: choose one of {', '.join(NAMES)}, a directory (IDX files, "
        "CIFAR-10 files or a folder of pictures) or an .npz file"
    )


def num_classes(splits: Splits) -> int:
    """K: the named classes, else one more than the largest label."""
    top = max(int(y.max()) for y in (splits.y_train, splits.y_test) if y.size)
    return max(len(splits.classes or ()), top + 1)


def describe(splits: Splits) -> dict[str, Any]:
    """Input shape (C, H, W) and class count of the data, for building a model."""
    return {"input_shape": tuple(int(d) for d in splits.x_train.shape[1:]),
            "num_classes": num_classes(splits)}  # fmt: skip
