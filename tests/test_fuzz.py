"""Fuzzing the readers of untrusted files: checkpoints, IDX (raw and gzip), images for predict.

Each hostile input must end in the reader's own error naming the file (CheckpointError,
DataError, ValueError) or in a result identical to the undamaged file's, and never in
another exception or an allocation beyond what the file declares. The memory tests run
the readers in a child process under ``RLIMIT_AS`` and report its peak RSS.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xcnn
from xcnn import datasets, io
from xcnn.datasets import DataError
from xcnn.images import read_image
from xcnn.io import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _small_checkpoint(path: Path) -> Path:
    """A checkpoint of every kind of content (weights, Adam state, RNG, extra), a few KB."""
    model = xcnn.Sequential([xcnn.Dense(4, 3)], seed=1)
    opt = xcnn.Adam(model, 0.01)
    y = model.forward(model.asarray(np.ones((2, 4))))
    model.backward(y)
    opt.step()
    io.save(model, path, opt, epoch=2, rng=np.random.default_rng(3), extra={"note": [1, 2]})
    return path


def _summary(ck: io.Checkpoint) -> tuple:
    opt = ck.optimizer.state_dict() if ck.optimizer is not None else None
    arrays = {k: v.tobytes() for k, v in ck.model.state_dict().items()}
    if opt is not None:
        arrays.update({"o" + k: v.tobytes() for k, v in opt["arrays"].items()})
        opt = json.dumps({k: opt[k] for k in ("type", "hyperparams", "steps")}, sort_keys=True)
    meta = json.dumps([ck.model.config(), ck.epoch, ck.rng_state, ck.extra], sort_keys=True)
    return arrays, opt, meta


def _central_directory(data: bytes) -> tuple[int, int]:
    """Byte range of the zip's central directory and end record."""
    eocd = data.rindex(b"PK\x05\x06")
    (cd_offset,) = struct.unpack("<I", data[eocd + 16 : eocd + 20])
    return cd_offset, len(data)


def test_checkpoint_bit_flip_scan(tmp_path):
    """3,000 single-bit flips: each load is a CheckpointError or the identical checkpoint."""
    good = _small_checkpoint(tmp_path / "good.npz")
    data = good.read_bytes()
    reference = _summary(io.load_checkpoint(good))
    lo, hi = _central_directory(data)
    rng = random.Random(13)
    # A third in the central directory and end record, where the escapes were found.
    bits = [rng.randrange(lo * 8, hi * 8) for _ in range(1000)]
    bits += [rng.randrange(len(data) * 8) for _ in range(2000)]
    path = tmp_path / "flipped.npz"
    outcomes = {"CheckpointError": 0, "identical": 0}
    for bit in bits:
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(flipped)
        try:
            ck = io.load_checkpoint(path)
        except CheckpointError as e:
            assert str(path) in str(e)
            outcomes["CheckpointError"] += 1
            continue
        assert _summary(ck) == reference, f"bit {bit} changed the checkpoint silently"
        outcomes["identical"] += 1
    assert sum(outcomes.values()) == 3000
    assert outcomes["CheckpointError"] > 2000, outcomes


