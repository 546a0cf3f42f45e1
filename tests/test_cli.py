"""The ``xcnn`` command line, end to end: train, evaluate, predict, sobel, and user errors."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import types

import numpy as np
import pytest

from xcnn import cli, datasets, io

SMALL = ["--train-size", "300", "--test-size", "100", "--no-progress"]


def run(capsys, *argv):
    """``main(argv)`` -> (exit status, stdout, stderr)."""
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def assert_user_error(status, err, *fragments):
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("xcnn: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def sample():
    return datasets.sample()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of the seed net after one epoch on 300 sample images."""
    path = tmp_path_factory.mktemp("ck") / "seed.npz"
    assert cli.main(["train", *SMALL, "--epochs", "1", "--save", str(path)]) == 0
    return path


@pytest.fixture
def fake_plots(monkeypatch):
    """Stands in for xcnn.plots (matplotlib) and records its calls."""
    calls = []
    module = types.ModuleType("xcnn.plots")

    def training_plots(out_dir, *, history, model, confusion, image):
        calls.append(("training_plots", out_dir, history, model, confusion, image))
        return [f"{out_dir}/curves.png"]

    def sobel_figure(image, out_path):
        calls.append(("sobel_figure", image, out_path))
        return out_path

    module.training_plots, module.sobel_figure = training_plots, sobel_figure
    monkeypatch.setitem(sys.modules, "xcnn.plots", module)
    return calls


# -- train -------------------------------------------------------------------------


def test_train_json_last_line(capsys):
    status, out, err = run(capsys, "train", *SMALL, "--epochs", "2", "--json")
    assert status == 0, err
    # --json: stdout holds only JSON lines (one per epoch, then the summary); text on stderr.
    assert "epoch 2: train loss" in err and "test accuracy:" in err
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["epoch"] for r in rows[:2]] == [1, 2] and "test_accuracy" in rows[0]
    metrics = last_json(out)
    assert metrics["epochs"] == 2 and metrics["model"] == "seed" and metrics["data"] == "sample"
    assert metrics["train_images"] == 300 and metrics["test_images"] == 100
    assert 0.5 < metrics["test_accuracy"] <= 1 and metrics["test_loss"] > 0
    assert metrics["optimizer"] == "adam" and metrics["images_per_second"] > 0


def test_train_options(capsys):
    status, out, _ = run(
        capsys, "train", *SMALL, "--epochs", "1", "--optimizer", "sgd", "--lr", "0.005",
        "--batch-size", "1", "--seed", "3", "--scale", "unit", "--backend", "array_api_strict",
        "--json",
    )  # fmt: skip
    assert status == 0
    metrics = last_json(out)
    assert metrics["optimizer"] == "sgd" and metrics["lr"] == 0.005 and metrics["lr_decay"] == 1
    assert metrics["batch_size"] == 1 and metrics["seed"] == 3 and metrics["scale"] == "unit"
    assert metrics["backend"] == "array_api_strict"


def test_train_from_a_directory_of_idx_files(capsys, tmp_path, sample):
    def write(name, array):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
        with gzip.open(tmp_path / (name + ".gz"), "wb") as fh:
            fh.write(header + array.astype(np.uint8).tobytes())

    write("train-images-idx3-ubyte", sample.x_train[:200, 0])
    write("train-labels-idx1-ubyte", sample.y_train[:200])
    write("t10k-images-idx3-ubyte", sample.x_test[:50, 0])
    write("t10k-labels-idx1-ubyte", sample.y_test[:50])
    status, out, _ = run(capsys, "train", "--data", tmp_path, "--epochs", "1", "--json")
    assert status == 0
    assert last_json(out)["train_images"] == 200 and last_json(out)["test_images"] == 50


def test_resume_continues_exactly(capsys, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    common = ["train", *SMALL, "--lr-decay", "0.5"]
    assert run(capsys, *common, "--epochs", "2", "--save", a)[0] == 0
    assert run(capsys, *common, "--epochs", "1", "--save", b)[0] == 0
    status, out, err = run(capsys, "train", "--resume", b, "--epochs", "1", "--save", b, "--json")
    assert status == 0 and "from epoch 1" in err
    assert last_json(out)["epochs"] == 2 and last_json(out)["train_images"] == 300
    full, resumed = io.load_checkpoint(a), io.load_checkpoint(b)
    assert resumed.epoch == 2 and resumed.optimizer.steps == full.optimizer.steps
    assert resumed.extra["history"] == {
        k: v if k != "seconds" else resumed.extra["history"]["seconds"]
        for k, v in full.extra["history"].items()
    }
    for key, value in full.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[key], value)


