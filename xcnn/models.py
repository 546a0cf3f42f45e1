"""Named architectures, and the training recipe that goes with each.

``build_model("seed")`` is the from-scratch tutorial's network; ``"lenet"``
is the LeNet-style net of the classic Keras/PyTorch MNIST examples. Each
name also has a :class:`Recipe` (optimizer, learning rate, batch size,
epochs, input scaling) that the CLI and ``benchmarks/accuracy.py`` use as
defaults, so "train the seed net" means one thing everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .layers import Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU
from .model import Sequential

__all__ = ["MODELS", "RECIPES", "Recipe", "build_model"]


def _seed_layers() -> list[Layer]:
    # The tutorial's Conv3x3 has no bias, and none is needed: without an
    # activation before the pooling, a per-filter constant passes unchanged
    # through the max and is absorbed exactly by the dense layer's bias.
    # "tutorial" init: randn / 9 for the 3x3 filters, randn / 1352 for dense.
    return [
        Conv2D(1, 8, 3, bias=False, init="tutorial"),  # (N, 1, 28, 28) -> (N, 8, 26, 26)
        MaxPool2D(2),  # -> (N, 8, 13, 13)
        Flatten(),  # -> (N, 1352)
        Dense(13 * 13 * 8, 10, init="tutorial"),  # -> (N, 10) logits; softmax lives in the loss
    ]


def _lenet_layers() -> list[Layer]:
    # He init where a ReLU follows (it keeps the activations' variance from
    # shrinking layer by layer); Glorot for the logits, which no ReLU halves.
    return [
        Conv2D(1, 32, 3, init="he"),  # (N, 1, 28, 28) -> (N, 32, 26, 26)
        ReLU(),
        Conv2D(32, 64, 3, init="he"),  # -> (N, 64, 24, 24)
        ReLU(),
        MaxPool2D(2),  # -> (N, 64, 12, 12)
        Flatten(),  # -> (N, 9216)
        Dense(12 * 12 * 64, 128, init="he"),  # -> (N, 128)
        ReLU(),
        Dense(128, 10, init="glorot"),  # -> (N, 10) logits
    ]


#: name -> function returning the (unbuilt) layers.
MODELS: dict[str, Callable[[], list[Layer]]] = {"seed": _seed_layers, "lenet": _lenet_layers}


class Recipe(NamedTuple):
    """How a named model is trained by default (CLI and accuracy benchmark)."""

    optimizer: str
    lr: float
    batch_size: int
    epochs: int
    lr_decay: float = 1.0
    scale: str = "centered"


#: Defaults measured on MNIST (see ``benchmarks/accuracy.py``).
RECIPES: dict[str, Recipe] = {
    # Constant-rate Adam ends full-MNIST runs at 96.9-97.5% depending on the
    # seed; decaying the rate x0.3 per epoch gives 97.5-97.7% (seeds 0-2).
    "seed": Recipe(optimizer="adam", lr=0.005, batch_size=32, epochs=3, lr_decay=0.3),
    "lenet": Recipe(optimizer="adam", lr=0.001, batch_size=64, epochs=5, lr_decay=0.5),
}


def build_model(
    name: str,
    *,
    backend: str | Any = "numpy",
    device: Any = None,
    dtype: str = "float32",
    seed: int = 0,
) -> Sequential:
    """Build a named architecture with fresh weights on ``backend``.

    Parameters
    ----------
    name : {"seed", "lenet"}
        ``"seed"``: the tutorial's net, ``Conv2D(1, 8, 3)`` (valid, no bias) ->
        ``MaxPool2D(2)`` -> ``Flatten`` -> ``Dense(1352, 10)``, tutorial init;
        13,602 parameters. ``"lenet"``: ``Conv2D(1, 32, 3)`` + ReLU ->
        ``Conv2D(32, 64, 3)`` + ReLU -> ``MaxPool2D(2)`` -> ``Flatten`` ->
        ``Dense(9216, 128)`` + ReLU -> ``Dense(128, 10)``, He init;
        1,199,882 parameters.
    backend, device, dtype, seed
        As for :class:`xcnn.Sequential`.

    Returns
    -------
    Sequential
        Maps images (N, 1, 28, 28) to logits (N, 10).

    Raises
    ------
    ValueError
        Unknown ``name`` (the message lists the known ones).

    Examples
    --------
    >>> from xcnn.models import build_model
    >>> model = build_model("seed", backend="numpy", seed=0)
    >>> model.num_params()
    13602
    """
    try:
        layers = MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}: choose one of {sorted(MODELS)}") from None
    return Sequential(layers(), backend=backend, device=device, dtype=dtype, seed=seed)
