"""Image folders, CIFAR-10 (binary files and tarball), .npz arrays, and the ``--data`` resolver."""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

import xcnn
from xcnn import datasets
from xcnn.cifar import CIFAR10_BYTES, CIFAR10_CLASSES, CIFAR10_MD5
from xcnn.datasets import DataError

Image = pytest.importorskip("PIL.Image", reason="image folders are decoded by Pillow")


def write_folder(root: Path, sizes=None, *, classes=("cat", "dog", "emu"), per_class=5, rgb=True):
    """Pictures of known content: class k, picture i has every pixel value 40 * k + i."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = sizes[(k * per_class + i) % len(sizes)] if sizes else (6, 5)
            a = np.full((h, w, 3) if rgb else (h, w), 40 * k + i, np.uint8)
            if rgb:
                a[..., 1] = rng.integers(0, 255, (h, w))  # colour content
            ext = ("png", "bmp")[i % 2]  # lossless: the content checks are exact
            Image.fromarray(a).save(root / name / f"{i}.{ext}")
    return root


def test_flat_layout_is_split_by_class_with_a_seed(tmp_path):
    root = write_folder(tmp_path / "pics")
    (root / "cat" / "notes.txt").write_text("not a picture")  # ignored
    s = datasets.image_folder(root, test_split=0.4, seed=1)
    assert s.classes == ("cat", "dog", "emu")
    assert s.x_train.dtype == np.uint8 and s.x_train.shape == (9, 3, 6, 5)
    assert s.x_test.shape == (6, 3, 6, 5)
    assert np.bincount(s.y_test).tolist() == [2, 2, 2]  # stratified
    assert np.bincount(s.y_train).tolist() == [3, 3, 3]
    # Red channel = 40 * class + index: labels match the pictures' content.
    for x, y in ((s.x_train, s.y_train), (s.x_test, s.y_test)):
        np.testing.assert_array_equal(x[:, 0, 0, 0] // 40, y)
    again = datasets.image_folder(root, test_split=0.4, seed=1)
    np.testing.assert_array_equal(again.x_test, s.x_test)
    other = datasets.image_folder(root, test_split=0.4, seed=2)
    assert not np.array_equal(other.x_test[:, 0, 0, 0], s.x_test[:, 0, 0, 0])
    all_red = np.sort(np.concatenate([s.x_train, s.x_test])[:, 0, 0, 0])
    np.testing.assert_array_equal(
        all_red, np.sort([40 * k + i for k in range(3) for i in range(5)])
    )


def test_train_test_layout_grey_auto_and_resize(tmp_path):
    write_folder(tmp_path / "d" / "train", rgb=False)
    write_folder(tmp_path / "d" / "test", rgb=False, per_class=2)
    s = datasets.image_folder(tmp_path / "d")
    assert s.x_train.shape == (15, 1, 6, 5) and s.x_test.shape == (6, 1, 6, 5)  # grey: C = 1
    np.testing.assert_array_equal(s.y_test, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(s.x_test[:, 0, 3, 3] // 40, s.y_test)
    r = datasets.image_folder(tmp_path / "d", size=(8, 4), color="rgb")
    assert r.x_train.shape == (15, 3, 8, 4)
    # Constant pictures stay constant through the resize.
    np.testing.assert_array_equal(r.x_train[:, 1], r.x_train[:, 0])
    np.testing.assert_array_equal(r.x_train[:, 0, 0, 0], s.x_train[:, 0, 0, 0])
    with pytest.raises(ValueError, match="test_split does not apply"):
        datasets.image_folder(tmp_path / "d", test_split=0.5)


def test_rgb_files_with_grey_content_are_grey(tmp_path):
    root = tmp_path / "g"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((4, 4, 3), 9 * i, np.uint8)).save(root / name / f"{i}.png")
    s = datasets.image_folder(root, test_split=0.5)
    assert s.x_train.shape[1] == 1
    assert datasets.image_folder(root, color="rgb", test_split=0.5).x_train.shape[1] == 3
    c = datasets.image_folder(write_folder(tmp_path / "c"), color="gray")
    assert c.x_train.shape[1] == 1
    # JPEG (either ending) decodes too; it is lossy, so only the shape is checked.
    Image.fromarray(np.full((4, 4, 3), 50, np.uint8)).save(root / "a" / "2.jpg")
    Image.fromarray(np.full((4, 4, 3), 50, np.uint8)).save(root / "b" / "2.JPEG")
    j = datasets.image_folder(root, test_split=0.5)
    assert len(j.x_train) + len(j.x_test) == 6


def test_folder_errors_name_the_file(tmp_path):
    root = write_folder(tmp_path / "mixed", sizes=[(6, 5), (7, 5)])
    with pytest.raises(DataError, match=r"1\.bmp: 5x7 pixels but .*0\.png is 5x6.*size="):
        datasets.image_folder(root)
    assert datasets.image_folder(root, size=6).x_train.shape[2:] == (6, 6)

    empty = write_folder(tmp_path / "empty")
    (empty / "zebra").mkdir()
    with pytest.raises(DataError, match=r"zebra: empty class"):
        datasets.image_folder(empty)

    broken = write_folder(tmp_path / "broken")
    (broken / "dog" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(DataError, match=r"dog/3\.png"):
        datasets.image_folder(broken)

    with pytest.raises(DataError, match="no class subfolders"):
        datasets.image_folder(tmp_path / "empty" / "zebra")
    with pytest.raises(ValueError, match="color"):
        datasets.image_folder(root, color="cmyk")


def test_folder_memory_is_the_dataset_plus_one_picture(tmp_path, monkeypatch):
    """Every picture is decoded once, into one preallocated array (no list, no concatenate)."""
    from xcnn import image_folder as module

    root = write_folder(tmp_path / "m", per_class=4)
    decoded = []
    real = module.read_image
    monkeypatch.setattr(module, "read_image", lambda p, **kw: decoded.append(p) or real(p, **kw))
    allocations = []
    real_empty = np.empty
    monkeypatch.setattr(
        module.np,
        "empty",
        lambda shape, dtype: allocations.append(shape) or real_empty(shape, dtype),
    )
    s = datasets.image_folder(root, test_split=0.25)
    assert len(decoded) == 12 and len(s.x_train) + len(s.x_test) == 12
    batches = [a for a in allocations if isinstance(a, tuple) and len(a) == 4]
    assert batches == [(12, 3, 6, 5)]  # one array for the whole dataset
    # Train and test are views of it (split before decoding), not copies.
    assert s.x_train.base is not None and s.x_train.base is s.x_test.base


# -- CIFAR-10 ----------------------------------------------------------------------------


def cifar_records(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    pixels = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
    raw = np.concatenate([labels[:, None], pixels.reshape(n, -1)], axis=1).tobytes()
    return raw, pixels, labels


def write_cifar(folder: Path, counts=(3, 2, 4, 1, 2, 3)) -> dict[str, tuple]:
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    out = {}
    for seed, (name, n) in enumerate(zip(names, counts, strict=True)):
        raw, x, y = cifar_records(n, seed)
        (folder / name).write_bytes(raw)
        out[name] = (x, y)
    return out


def expected(parts: dict) -> tuple[np.ndarray, ...]:
    train = [parts[f"data_batch_{i}.bin"] for i in range(1, 6)]
    return (
        np.concatenate([p[0] for p in train]),
        np.concatenate([p[1] for p in train]),
        *parts["test_batch.bin"],
    )


def test_cifar10_from_the_binary_directory(tmp_path):
    parts = write_cifar(tmp_path / "cifar-10-batches-bin")
    s = datasets.cifar10(tmp_path)
    xtr, ytr, xte, yte = expected(parts)
    np.testing.assert_array_equal(s.x_train, xtr)
    np.testing.assert_array_equal(s.y_train, ytr)
    np.testing.assert_array_equal(s.x_test, xte)
    np.testing.assert_array_equal(s.y_test, yte)
    assert s.x_train.dtype == np.uint8 and s.y_train.dtype == np.int64
    assert s.classes == CIFAR10_CLASSES and s.classes[:2] == ("airplane", "automobile")
    assert datasets.load_data(str(tmp_path)).x_test.shape == (3, 3, 32, 32)


def make_tarball(tmp_path: Path, members_order=None) -> tuple[Path, dict]:
    parts = write_cifar(tmp_path / "src" / "cifar-10-batches-bin")
    tar_path = tmp_path / "cifar-10-binary.tar.gz"
    names = members_order or sorted(
        p.name for p in (tmp_path / "src" / "cifar-10-batches-bin").iterdir()
    )
    with tarfile.open(tar_path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/batches.meta.txt")
        meta = "\n".join(CIFAR10_CLASSES).encode()
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
        for name in names:
            tar.add(
                tmp_path / "src" / "cifar-10-batches-bin" / name, f"cifar-10-batches-bin/{name}"
            )
    return tar_path, parts


def test_cifar10_from_the_tarball_any_member_order(tmp_path):
    order = ["test_batch.bin", "data_batch_3.bin", "data_batch_1.bin", "data_batch_5.bin",
             "data_batch_2.bin", "data_batch_4.bin"]  # fmt: skip
    tar_path, parts = make_tarball(tmp_path, order)
    for s in (datasets.cifar10(tar_path), datasets.cifar10(tmp_path)):
        for got, want in zip(s[:4], expected(parts), strict=True):
            np.testing.assert_array_equal(got, want)


def test_cifar10_cache_checksum_and_download(tmp_path, monkeypatch):
    tar_path, parts = make_tarball(tmp_path)
    md5 = hashlib.md5(tar_path.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="download=True"):
        datasets.cifar10(cache_dir=cache, download=False)
    calls = []

    def fake_download(filename, dest, mirrors, want, progress, *, max_bytes=None, seconds=None):
        calls.append((filename, list(mirrors), want, max_bytes))
        dest.write_bytes(tar_path.read_bytes())

    monkeypatch.setattr(datasets, "_download", fake_download)
    s = datasets.cifar10(cache_dir=cache, md5=md5, mirrors=["http://mirror/"])
    # CIFAR-10's 170 MB archive gets its own size cap, above the 100 MB default.
    assert calls == [("cifar-10-binary.tar.gz", ["http://mirror/"], md5, CIFAR10_BYTES)]
    np.testing.assert_array_equal(s.x_test, expected(parts)[2])
    datasets.cifar10(cache_dir=cache, md5=md5, download=False)  # cached and verified: no call
    assert len(calls) == 1
    # The official archive's MD5 is the default, so this local one is "wrong".
    with pytest.raises(DataError, match="MD5 mismatch"):
        datasets.cifar10(cache_dir=cache, download=False)
    assert CIFAR10_MD5 == "c32a1d4ab5d03f1284b67883e8d87530"
    with pytest.raises(ValueError, match="MD5"):  # a download is never cached unchecked
        datasets.cifar10(cache_dir=cache, md5="")


def test_cifar10_errors_name_the_file(tmp_path):
    folder = tmp_path / "a" / "cifar-10-batches-bin"
    write_cifar(folder)
    (folder / "data_batch_2.bin").write_bytes((folder / "data_batch_2.bin").read_bytes()[:-7])
    with pytest.raises(DataError, match=r"data_batch_2\.bin: .*not a whole number"):
        datasets.cifar10(tmp_path / "a")

    folder = tmp_path / "b" / "cifar-10-batches-bin"
    write_cifar(folder)
    raw = bytearray((folder / "test_batch.bin").read_bytes())
    raw[3073] = 12  # second record's label
    (folder / "test_batch.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"test_batch\.bin: record 1 has label 12"):
        datasets.cifar10(tmp_path / "b")

    (folder / "data_batch_4.bin").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4.bin"):
        datasets.cifar10(tmp_path / "b")

    huge = tmp_path / "huge" / "cifar-10-batches-bin"
    write_cifar(huge)
    with open(huge / "data_batch_3.bin", "r+b") as fh:
        fh.truncate(10001 * 3073)  # sparse: declares one record too many
    with pytest.raises(DataError, match=r"data_batch_3\.bin: 10001 records, more than"):
        datasets.cifar10(tmp_path / "huge")

    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b" + bytes(100))
    with pytest.raises(DataError, match="bad.tar.gz"):
        datasets.cifar10(bad)
    with pytest.raises(FileNotFoundError, match="no CIFAR-10"):
        datasets.cifar10(tmp_path / "c")


# -- .npz and load_data --------------------------------------------------------------------


def test_npz_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 2, 5, 4), dtype=np.uint8)
    y = np.arange(10) % 3
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x[:7], y_train=y[:7], x_test=x[7:], y_test=y[7:],
             classes=np.array(["a", "b", "c"]))  # fmt: skip
    s = datasets.load_data(str(path))
    np.testing.assert_array_equal(s.x_train, x[:7])
    assert s.y_test.dtype == np.int64 and s.classes == ("a", "b", "c")
    np.savez(path, x_train=x[:7, 0].astype(np.int32), y_train=y[:7], x_test=x[7:, 0],
             y_test=y[7:])  # fmt: skip
    s = datasets.load_npz(path)
    assert s.x_train.shape == (7, 1, 5, 4) and s.x_train.dtype == np.uint8 and s.classes is None


@pytest.mark.parametrize(
    "arrays, match",
    [
        (
            {"x_train": np.zeros((2, 1, 3, 3), np.uint8), "y_train": np.zeros(2, int)},
            "missing x_test",
        ),
        (
            {"x_train": np.zeros((2, 1, 3, 3)), "y_train": np.zeros(2, int)},
            "x_train must be integer",
        ),
        ({"x_train": np.full((2, 1, 3, 3), 300), "y_train": np.zeros(2, int)}, r"0\.\.255"),
        (
            {"x_train": np.zeros((2, 1, 3, 3), np.uint8), "y_train": np.zeros(3, int)},
            "y_train must",
        ),
        ({"x_train": np.zeros((2, 1, 3, 3), np.uint8), "y_train": np.full(2, 0.5)}, "y_train must"),
        ({"x_train": np.zeros((2, 1, 3, 3), np.uint8), "y_train": np.full(2, -1)}, "negative"),
        ({"x_train": np.zeros((2, 1, 4, 3), np.uint8), "y_train": np.zeros(2, int)}, "x_test's"),
        (
            {
                "x_train": np.zeros((2, 1, 3, 3), np.uint8),
                "y_train": np.full(2, 5),
                "classes": np.array(["a"]),
            },
            "label 5 but only 1",
        ),  # fmt: skip
        (
            {
                "x_train": np.zeros((2, 1, 3, 3), np.uint8),
                "y_train": np.zeros(2, int),
                "classes": np.array([1, 2]),
            },
            "classes must be",
        ),  # fmt: skip
    ],
)
def test_npz_errors(tmp_path, arrays, match):
    base = {"x_test": np.zeros((1, 1, 3, 3), np.uint8), "y_test": np.zeros(1, int)}
    if "missing" in match:
        base.pop("x_test")
    path = tmp_path / "bad.npz"
    np.savez(path, **{**base, **arrays})
    with pytest.raises(DataError, match=match) as e:
        datasets.load_npz(path)
    assert "bad.npz" in str(e.value)


def test_npz_refuses_pickles_and_lying_headers(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x_train=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="obj.npz: x_train holds Python objects"):
        datasets.load_npz(path)
    # An .npy header declaring far more than the member holds is refused from the header.
    buf = io.BytesIO()
    header = {"descr": "|u1", "fortran_order": False, "shape": (4_000_000_000_000,)}
    np.lib.format.write_array_header_1_0(buf, header)
    raw = buf.getvalue() + bytes(4)

    with zipfile.ZipFile(tmp_path / "lie.npz", "w") as zf:
        zf.writestr("x_train.npy", raw)
    with pytest.raises(DataError, match="lie.npz: .*declares"):
        datasets.load_npz(tmp_path / "lie.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04" + bytes(50))
    with pytest.raises(DataError, match="junk.npz: not a readable"):
        datasets.load_npz(tmp_path / "junk.npz")


def test_load_data_resolves_every_kind(tmp_path):
    s = datasets.load_data("sample")
    assert s.x_train.shape == (8000, 1, 28, 28) and s.classes is None
    folder = write_folder(tmp_path / "pics")
    assert datasets.load_data(folder, test_split=0.2).classes == ("cat", "dog", "emu")
    idx = tmp_path / "idx"
    idx.mkdir()
    for name in datasets.FILES:
        n = 2
        header = b"\x00\x00\x08\x03" + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
        if "labels" in name:
            header = b"\x00\x00\x08\x01" + n.to_bytes(4, "big")
            (idx / name).write_bytes(header + bytes([1, 2]))
        else:
            (idx / name).write_bytes(header + bytes(n * 784))
    assert datasets.load_data(idx).x_train.shape == (2, 1, 28, 28)
    with pytest.raises(DataError, match="not a dataset directory: missing"):
        datasets.load_data(tmp_path / "pics" / "cat")
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        datasets.load_data("nope")
    assert datasets.describe(datasets.load_data(folder)) == {
        "input_shape": (3, 6, 5),
        "num_classes": 3,
    }


@pytest.mark.skipif(
    "input_shape" not in inspect.signature(xcnn.build_model).parameters,
    reason="needs build_model(name, input_shape=, num_classes=) from the framework branch "
    "(contract 1); runs once merged",
)
def test_accuracy_benchmark_runs_on_cifar_files(tmp_path, capsys):
    from benchmarks import accuracy

    write_cifar(tmp_path / "cifar-10-batches-bin", counts=(8, 8, 8, 8, 8, 10))
    status = accuracy.main(["--cifar", str(tmp_path), "--models", "seed", "--epochs", "1",
                            "--json"])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0 and "CIFAR-10 seed:" in out
    assert json.loads(out.strip().splitlines()[-1])["results"][0]["train_images"] == 40
