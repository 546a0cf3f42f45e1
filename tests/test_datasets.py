"""Tests for xcnn.datasets: IDX reader, directory loading, HTTP download, embedded sample."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from xcnn import datasets
from xcnn.datasets import DataError, DownloadError, read_idx

SHARED = Path(
    os.environ.get("XCNN_MNIST_DIR")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
)
OFFICIAL_RAW_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
GZ_NAMES = [f + ".gz" for f in datasets.FILES]
CODES = {"u1": 0x08, "i1": 0x09, ">i2": 0x0B, ">i4": 0x0C, ">f4": 0x0D, ">f8": 0x0E}


def shared_dir() -> Path:
    if not all((SHARED / n).is_file() for n in GZ_NAMES):
        pytest.skip(f"real MNIST not found in {SHARED} (set XCNN_MNIST_DIR to point at it)")
    return SHARED


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode ``arr`` as IDX (big-endian payload)."""
    dt = arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    code = CODES[dt.str.lstrip("|").replace("<", ">")]
    head = bytes([0, 0, code, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(dt).tobytes()


def write(path: Path, payload: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


def write_split_dir(root: Path, n_train: int = 30, n_test: int = 20, *, gz: bool = True, **over):
    """Write a tiny MNIST-format directory; ``over`` replaces arrays by file stem."""
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    arrays.update({k.replace("_", "-"): v for k, v in over.items()})
    root.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        write(root / (stem + ".gz" if gz else stem), idx_bytes(arr), gz)
    return arrays


# ----------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", list(CODES))
def test_read_idx_valid(tmp_path, dtype, gz):
    arr = (np.arange(24).reshape(2, 3, 4) - (0 if dtype == "u1" else 5)).astype(dtype)
    out = read_idx(write(tmp_path / "a.idx", idx_bytes(arr), gz), ndim=3)
    np.testing.assert_array_equal(out, arr)
    assert out.dtype == np.dtype(dtype).newbyteorder("=") and out.dtype.isnative
    assert out.flags.writeable


def _good() -> bytes:
    return idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))


BROKEN = {
    "bad magic": (b"\x01\x00" + _good()[2:], "bad magic number"),
    "unknown dtype": (_good()[:2] + b"\x0a" + _good()[3:], "unknown dtype code 0x0A"),
    "truncated data": (_good()[:-1], "truncated: header says 3x4 = 12 bytes of data, file has 11"),
    "trailing bytes": (_good() + b"\0\0", "trailing bytes: header says 3x4 = 12 bytes of data"),
    "truncated header": (_good()[:10], "truncated header: 2 dimensions need 12 bytes, file has 10"),
    "tiny file": (b"\0\0", "truncated header"),
    "empty file": (b"", "truncated header"),
}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case", list(BROKEN))
def test_read_idx_broken(tmp_path, case, gz):
    payload, message = BROKEN[case]
    path = write(tmp_path / "broken-file.idx", payload, gz)
    with pytest.raises(DataError, match="broken-file.idx") as info:
        read_idx(path)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_read_idx_ndim_mismatch(tmp_path):
    path = write(tmp_path / "labels.idx", _good())
    with pytest.raises(DataError, match=r"labels\.idx: expected 1 dimensions, header says 2"):
        read_idx(path, ndim=1)


def _flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :]