def _rehashed(path: Path, mutate, *, list_arrays: bool = True) -> None:
    """Rewrite the checkpoint with ``mutate(meta, arrays)`` applied and every hash recomputed."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays.pop("__xcnn__").tobytes())
    arrays.pop("__xcnn_sha256__")
    meta = mutate(meta, arrays)
    for k, v in arrays.items() if list_arrays else ():
        meta["arrays"][k] = {
            "shape": list(v.shape),
            "dtype": v.dtype.str,
            "sha256": hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest(),
        }
    raw = json.dumps(meta).encode()
    arrays["__xcnn__"] = np.frombuffer(raw, np.uint8)
    arrays["__xcnn_sha256__"] = np.frombuffer(hashlib.sha256(raw).hexdigest().encode(), np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
_FIELDS = ["model", "optimizer", "epoch", "rng_state", "extra", "dtype", "arrays", "version"]


@FUZZ
@given(field=st.sampled_from(_FIELDS), value=_JSON, inner=st.booleans())
def test_metadata_of_wrong_types_with_hashes_recomputed(tmp_path, field, value, inner):
    path = _small_checkpoint(tmp_path / "m.npz")

    def mutate(meta, arrays):
        target = (
            meta[field] if inner and isinstance(meta.get(field), dict) and meta[field] else None
        )
        if target is not None:
            target[sorted(target)[0]] = value
        else:
            meta[field] = value
        return meta

    _rehashed(path, mutate, list_arrays=field != "arrays")
    try:
        io.load_checkpoint(path)
    except CheckpointError as e:
        assert str(path) in str(e)


@pytest.mark.parametrize("depth", [40, 10_000, 200_000])
def test_deeply_nested_metadata(tmp_path, depth):
    path = _small_checkpoint(tmp_path / "deep.npz")

    def mutate(meta, arrays):
        meta["extra"] = {"x": None}
        return meta

    _rehashed(path, mutate)
    # Splice the nesting into the JSON text itself (json.dumps would recurse too deep).
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    raw = arrays["__xcnn__"].tobytes().replace(b'"x": null', b'"x": ' + b"[" * depth + b"]" * depth)
    arrays["__xcnn__"] = np.frombuffer(raw, np.uint8)
    arrays["__xcnn_sha256__"] = np.frombuffer(hashlib.sha256(raw).hexdigest().encode(), np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(CheckpointError, match="nested deeper|unreadable"):
        io.load_checkpoint(path)


def test_array_dtype_tampered_alone(tmp_path):
    """Only the dtype changes (bytes, shape and hashes consistent): still refused."""
    path = _small_checkpoint(tmp_path / "d.npz")

    def as_float64(meta, arrays):
        key = "param.0.weight"
        arrays[key] = arrays[key].astype(np.float64)
        return meta

    _rehashed(path, as_float64)
    with pytest.raises(CheckpointError, match="float64|fit the saved"):
        io.load_checkpoint(path)

    def as_int(meta, arrays):
        arrays["param.0.weight"] = arrays["param.0.weight"].view(np.int32)
        return meta

    _small_checkpoint(path)
    _rehashed(path, as_int)
    with pytest.raises(CheckpointError, match="real floating"):
        io.load_checkpoint(path)


# -- IDX and gzip headers --------------------------------------------------------------------


@FUZZ
@given(header=st.binary(min_size=0, max_size=40), body=st.binary(max_size=64), gz=st.booleans())
def test_malformed_idx_headers(tmp_path, header, body, gz):
    raw = header + body
    path = tmp_path / "f.idx"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    try:
        arr = datasets.read_idx(path)
    except DataError as e:
        assert str(path) in str(e)
    else:
        assert arr.nbytes <= len(raw)


@FUZZ
@given(
    code=st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07]),
    dims=st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=4),
    body=st.integers(0, 64),
)
def test_idx_headers_declaring_any_size(tmp_path, code, dims, body):
    raw = bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    path = tmp_path / "f.idx.gz"
    path.write_bytes(gzip.compress(raw + bytes(body)))
    try:
        datasets.read_idx(path)
    except DataError as e:
        assert str(path) in str(e)


@FUZZ
@given(position=st.integers(0, 30), bit=st.integers(0, 7))
def test_gzip_header_bit_flips(tmp_path, position, bit):
    raw = b"\x00\x00\x08\x01" + (6).to_bytes(4, "big") + bytes(range(6))
    data = bytearray(gzip.compress(raw, mtime=0))
    data[position % len(data)] ^= 1 << bit
    path = tmp_path / "g.gz"
    path.write_bytes(bytes(data))
    try:
        arr = datasets.read_idx(path)
    except DataError as e:
        assert str(path) in str(e)
    else:
        assert arr.tolist() == list(range(6))


def test_float_and_nan_labels_name_the_file(tmp_path):
    from tests.test_datasets import write_split_dir

    write_split_dir(tmp_path)
    lbl = tmp_path / "t10k-labels-idx1-ubyte.gz"
    n = len(datasets.read_idx(lbl))
    for values in (np.full(n, 3.7), np.full(n, np.nan)):
        raw = b"\x00\x00\x0e\x01" + n.to_bytes(4, "big") + values.astype(">f8").tobytes()
        lbl.write_bytes(gzip.compress(raw))
        with pytest.raises(DataError, match=f"{lbl}.*integers"):
            datasets.mnist(tmp_path)


# -- random bytes as .npy for predict -----------------------------------------------------------


_NPY_MAGIC = b"\x93NUMPY\x01\x00"


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda h, b: _NPY_MAGIC + len(h).to_bytes(2, "little") + h + b,
            st.binary(max_size=80),
            st.binary(max_size=80),
        ),  # fmt: skip
        st.builds(
            lambda shape, descr, b: _npy_bytes(shape, descr) + b,
            st.lists(st.integers(0, 2**40), max_size=3),
            st.sampled_from(["|u1", "<f8", "|b1", "<c16", "|O", "<i8", "<U3", "|V4"]),
            st.binary(max_size=100),
        ),
    )
)
def test_random_bytes_as_npy_for_predict(tmp_path, data):
    path = tmp_path / "x.npy"
    path.write_bytes(data)
    try:
        image = read_image(path)
    except (ValueError, OSError) as e:
        assert str(path) in str(e)
    else:
        assert image.ndim in (2, 3) and image.size <= len(data)


def _npy_bytes(shape, descr):
    header = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return _NPY_MAGIC + len(header).to_bytes(2, "little") + header


def test_predict_cli_on_random_npy_is_one_line(tmp_path, capsys):
    ck = _small_checkpoint(tmp_path / "m.npz")
    from xcnn.cli import main

    rng = np.random.default_rng(0)
    for i in range(20):
        path = tmp_path / f"r{i}.npy"
        path.write_bytes(_npy_bytes([28, 28 + i], "|u1") if i % 2 else rng.bytes(300))
        assert main(["predict", str(ck), str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("xcnn: error: ") and err.count("\n") == 1 and str(path) in err


# -- memory: hostile files under a memory cap ---------------------------------------------------


_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    import xcnn
    from xcnn import datasets, io, images

    def status_kb(field):
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith(field + ":"))

    def vm_kb():
        return status_kb("VmSize")

    cap = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, ((vm_kb() << 10) + cap, resource.RLIM_INFINITY))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    base = status_kb("VmHWM")
    results = {}
    for kind, path in json.loads(sys.argv[2]):
        try:
            if kind == "checkpoint":
                io.load_checkpoint(path)
            elif kind == "idx":
                datasets.read_idx(path)
            else:
                images.read_image(path)
            results[path] = "loaded"
        except (io.CheckpointError, datasets.DataError, ValueError) as e:
            results[path] = type(e).__name__
        except MemoryError:
            results[path] = "MemoryError"
    peak = status_kb("VmHWM")
    print(json.dumps({"results": results, "peak_kb": peak, "base_kb": base}))
    """
)

