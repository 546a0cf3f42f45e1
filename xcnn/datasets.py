"""Host-side datasets: the IDX reader, MNIST / Fashion-MNIST and the embedded MNIST sample.

Everything here is NumPy on the host. Images come back as ``uint8`` arrays of shape
``(N, 1, 28, 28)`` (NCHW) and labels as ``int64`` arrays of shape ``(N,)``; converting to
float and moving to a device is left to the caller, so that the scaling is an explicit choice.

Errors:

* :class:`DataError` (a ``ValueError``): a file exists but its content is wrong (bad IDX
  header, truncated or trailing data, corrupt gzip stream, wrong checksum, inconsistent
  images/labels). The message always names the file.
* :class:`DownloadError` (an ``OSError``): every mirror failed for a file; the message lists
  each mirror's failure. It is an ``OSError`` because the cause is the network or the mirrors,
  not the data on disk.
* ``FileNotFoundError``: the files are missing and may not be downloaded (a cached file
  whose MD5 is wrong, with ``download=False``, is a :class:`DataError`).

Rebuild the embedded sample with ``python -m xcnn.datasets build-sample SRC_DIR OUT.npz``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import http.client
import math
import os
import stat
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from tqdm import tqdm

from .atomic import atomic_write

__all__ = [
    "DataError",
    "DownloadError",
    "Splits",
    "read_idx",
    "mnist",
    "fashion_mnist",
    "sample",
    "build_sample",
    "load",
]

#: Seconds to wait for a mirror to answer (connect and each read).
DOWNLOAD_TIMEOUT = 30.0
#: Seconds one file's download may take in all, however the server trickles its bytes.
DOWNLOAD_DEADLINE = 600.0
#: Largest file a download may deliver (the biggest MNIST file is under 10 MB).
MAX_DOWNLOAD_BYTES = 100 << 20

# Order matters: it is the order of the fields of Splits.
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
FASHION_MNIST_MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
# MD5 of the published .gz files (what the mirrors serve, hence what the cache holds).
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

# A deflate stream expands at most about 1032:1, which bounds what a .gz file can declare.
_DEFLATE_MAX_RATIO = 1032
_CHUNK = 1 << 20
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """A data file is malformed, corrupt, or inconsistent with its companions."""


class DownloadError(OSError):
    """Every mirror failed to deliver a file; the message lists each failure."""


class Splits(NamedTuple):
    """Train and test splits: images ``uint8 (N, C, H, W)``, labels ``int64 (N,)``.

    ``classes`` holds the class names when the data has them (image folders, CIFAR-10).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...] | None = None


