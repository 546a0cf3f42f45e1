"""Weight initialisers, drawn on the host.

The array API has no random numbers, and drawing on the host from one seeded
``numpy.random.Generator`` means one seed gives the same model on every
backend: weights are drawn here in float64 and only then cast and moved.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["INITIALISERS", "initialise", "make_rng"]

INITIALISERS = ("he", "glorot", "tutorial", "zeros", "ones")


def initialise(
    name: str, shape: tuple[int, ...], fan_in: int, fan_out: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw a float64 host array of ``shape``.

    Parameters
    ----------
    name : str
        ``"he"``: normal with std ``sqrt(2 / fan_in)``, for layers followed by
        ReLU (He et al., 2015). ``"glorot"``: uniform on ``+-sqrt(6 / (fan_in +
        fan_out))``, which keeps the variance of activations and gradients
        alike in both directions (Glorot & Bengio, 2010). ``"tutorial"``: the
        from-scratch tutorial's ``randn / fan_in`` (``randn / 9`` for 3x3
        filters, ``randn / input_len`` for dense): dividing keeps the first
        outputs small so softmax does not saturate. ``"zeros"``, ``"ones"``
        (BatchNorm's scale; ``rng`` is not used and may be None).
    fan_in, fan_out : int
        Inputs feeding one output unit, outputs fed by one input unit.
    """
    if name == "he":
        return rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
    if name == "glorot":
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, shape)
    if name == "tutorial":
        return rng.standard_normal(shape) / fan_in
    if name == "zeros":
        return np.zeros(shape)
    if name == "ones":
        return np.ones(shape)
    raise ValueError(f"unknown initialiser {name!r}: use one of {INITIALISERS}")


def make_rng(seed: Any) -> np.random.Generator:
    """A host generator from a seed, or a sequence of ints (``(seed, 1)``: a second
    stream of one seed), or the generator itself, to share one stream."""
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