CAP = 256 << 20


def _hostile_files(tmp_path: Path) -> list[tuple[str, str]]:
    files = []
    good = _small_checkpoint(tmp_path / "good.npz")

    def huge_shape(meta, arrays):  # metadata declares a terabyte weight, hashes recomputed
        meta["model"]["layers"][0]["config"]["in_features"] = 2**20
        meta["model"]["layers"][0]["config"]["out_features"] = 2**20
        return meta

    for name, mutate in [("arch.npz", huge_shape)]:
        p = tmp_path / name
        p.write_bytes(good.read_bytes())
        _rehashed(p, mutate)
        files.append(("checkpoint", str(p)))
    # Consistent metadata and npy header both declaring 8 TB, with 16 bytes of data.
    with np.load(good, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays["__xcnn__"].tobytes())
    meta["model"]["layers"] = [{"type": "Dense", "config": {"in_features": 2**20,
                               "out_features": 2**20, "bias": False}}]  # fmt: skip
    meta["optimizer"] = None
    meta["arrays"] = {"param.0.weight": {"shape": [2**20, 2**20], "dtype": "<f4",
                                         "sha256": "0" * 64}}  # fmt: skip
    mraw = json.dumps(meta).encode()
    import zipfile

    p = tmp_path / "npyheader.npz"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("__xcnn__.npy", _npy_bytes([len(mraw)], "|u1") + mraw)
        zf.writestr(
            "__xcnn_sha256__.npy",
            _npy_bytes([64], "|u1") + hashlib.sha256(mraw).hexdigest().encode(),
        )
        zf.writestr("param.0.weight.npy", _npy_bytes([2**20, 2**20], "<f4") + bytes(16))
    files.append(("checkpoint", str(p)))
    # A deflate bomb: a 200 MB member (declared as such in the central directory).
    p = tmp_path / "bomb.npz"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("param.0.weight.npy", "w", force_zip64=True) as fh:
            for _ in range(200):
                fh.write(bytes(1 << 20))
        zf.writestr("__xcnn__.npy", _npy_bytes([len(mraw)], "|u1") + mraw)
        digest = hashlib.sha256(mraw).hexdigest().encode()
        zf.writestr("__xcnn_sha256__.npy", _npy_bytes([64], "|u1") + digest)
    files.append(("checkpoint", str(p)))
    # An IDX gzip whose stream is 300 MB of zeros behind a header declaring 784 bytes.
    p = tmp_path / "bomb-idx.gz"
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(p, "wb") as fh:
        fh.write(
            comp.compress(b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (1, 28, 28)))
        )
        for _ in range(300):
            fh.write(comp.compress(bytes(1 << 20)))
        fh.write(comp.flush())
    files.append(("idx", str(p)))
    # An IDX gzip header declaring 60000 x 28 x 28 x 4 GB.
    p = tmp_path / "huge-idx.gz"
    p.write_bytes(gzip.compress(b"\x00\x00\x0e\x04" + b"\xff\xff\xff\xff" * 4 + bytes(100)))
    files.append(("idx", str(p)))
    # A .npy for predict declaring a terabyte.
    p = tmp_path / "huge.npy"
    p.write_bytes(_npy_bytes([2**20, 2**20], "|u1") + bytes(100))
    files.append(("image", str(p)))
    # A raw IDX declaring 4 GB x 4 GB.
    p = tmp_path / "huge.idx"
    p.write_bytes(b"\x00\x00\x08\x02\xff\xff\xff\xff\xff\xff\xff\xff" + bytes(100))
    files.append(("idx", str(p)))
    return files


def test_hostile_files_under_a_memory_cap(tmp_path):
    files = _hostile_files(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(CAP), json.dumps(files)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for _, path in files:
        assert report["results"][path] in (
            "CheckpointError",
            "DataError",
            "ImageError",
            "ValueError",
        ), report
    grown_mb = (report["peak_kb"] - report["base_kb"]) / 1024
    print(f"peak RSS growth on hostile files: {grown_mb:.1f} MB (cap {CAP >> 20} MB)")
    # Before the fix the deflate bombs peaked at 450 and 650 MB.
    assert grown_mb < 64, report


def test_memory_cap_is_real():
    """The child's cap does bite: allocating past it fails (so the test above can fail)."""
    code = _CHILD.split("base =")[0] + "np.ones(400 << 20, np.uint8)\n"
    done = subprocess.run(
        [sys.executable, "-c", code, str(CAP), "[]"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.returncode != 0 and "MemoryError" in done.stderr
