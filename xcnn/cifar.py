"""CIFAR-10, from its official binary version: 60000 colour 32x32 pictures in 10 classes.

The binary version (``cifar-10-binary.tar.gz``, 170,052,171 bytes) holds
``cifar-10-batches-bin/data_batch_1.bin`` .. ``data_batch_5.bin`` (training) and
``test_batch.bin``. Each file is a run of 3073-byte records: one label byte (0..9), then
3072 pixel bytes, the 1024 red, 1024 green and 1024 blue values of a 32x32 picture in row
order, that is CHW. No pickle is involved (the "python version" of CIFAR-10 is pickles).

Memory stays bounded: the record counts come from file or tar member sizes, the uint8
arrays are allocated once, and records are read into them in chunks, straight from the
files or from the compressed tar stream (nothing is extracted to disk).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np

from . import datasets
from .datasets import DataError, Splits

__all__ = ["CIFAR10_CLASSES", "CIFAR10_FILE", "CIFAR10_MD5", "CIFAR10_MIRRORS", "cifar10"]

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_FILE = "cifar-10-binary.tar.gz"
#: MD5 of the official archive, as published on https://www.cs.toronto.edu/~kriz/cifar.html.
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
#: Its size in bytes: the download cap (above the 100 MB default for other datasets).
CIFAR10_BYTES = 170_052_171
CIFAR10_MIRRORS = (
    "https://www.cs.toronto.edu/~kriz/",
    "http://www.cs.toronto.edu/~kriz/",
    "https://mindspore-website.obs.cn-north-4.myhuaweicloud.com/notebook/datasets/",
)
_DIR = "cifar-10-batches-bin"
_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_TEST = ("test_batch.bin",)
_RECORD = 1 + 3 * 32 * 32
_CHUNK = 1000  # records per read: 3 MB
_PER_FILE = 10000  # records in each official file: more is not CIFAR-10 (and is not allocated)


def _count(name: str, nbytes: int) -> int:
    if nbytes == 0 or nbytes % _RECORD:
        raise DataError(
            f"{name}: {nbytes} bytes is not a whole number of {_RECORD}-byte CIFAR-10 records "
            "(1 label byte + 3072 pixel bytes): truncated or not CIFAR-10"
        )
    if nbytes // _RECORD > _PER_FILE:
        raise DataError(
            f"{name}: {nbytes // _RECORD} records, more than the {_PER_FILE} of a CIFAR-10 file"
        )
    return nbytes // _RECORD


def _read_records(fh: IO[bytes], name: str, n: int, x: np.ndarray, y: np.ndarray) -> None:
    """Read ``n`` records from ``fh`` into the views ``x`` (n, 3, 32, 32) and ``y`` (n,)."""
    for i in range(0, n, _CHUNK):
        k = min(_CHUNK, n - i)
        block = fh.read(k * _RECORD)
        if len(block) != k * _RECORD:
            raise DataError(f"{name}: truncated: ended inside record {i + len(block) // _RECORD}")
        rec = np.frombuffer(block, dtype=np.uint8).reshape(k, _RECORD)  # (k, 3073)
        labels = rec[:, 0]
        if labels.max() > 9:
            bad = i + int(np.argmax(labels > 9))
            raise DataError(f"{name}: record {bad} has label {labels.max()}, expected 0..9")
        # Host buffers allocated by the caller: filled in place, chunk by chunk.
        y[i : i + k] = labels
        x[i : i + k] = rec[:, 1:].reshape(k, 3, 32, 32)  # (k, C, H, W)


def _fill(sources: Sequence[tuple[str, int, IO[bytes] | None]], opener) -> tuple[np.ndarray, ...]:
    """Allocate from the record counts, then read every source in order."""
    counts = [_count(name, size) for name, size, _ in sources]
    total = sum(counts)
    x = np.empty((total, 3, 32, 32), dtype=np.uint8)
    y = np.empty((total,), dtype=np.uint8)
    start = 0
    for (name, _, handle), n in zip(sources, counts, strict=True):
        with opener(name, handle) as fh:
            _read_records(fh, name, n, x[start : start + n], y[start : start + n])
        start += n
    return x, y.astype(np.int64)


def _from_dir(folder: Path) -> Splits:
    missing = [f for f in _TRAIN + _TEST if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}")

    def opener(name: str, _handle: object) -> IO[bytes]:
        return open(name, "rb")

    out = []
    for group in (_TRAIN, _TEST):
        paths = [str(folder / f) for f in group]
        out += _fill([(p, os.path.getsize(p), None) for p in paths], opener)
    return Splits(*out, classes=CIFAR10_CLASSES)


def _from_tar(path: Path) -> Splits:
    name = str(path)
    try:
        with tarfile.open(name, "r:*") as tar:
            # One pass over the headers for the sizes; members are then read in archive order
            # (forward seeks only, so the gzip stream is not restarted per member).
            members = {}
            for m in tar.getmembers():
                parts = Path(m.name).parts
                if m.isfile() and len(parts) >= 2 and parts[-2] == _DIR:
                    members[parts[-1]] = m
            missing = [f for f in _TRAIN + _TEST if f not in members]
            if missing:
                raise DataError(f"{name}: the archive lacks {_DIR}/{', '.join(missing)}")

            def opener(label: str, member: tarfile.TarInfo) -> IO[bytes]:
                return tar.extractfile(member)

            out = []
            for group in (_TRAIN, _TEST):
                ms = sorted((members[f] for f in group), key=lambda m: m.offset)
                out += _fill([(f"{name}:{m.name}", m.size, m) for m in ms], opener)
            return _reorder(out, members, name)
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(
            f"{name}: corrupt or unreadable archive ({type(e).__name__}: {e})"
        ) from None


def _reorder(out: list[np.ndarray], members: dict, name: str) -> Splits:
    """The training batches in their official order 1..5, whatever the archive's order."""
    order = sorted(_TRAIN, key=lambda f: members[f].offset)
    if list(order) != list(_TRAIN):
        sizes = {f: members[f].size // _RECORD for f in _TRAIN}
        starts, at = {}, 0
        for f in order:
            starts[f], at = at, at + sizes[f]
        idx = np.concatenate([np.arange(starts[f], starts[f] + sizes[f]) for f in _TRAIN])
        out[0], out[1] = out[0][idx], out[1][idx]
    return Splits(*out, classes=CIFAR10_CLASSES)


def cifar10(
    root: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    mirrors: Sequence[str] | None = None,
    md5: str = CIFAR10_MD5,
    progress: bool = True,
) -> Splits:
    """Load CIFAR-10: 50000 train and 10000 test colour pictures of 32x32, 10 classes.

    Parameters
    ----------
    root : path-like, optional
        A directory holding ``cifar-10-batches-bin/`` (or the six ``.bin`` files themselves)
        or ``cifar-10-binary.tar.gz``, or the path of that tarball. Read as is (structure
        checks only); nothing is downloaded.
    cache_dir : path-like, optional
        Used when ``root`` is None: ``$XCNN_DATA``, else ``~/.cache/xcnn``; the tarball
        lives in its ``cifar-10`` subfolder.
    download : bool
        Download the tarball when it is missing from the cache or its MD5 is wrong.
    mirrors : sequence of str, optional
        Base URLs tried in order (default: :data:`CIFAR10_MIRRORS`).
    md5 : str
        Expected MD5 of the tarball (default: the official one). Required: the cache
        never holds a download that was not checked.
    progress : bool
        Show a progress bar while downloading.

    Returns
    -------
    Splits
        ``x_train`` uint8 (50000, 3, 32, 32), ``y_train`` int64 (50000,), ``x_test`` uint8
        (10000, 3, 32, 32), ``y_test`` int64 (10000,), ``classes`` :data:`CIFAR10_CLASSES`.

    Raises
    ------
    DataError
        A file that is not a whole number of records, a label above 9, a corrupt archive or
        a wrong checksum; the message names the file.
    FileNotFoundError
        Files missing (and not to be downloaded).
    """
    if root is not None:
        root = Path(root)
        if root.is_file():
            return _from_tar(root)
        for folder in (root / _DIR, root):
            if (folder / _TRAIN[0]).is_file():
                return _from_dir(folder)
        if (root / CIFAR10_FILE).is_file():
            return _from_tar(root / CIFAR10_FILE)
        raise FileNotFoundError(
            f"{root}: no CIFAR-10 binary files ({_DIR}/{_TRAIN[0]} ...) or {CIFAR10_FILE}"
        )
    base = cache_dir or os.environ.get("XCNN_DATA") or Path.home() / ".cache" / "xcnn"
    cache = Path(base) / "cifar-10"
    dest = cache / CIFAR10_FILE
    if not md5:
        raise ValueError("cifar10: a download is checked against an MD5; md5 must be given")
    ok = dest.is_file() and datasets._md5(dest) == md5
    if not ok:
        hint = "pass download=True, or root= a directory holding the files"
        if not download:
            if dest.is_file():
                raise DataError(f"{dest}: MD5 mismatch (expected {md5}); {hint}")
            raise FileNotFoundError(f"{dest} not found; {hint}")
        cache.mkdir(parents=True, exist_ok=True)
        chosen = CIFAR10_MIRRORS if mirrors is None else mirrors
        if isinstance(chosen, str):
            chosen = [chosen]
        # Its own size cap and an hour: the archive is 170 MB, 17x MNIST's largest file.
        datasets._download(
            CIFAR10_FILE, dest, chosen, md5, progress, max_bytes=CIFAR10_BYTES, seconds=3600.0
        )
    return _from_tar(dest)
