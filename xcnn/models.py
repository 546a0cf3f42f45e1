"""Named architectures, and the training recipe that goes with each.

``build_model("seed")`` is the from-scratch tutorial's network; ``"lenet"``
is PyTorch's MNIST example net (without dropout); ``"lenet5"`` is LeNet-5;
``"resnet"`` a small residual net with BatchNorm. Each
name also has a :class:`Recipe` (optimizer, learning rate, batch size,
epochs, input scaling) that the CLI and ``benchmarks/accuracy.py`` use as
defaults, so "train the seed net" means one thing everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .blocks import BatchNorm2D, Dropout, GlobalAvgPool2D, Residual
from .layers import Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU
from .model import Sequential

__all__ = ["MODELS", "RECIPES", "Recipe", "build_model"]


Shape = tuple[int, int, int]
MNIST: Shape = (1, 28, 28)


def _seed_layers(shape: Shape = MNIST, k: int = 10) -> list[Layer]:
    # The tutorial's Conv3x3 has no bias, and none is needed: without an
    # activation before the pooling, a per-filter constant passes unchanged
    # through the max and is absorbed exactly by the dense layer's bias.
    # "tutorial" init: randn / 9 for the 3x3 filters, randn / 1352 for dense.
    c, h, w = shape
    return [
        Conv2D(c, 8, 3, bias=False, init="tutorial"),  # (N, 1, 28, 28) -> (N, 8, 26, 26)
        MaxPool2D(2),  # -> (N, 8, 13, 13)
        Flatten(),  # -> (N, 1352)
        Dense(8 * _n((h - 2) // 2) * _n((w - 2) // 2), k, init="tutorial"),  # -> (N, 10) logits
    ]


def _n(size: int) -> int:
    # An image too small for the net: the convolution or pooling before reports it
    # (Sequential checks the shapes in order); never a Dense error first.
    return max(size, 1)


def _lenet_layers(shape: Shape = MNIST, k: int = 10) -> list[Layer]:
    """PyTorch's MNIST example net (pytorch/examples mnist/main.py) without its two dropouts.

    Not LeNet: 3x3 convolutions and a 9216-wide dense layer, 1,199,882
    parameters. Kept under its historical name; ``lenet5`` is the real LeNet-5.
    """
    # He init where a ReLU follows (it keeps the activations' variance from
    # shrinking layer by layer); Glorot for the logits, which no ReLU halves.
    c, h, w = shape
    return [
        Conv2D(c, 32, 3, init="he"),  # (N, 1, 28, 28) -> (N, 32, 26, 26)
        ReLU(),
        Conv2D(32, 64, 3, init="he"),  # -> (N, 64, 24, 24)
        ReLU(),
        MaxPool2D(2),  # -> (N, 64, 12, 12)
        Flatten(),  # -> (N, 9216)
        Dense(64 * _n((h - 4) // 2) * _n((w - 4) // 2), 128, init="he"),  # -> (N, 128)
        ReLU(),
        Dense(128, k, init="glorot"),  # -> (N, 10) logits
    ]


def _lenet5_layers(shape: Shape = MNIST, k: int = 10) -> list[Layer]:
    """LeNet-5 (LeCun et al., 1998) with today's ReLU and max pooling.

    The paper's 32x32 input is the 28x28 digit padded by 2, here the first
    convolution's ``padding=2``: C1 6@28x28, S2 6@14x14, C3 16@10x10, S4
    16@5x5, C5 120, F6 84, output 10; 61,706 parameters at 28x28x1.
    """
    c, h, w = shape
    return [
        Conv2D(c, 6, 5, padding=2, init="he"),  # (N, 1, 28, 28) -> (N, 6, 28, 28)
        ReLU(),
        MaxPool2D(2),  # -> (N, 6, 14, 14)
        Conv2D(6, 16, 5, init="he"),  # -> (N, 16, 10, 10)
        ReLU(),
        MaxPool2D(2),  # -> (N, 16, 5, 5)
        Flatten(),  # -> (N, 400)
        # C5: a 5x5 convolution over a 5x5 map is a dense layer
        Dense(16 * _n((h // 2 - 4) // 2) * _n((w // 2 - 4) // 2), 120, init="he"),
        ReLU(),
        Dense(120, 84, init="he"),
        ReLU(),
        Dense(84, k, init="glorot"),  # -> (N, 10) logits
    ]


def _block(in_channels: int, out_channels: int) -> list[Layer]:
    """conv-BN-ReLU-conv-BN + shortcut, then ReLU (He et al., 2016, "basic block").

    A block that widens the channels projects the shortcut with a 1x1
    convolution and BatchNorm (the "B" option of the paper) instead of the identity.
    """
    branch = [
        Conv2D(in_channels, out_channels, 3, padding=1, bias=False),
        BatchNorm2D(out_channels),
        ReLU(),
        Conv2D(out_channels, out_channels, 3, padding=1, bias=False),
        BatchNorm2D(out_channels),
    ]
    shortcut: list[Layer] = []
    if in_channels != out_channels:
        shortcut = [Conv2D(in_channels, out_channels, 1, bias=False), BatchNorm2D(out_channels)]
    return [Residual(branch, shortcut=shortcut), ReLU()]


def _resnet_layers(shape: Shape = MNIST, k: int = 10) -> list[Layer]:
    """A small ResNet: a 16-channel stem, three residual blocks of 16, 32, 64 channels.

    The maps are halved by 2x2 max pooling before the 32- and 64-channel
    blocks (28 -> 14 -> 7, or 32 -> 16 -> 8), where the original ResNet uses
    stride-2 convolutions: the same shapes, and every convolution stays
    stride 1. Global average pooling makes the classifier independent of the
    image size. BatchNorm after every convolution (so no convolution needs
    a bias), dropout before the logits.
    """
    return [
        Conv2D(shape[0], 16, 3, padding=1, bias=False),  # (N, C, H, W) -> (N, 16, H, W)
        BatchNorm2D(16),
        ReLU(),
        *_block(16, 16),  # -> (N, 16, H, W)
        MaxPool2D(2),  # -> (N, 16, H/2, W/2)
        *_block(16, 32),  # -> (N, 32, H/2, W/2)
        MaxPool2D(2),  # -> (N, 32, H/4, W/4)
        *_block(32, 64),  # -> (N, 64, H/4, W/4)
        GlobalAvgPool2D(),  # -> (N, 64)
        Dropout(0.2),
        Dense(64, k, init="glorot"),  # -> (N, K) logits
    ]


#: name -> function ``(input_shape=(1, 28, 28), num_classes=10) -> unbuilt layers``, every
#: size given (``MODELS["seed"]()`` builds without an input shape).
MODELS: dict[str, Callable[..., list[Layer]]] = {
    "seed": _seed_layers,
    "lenet": _lenet_layers,
    "lenet5": _lenet5_layers,
    "resnet": _resnet_layers,
}


class Recipe(NamedTuple):
    """How a named model is trained by default (CLI and accuracy benchmark).

    ``schedule`` is a name for :func:`xcnn.schedules.make_schedule`: ``"step"``
    multiplies the rate by ``lr_decay`` after every epoch, ``"cosine"`` anneals
    it to 0 over ``epochs``; ``warmup`` epochs of linear warm-up come first.
    """

    optimizer: str
    lr: float
    batch_size: int
    epochs: int
    lr_decay: float = 1.0
    scale: str = "centered"
    schedule: str = "step"
    warmup: float = 0.0
    weight_decay: float = 0.0


#: Defaults measured on MNIST (see ``benchmarks/accuracy.py``); the lenet5 and
#: resnet recipes were chosen on a 10% validation split of the training set.
RECIPES: dict[str, Recipe] = {
    # Constant-rate Adam ends full-MNIST runs at 96.9-97.5% depending on the
    # seed; decaying the rate x0.3 per epoch gives 97.5-97.7% (seeds 0-2).
    "seed": Recipe(optimizer="adam", lr=0.005, batch_size=32, epochs=3, lr_decay=0.3),
    "lenet": Recipe(optimizer="adam", lr=0.001, batch_size=64, epochs=5, lr_decay=0.5),
    "lenet5": Recipe(optimizer="adam", lr=0.002, batch_size=64, epochs=10, schedule="cosine"),
    "resnet": Recipe(
        optimizer="adamw",
        lr=0.003,
        batch_size=128,
        epochs=5,
        schedule="cosine",
        warmup=0.3,
        weight_decay=0.01,
    ),
}


def build_model(
    name: str,
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int = 10,
    backend: str | Any = "numpy",
    device: Any = None,
    dtype: str = "float32",
    seed: int = 0,
) -> Sequential:
    """Build a named architecture with fresh weights on ``backend``.

    Parameters
    ----------
    name : {"seed", "lenet", "lenet5", "resnet"}
        ``"seed"``: the tutorial's net, ``Conv2D(1, 8, 3)`` (valid, no bias) ->
        ``MaxPool2D(2)`` -> ``Flatten`` -> ``Dense(1352, 10)``, tutorial init;
        13,602 parameters. ``"lenet"``: PyTorch's MNIST example net without its
        dropout (not LeNet): ``Conv2D(1, 32, 3)`` + ReLU -> ``Conv2D(32, 64, 3)``
        + ReLU -> ``MaxPool2D(2)`` -> ``Flatten`` -> ``Dense(9216, 128)`` + ReLU
        -> ``Dense(128, 10)``, He init; 1,199,882 parameters. ``"lenet5"``: the
        real LeNet-5 (5x5 convolutions 6 and 16 filters, 2x2 max pooling, dense
        120-84-10, ReLU); 61,706 parameters. ``"resnet"``: a small residual net
        with BatchNorm (16-channel stem, blocks of 16, 32, 64 channels, global
        average pooling, dropout 0.2); 77,754 parameters at 28x28x1.
    input_shape : (C, H, W), optional
        One image's shape; default ``(1, 28, 28)`` (MNIST). Every model adapts
        to other sizes and channel counts (e.g. ``(3, 32, 32)``) as long as the
        image survives its convolutions and poolings.
    num_classes : int
        ``K``, the number of logits.
    backend, device, dtype, seed
        As for :class:`xcnn.Sequential`.

    Returns
    -------
    Sequential
        Maps images (N, C, H, W) to logits (N, K); its ``scale`` is the recipe's.

    Raises
    ------
    ValueError
        Unknown ``name`` (the message lists the known ones).
    xcnn.layers.ShapeError
        An ``input_shape`` the architecture cannot take (too small, wrong rank).

    Examples
    --------
    >>> from xcnn.models import build_model
    >>> model = build_model("seed", backend="numpy", seed=0)
    >>> model.num_params()
    13602
    >>> build_model("resnet", input_shape=(3, 32, 32)).input_shape
    (3, 32, 32)
    """
    try:
        layers = MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}: choose one of {sorted(MODELS)}") from None
    shape = (1, 28, 28) if input_shape is None else tuple(input_shape)
    if len(shape) != 3:
        raise ValueError(f"{name}: input_shape must be (C, H, W), got {shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    recipe = RECIPES.get(name)
    return Sequential(
        layers(shape, num_classes),
        input_shape=shape,
        backend=backend,
        device=device,
        dtype=dtype,
        seed=seed,
        scale=recipe.scale if recipe is not None else "centered",
    )
