"""Pictures of a network and its data: training curves, filters, feature maps, Sobel edges.

matplotlib is an optional extra (``pip install 'xcnn[plot]'``), imported only
when a picture is drawn, and only through its object API with the Agg
(raster, no display) canvas: nothing here touches ``pyplot``'s global state.

Every PNG is drawn at a fixed size and dpi (so its pixel size never depends on
the data) and written atomically: to a temporary file beside the target, then
``os.replace`` (:mod:`xcnn.atomic`), so a reader never sees half a picture.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write
from .backend import to_numpy
from .layers import Conv2D

__all__ = [
    "DPI",
    "SOBEL_VERTICAL",
    "SOBEL_HORIZONTAL",
    "sobel_maps",
    "sobel_figure",
    "training_plots",
]

#: Dots per inch of every PNG; with the fixed figure sizes below it fixes the pixel size.
DPI = 100

#: At most this many filters (or input + feature maps) are drawn in one picture.
MAX_PANELS = 32

#: Responds to vertical edges: positive where the image gets brighter left to right.
SOBEL_VERTICAL = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
#: Its transpose responds to horizontal edges: positive where it gets brighter downwards.
SOBEL_HORIZONTAL = SOBEL_VERTICAL.T.copy()

_MISSING = "matplotlib is needed for pictures: pip install 'xcnn[plot]'"


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure (inches) on an Agg canvas; ImportError with the fix if missing."""
    try:
        import matplotlib  # noqa: F401  (fails first, and clearly, when absent)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(_MISSING) from e
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG at :data:`DPI` to ``path`` atomically (see :mod:`xcnn.atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        # No "Software" stamp: the bytes depend on the picture, not the matplotlib version.
        fig.savefig(fh, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _image_2d(image: Any) -> np.ndarray:
    """A digit as a 2-D host array: accepts (H, W) or (1, H, W), any backend."""
    img = to_numpy(image)
    if img.ndim == 3 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image (H, W) or (1, H, W), got shape {img.shape}")
    return img


# ---------------------------------------------------------------------------
# Sobel edges, computed by xcnn's own convolution
# ---------------------------------------------------------------------------


def sobel_maps(image: Any, *, padding: str | int = "same") -> tuple[np.ndarray, np.ndarray]:
    """Vertical and horizontal Sobel edge maps of one image, by :class:`xcnn.Conv2D`.

    A 2-filter ``Conv2D(1, 2, 3, bias=False)`` gets the Sobel filters as its
    weights and runs once, in float64 on NumPy: this is the convolution of the
    tutorial (overlay the filter, multiply, sum), done by the library itself.
    Pixels are used as given (0..255 for uint8), so a bright output pixel means
    a big jump in brightness: an edge.

    Parameters
    ----------
    image : (H, W) uint8 or float array
    padding : "same" (default), "valid" or int
        ``"same"`` zero-pads one pixel on each side so the maps are (H, W) and
        line up with the image; ``"valid"`` gives (H - 2, W - 2).

    Returns
    -------
    vertical, horizontal : float64 arrays (OH, OW)
        ``vertical`` is the image correlated with :data:`SOBEL_VERTICAL`,
        ``horizontal`` with :data:`SOBEL_HORIZONTAL`.

    Examples
    --------
    >>> import numpy as np
    >>> from xcnn.plots import sobel_maps
    >>> img = np.array([[0, 50, 0, 29], [0, 80, 31, 2], [33, 90, 0, 75], [0, 9, 0, 95]])
    >>> sobel_maps(img, padding="valid")[0]
    array([[  29., -192.],
           [ -35.,  -22.]])
    """
    img = _image_2d(image).astype(np.float64)
    conv = Conv2D(1, 2, 3, padding=padding, bias=False).build("numpy", "float64")
    conv.params["weight"] = np.stack([SOBEL_VERTICAL, SOBEL_HORIZONTAL])[:, None]  # (2, 1, 3, 3)
    y = conv.forward(img[None, None], train=False)  # (1, 2, OH, OW)
    return y[0, 0], y[0, 1]


def sobel_figure(image: Any, out: str | os.PathLike[str]) -> Path:
    """Draw an image beside its vertical and horizontal Sobel edge maps; write a PNG.

    The maps come from :func:`sobel_maps` with ``"same"`` padding, so all three
    panels are the same size. They are signed: red where brightness rises (left
    to right, or top to bottom), blue where it falls, white where it is flat.

    Parameters
    ----------
    image : (H, W) uint8 or float array, e.g. one MNIST digit ``x[i, 0]``.
    out : path of the PNG (parent folders are created).

    Returns
    -------
    pathlib.Path
        ``out``; a 900 x 330 pixel PNG.

    Raises
    ------
    ImportError
        matplotlib is not installed.
    """
    img = _image_2d(image)
    vertical, horizontal = sobel_maps(img, padding="same")
    fig = _figure(9.0, 3.3)
    axes = fig.subplots(1, 3)
    lim = max(float(np.abs(vertical).max()), float(np.abs(horizontal).max()), 1e-12)
    axes[0].imshow(img, cmap="gray")
    axes[0].set_title("image")
    for ax, edge, title in (
        (axes[1], vertical, "vertical Sobel: vertical edges"),
        (axes[2], horizontal, "horizontal Sobel: horizontal edges"),
    ):
        shown = ax.imshow(edge, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(title, fontsize=10)
    fig.colorbar(shown, ax=list(axes[1:]), shrink=0.8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, out)


# ---------------------------------------------------------------------------
# What training produced
# ---------------------------------------------------------------------------


def training_plots(
    out_dir: str | os.PathLike[str],
    *,
    history: Mapping[str, Sequence[float]] | None,
    model: Any,
    confusion: Any,
    image: Any,
) -> list[Path]:
    """Write the pictures of a training run into ``out_dir`` (created if needed).

    Any of ``history``, ``model``, ``confusion``, ``image`` may be None to skip
    its pictures (``image`` needs ``model``).

    Parameters
    ----------
    out_dir : path
        Folder for the PNGs.
    history : dict of lists, or None
        As returned by :func:`xcnn.training.fit`: ``"epoch"``, ``"train_loss"``,
        ``"train_accuracy"`` and optionally ``"val_loss"``, ``"val_accuracy"``.
    model : xcnn.Sequential, or None
        A model whose first layer is a :class:`xcnn.Conv2D`, on any backend.
    confusion : (K, K) int array, or None
        Rows the true class, columns the predicted one
        (``evaluate(...)["confusion"]``).
    image : (28, 28) uint8 array, or None
        The digit whose feature maps are shown, scaled as training scales it
        (``x / 255 - 0.5``) before the first layer.

    Returns
    -------
    list of pathlib.Path, in this order, for those drawn:

    - ``curves.png`` (1000 x 400): loss and accuracy per epoch, train and test;
    - ``filters.png`` (800 x 400): the first layer's learned filters, each
      annotated with its weights when there are at most 16;
    - ``feature_maps.png`` (800 x 400): ``image`` and its maps after that layer
      (at most :data:`MAX_PANELS` panels in each of these two);
    - ``confusion.png`` (600 x 560): the confusion matrix, every cell annotated.

    Raises
    ------
    ImportError
        matplotlib is not installed.
    """
    out_dir = Path(out_dir)
    paths: list[Path] = []
    if history is not None:
        paths.append(_curves(history, out_dir / "curves.png"))
    if model is not None:
        paths.append(_filters(model, out_dir / "filters.png"))
        if image is not None:
            paths.append(_feature_maps(model, image, out_dir / "feature_maps.png"))
    if confusion is not None:
        paths.append(_confusion(confusion, out_dir / "confusion.png"))
    return paths


def _curves(history: Mapping[str, Sequence[float]], out: Path) -> Path:
    epochs = list(history.get("epoch") or range(1, len(history["train_loss"]) + 1))
    fig = _figure(10.0, 4.0)
    axes = fig.subplots(1, 2)
    for ax, what in zip(axes, ("loss", "accuracy"), strict=True):
        for split, style in (("train", "o-"), ("val", "s--")):
            values = history.get(f"{split}_{what}")
            if values is not None and len(values) and all(v is not None for v in values):
                label = "train" if split == "train" else "test"
                ax.plot(epochs[: len(values)], [float(v) for v in values], style, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy loss" if what == "loss" else "accuracy")
        ax.set_title(what)
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, out)


def _first_conv(model: Any) -> Conv2D:
    layer = model.layers[0]
    if not isinstance(layer, Conv2D):
        raise ValueError(f"the model's first layer must be a Conv2D to picture it, got {layer!r}")
    return layer


def _grid(n: int) -> tuple[int, int]:
    """Rows and columns for ``n`` small panels on a 2:1 figure."""
    cols = min(n, math.ceil(math.sqrt(2 * n)))
    return math.ceil(n / cols), cols


def _filters(model: Any, out: Path) -> Path:
    w = to_numpy(_first_conv(model).params["weight"]).astype(np.float64)  # (F, C, KH, KW)
    shown = f"first {MAX_PANELS} of {w.shape[0]} " if w.shape[0] > MAX_PANELS else ""
    w = w[:MAX_PANELS, 0]  # (F, KH, KW): the first input channel (the only one for MNIST)
    rows, cols = _grid(w.shape[0])
    fig = _figure(8.0, 4.0)
    fig.suptitle(f"{shown}learned first-layer filters (red positive, blue negative)")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    lim = max(float(np.abs(w).max()), 1e-12)
    for i, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= w.shape[0]:
            ax.set_axis_off()
            continue
        ax.imshow(w[i], cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"filter {i}", fontsize=9)
        if w.shape[0] <= 16 and w.shape[1] * w.shape[2] <= 25:  # room for the numbers
            for (r, c), v in np.ndenumerate(w[i]):
                color = "white" if abs(v) > 0.6 * lim else "black"
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8, color=color)
    return _save(fig, out)


def _feature_maps(model: Any, image: Any, out: Path) -> Path:
    conv = _first_conv(model)
    img = _image_2d(image)
    # Scaled as training scales ("centered"): x / 255 - 0.5.
    x = img.astype(np.float64) / 255.0 - 0.5 if img.dtype == np.uint8 else img.astype(np.float64)
    maps = to_numpy(conv.forward(model.asarray(x[None, None]), train=False))[0]  # (F, OH, OW)
    count = maps.shape[0]
    maps = maps[: MAX_PANELS - 1]
    rows, cols = _grid(maps.shape[0] + 1)
    fig = _figure(8.0, 4.0)
    oh, ow = maps.shape[1:]
    shown = f"the first {maps.shape[0]} of " if count > maps.shape[0] else ""
    fig.suptitle(f"one digit after the first layer: {shown}{count} maps of {oh}x{ow}")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].imshow(img, cmap="gray")
    axes[0].set_title("input", fontsize=9)
    for i, ax in enumerate(axes[1:]):
        if i >= maps.shape[0]:
            ax.set_axis_off()
            continue
        ax.imshow(maps[i], cmap="magma")
        ax.set_title(f"map {i}", fontsize=9)
    return _save(fig, out)


def _confusion(confusion: Any, out: Path) -> Path:
    cm = to_numpy(confusion).astype(np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion must be a square (K, K) matrix, got shape {cm.shape}")
    k = cm.shape[0]
    total = int(cm.sum())
    accuracy = float(np.trace(cm)) / total if total else float("nan")
    fig = _figure(6.0, 5.6)
    ax = fig.subplots()
    # Colour by the share of each true class, so small classes read as well as big ones.
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for (r, c), v in np.ndenumerate(cm):
        ax.text(
            c,
            r,
            str(v),
            ha="center",
            va="center",
            fontsize=8 if k <= 10 else 6,
            color="white" if share[r, c] > 0.5 else "black",
        )
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"confusion matrix: {total} test images, accuracy {accuracy:.1%}")
    return _save(fig, out)
