"""Checkpoints: round trips across backends, exact resume, corruption, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

import xcnn
from xcnn import datasets, io
from xcnn.io import CheckpointError, load, load_checkpoint, save
from xcnn.models import build_model
from xcnn.training import fit, predict


@pytest.fixture(scope="module")
def data():
    s = datasets.sample()
    return s.x_train[:300], s.y_train[:300], s.x_test[:100]


def _trained(data, backend="numpy", device=None, epochs=1, rng=None):
    model = build_model("seed", backend=backend, device=device)
    opt = xcnn.make_optimizer("adam", model, 0.005)
    fit(model, opt, data[0], data[1], epochs=epochs, batch_size=50, progress=False, rng=rng)
    return model, opt


@pytest.fixture
def checkpoint(tmp_path, data):
    model, opt = _trained(data)
    path = tmp_path / "model.npz"
    save(model, path, opt, epoch=1, rng=np.random.default_rng(5), extra={"note": "hi"})
    return path


def _arrays(path):
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _rewrite(path, arrays):
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _meta(arrays):
    return json.loads(arrays["__xcnn__"].tobytes())


def _with_meta(arrays, meta, *, rehash):
    raw = json.dumps(meta, sort_keys=True).encode()
    arrays = dict(arrays, __xcnn__=np.frombuffer(raw, dtype=np.uint8))
    if rehash:
        digest = hashlib.sha256(raw).hexdigest().encode()
        arrays["__xcnn_sha256__"] = np.frombuffer(digest, dtype=np.uint8)
    return arrays


# -- round trips ------------------------------------------------------------------


def test_numpy_to_strict_to_numpy_predicts_the_same(tmp_path, data):
    model, _ = _trained(data)
    expected = predict(model, data[2])
    save(model, tmp_path / "a.npz")
    strict = load(tmp_path / "a.npz", backend="array_api_strict", device="device1")
    assert strict.backend.name == "array_api_strict" and "device1" in str(strict.device)
    # Same weights; the arithmetic may differ in the last bits (NumPy has fast paths).
    np.testing.assert_allclose(predict(strict, data[2]), expected, rtol=1e-5, atol=1e-7)
    save(strict, tmp_path / "b.npz")
    back = load(tmp_path / "b.npz")
    np.testing.assert_array_equal(predict(back, data[2]), expected)  # bit for bit
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[key], value)
    assert back.config() == model.config()


def test_load_on_every_backend(backend, checkpoint, data):
    expected = predict(load(checkpoint), data[2])
    model = load(checkpoint, backend=backend.spec, device=backend.device)
    # Probabilities: a few hundred float32 ulps of rounding through the net and softmax.
    tol = 512 * float(np.finfo(np.dtype(model.dtype)).eps)
    np.testing.assert_allclose(predict(model, data[2]), expected, rtol=0, atol=tol)


def test_checkpoint_restores_optimizer_epoch_rng_and_extra(checkpoint, data):
    ck = load_checkpoint(checkpoint)
    assert isinstance(ck.optimizer, xcnn.Adam) and ck.optimizer.model is ck.model
    assert ck.optimizer.steps == 6 and ck.optimizer.lr == 0.005
    assert ck.epoch == 1 and ck.extra == {"note": "hi"}
    assert ck.rng().integers(1 << 30) == np.random.default_rng(5).integers(1 << 30)
    original, opt = _trained(data)
    state = opt.state_dict()["arrays"]
    for key, value in ck.optimizer.state_dict()["arrays"].items():
        np.testing.assert_array_equal(value, state[key])


def test_model_only_checkpoint(tmp_path, data):
    model, _ = _trained(data)
    save(model, tmp_path / "m.npz")
    ck = load_checkpoint(tmp_path / "m.npz")
    assert ck.optimizer is None and ck.epoch is None and ck.rng_state is None and ck.extra == {}


def test_resume_ends_where_an_uninterrupted_run_ends(backend, tmp_path, data):
    x, y = data[0], data[1]

    def run(model, opt, epochs, rng, start=0):
        return fit(model, opt, x, y, epochs=epochs, batch_size=32, lr_decay=0.7, rng=rng,
                   start_epoch=start, progress=False)  # fmt: skip

    straight = build_model("seed", backend=backend.spec, device=backend.device)
    opt = xcnn.make_optimizer("adam", straight, 0.005)
    full = run(straight, opt, 3, np.random.default_rng(11))

    model = build_model("seed", backend=backend.spec, device=backend.device)
    opt = xcnn.make_optimizer("adam", model, 0.005)
    rng = np.random.default_rng(11)
    first = run(model, opt, 2, rng)
    save(model, tmp_path / "ck.npz", opt, epoch=2, rng=rng)
    del model, opt, rng
    ck = load_checkpoint(tmp_path / "ck.npz", backend=backend.spec, device=backend.device)
    rest = run(ck.model, ck.optimizer, 1, ck.rng(), start=ck.epoch)

    assert rest["epoch"] == [3]
    assert first["train_loss"] + rest["train_loss"] == full["train_loss"]
    expected, got = straight.state_dict(), ck.model.state_dict()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


# -- corrupt files ------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 10, 100, 0.5, -30])
def test_truncated(checkpoint, keep):
    raw = checkpoint.read_bytes()
    cut = int(len(raw) * keep) if isinstance(keep, float) else keep % len(raw)
    checkpoint.write_bytes(raw[:cut])
    with pytest.raises(CheckpointError, match=str(checkpoint)):
        load(checkpoint)


def test_flipped_byte_in_the_zip(checkpoint):
    raw = bytearray(checkpoint.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the weights: the zip CRC or our SHA-256 catches it
    checkpoint.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=str(checkpoint)):
        load(checkpoint)


def test_changed_weights(checkpoint):
    arrays = _arrays(checkpoint)
    arrays["param.3.weight"] = arrays["param.3.weight"].copy()
    arrays["param.3.weight"][0, 0] += 1.0
    _rewrite(checkpoint, arrays)
    with pytest.raises(CheckpointError, match=r"array 'param.3.weight' does not match"):
        load(checkpoint)


def test_changed_metadata(checkpoint):
    arrays = _arrays(checkpoint)
    meta = _meta(arrays)
    meta["epoch"] = 99
    _rewrite(checkpoint, _with_meta(arrays, meta, rehash=False))
    with pytest.raises(CheckpointError, match="metadata does not match its SHA-256"):
        load(checkpoint)


def test_removed_and_added_arrays(checkpoint, tmp_path):
    arrays = _arrays(checkpoint)
    _rewrite(checkpoint, {k: v for k, v in arrays.items() if k != "param.3.bias"})
    with pytest.raises(CheckpointError, match=r"missing arrays \['param.3.bias'\]"):
        load(checkpoint)
    _rewrite(checkpoint, dict(arrays, extra=np.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected \['extra'\]"):
        load(checkpoint)


def test_wrong_version(checkpoint):
    arrays = _arrays(checkpoint)
    meta = _meta(arrays)
    meta["version"] = 2
    _rewrite(checkpoint, _with_meta(arrays, meta, rehash=True))
    with pytest.raises(CheckpointError, match="version 2 is not supported.*reads version 1"):
        load(checkpoint)


def test_invalid_architecture(checkpoint):
    arrays = _arrays(checkpoint)
    meta = _meta(arrays)
    meta["model"]["layers"][0]["type"] = "Eval"
    _rewrite(checkpoint, _with_meta(arrays, meta, rehash=True))
    with pytest.raises(CheckpointError, match="invalid model description"):
        load(checkpoint)


def test_invalid_optimizer(checkpoint):
    arrays = _arrays(checkpoint)
    meta = _meta(arrays)
    meta["optimizer"]["hyperparams"]["model"] = "x"  # may not reach setattr
    _rewrite(checkpoint, _with_meta(arrays, meta, rehash=True))
    with pytest.raises(CheckpointError, match="invalid optimizer state"):
        load_checkpoint(checkpoint)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "not a readable"),
        (b"hello, I am a text file\n", "not a readable"),
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "not a readable"),
        ("npy", "single .npy array"),
        ("plain-npz", "no '__xcnn__' metadata"),
    ],
)
def test_not_a_checkpoint(tmp_path, content, match):
    path = tmp_path / "thing.npz"
    if content == "npy":
        with open(path, "wb") as fh:
            np.save(fh, np.arange(3))
    elif content == "plain-npz":
        _rewrite(path, {"weights": np.arange(3)})
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as info:
        load(path)
    assert str(path) in str(info.value)


class _Payload:
    """Unpickling this would create a file: the test checks that it never happens."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickled_objects_are_never_loaded(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    with open(path, "wb") as fh:
        np.savez(fh, __xcnn__=np.array([_Payload(str(target))], dtype=object))
    with pytest.raises(CheckpointError, match="not a readable"):
        load(path)
    assert not target.exists()


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.npz")