GZ = gzip.compress(idx_bytes(np.random.default_rng(0).integers(0, 9, 500, dtype=np.uint8)))
CORRUPT_GZ = {
    "bad crc": _flip(GZ, len(GZ) - 6),
    "bad length trailer": _flip(GZ, len(GZ) - 2),
    "cut stream": GZ[: len(GZ) // 2],
    "cut trailer": GZ[:-3],
    "bad deflate data": _flip(_flip(GZ, 20), 40),
    "bad header": GZ[:2] + b"\x07" + GZ[3:],
}


@pytest.mark.parametrize("case", list(CORRUPT_GZ))
def test_read_idx_corrupt_gzip(tmp_path, case):
    path = write(tmp_path / "corrupt.gz", CORRUPT_GZ[case])
    with pytest.raises(DataError, match=r"corrupt\.gz: corrupt gzip stream"):
        read_idx(path)


# ------------------------------------------------------------------------- directories


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_root_synthetic(tmp_path, gz):
    arrays = write_split_dir(tmp_path, gz=gz)
    splits = datasets.mnist(tmp_path, download=False)
    assert splits.x_train.shape == (30, 1, 28, 28) and splits.x_train.dtype == np.uint8
    assert splits.y_test.shape == (20,) and splits.y_test.dtype == np.int64
    np.testing.assert_array_equal(splits.x_test[:, 0], arrays["t10k-images-idx3-ubyte"])
    assert datasets.load(str(tmp_path)).y_train.tolist() == splits.y_train.tolist()


def test_mismatched_counts(tmp_path):
    write_split_dir(tmp_path, train_labels_idx1_ubyte=np.zeros(29, np.uint8))
    with pytest.raises(DataError, match="30 images but 29 labels") as info:
        datasets.mnist(tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(info.value)
    assert "train-labels-idx1-ubyte.gz" in str(info.value)


def test_bad_labels_and_dims(tmp_path):
    write_split_dir(tmp_path / "a", t10k_labels_idx1_ubyte=np.full(20, 10, np.uint8))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: labels must be in 0\.\.9"):
        datasets.mnist(tmp_path / "a")
    write_split_dir(tmp_path / "b", t10k_images_idx3_ubyte=np.zeros((20, 28, 27), np.uint8))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: expected uint8 images"):
        datasets.mnist(tmp_path / "b")


def test_missing_files(tmp_path):
    write_split_dir(tmp_path / "root")
    (tmp_path / "root" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte"):
        datasets.mnist(tmp_path / "root")
    with pytest.raises(FileNotFoundError, match="not found; pass download=True") as info:
        datasets.fashion_mnist(cache_dir=tmp_path / "cache", download=False)
    assert str(tmp_path / "cache" / "fashion-mnist") in str(info.value)


def test_load_names():
    with pytest.raises(ValueError, match="'sample', 'mnist', 'fashion-mnist'"):
        datasets.load("cifar10")
    assert datasets.load("sample").x_train.shape == (8000, 1, 28, 28)


def test_real_mnist_from_shared_dir():
    root = shared_dir()
    for stem, md5 in OFFICIAL_RAW_MD5.items():
        with gzip.open(root / (stem + ".gz"), "rb") as fh:
            assert hashlib.md5(fh.read()).hexdigest() == md5, stem
    s = datasets.mnist(root, download=False)
    assert s.x_train.shape == (60000, 1, 28, 28) and s.x_test.shape == (10000, 1, 28, 28)
    assert s.y_train.shape == (60000,) and s.y_test.shape == (10000,)
    assert s.x_train.dtype == np.uint8 and s.y_train.dtype == np.int64
    assert s.y_train[:5].tolist() == [5, 0, 4, 1, 9]  # The well-known first labels.


# ----------------------------------------------------------------------------- sample


def test_sample():
    s = datasets.sample()
    assert s.x_train.shape == (8000, 1, 28, 28) and s.x_test.shape == (2000, 1, 28, 28)
    assert s.x_train.dtype == np.uint8 and s.y_train.dtype == np.int64
    assert np.bincount(s.y_train).tolist() == [800] * 10
    assert np.bincount(s.y_test).tolist() == [200] * 10
    with resources.as_file(resources.files("xcnn") / "data" / "mnist_sample.npz") as path:
        assert path.stat().st_size <= 2_000_000


def test_sample_matches_official_images():
    root = shared_dir()
    path = resources.files("xcnn") / "data" / "mnist_sample.npz"
    with path.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
        tr, te = npz["train_index"], npz["test_index"]
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(te) > 0)
    full, s = datasets.mnist(root), datasets.sample()
    np.testing.assert_array_equal(s.x_train, full.x_train[tr])
    np.testing.assert_array_equal(s.y_train, full.y_train[tr])
    np.testing.assert_array_equal(s.x_test, full.x_test[te])
    np.testing.assert_array_equal(s.y_test, full.y_test[te])


def test_build_sample_cli(tmp_path):
    arrays = write_split_dir(tmp_path / "src", n_train=40, n_test=20)
    out = tmp_path / "s.npz"
    datasets._main(
        [
            "build-sample",
            str(tmp_path / "src"),
            str(out),
            "--train-per-class",
            "3",
            "--test-per-class",
            "2",
        ]
    )
    with np.load(out, allow_pickle=False) as npz:
        assert np.bincount(npz["y_train"]).tolist() == [3] * 10
        assert np.bincount(npz["y_test"]).tolist() == [2] * 10
        idx = npz["train_index"]
        np.testing.assert_array_equal(npz["x_train"][:, 0], arrays["train-images-idx3-ubyte"][idx])


# ---------------------------------------------------------------------------- download


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` under /ok/, /bad/ (corrupted), /drop/ (cut short), /404/."""

    def do_GET(self) -> None:
        self.server.log.append(self.path)
        _, mode, name = self.path.split("/", 2)
        body = self.server.files.get(name)
        if mode == "404" or body is None:
            self.send_error(404)
            return
        if mode == "bad":
            body = _flip(body, len(body) // 2)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # HTTP/1.0: the server closes the connection after this, so "drop" is a short body.
        self.wfile.write(body[: len(body) // 2] if mode == "drop" else body)

    def log_message(self, *args) -> None:  # Keep test output quiet.
        pass


@pytest.fixture(scope="module")
def synthetic_gz(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("served")
    write_split_dir(root)
    return {n: (root / n).read_bytes() for n in GZ_NAMES}


@contextlib.contextmanager
def _serve(files: dict[str, bytes]) -> Iterator[tuple[str, http.server.ThreadingHTTPServer]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.files, server.log = files, []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def server(synthetic_gz, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with _serve(synthetic_gz) as base:
        yield base


def md5s(files: dict[str, bytes]) -> dict[str, str]:
    return {n: hashlib.md5(b).hexdigest() for n, b in files.items()}


def fetch(base, tmp_path, *modes, **kw):
    url, srv = base
    kw.setdefault("progress", False)
    kw.setdefault("cache_dir", tmp_path)
    mirrors = [f"{url}/{m}/" for m in modes]
    return datasets.mnist(mirrors=mirrors, checksums=md5s(srv.files), **kw)


def cache_listing(tmp_path: Path, sub: str = "mnist") -> list[str]:
    return sorted(os.listdir(tmp_path / sub))  # Hidden temp files would show here too.


def test_download_then_cached(server, tmp_path, monkeypatch):
    monkeypatch.setenv("XCNN_DATA", str(tmp_path))
    s = fetch(server, tmp_path, "ok", cache_dir=None, progress=True)
    assert s.x_train.shape == (30, 1, 28, 28) and s.y_test.shape == (20,)
    assert len(server[1].log) == 4
    assert cache_listing(tmp_path) == sorted(GZ_NAMES)
    fetch(server, tmp_path, "ok")
    assert len(server[1].log) == 4  # Second call: everything came from the cache.


def test_download_real_mnist(tmp_path, monkeypatch):
    root = shared_dir()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    files = {n: (root / n).read_bytes() for n in GZ_NAMES}
    with _serve(files) as base:
        s = fetch(base, tmp_path, "ok")
        assert len(base[1].log) == 4
    ref = datasets.mnist(root)
    for a, b in zip(s, ref, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_checksum_then_next_mirror(server, tmp_path):
    fetch(server, tmp_path, "bad", "ok")
    assert [p.split("/")[1] for p in server[1].log] == ["bad", "ok"] * 4
    assert cache_listing(tmp_path) == sorted(GZ_NAMES)


def test_dropped_connection(server, tmp_path):
    with pytest.raises(DownloadError, match="short body") as info:
        fetch(server, tmp_path, "drop")
    assert isinstance(info.value, OSError)
    assert cache_listing(tmp_path) == []  # No partial or temp file left behind.
    fetch(server, tmp_path, "drop", "ok")
    assert cache_listing(tmp_path) == sorted(GZ_NAMES)


def test_404_then_next_mirror(server, tmp_path):
    fetch(server, tmp_path, "404", "ok")
    assert cache_listing(tmp_path) == sorted(GZ_NAMES)


def test_all_mirrors_fail(server, tmp_path):
    with socket.socket() as sock:  # A port that nothing listens on.
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/x/"
    url = server[0]
    with pytest.raises(DownloadError) as info:
        datasets.mnist(
            cache_dir=tmp_path,
            mirrors=[f"{url}/404/", f"{url}/bad/", f"{url}/drop/", dead],
            checksums=md5s(server[1].files),
            progress=False,
        )
    msg = str(info.value)
    assert "could not download train-images-idx3-ubyte.gz" in msg
    for part in ("HTTP 404", "bad checksum", "short body", dead):
        assert part in msg
    assert cache_listing(tmp_path) == []
    with pytest.raises(DownloadError, match="no mirrors given"):
        datasets.mnist(cache_dir=tmp_path, mirrors=[], progress=False)


def test_corrupt_cache_is_redownloaded(server, tmp_path):
    fetch(server, tmp_path, "ok")
    cached = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    cached.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: MD5 mismatch"):
        fetch(server, tmp_path, "ok", download=False)
    s = fetch(server, tmp_path, "ok")
    assert server[1].log[4:] == ["/ok/t10k-images-idx3-ubyte.gz"]
    assert s.x_test.shape == (20, 1, 28, 28)


def test_interrupt_leaves_nothing(server, tmp_path, monkeypatch):
    class Interrupting:
        def __init__(self, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "tqdm", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        fetch(server, tmp_path, "ok")
    assert cache_listing(tmp_path) == []


def test_fashion_mnist_cache_subdir(server, tmp_path):
    url, srv = server
    s = datasets.fashion_mnist(
        cache_dir=tmp_path, mirrors=[f"{url}/ok"], checksums=md5s(srv.files), progress=False
    )
    assert s.x_train.shape == (30, 1, 28, 28)
    assert cache_listing(tmp_path, "fashion-mnist") == sorted(GZ_NAMES)
