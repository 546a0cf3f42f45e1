"""The CLI on people's own data: picture folders, .npz arrays, augmentation, real pictures."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

from xcnn import cli, io
from xcnn.models import build_model

Image = pytest.importorskip("PIL.Image", reason="picture folders are decoded by Pillow")
ADAPTS = "input_shape" in inspect.signature(build_model).parameters
NEEDS_ADAPTING = pytest.mark.skipif(
    not ADAPTS,
    reason="needs build_model(name, input_shape=, num_classes=) from the framework branch "
    "(contract 1); runs once merged",
)


def run(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def one_line_error(status, err, *fragments):
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("xcnn: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """root/<name>/*.png: 10 classes of 28x28 grey pictures taken from the embedded sample."""
    from xcnn import datasets

    s = datasets.sample()
    root = tmp_path_factory.mktemp("digits")
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for k, name in enumerate(names):
        (root / name).mkdir()
        for i, j in enumerate(np.flatnonzero(s.y_train == k)[:12]):
            Image.fromarray(s.x_train[j, 0]).save(root / name / f"{i}.png")
    return root, sorted(names)


def test_train_on_a_folder_with_no_other_flag_then_evaluate_and_predict(
    capsys, tmp_path, digit_folder, monkeypatch
):
    root, names = digit_folder
    monkeypatch.chdir(tmp_path)
    status, out, _ = run(capsys, "train", "--data", root, "--no-progress")
    assert status == 0, out
    assert "test accuracy" in out and "100 train / 20 test images" in out

    ck = tmp_path / "d.npz"
    status, out, _ = run(capsys, "train", "--data", root, "--epochs", "1", "--save", ck)
    assert status == 0
    saved = io.load_checkpoint(ck)
    assert (getattr(saved.model, "classes", None) or saved.extra["classes"]) == names

    status, out, _ = run(capsys, "evaluate", ck)
    assert status == 0 and "classes: 0 eight, 1 five" in out and "on " + str(root) in out

    picture = Image.open(root / "seven" / "0.png")
    big = np.asarray(picture.resize((280, 280)))
    Image.fromarray(255 - big).save(tmp_path / "paper.png")  # dark pen on white paper
    status, out, err = run(capsys, "predict", ck, root / "seven" / "0.png", tmp_path / "paper.png",
                           "--json")  # fmt: skip
    assert status == 0
    assert "paper.png: dark on light: inverted" in err and "xcnn: note:" in err
    result = last_json(out)
    assert result["classes"] == names
    for row in result["predictions"]:
        assert set(row["probabilities"]) == set(names)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, rel=1e-5)
        assert row["name"] == names[row["class"]]
        assert f"{row['file']}: {row['name']} (" in out
    status, _, err = run(capsys, "predict", ck, tmp_path / "paper.png", "--no-invert")
    assert status == 0 and "inverted" not in err


@NEEDS_ADAPTING
def test_named_models_adapt_to_colour_folders(capsys, tmp_path):
    rng = np.random.default_rng(0)
    for k, name in enumerate(["red", "green", "blue"]):
        (tmp_path / "c" / name).mkdir(parents=True)
        for i in range(6):
            a = rng.integers(0, 60, (12, 12, 3), dtype=np.uint8)
            a[..., k] += 180
            Image.fromarray(a).save(tmp_path / "c" / name / f"{i}.png")
    for model in ("seed", "lenet"):
        ck = tmp_path / f"{model}.npz"
        status, out, _ = run(capsys, "train", "--data", tmp_path / "c", "--model", model,
                             "--epochs", "1", "--save", ck, "--json")  # fmt: skip
        assert status == 0, out
        status, out, _ = run(capsys, "predict", ck, tmp_path / "c" / "red" / "0.png", "--json")
        assert status == 0 and set(last_json(out)["classes"]) == {"red", "green", "blue"}


def test_npz_data_and_mixed_sizes(capsys, tmp_path, digit_folder):
    from xcnn import datasets

    s = datasets.sample()
    path = tmp_path / "arrays.npz"
    np.savez(path, x_train=s.x_train[:200], y_train=s.y_train[:200], x_test=s.x_test[:50],
             y_test=s.y_test[:50], classes=np.array([f"digit {k}" for k in range(10)]))  # fmt: skip
    status, out, _ = run(capsys, "train", "--data", path, "--epochs", "1", "--no-progress",
                         "--json")  # fmt: skip
    assert status == 0 and last_json(out)["train_images"] == 200
    assert last_json(out)["classes"][3] == "digit 3"

    mixed = tmp_path / "mixed"  # 10 classes of two pictures, one of them 28 wide, 30 high
    for k in range(10):
        (mixed / f"c{k}").mkdir(parents=True)
        for i in range(2):
            shape = (30, 28) if (k, i) == (4, 1) else (28, 28)
            Image.fromarray(np.full(shape, 25 * k, np.uint8)).save(mixed / f"c{k}" / f"{i}.png")
    status, _, err = run(capsys, "train", "--data", mixed)
    one_line_error(status, err, "c4/1.png: 28x30 pixels", "--image-size")
    status, out, _ = run(capsys, "train", "--data", mixed, "--image-size", "28", "--epochs", "1",
                         "--json")  # fmt: skip
    assert status == 0 and last_json(out)["image_size"] == 28


def test_augment_flag_resumes_exactly(capsys, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    common = ["train", "--train-size", "300", "--test-size", "100", "--no-progress",
              "--augment", "shift,rotate=8"]  # fmt: skip
    assert run(capsys, *common, "--epochs", "2", "--save", a)[0] == 0
    assert run(capsys, *common, "--epochs", "1", "--save", b)[0] == 0
    status, out, _ = run(capsys, "train", "--resume", b, "--epochs", "1", "--save", b, "--json")
    assert status == 0 and last_json(out)["augment"] == "shift=2,rotate=8"
    full, resumed = io.load_checkpoint(a), io.load_checkpoint(b)
    for key, value in full.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[key], value)
    plain = tmp_path / "p.npz"
    assert run(capsys, *common[:-2], "--epochs", "2", "--save", plain)[0] == 0
    other = io.load_checkpoint(plain).model.state_dict()
    assert not np.array_equal(other["3.weight"], full.model.state_dict()["3.weight"])

    status, _, err = run(capsys, "train", "--augment", "shear")
    assert status == 2 and "shear" in err


def test_hostile_pictures_are_one_line_errors(capsys, tmp_path):
    ck = tmp_path / "s.npz"
    assert run(capsys, "train", "--train-size", "100", "--test-size", "50", "--epochs", "1",
               "--save", ck)[0] == 0  # fmt: skip
    rng = np.random.default_rng(0)
    (tmp_path / "noise.png").write_bytes(rng.bytes(500))
    (tmp_path / "noise.npy").write_bytes(b"\x93NUMPY\x01\x00" + rng.bytes(500))
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 99))
        + chunk(b"IEND", b"")
    )  # fmt: skip
    for name, fragment in (("noise.png", "not a readable image"),
                           ("noise.npy", "not a readable .npy"),
                           ("bomb.png", "decompression bomb")):  # fmt: skip
        status, _, err = run(capsys, "predict", ck, tmp_path / name)
        one_line_error(status, err, name, fragment)
