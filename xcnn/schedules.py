"""Learning-rate schedules: the rate as a function of training progress, in epochs.

A schedule is a callable ``schedule(epoch) -> lr`` of the (fractional) number
of epochs done, ``optimizer.steps / steps_per_epoch``. :func:`xcnn.fit` sets
``optimizer.lr = schedule(epoch)`` before every step. Because the rate is a
pure function of the step count, which the optimizer's checkpoint holds, a
resumed run follows the same rates as an uninterrupted one: a schedule keeps
no state of its own.

Each schedule is a frozen dataclass with :meth:`Schedule.config`, so its
settings can be saved (JSON) and rebuilt with :func:`schedule_from_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

__all__ = [
    "Schedule",
    "Constant",
    "Step",
    "Cosine",
    "Warmup",
    "constant",
    "step",
    "cosine",
    "warmup",
    "make_schedule",
    "schedule_from_config",
    "SCHEDULES",
]


class Schedule:
    """Base class: ``schedule(epoch) -> lr`` for ``epoch >= 0`` (fractional)."""

    def __call__(self, epoch: float) -> float:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """``{"type": name, **fields}``; :func:`schedule_from_config` rebuilds it."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        values = {k: v.config() if isinstance(v, Schedule) else v for k, v in values.items()}
        return {"type": type(self).__name__, **values}


@dataclass(frozen=True)
class Constant(Schedule):
    """``lr`` throughout."""

    lr: float

    def __call__(self, epoch: float) -> float:
        return self.lr


@dataclass(frozen=True)
class Step(Schedule):
    """Step decay: ``lr * gamma ** floor(epoch / every)``.

    With ``every=1`` this is the same rate as ``fit(lr_decay=gamma)``, which
    multiplies the rate after every epoch.
    """

    lr: float
    gamma: float = 0.5
    every: float = 1.0

    def __call__(self, epoch: float) -> float:
        return self.lr * self.gamma ** math.floor(epoch / self.every + 1e-9)


@dataclass(frozen=True)
class Cosine(Schedule):
    """Cosine annealing from ``lr`` to ``min_lr`` over ``epochs``, then ``min_lr``.

    ``lr_t = min_lr + (lr - min_lr) * (1 + cos(pi * t / epochs)) / 2``
    (Loshchilov & Hutter, 2017, without restarts).
    """

    lr: float
    epochs: float
    min_lr: float = 0.0

    def __call__(self, epoch: float) -> float:
        t = min(max(epoch / self.epochs, 0.0), 1.0)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Warmup(Schedule):
    """Linear warm-up over the first ``epochs``, then ``after`` (shifted to start at 0).

    The rate rises linearly to ``after(0)`` at ``epochs`` (starting at one
    step's worth above 0, never 0 itself); large rates early, before
    BatchNorm's and Adam's statistics settle, are what it avoids (Goyal et al., 2017).
    """

    after: Schedule
    epochs: float

    def __call__(self, epoch: float) -> float:
        if epoch < self.epochs:
            return self.after(0.0) * max(epoch, 1e-3 * self.epochs) / self.epochs
        return self.after(epoch - self.epochs)


def constant(lr: float) -> Constant:
    """A constant rate."""
    return Constant(_positive("lr", lr))


def step(lr: float, *, gamma: float = 0.5, every: float = 1.0) -> Step:
    """``lr`` times ``gamma`` every ``every`` epochs."""
    if not 0 < gamma <= 1:
        raise ValueError(f"step schedule: gamma must be in (0, 1], got {gamma!r}")
    return Step(_positive("lr", lr), float(gamma), _positive("every", every))


def cosine(lr: float, *, epochs: float, min_lr: float = 0.0) -> Cosine:
    """Cosine annealing from ``lr`` to ``min_lr`` over ``epochs``."""
    if not 0 <= min_lr <= lr:
        raise ValueError(f"cosine schedule: min_lr must be in [0, lr], got {min_lr!r}")
    return Cosine(_positive("lr", lr), _positive("epochs", epochs), float(min_lr))


def warmup(after: Schedule, *, epochs: float) -> Schedule:
    """Linear warm-up for ``epochs`` (0: none, ``after`` itself), then ``after``."""
    if epochs == 0:
        return after
    return Warmup(after, _positive("warm-up epochs", epochs))


#: Names accepted by :func:`make_schedule` (and ``xcnn train --schedule``).
SCHEDULES = ("constant", "step", "cosine")


def make_schedule(
    name: str, lr: float, *, epochs: float, warmup_epochs: float = 0.0, gamma: float = 0.5
) -> Schedule:
    """A named schedule over ``epochs`` of training, with optional warm-up first.

    Parameters
    ----------
    name : "constant", "step" or "cosine"
    lr : float, the peak rate.
    epochs : float, the whole run, warm-up included (cosine reaches 0 at its end).
    warmup_epochs : float, linear warm-up at the start.
    gamma : float, the step schedule's factor per epoch.
    """
    if warmup_epochs < 0 or (warmup_epochs and warmup_epochs >= epochs and name == "cosine"):
        raise ValueError(
            f"warm-up must be >= 0 and shorter than the {epochs} epochs, got {warmup_epochs}"
        )
    if name == "constant":
        base: Schedule = constant(lr)
    elif name == "step":
        base = step(lr, gamma=gamma)
    elif name == "cosine":
        base = cosine(lr, epochs=epochs - warmup_epochs)
    else:
        raise ValueError(f"unknown schedule {name!r}: choose one of {SCHEDULES}")
    return warmup(base, epochs=warmup_epochs)


_TYPES: dict[str, type[Schedule]] = {c.__name__: c for c in (Constant, Step, Cosine, Warmup)}


def schedule_from_config(config: dict[str, Any]) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.config`."""
    values = dict(config)
    try:
        cls = _TYPES[values.pop("type")]
    except KeyError:
        raise ValueError(f"unknown schedule config {config!r}") from None
    if "after" in values:
        values["after"] = schedule_from_config(values["after"])
    return cls(**values)


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)