def test_plots_get_history_model_confusion_and_a_test_image(capsys, tmp_path, fake_plots):
    status, out, _ = run(capsys, "train", *SMALL, "--epochs", "2", "--plots", tmp_path / "p")
    assert status == 0 and f"wrote {tmp_path / 'p'}/curves.png" in out
    ((name, out_dir, history, model, confusion, image),) = fake_plots
    assert name == "training_plots" and out_dir == str(tmp_path / "p")
    assert history["epoch"] == [1, 2] and len(history["val_accuracy"]) == 2
    assert confusion.shape == (10, 10) and confusion.sum() == 100
    assert image.shape == (28, 28) and image.dtype == np.uint8
    assert model.layers[0].params["weight"].shape == (8, 1, 3, 3)


def test_plots_import_error_is_the_message(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "xcnn.plots", None)  # import fails with ImportError
    status, _, err = run(capsys, "train", *SMALL, "--epochs", "1", "--plots", tmp_path)
    assert_user_error(status, err, "xcnn.plots")


# -- evaluate and predict ---------------------------------------------------------------


def test_evaluate(capsys, trained):
    status, out, _ = run(capsys, "evaluate", trained, "--test-size", "100", "--json")
    assert status == 0
    assert "confusion matrix" in out
    metrics = last_json(out)
    assert metrics["test_size"] == 100 and np.array(metrics["confusion"]).sum() == 100
    assert metrics["test_accuracy"] == pytest.approx(np.trace(metrics["confusion"]) / 100)


def test_predict_png_and_npy(capsys, trained, tmp_path, sample):
    from PIL import Image

    digits = sample.x_test[:3, 0]
    Image.fromarray(digits[0]).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", digits[1])
    np.save(tmp_path / "c.npy", digits[2].astype(np.float32) / 255)  # floats are 0..1
    files = [tmp_path / "a.png", tmp_path / "b.npy", tmp_path / "c.npy"]
    status, out, _ = run(capsys, "predict", trained, *files, "--json")
    assert status == 0
    preds = last_json(out)["predictions"]
    assert [p["file"] for p in preds] == [str(f) for f in files]
    model = io.load(trained)
    from xcnn.training import predict

    expected = predict(model, digits[:, None])
    for p, e in zip(preds, expected, strict=True):
        assert p["class"] == int(e.argmax())
        assert p["probability"] == pytest.approx(float(e.max()), rel=1e-5)
    assert f"{files[0]}: {preds[0]['class']} (" in out


def test_predict_without_pillow(capsys, trained, tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "PIL", None)
    status, _, err = run(capsys, "predict", trained, tmp_path / "a.png")
    assert_user_error(status, err, "needs Pillow", "pip install")


# -- sobel ---------------------------------------------------------------------------------


def test_sobel_digit(capsys, tmp_path, fake_plots, sample):
    status, out, _ = run(capsys, "sobel", "--digit", "3", "--out", tmp_path / "s.png")
    assert status == 0 and "s.png" in out
    ((name, image, out_path),) = fake_plots
    assert name == "sobel_figure" and out_path == str(tmp_path / "s.png")
    first_three = sample.x_test[int(np.flatnonzero(sample.y_test == 3)[0]), 0]
    np.testing.assert_array_equal(image, first_three)


def test_sobel_image_files(capsys, tmp_path, fake_plots):
    from PIL import Image

    picture = (np.arange(40 * 30) % 256).astype(np.uint8).reshape(40, 30)
    Image.fromarray(picture).save(tmp_path / "p.png")
    np.save(tmp_path / "f.npy", picture / 255.0)
    for name in ("p.png", "f.npy"):
        assert run(capsys, "sobel", tmp_path / name, "--out", tmp_path / "o.png")[0] == 0
    for call in fake_plots:
        np.testing.assert_array_equal(call[1], picture)
        assert call[1].dtype == np.uint8


