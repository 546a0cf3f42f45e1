"""xcnn.plots: every picture is a real, non-blank PNG of a fixed size; Sobel maps are right."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

import xcnn
from xcnn import plots
from xcnn.datasets import sample

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZES = {
    "curves.png": (1000, 400),
    "filters.png": (800, 400),
    "feature_maps.png": (800, 400),
    "confusion.png": (600, 560),
    "sobel.png": (900, 330),
}


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header, after checking the signature and the IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert head[12:16] == b"IHDR", f"{path.name}: first chunk is {head[12:16]!r}, not IHDR"
    return struct.unpack(">II", head[16:24])


def check_png(path: Path, size: tuple[int, int]) -> None:
    assert png_size(path) == size
    with PIL.open(path) as img:
        img.load()  # decodes the whole stream: catches truncated files
        assert img.size == size
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert pixels.var() > 0, f"{path.name} is blank"


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    return sample().x_test[0, 0]  # (28, 28) uint8


def seed_net(backend="numpy", device=None) -> xcnn.Sequential:
    layers = [xcnn.Conv2D(1, 8, 3), xcnn.MaxPool2D(2), xcnn.Flatten(), xcnn.Dense(13 * 13 * 8, 10)]
    return xcnn.Sequential(layers, backend=backend, device=device, seed=0)


HISTORY = {
    "epoch": [1, 2, 3],
    "train_loss": [1.2, 0.6, 0.4],
    "train_accuracy": [0.62, 0.83, 0.88],
    "val_loss": [0.8, 0.5, 0.45],
    "val_accuracy": [0.75, 0.85, 0.87],
    "seconds": [0.5, 0.5, 0.5],
}


def test_training_plots_writes_every_picture(tmp_path, digit):
    confusion = np.diag(np.full(10, 20)) + 1
    out = tmp_path / "new" / "dir"
    paths = plots.training_plots(
        out, history=HISTORY, model=seed_net(), confusion=confusion, image=digit
    )
    assert [p.name for p in paths] == [
        "curves.png",
        "filters.png",
        "feature_maps.png",
        "confusion.png",
    ]
    for p in paths:
        assert p.parent == out
        check_png(p, SIZES[p.name])
    # Atomic writes leave no temporary files behind.
    assert sorted(f.name for f in out.iterdir()) == sorted(p.name for p in paths)


def test_training_plots_without_validation_and_with_skips(tmp_path):
    history = {k: v for k, v in HISTORY.items() if not k.startswith("val_")}
    paths = plots.training_plots(tmp_path, history=history, model=None, confusion=None, image=None)
    assert [p.name for p in paths] == ["curves.png"]
    check_png(paths[0], SIZES["curves.png"])


def test_training_plots_overwrite_keeps_size(tmp_path, digit):
    model = seed_net()
    first = plots.training_plots(tmp_path, history=None, model=model, confusion=None, image=digit)
    model.layers[0].params["weight"] = model.layers[0].params["weight"] * 10
    second = plots.training_plots(tmp_path, history=None, model=model, confusion=None, image=digit)
    assert first == second
    for p in second:
        check_png(p, SIZES[p.name])


def test_filters_and_feature_maps_on_every_backend(tmp_path, backend, digit):
    model = seed_net(backend.spec, backend.device)
    paths = plots.training_plots(tmp_path, history=None, model=model, confusion=None, image=digit)
    assert [p.name for p in paths] == ["filters.png", "feature_maps.png"]
    for p in paths:
        check_png(p, SIZES[p.name])


def test_many_filters_keep_the_size(tmp_path, digit):
    model = xcnn.Sequential([xcnn.Conv2D(1, 40, 5)])  # more filters than panels
    paths = plots.training_plots(tmp_path, history=None, model=model, confusion=None, image=digit)
    for p in paths:
        check_png(p, SIZES[p.name])


def test_sobel_figure(tmp_path, digit):
    out = plots.sobel_figure(digit, tmp_path / "sobel.png")
    assert out == tmp_path / "sobel.png"
    check_png(out, SIZES["sobel.png"])
    # Floats and a (1, H, W) digit are accepted too, and give the same size.
    again = plots.sobel_figure(digit[None] / 255.0, tmp_path / "sobel_float.png")
    check_png(again, SIZES["sobel.png"])


def correlate(img: np.ndarray, k: np.ndarray, pad: int) -> np.ndarray:
    """The definition, one output pixel at a time: overlay, multiply, sum."""
    img = np.pad(img.astype(np.float64), pad)
    oh, ow = img.shape[0] - 2, img.shape[1] - 2
    out = np.empty((oh, ow))
    for r in range(oh):
        for c in range(ow):
            out[r, c] = np.sum(img[r : r + 3, c : c + 3] * k)
    return out


@pytest.mark.parametrize("padding, pad", [("same", 1), ("valid", 0)])
def test_sobel_maps_equal_direct_correlation(digit, padding, pad):
    vertical, horizontal = plots.sobel_maps(digit, padding=padding)
    assert vertical.shape == (28 - 2 + 2 * pad,) * 2
    np.testing.assert_allclose(vertical, correlate(digit, plots.SOBEL_VERTICAL, pad), atol=1e-9)
    np.testing.assert_allclose(horizontal, correlate(digit, plots.SOBEL_HORIZONTAL, pad), atol=1e-9)


def test_sobel_filters_and_tutorial_example():
    np.testing.assert_array_equal(plots.SOBEL_HORIZONTAL, plots.SOBEL_VERTICAL.T)
    img = np.array([[0, 50, 0, 29], [0, 80, 31, 2], [33, 90, 0, 75], [0, 9, 0, 95]], np.uint8)
    vertical, _ = plots.sobel_maps(img, padding="valid")
    np.testing.assert_array_equal(vertical, [[29, -192], [-35, -22]])


def test_bad_inputs(tmp_path, digit):
    with pytest.raises(ValueError, match="square"):
        plots.training_plots(
            tmp_path, history=None, model=None, confusion=np.ones((3, 4)), image=None
        )
    dense_first = xcnn.Sequential([xcnn.Flatten(), xcnn.Dense(784, 10)])
    with pytest.raises(ValueError, match="first layer must be a Conv2D"):
        plots.training_plots(tmp_path, history=None, model=dense_first, confusion=None, image=None)
    with pytest.raises(ValueError, match="2-D image"):
        plots.sobel_figure(np.zeros((2, 28, 28)), tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_missing_matplotlib_is_a_clear_import_error(tmp_path, digit, monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" now fails
    msg = r"matplotlib is needed for pictures: pip install 'xcnn\[plot\]'"
    with pytest.raises(ImportError, match=msg):
        plots.sobel_figure(digit, tmp_path / "sobel.png")
    with pytest.raises(ImportError, match=msg):
        plots.training_plots(tmp_path, history=HISTORY, model=None, confusion=None, image=None)
    assert not list(tmp_path.iterdir())
    # The Sobel numbers themselves need no matplotlib.
    assert plots.sobel_maps(digit)[0].shape == (28, 28)