# -- atomic writes -------------------------------------------------------------------


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".xcnn-tmp-" in p.name)


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_the_old_file(checkpoint, data, monkeypatch, failure):
    before = checkpoint.read_bytes()
    model, opt = _trained(data, epochs=2)

    def half_then_fail(fh, arrays):
        fh.write(b"PK\x03\x04" + bytes(1000))  # the start of a zip, then the crash
        raise failure

    monkeypatch.setattr(io, "_write_npz", half_then_fail)
    with pytest.raises(type(failure)):
        save(model, checkpoint, opt, epoch=2)
    assert checkpoint.read_bytes() == before
    assert load_checkpoint(checkpoint).epoch == 1
    assert _leftovers(checkpoint.parent) == []


def test_failed_fsync_keeps_the_old_file(checkpoint, data, monkeypatch):
    before = checkpoint.read_bytes()
    model, _ = _trained(data)

    def fail(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="I/O error"):
        save(model, checkpoint)
    assert checkpoint.read_bytes() == before
    assert _leftovers(checkpoint.parent) == []


def test_save_argument_errors(tmp_path, data):
    model, opt = _trained(data)
    other, _ = _trained(data)
    with pytest.raises(ValueError, match="another model"):
        save(other, tmp_path / "x.npz", opt)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save(model, tmp_path / "x.npz", extra={"f": object()})
    assert list(tmp_path.iterdir()) == []
