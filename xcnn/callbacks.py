"""Callbacks: code that :func:`xcnn.fit` runs after every epoch, and that may stop it.

The protocol is one method, ``on_epoch_end(epoch, logs) -> bool | None``:
``epoch`` counts from 1 (across resumes), ``logs`` is that epoch's history
entry (``train_loss``, ``val_accuracy``, ...), and returning True stops
training after this epoch. A plain function ``f(epoch, logs)`` is accepted
too, with the same meaning for its return value.

Callbacks that carry state across epochs (:class:`EarlyStopping`,
:class:`BestCheckpoint`) have ``state_dict()`` / ``load_state_dict()``, JSON
data to save in a checkpoint's ``extra`` so a resumed run stops, and saves,
exactly where an uninterrupted one would.
"""

from __future__ import annotations

import math
import os
from typing import Any, Protocol, runtime_checkable

__all__ = ["Callback", "EarlyStopping", "BestCheckpoint", "MONITORS"]

#: Metrics a callback can watch, and whether larger is better.
MONITORS: dict[str, bool] = {
    "val_accuracy": True,
    "val_loss": False,
    "train_accuracy": True,
    "train_loss": False,
}


@runtime_checkable
class Callback(Protocol):
    """Anything with ``on_epoch_end(epoch, logs)``; a True result stops training."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> bool | None: ...


class _Best:
    """The best value of a monitored metric so far, and the epoch it came in."""

    def __init__(self, monitor: str, min_delta: float) -> None:
        if monitor not in MONITORS:
            raise ValueError(f"unknown monitor {monitor!r}: choose one of {sorted(MONITORS)}")
        if not min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        self.monitor, self.min_delta = monitor, float(min_delta)
        self.best: float | None = None
        self.best_epoch: int | None = None

    def improved(self, epoch: int, logs: dict[str, Any]) -> bool:
        if self.monitor not in logs:
            raise ValueError(
                f"{type(self).__name__}: no {self.monitor!r} in the epoch's logs; "
                "validation metrics need validation_split or validation_data"
            )
        value = float(logs[self.monitor])
        if not math.isfinite(value):
            return False
        sign = 1.0 if MONITORS[self.monitor] else -1.0
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.best_epoch = value, epoch
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("monitor", self.monitor) != self.monitor:
            raise ValueError(
                f"{type(self).__name__}: state monitors {state['monitor']!r}, not {self.monitor!r}"
            )
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")


class EarlyStopping(_Best):
    """Stop when ``monitor`` has not improved for ``patience`` epochs in a row (as Keras).

    Parameters
    ----------
    patience : int
        Stop after this many epochs in a row without improvement (at least one).
    monitor : "val_accuracy" (default), "val_loss", "train_accuracy" or "train_loss"
    min_delta : float
        A change smaller than this is no improvement.

    Attributes
    ----------
    best, best_epoch : the best value so far and its epoch.
    wait : epochs since ``best_epoch``.
    stopped_epoch : the epoch that stopped training, or None.
    """

    def __init__(self, patience: int, *, monitor: str = "val_accuracy", min_delta: float = 0.0):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"early stopping patience must be an integer >= 0, got {patience!r}")
        super().__init__(monitor, min_delta)
        self.patience = patience
        self.wait = 0
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> bool:
        self.wait = 0 if self.improved(epoch, logs) else self.wait + 1
        # Keras's rule: patience 0 or 1 both stop at the first epoch without improvement.
        if self.wait and self.wait >= self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "wait": self.wait, "patience": self.patience}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.wait = int(state.get("wait", 0))


class BestCheckpoint(_Best):
    """Save the model to ``path`` whenever ``monitor`` improves (``xcnn train --save-best``).

    Parameters
    ----------
    path : path-like
        Overwritten atomically at each improvement (:func:`xcnn.io.save`).
    optimizer : Optimizer, optional
        Saved with the model, so the best checkpoint can be resumed too.
    monitor : as for :class:`EarlyStopping`.
    extra : callable, optional
        ``extra() -> dict`` of JSON data saved with it (settings, history).
    rng : numpy Generator, optional
        The shuffle generator, saved for resuming.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        model: Any,
        optimizer: Any = None,
        *,
        monitor: str = "val_accuracy",
        extra: Any = None,
        rng: Any = None,
    ) -> None:
        super().__init__(monitor, 0.0)
        self.path, self.model, self.optimizer = path, model, optimizer
        self.extra, self.rng = extra, rng

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        if self.improved(epoch, logs):
            from . import io  # io imports the model; import on use keeps this module light

            extra = self.extra() if callable(self.extra) else self.extra
            io.save(self.model, self.path, self.optimizer, epoch=epoch, rng=self.rng, extra=extra)
