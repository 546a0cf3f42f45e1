"""A folder of one's own pictures as a dataset: one subfolder per class.

Two layouts, detected: ``root/train/<class>/*`` and ``root/test/<class>/*``, or
``root/<class>/*`` split by a seeded, stratified ``test_split``. Files ending in .png, .jpg,
.jpeg or .bmp (any case) are read; hidden files and other names are ignored.

Memory stays bounded: every header is read first (size, mode: nothing decoded), then the
uint8 ``(N, C, H, W)`` array is allocated once from the file count and filled one decoded
picture at a time, so the peak is the dataset itself plus one picture.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .datasets import DataError, Splits
from .images import _GREY_MODES, MAX_PIXELS, open_image, read_image, resize

__all__ = ["EXTENSIONS", "image_folder", "is_image_folder"]

#: File name endings read as pictures (compared in lower case).
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
_COLORS = ("auto", "gray", "rgb")


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def _classes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def is_image_folder(root: str | os.PathLike[str]) -> bool:
    """True when ``root`` has class subfolders holding pictures (either layout)."""
    root = Path(root)
    if not root.is_dir():
        return False
    base = root / "train" if (root / "train").is_dir() and (root / "test").is_dir() else root
    return any(_images_in(base / c) for c in _classes(base))


def _scan(
    folder: Path, classes: Sequence[str] | None = None
) -> tuple[list[str], list[Path], list[int]]:
    """Class names, files and labels under ``folder``; an empty class is an error."""
    names = _classes(folder)
    if not names:
        raise DataError(f"{folder}: no class subfolders (expected {folder}/<class>/*.png)")
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise DataError(f"{folder}: classes {unknown} are not in the training set")
        names = list(classes)
    files, labels = [], []
    for k, name in enumerate(names):
        found = _images_in(folder / name) if (folder / name).is_dir() else []
        if not found and classes is None:
            raise DataError(f"{folder / name}: empty class: no {'/'.join(EXTENSIONS)} files")
        files += found
        labels += [k] * len(found)
    return names, files, labels


def _headers(files: Sequence[Path], max_pixels: int) -> tuple[list[tuple[int, int]], bool]:
    """(height, width) of every file and whether any is colour, from the headers alone."""
    sizes, colour = [], False
    for path in files:
        with open_image(path, max_pixels=max_pixels) as img:
            sizes.append((img.size[1], img.size[0]))
            colour = colour or img.mode not in _GREY_MODES
    return sizes, colour


def _decode_all(
    files: Sequence[Path], channels: int, size: tuple[int, int], max_pixels: int
) -> tuple[np.ndarray, bool]:
    """uint8 (N, C, H, W), decoded one file at a time; also whether every picture was grey."""
    h, w = size
    x = np.empty((len(files), channels, h, w), dtype=np.uint8)  # host buffer, filled in place
    all_grey = True
    for i, path in enumerate(files):
        image = read_image(path, max_pixels=max_pixels)
        all_grey = all_grey and image.ndim == 2
        image = resize(image, h, w)
        if channels == 1 and image.ndim == 3:
            image = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if image.ndim == 2:
            image = image[..., None]  # (H, W, 1); broadcast to 3 channels if needed
        x[i] = np.rint(np.moveaxis(image, -1, 0) * 255.0).astype(np.uint8)  # (C, H, W)
    return x, all_grey


def _stratified(labels: np.ndarray, test_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices with ``round(test_split * n_k)`` of each class in test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for k in range(int(labels.max()) + 1):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_test = int(round(test_split * len(idx)))
        if 0 < test_split and len(idx) > 1:
            n_test = min(max(n_test, 1), len(idx) - 1)  # each class on both sides
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def image_folder(
    root: str | os.PathLike[str],
    *,
    size: int | tuple[int, int] | None = None,
    color: str = "auto",
    test_split: float | None = None,
    seed: int = 0,
    max_pixels: int = MAX_PIXELS,
) -> Splits:
    """Load a folder of pictures, one subfolder per class (the folder names, sorted).

    Parameters
    ----------
    root : path-like
        ``root/train/<class>/*`` with ``root/test/<class>/*``, or ``root/<class>/*``.
    size : int or (height, width), optional
        Resize every picture to this (bilinear). Default: keep the size, which must then be
        the same for all (an error names the first file that differs).
    color : {"auto", "gray", "rgb"}
        ``"auto"``: one channel if every picture is grey (by content: an RGB file with equal
        channels is grey), else three; ``"gray"`` converts colour by BT.601 luma; ``"rgb"``
        repeats grey.
    test_split : float, optional
        Only for ``root/<class>/*``: the fraction of each class held out for test (default
        0.2), chosen by ``seed``. Every class with two or more pictures lands on both sides.
    seed : int
        Seeds the split.
    max_pixels : int
        Largest picture accepted (checked from each header before decoding).

    Returns
    -------
    Splits
        ``x_*`` uint8 ``(N, C, H, W)``, ``y_*`` int64 ``(N,)``, ``classes`` the folder names.

    Raises
    ------
    DataError
        No classes, an empty class, an unreadable file (:class:`xcnn.images.ImageError`),
        a mix of sizes without ``size``, or a test class unknown to training; names the path.
    """
    root = Path(root)
    if color not in _COLORS:
        raise ValueError(f"color must be one of {_COLORS}, got {color!r}")
    if not root.is_dir():
        raise FileNotFoundError(2, "No such directory", str(root))
    split_layout = (root / "train").is_dir() and (root / "test").is_dir()
    if split_layout:
        if test_split is not None:
            raise ValueError(f"{root}: has train/ and test/ folders; test_split does not apply")
        classes, train_files, train_labels = _scan(root / "train")
        _, test_files, test_labels = _scan(root / "test", classes)
    else:
        test_split = 0.2 if test_split is None else float(test_split)
        if not 0 <= test_split < 1:
            raise ValueError(f"test_split must be in [0, 1), got {test_split}")
        classes, train_files, train_labels = _scan(root)
        test_files, test_labels = [], []
    if not split_layout:
        # Split before decoding, so train and test are views of one array (no copy).
        y = np.array(train_labels, np.int64)
        tr, te = _stratified(y, test_split, seed)
        test_files, test_labels = [train_files[i] for i in te], y[te].tolist()
        train_files, train_labels = [train_files[i] for i in tr], y[tr].tolist()
    files, labels = train_files + test_files, np.array(train_labels + test_labels, np.int64)

    sizes, colour = _headers(files, max_pixels)
    if size is None:
        for path, s in zip(files, sizes, strict=True):
            if s != sizes[0]:
                raise DataError(
                    f"{path}: {s[1]}x{s[0]} pixels but {files[0]} is {sizes[0][1]}x{sizes[0][0]};"
                    " pass size= (--image-size) to resize them all"
                )
        hw = sizes[0]
    else:
        hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if min(hw) < 1:
            raise ValueError(f"size must be positive, got {size!r}")
    channels = {"gray": 1, "rgb": 3, "auto": 3 if colour else 1}[color]
    x, all_grey = _decode_all(files, channels, hw, max_pixels)
    if color == "auto" and channels == 3 and all_grey:
        x = np.ascontiguousarray(x[:, :1])  # colour files with grey content
    n = len(train_files)
    return Splits(x[:n], labels[:n], x[n:], labels[n:], tuple(classes))