def test_real_plots_if_matplotlib(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    status, out, _ = run(capsys, "sobel", "--digit", "7", "--out", tmp_path / "s.png")
    assert status == 0 and (tmp_path / "s.png").stat().st_size > 0


# -- help and user errors -----------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["predict"], ["sobel"]])
def test_help(capsys, command):
    status, out, _ = run(capsys, *command, "--help")
    assert status == 0 and out.startswith("usage: xcnn")


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        ([], ["required: COMMAND"]),
        (["fly"], ["invalid choice: 'fly'"]),
        (["train", "--epochs", "0"], ["--epochs", "must be >= 1"]),
        (["train", "--lr", "-1"], ["--lr", "must be > 0"]),
        (["train", "--batch-size", "x"], ["--batch-size", "expected an integer"]),
        (["train", "--model", "vgg"], ["invalid choice: 'vgg'"]),
        (["sobel", "--out", "x.png"], ["one of the arguments IMAGE --digit is required"]),
        (["sobel", "--digit", "12", "--out", "x.png"], ["--digit"]),
        (["train", "--lr-decay", "2"], ["--lr-decay", "at most 1"]),
        (["train", "--lr", "inf"], ["--lr", "must be > 0"]),
        (["train", "--lr", "1e308"], ["--lr", "at most"]),
        (["train", "--lr", "nan"], ["--lr"]),
    ],
)
def test_usage_errors(capsys, argv, fragments):
    status, _, err = run(capsys, *argv)
    assert status == 2
    assert_user_error(status, err, *fragments)


def test_user_errors(capsys, tmp_path, trained, sample):
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    for name in datasets.FILES:
        (idx_dir / name).write_bytes(b"\x00\x00\x08\x03" + bytes(12))  # 0 images: fine
    (idx_dir / "train-labels-idx1-ubyte").write_bytes(b"junk")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(trained.read_bytes()[:500])
    np.save(tmp_path / "mask.npy", np.zeros((28, 28), bool))
    np.save(tmp_path / "hot.npy", np.full((28, 28), 2.0))
    cases = [
        (["train", "--backend", "jax"], ["unknown backend 'jax'"]),
        (["train", "--data", tmp_path / "nothing"], ["unknown dataset"]),
        (["train", "--data", tmp_path], ["missing"]),
        (["train", "--data", idx_dir], ["train-labels-idx1-ubyte", "bad magic"]),
        (["train", "--train-size", "9000"], ["--train-size 9000 is more than the 8000"]),
        (["train", "--resume", tmp_path / "none.npz"], ["none.npz", "No such file"]),
        (["train", "--resume", trained, "--model", "lenet"], ["--model cannot be combined"]),
        (["train", "--device", "3"], ["numpy", "CPU only"]),
        (["train", "--save", tmp_path / "no" / "x.npz"], ["No such directory", "no"]),
        (["evaluate", corrupt], [str(corrupt), "not a readable"]),
        (["evaluate", tmp_path / "none.npz"], ["No such file"]),
        (["predict", trained, tmp_path / "none.npy"], ["No such file"]),
        (["predict", trained, tmp_path / "mask.npy"], ["mask.npy", "bool"]),
        (["predict", trained, tmp_path / "hot.npy"], ["intensities in [0, 1]"]),
        (["sobel", tmp_path / "none.png", "--out", tmp_path / "o.png"], ["No such file"]),
    ]
    for argv, fragments in cases:
        status, _, err = run(capsys, *argv)
        assert status == 1, argv
        assert_user_error(status, err, *fragments)


def test_cupy_missing_is_one_line(capsys):
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed")
    except ImportError:
        pass
    status, _, err = run(capsys, "train", "--backend", "cupy")
    assert_user_error(status, err, "CuPy is not installed")


# -- as a program --------------------------------------------------------------------------


def test_python_dash_m_xcnn(tmp_path):
    argv = [sys.executable, "-m", "xcnn", "train", *SMALL, "--epochs", "1", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert last_json(done.stdout)["epochs"] == 1
    # no progress bar when stderr is not a terminal: only the text --json moves there
    assert "epoch 1: train loss" in done.stderr and "\r" not in done.stderr

    bad = [sys.executable, "-m", "xcnn", "evaluate", "missing.npz"]
    done = subprocess.run(bad, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == "xcnn: error: missing.npz: No such file or directory"