def read_idx(path: str | os.PathLike[str], *, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (raw, or gzip-compressed as detected by its magic bytes).

    The header is read and checked first, and the data is then streamed into a buffer of
    exactly the size it declares: a gzip file is never decompressed past what its
    header promises, so memory is bounded by the header (which must itself fit the
    file: a raw file's size, or a gzip file's size times deflate's largest ratio).

    Parameters
    ----------
    path : path-like
        The file to read.
    ndim : int, optional
        Expected number of dimensions; a different one is an error.

    Returns
    -------
    numpy.ndarray
        Array of the shape ``(d0, ..., d{ndim-1})`` given in the header, in native byte order.

    Raises
    ------
    DataError
        On a bad magic number, unknown dtype code, unexpected ``ndim``, truncated header or
        data, trailing bytes, a size the file cannot hold, a corrupt gzip stream, or a path
        that is not a regular file. The message names the file.
    """
    name = os.fspath(path)
    st = os.stat(path)  # FileNotFoundError as is
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{name}: not a regular file")
    with open(path, "rb") as raw:
        gz = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        try:
            if gz:
                with gzip.GzipFile(fileobj=raw) as fh:
                    return _read_idx_stream(fh, name, ndim, st.st_size * _DEFLATE_MAX_RATIO)
            return _read_idx_stream(raw, name, ndim, st.st_size)
        # gzip reports corruption as BadGzipFile (an OSError), EOFError or zlib.error.
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{name}: corrupt gzip stream: {exc}") from None


def read_into(fh: BinaryIO, nbytes: int) -> tuple[bytearray, int]:
    """Read up to ``nbytes`` of ``fh`` into one buffer: ``(buffer, bytes read)``.

    The buffer is the size a header declared (the caller has bounded it
    already); it is filled a megabyte at a time, so a short file gives
    ``bytes read < nbytes`` and never more memory than declared.
    """
    buf = bytearray(nbytes)
    view, got = memoryview(buf), 0
    while got < nbytes:
        n = fh.readinto(view[got : got + _CHUNK])
        if not n:
            break
        got += n
    return buf, got


def _read_exact(fh: BinaryIO, n: int) -> bytes:
    out = fh.read(n)
    return out if out is not None else b""


def _read_idx_stream(fh: BinaryIO, name: str, ndim: int | None, max_bytes: int) -> np.ndarray:
    data = _read_exact(fh, 4)
    if len(data) < 4:
        raise DataError(f"{name}: truncated header: file has {len(data)} bytes, need 4 for magic")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{name}: bad magic number 0x{data[:4].hex()}: an IDX file starts with two zero "
            "bytes, then the dtype code and the number of dimensions"
        )
    code, nd = data[2], data[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DataError(f"{name}: unknown dtype code 0x{code:02X} (known: {known})")
    if ndim is not None and nd != ndim:
        raise DataError(f"{name}: expected {ndim} dimensions, header says {nd}")
    dims = _read_exact(fh, 4 * nd)
    if len(dims) < 4 * nd:
        raise DataError(
            f"{name}: truncated header: {nd} dimensions need {4 + 4 * nd} bytes, "
            f"file has {4 + len(dims)}"
        )
    shape = tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(nd))
    dtype = np.dtype(_IDX_DTYPES[code])
    # Python ints: a hostile header cannot overflow this product.
    expected = math.prod(shape) * dtype.itemsize
    size = "x".join(map(str, shape))
    if math.prod(d for d in shape if d) * dtype.itemsize >= 2**62:
        raise DataError(f"{name}: header declares dimensions {size}, too large for any array")
    if expected > max_bytes:
        raise DataError(
            f"{name}: truncated: header says {size} = {expected} bytes of data, "
            f"more than the file can hold"
        )
    buf, got = read_into(fh, expected)
    if got < expected:
        raise DataError(
            f"{name}: truncated: header says {size} = {expected} bytes of data, file has {got}"
        )
    if _read_exact(fh, 1):
        raise DataError(
            f"{name}: trailing bytes: header says {size} = {expected} bytes of data, file has more"
        )
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def _read_dir(paths: Sequence[Path]) -> Splits:
    """Read and cross-check the four files ``paths`` (in the order of ``FILES``)."""
    out = []
    for img_path, lbl_path in (paths[0:2], paths[2:4]):
        images, labels = read_idx(img_path, ndim=3), read_idx(lbl_path, ndim=1)
        if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
            raise DataError(
                f"{img_path}: expected uint8 images of 28x28, got {images.dtype} of "
                f"{'x'.join(map(str, images.shape[1:]))}"
            )
        if labels.dtype.kind not in "iu":
            raise DataError(
                f"{lbl_path}: labels must be stored as integers, the IDX header says "
                f"{labels.dtype} (float labels would be truncated to classes silently)"
            )
        if len(images) != len(labels):
            raise DataError(
                f"{len(images)} images but {len(labels)} labels ({img_path}, {lbl_path})"
            )
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DataError(
                f"{lbl_path}: labels must be in 0..9, found {labels.min()}..{labels.max()}"
            )
        out += [images[:, None], labels.astype(np.int64)]
    return Splits(*out)


def _find(root: Path) -> tuple[list[Path], list[str]]:
    """Locate the four files in ``root`` (raw preferred over .gz); also return what is missing."""
    found, missing = [], []
    for stem in FILES:
        hits = [root / n for n in (stem, stem + ".gz") if (root / n).is_file()]
        found += hits[:1]
        if not hits:
            missing.append(stem + "[.gz]")
    return found, missing


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(
    url: str,
    dest: Path,
    md5: str,
    progress: bool,
    *,
    max_bytes: int | None = None,
    seconds: float | None = None,
) -> None:
    """Stream ``url`` to a temp file beside ``dest``; move it into place only once verified.

    The whole download has ``seconds`` (default :data:`DOWNLOAD_DEADLINE`; each read
    still times out after :data:`DOWNLOAD_TIMEOUT`), and may be at most ``max_bytes``
    (default :data:`MAX_DOWNLOAD_BYTES`; a bigger archive, such as CIFAR-10's, passes
    its own known size).
    """
    limit = MAX_DOWNLOAD_BYTES if max_bytes is None else max_bytes
    seconds = DOWNLOAD_DEADLINE if seconds is None else seconds
    deadline = time.monotonic() + seconds
    with atomic_write(dest) as out:
        try:
            resp = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT)
        except urllib.error.HTTPError as exc:
            exc.close()  # It holds the response socket.
            raise DownloadError(f"HTTP {exc.code} {exc.reason}") from None
        with resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > limit:
                raise DownloadError(f"{total} bytes announced, over the {limit}-byte limit")
            h, got = hashlib.md5(), 0
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress
            ) as bar:
                # read1: returns what one socket read gives, so the deadline is checked
                # between reads however slowly the bytes come.
                while block := resp.read1(1 << 16):
                    out.write(block)
                    h.update(block)
                    got += len(block)
                    bar.update(len(block))
                    if got > limit:
                        raise DownloadError(f"over the {limit}-byte limit")
                    if time.monotonic() > deadline:
                        raise DownloadError(f"took over {seconds:g} s in all ({got} bytes so far)")
        # http.client returns a short body silently when the peer closes early.
        if total is not None and got < total:
            raise DownloadError(f"short body: {got} of {total} bytes (connection dropped?)")
        if h.hexdigest() != md5:
            raise DataError(f"bad checksum: MD5 {h.hexdigest()}, expected {md5}")


def _download(
    filename: str,
    dest: Path,
    mirrors: Sequence[str],
    md5: str,
    progress: bool,
    *,
    max_bytes: int | None = None,
    seconds: float | None = None,
) -> None:
    """Try each mirror in turn; raise DownloadError listing every failure if none works.

    ``max_bytes`` and ``seconds`` bound each attempt as in :func:`_fetch`.
    """
    failures = ["  (no mirrors given)"] if not mirrors else []
    for base in mirrors:
        url = base.rstrip("/") + "/" + filename
        try:
            _fetch(url, dest, md5, progress, max_bytes=max_bytes, seconds=seconds)
            return
        # ValueError covers DataError (checksum) and malformed URLs.
        except (OSError, http.client.HTTPException, ValueError) as exc:
            failures.append(f"  {url}: {type(exc).__name__}: {exc}")
    raise DownloadError(f"could not download {filename}; tried:\n" + "\n".join(failures))


def _load(
    subdir: str,
    default_mirrors: Sequence[str],
    default_md5: Mapping[str, str],
    root: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None,
    download: bool,
    mirrors: Sequence[str] | None,
    checksums: Mapping[str, str | None] | None,
    progress: bool,
) -> Splits:
    if root is not None:
        # An explicit root is read as is (structure checks only: recompressed copies are fine).
        found, missing = _find(Path(root))
        if missing:
            raise FileNotFoundError(f"{root}: missing {', '.join(missing)}")
        return _read_dir(found)
    base = cache_dir or os.environ.get("XCNN_DATA") or Path.home() / ".cache" / "xcnn"
    cache = Path(base) / subdir
    mirrors = default_mirrors if mirrors is None else mirrors
    if isinstance(mirrors, str):  # A lone URL would otherwise be iterated character by character.
        mirrors = [mirrors]
    checksums = default_md5 if checksums is None else checksums
    unverified = [f + ".gz" for f in FILES if not checksums.get(f + ".gz")]
    if unverified:
        # The cache is trusted on later runs, so nothing unverified goes in.
        raise ValueError(
            f"no MD5 checksum for {', '.join(unverified)}: files are cached only when "
            "verified (give checksums=, or root= a directory holding the files)"
        )
    paths = []
    for filename in (f + ".gz" for f in FILES):
        dest, md5 = cache / filename, checksums[filename]
        ok = dest.is_file() and _md5(dest) == md5
        if not ok and not download:
            hint = "pass download=True, or root= a directory holding the files"
            if dest.is_file():
                raise DataError(f"{dest}: MD5 mismatch (expected {md5}); {hint}")
            raise FileNotFoundError(f"{dest} not found; {hint}")
        if not ok:
            cache.mkdir(parents=True, exist_ok=True)
            _download(filename, dest, mirrors, md5, progress)
        paths.append(dest)
    return _read_dir(paths)


def mnist(
    root: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    mirrors: Sequence[str] | None = None,
    checksums: Mapping[str, str | None] | None = None,
    progress: bool = True,
) -> Splits:
    """Load MNIST: 60000 train and 10000 test images of handwritten digits.

    Parameters
    ----------
    root : path-like, optional
        A directory holding the four standard IDX files (each raw or ``.gz``). They are
        checked for structure only, so recompressed copies are accepted. Nothing is
        downloaded; missing files raise ``FileNotFoundError``.
    cache_dir : path-like, optional
        Used when ``root`` is None. Defaults to ``$XCNN_DATA``, else ``~/.cache/xcnn``; the
        files live in its ``mnist`` subfolder as the published ``.gz`` files.
    download : bool
        Download missing (or checksum-mismatched) cache files.
    mirrors : sequence of str, optional
        Base URLs tried in order (default: :data:`MNIST_MIRRORS`).
    checksums : mapping, optional
        ``{"train-images-idx3-ubyte.gz": md5_hex, ...}`` (default: :data:`MNIST_MD5`).
        Every file needs one: nothing unverified is cached (a ``ValueError`` says so);
        read unverified files with ``root=`` instead.
    progress : bool
        Show a tqdm progress bar while downloading.

    Returns
    -------
    Splits
        ``x_train`` uint8 (60000, 1, 28, 28), ``y_train`` int64 (60000,),
        ``x_test`` uint8 (10000, 1, 28, 28), ``y_test`` int64 (10000,).
    """
    return _load(
        "mnist", MNIST_MIRRORS, MNIST_MD5, root, cache_dir, download, mirrors, checksums, progress
    )


def fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    mirrors: Sequence[str] | None = None,
    checksums: Mapping[str, str | None] | None = None,
    progress: bool = True,
) -> Splits:
    """Load Fashion-MNIST (Zalando clothing images); same shapes and parameters as :func:`mnist`.

    The cache subfolder is ``fashion-mnist``; defaults are :data:`FASHION_MNIST_MIRRORS` and
    :data:`FASHION_MNIST_MD5`.
    """
    return _load(
        "fashion-mnist",
        FASHION_MNIST_MIRRORS,
        FASHION_MNIST_MD5,
        root,
        cache_dir,
        download,
        mirrors,
        checksums,
        progress,
    )


def sample() -> Splits:
    """Load the MNIST sample shipped with the package (no network, no files needed).

    A class-stratified subset of real MNIST (see :func:`build_sample`): 800 train and 200
    test images per class.

    Returns
    -------
    Splits
        ``x_train`` uint8 (8000, 1, 28, 28), ``y_train`` int64 (8000,),
        ``x_test`` uint8 (2000, 1, 28, 28), ``y_test`` int64 (2000,).
    """
    ref = resources.files("xcnn") / "data" / "mnist_sample.npz"
    with ref.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
        return Splits(*(npz[k] for k in Splits._fields[:4]))


def build_sample(
    source_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    train_per_class: int = 800,
    test_per_class: int = 200,
    seed: int = 0,
) -> Path:
    """Write a class-stratified subset of the MNIST files in ``source_dir`` to ``out_path``.

    The ``.npz`` holds ``x_train, y_train, x_test, y_test`` (as :class:`Splits`) and
    ``train_index, test_index``: int64 indices into the official files, for provenance.
    Indices are sorted, so the sample keeps the official order.

    Returns
    -------
    pathlib.Path
        ``out_path``.
    """
    full = mnist(source_dir)
    rng = np.random.default_rng(seed)

    def pick(y: np.ndarray, k: int) -> np.ndarray:
        pools = [np.flatnonzero(y == c) for c in range(10)]
        if k > min(map(len, pools)):
            raise ValueError(f"asked for {k} images per class, the smallest class has fewer")
        idx = [rng.choice(pool, k, replace=False) for pool in pools]
        return np.sort(np.concatenate(idx)).astype(np.int64)

    tr, te = pick(full.y_train, train_per_class), pick(full.y_test, test_per_class)
    out = Path(out_path)
    # A file object keeps numpy from appending ".npz" to the name.
    with open(out, "wb") as fh:
        np.savez_compressed(
            fh,
            x_train=full.x_train[tr],
            y_train=full.y_train[tr],
            x_test=full.x_test[te],
            y_test=full.y_test[te],
            train_index=tr,
            test_index=te,
        )
    return out


def load(name: str, **kw) -> Splits:
    """Load a dataset by name, for the CLI.

    Parameters
    ----------
    name : str
        ``"sample"``, ``"mnist"``, ``"fashion-mnist"``, or a directory holding the four
        MNIST-format files.
    **kw
        Passed to :func:`mnist` / :func:`fashion_mnist` (not accepted for ``"sample"``).
    """
    if name == "sample":
        if kw:
            raise TypeError(f"sample() takes no options, got {sorted(kw)}")
        return sample()
    if name == "mnist":
        return mnist(**kw)
    if name == "fashion-mnist":
        return fashion_mnist(**kw)
    if os.path.isdir(name):
        return mnist(name, **kw)
    raise ValueError(
        f"unknown dataset {name!r}: choose 'sample', 'mnist', 'fashion-mnist', "
        "or a directory holding the MNIST-format IDX files"
    )


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m xcnn.datasets")
    sub = parser.add_subparsers(dest="command", required=True)
    bs = sub.add_parser("build-sample", help="rebuild the embedded MNIST sample")
    bs.add_argument("source_dir", help="directory with the four official MNIST files")
    bs.add_argument("out_path", help="output .npz (e.g. xcnn/data/mnist_sample.npz)")
    bs.add_argument("--train-per-class", type=int, default=800)
    bs.add_argument("--test-per-class", type=int, default=200)
    bs.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_sample(
        args.source_dir,
        args.out_path,
        train_per_class=args.train_per_class,
        test_per_class=args.test_per_class,
        seed=args.seed,
    )
    print(f"wrote {out} ({out.stat().st_size} bytes)")


# Image folders, CIFAR-10, .npz arrays and the one-``--data`` resolver (data branch, #12).
from .sources import cifar10, describe, image_folder, load_data, load_npz  # noqa: E402, F401

if __name__ == "__main__":
    _main()
