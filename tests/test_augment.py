"""Augmentation on the device: loop references, parity on every backend, seeds, exact resume."""

from __future__ import annotations

import numpy as np
import pytest

import xcnn
from xcnn.augment import Augment, parse_augment, warp
from xcnn.backend import to_numpy


def batch(n=6, c=2, h=7, w=5, dtype=np.uint8, seed=0):
    return np.random.default_rng(seed).integers(1, 256, (n, c, h, w)).astype(dtype)


def loop_shift_flip(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Obviously correct reference for integer shifts then flips: pixel by pixel."""
    n, c, h, w = x.shape
    out = np.zeros_like(x)
    for k in range(n):
        ty, tx = -theta[k, 0, 2], -theta[k, 1, 2]  # the content moves by (ty, tx)
        shifted = np.zeros_like(x[k])
        for i in range(h):
            for j in range(w):
                if 0 <= i - ty < h and 0 <= j - tx < w:
                    shifted[:, i, j] = x[k, :, int(i - ty), int(j - tx)]
        out[k] = shifted[:, :, ::-1] if theta[k, 1, 1] < 0 else shifted
    return out


def test_shift_and_flip_match_a_loop_reference():
    x = batch()
    aug = Augment(shift=3, flip=True)
    theta = aug.matrices(len(x), np.random.default_rng(1))
    assert set(np.unique(theta[:, 1, 1])) == {-1.0, 1.0}  # both flipped and unflipped samples
    got = warp(x, theta)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, loop_shift_flip(x, theta))


def test_known_shift_and_flip():
    x = np.arange(12, dtype=np.uint8).reshape(1, 1, 3, 4) + 1
    right = np.array([[[1, 0, 0], [0, 1, 0]]], np.float32)  # source column = j - 1
    right[0, 1, 2] = -1.0
    np.testing.assert_array_equal(
        warp(x, right)[0, 0], [[0, 1, 2, 3], [0, 5, 6, 7], [0, 9, 10, 11]]
    )
    mirror = np.array([[[1, 0, 0], [0, -1, 0]]], np.float32)
    np.testing.assert_array_equal(warp(x, mirror)[0, 0], x[0, 0, :, ::-1])
    # The checker can fail: a wrong direction of shift differs from the reference.
    wrong = right.copy()
    wrong[0, 1, 2] = 1.0
    assert not np.array_equal(warp(x, wrong), loop_shift_flip(x, right))


def test_rotation_by_90_degrees_is_exact_and_small_ones_keep_the_centre():
    x = batch(n=1, c=1, h=5, w=5)
    quarter = Augment(rotate=90).matrices(1, np.random.default_rng(0))
    quarter[0, :, :2] = [[0, -1], [1, 0]]  # exactly 90 degrees
    np.testing.assert_array_equal(warp(x, quarter)[0, 0], np.rot90(x[0, 0], k=-1))
    ones = np.full((4, 1, 9, 9), 200, np.uint8)
    out = warp(ones, Augment(rotate=10).matrices(4, np.random.default_rng(0)))
    assert (out[:, :, 3:6, 3:6] == 200).all()  # the middle stays inside the picture


def test_parity_on_every_backend(backend):
    x = batch(n=8, c=3, h=9, w=8)
    aug = Augment(shift=2, flip=True, rotate=15)
    theta = aug.matrices(len(x), np.random.default_rng(3))
    ref = warp(x, theta)
    model = backend.model([xcnn.Flatten()])
    got = to_numpy(warp(model.asarray(x), theta))
    assert got.dtype == np.uint8
    # Rotations sample between pixels: float32 rounding may move a value by one level.
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    assert np.mean(got != ref) < 0.01
    shift_only = Augment(shift=2, flip=True).matrices(len(x), np.random.default_rng(3))
    np.testing.assert_array_equal(to_numpy(warp(model.asarray(x), shift_only)), warp(x, shift_only))
    xf = model.asarray(x.astype(np.float32) / 255)
    out = warp(xf, theta)
    assert out.dtype == xf.dtype and model.backend.owns(out)


def test_read_only_input_is_not_written():
    x = batch()
    x.setflags(write=False)
    Augment(shift=1, rotate=5, flip=True)(x, np.random.default_rng(0))


def test_seeded_and_deterministic():
    x = batch()
    aug = parse_augment("shift,rotate,flip")
    a = aug(x, np.random.default_rng(5))
    b = aug(x, np.random.default_rng(5))
    c = aug(x, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert Augment()(x, np.random.default_rng(0)) is x


def test_parse_augment():
    assert repr(parse_augment("shift")) == "Augment(shift=2, flip=False, rotate=0)"
    assert repr(parse_augment("shift=4, flip, rotate=12.5")) == (
        "Augment(shift=4, flip=True, rotate=12.5)"
    )
    assert parse_augment("rotate,flip").spec() == "flip,rotate=10"
    for bad in ("shear", "shift=x", "flip=1", "rotate=500", "shift=-1", ""):
        with pytest.raises(ValueError):
            parse_augment(bad)


def small_run(epochs, *, rng, model=None, start_epoch=0):
    data = xcnn.datasets.sample()
    model = model or xcnn.build_model("seed", seed=0)
    opt = xcnn.make_optimizer("adam", model, 0.005)
    hist = xcnn.fit(model, opt, data.x_train[:256], data.y_train[:256], epochs=epochs,
                    batch_size=64, rng=rng, progress=False, start_epoch=start_epoch,
                    augment=Augment(shift=2, rotate=10))  # fmt: skip
    return model, opt, hist


def test_fit_with_augment_resumes_exactly(tmp_path):
    """Two epochs in one go == one epoch, a checkpoint (with the shuffle rng), one more."""
    whole, _, hist = small_run(2, rng=np.random.default_rng(0))
    plain = xcnn.build_model("seed", seed=0)
    xcnn.fit(plain, xcnn.make_optimizer("adam", plain, 0.005),
             xcnn.datasets.sample().x_train[:256], xcnn.datasets.sample().y_train[:256],
             epochs=2, batch_size=64, rng=np.random.default_rng(0), progress=False)  # fmt: skip
    assert not np.array_equal(plain.state_dict()["3.weight"], whole.state_dict()["3.weight"])

    rng = np.random.default_rng(0)
    first, opt, _ = small_run(1, rng=rng)
    xcnn.save(first, tmp_path / "a.npz", opt, epoch=1, rng=rng)
    ck = xcnn.io.load_checkpoint(tmp_path / "a.npz")
    data = xcnn.datasets.sample()
    hist2 = xcnn.fit(ck.model, ck.optimizer, data.x_train[:256], data.y_train[:256], epochs=1,
                     batch_size=64, rng=ck.rng(), progress=False, start_epoch=1,
                     augment=Augment(shift=2, rotate=10))  # fmt: skip
    for key, value in whole.state_dict().items():
        np.testing.assert_array_equal(ck.model.state_dict()[key], value)
    assert hist2["train_loss"] == hist["train_loss"][1:]


def test_fit_augments_every_batch_before_scaling(monkeypatch):
    seen = []

    def spy(xb, rng):
        seen.append((xb.dtype, int(xb.shape[0])))
        return xb

    data = xcnn.datasets.sample()
    model = xcnn.build_model("seed")
    xcnn.fit(model, xcnn.make_optimizer("sgd", model, 0.01), data.x_train[:100],
             data.y_train[:100], batch_size=32, progress=False, augment=spy)  # fmt: skip
    assert seen == [(np.uint8, 32)] * 3 + [(np.uint8, 4)]
