"""Training runs: settings from options, recipe and checkpoint; start, data, checkpoints.

What ``xcnn train`` does, as library functions, so that the command line only parses
options and prints:

- :func:`resolve_settings` decides every setting of a run with one precedence rule:
  an explicit option, else the setting the resumed run recorded, else the model's
  :class:`~xcnn.models.Recipe`. A checkpoint written from Python records no settings and
  no recipe, so resuming it needs ``epochs`` and ``batch_size`` given: it never silently
  takes the seed net's recipe.
- :func:`start_run` builds (or restores) the model, optimizer and shuffle generator;
- :func:`load_splits` loads and trims the data;
- :meth:`Run.save` writes a checkpoint, refusing weights that have diverged.

Examples
--------
>>> from xcnn import runs
>>> s = runs.resolve_settings({"model": "seed", "epochs": 1})
>>> s.optimizer, s.lr, s.batch_size, s.epochs
('adam', 0.005, 32, 1)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import datasets, io, schedules
from .callbacks import BestCheckpoint, EarlyStopping
from .models import RECIPES, Recipe, build_model
from .optim import Optimizer, make_optimizer

__all__ = ["TrainSettings", "Run", "recipe_for", "resolve_settings", "start_run", "load_splits"]

#: Options that the checkpoint itself fixes: given with a resume, they are an error.
#: (The schedule, weight decay and validation split are part of the run it continues.)
FIXED_BY_CHECKPOINT = (
    "model", "optimizer", "seed", "weight_decay", "schedule", "warmup", "val_split",
)  # fmt: skip


@dataclass(frozen=True)
class TrainSettings:
    """Every setting of a training run (``epochs`` counts the epochs still to run)."""

    model: str
    data: str
    train_size: int | None
    test_size: int | None
    batch_size: int
    epochs: int
    optimizer: str
    lr: float
    lr_decay: float
    scale: str
    seed: int
    augment: str | None = None  # an xcnn.augment spec, e.g. "shift=2,rotate=10"
    image_size: int | None = None  # picture folders resized to this size
    weight_decay: float = 0.0  # decoupled (sgd, momentum, adamw)
    schedule: str = "step"  # xcnn.schedules.make_schedule's names; "step" is lr_decay itself
    warmup: float = 0.0  # epochs of linear warm-up
    val_split: float = 0.0  # fraction of the training images held out for validation
    early_stopping: int | None = None  # patience in epochs, on the validation accuracy
    #: The schedule fixed when the run started (over its epochs), so a resume follows it.
    schedule_config: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        """What a checkpoint records so that a resume continues with the same settings.

        ``lr`` is the run's starting rate (decay happens on top of it), never the decayed
        rate of the epoch it was saved at.
        """
        out = dataclasses.asdict(self)
        del out["epochs"]  # A resume says how many more to run.
        return out


def recipe_for(name: str, optimizer: str | None = None) -> Recipe:
    """The recipe of the named model; another optimizer than its own gets lr 0.01, no decay."""
    recipe = RECIPES[name]
    if optimizer is not None and optimizer != recipe.optimizer:
        recipe = recipe._replace(
            optimizer=optimizer, lr=0.01, lr_decay=1.0, schedule="step", warmup=0.0,
            weight_decay=0.0,
        )  # fmt: skip
    return recipe


def _given(options: Mapping[str, Any], key: str) -> Any:
    return options.get(key)


def resolve_settings(
    options: Mapping[str, Any], checkpoint: io.Checkpoint | None = None
) -> TrainSettings:
    """Settings of a run: explicit option > the resumed run's recorded setting > the recipe.

    Parameters
    ----------
    options : mapping
        Option values by :class:`TrainSettings` field name; ``None`` (or absent) means
        "not given".
    checkpoint : Checkpoint, optional
        The checkpoint to resume from. ``model``, ``optimizer`` and ``seed`` come from it
        and may not be given.

    Raises
    ------
    ValueError
        A fixed option given with a resume; a checkpoint without optimizer state; a
        checkpoint that records no settings (written from Python) resumed without
        ``epochs`` and ``batch_size``.
    """
    if checkpoint is None:
        name = _given(options, "model") or "seed"
        if name not in RECIPES:
            raise ValueError(f"unknown model {name!r}: choose one of {sorted(RECIPES)}")
        recipe = recipe_for(name, _given(options, "optimizer"))
        defaults: dict[str, Any] = {
            "model": name, "data": "sample", "train_size": None, "test_size": None,
            "optimizer": recipe.optimizer, "seed": 0, "augment": None, "image_size": None,
            "val_split": 0.0, "early_stopping": None, "schedule_config": None,
            **recipe._asdict(),
        }  # fmt: skip
    else:
        given = [f"--{k}" for k in FIXED_BY_CHECKPOINT if _given(options, k) is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} cannot be combined with --resume: the checkpoint holds them"
            )
        if checkpoint.optimizer is None:
            raise ValueError("the checkpoint has no optimizer state to resume from")
        previous = checkpoint.extra.get("train")
        previous = previous if isinstance(previous, dict) else {}
        name = previous.get("model", "model")
        opt_name = previous.get("optimizer", type(checkpoint.optimizer).__name__.lower())
        if name in RECIPES and previous:
            defaults = {**recipe_for(name, opt_name)._asdict(), "epochs": None}
        else:
            # No recipe is known for this model: nothing is guessed.
            defaults = {"batch_size": None, "epochs": None, "lr_decay": 1.0, "schedule": "step",
                        "warmup": 0.0}  # fmt: skip
        defaults.update(
            model=name,
            data="sample",
            train_size=None,
            test_size=None,
            optimizer=opt_name,
            seed=0,
            lr=checkpoint.optimizer.lr,
            scale=checkpoint.model.scale,
            augment=None,
            image_size=None,
            weight_decay=getattr(checkpoint.optimizer, "weight_decay", 0.0),
            val_split=0.0,
            early_stopping=None,
            schedule_config=None,
        )
        defaults.update({k: v for k, v in previous.items() if k in defaults and v is not None})
        missing = [f"--{k.replace('_', '-')}" for k in ("epochs", "batch_size")
                   if _given(options, k) is None and defaults[k] is None]  # fmt: skip
        if missing:
            why = "records no training settings (not written by 'xcnn train')"
            if previous:
                why = "sets no epoch count for a resume"
            raise ValueError(f"the checkpoint {why}: give {' and '.join(missing)}")
    values = {
        f.name: options[f.name] if options.get(f.name) is not None else defaults[f.name]
        for f in dataclasses.fields(TrainSettings)
        if f.name != "schedule_config"
    }
    config = defaults["schedule_config"]
    if config is not None:
        _schedule(config)  # a recorded schedule that cannot be rebuilt fails now
    elif checkpoint is None and (values["schedule"] != "step" or values["warmup"]):
        # The schedule is fixed when a run starts (over its epochs) and recorded, so a
        # resumed run follows the same rates. "step" without warm-up is lr_decay itself.
        config = schedules.make_schedule(
            values["schedule"], values["lr"], epochs=values["epochs"],
            warmup_epochs=values["warmup"], gamma=values["lr_decay"],
        ).config()  # fmt: skip
    return TrainSettings(**values, schedule_config=config)


def _schedule(config: Any) -> schedules.Schedule:
    try:
        return schedules.schedule_from_config(config)
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise ValueError(
            f"the recorded learning-rate schedule {config!r} is unusable ({e})"
        ) from None


@dataclass
class Run:
    """A run in progress: model, optimizer, shuffle generator, history so far."""

    settings: TrainSettings
    model: Any
    optimizer: Optimizer
    rng: np.random.Generator
    start_epoch: int = 0
    history: dict[str, list[Any]] = field(default_factory=dict)
    early: EarlyStopping | None = None  # with settings.early_stopping
    best: BestCheckpoint | None = None  # with a save-best path

    def schedule(self) -> schedules.Schedule | None:
        """The run's learning-rate schedule, or None for a constant rate times ``lr_decay``."""
        config = self.settings.schedule_config
        return None if config is None else _schedule(config)

    def callbacks(self) -> list[Any]:
        """Early stopping, then save-best, for ``fit(callbacks=...)`` after the history."""
        return [cb for cb in (self.early, self.best) if cb is not None]

    def extra(self) -> dict[str, Any]:
        """What a checkpoint of this run records: settings, callback state, history."""
        state = {"early_stopping": self.early.state_dict() if self.early else None,
                 "save_best": self.best.state_dict() if self.best else None}  # fmt: skip
        train = {**self.settings.record(), "backend": self.model.backend.name}
        train["state"] = {k: v for k, v in state.items() if v is not None}
        return {"train": train, "history": self.history}

    def record_epoch(self, epoch: int, logs: Mapping[str, float]) -> None:
        """Append one epoch's logs to the history: a ``fit`` callback, ``(epoch, logs)``."""
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)

    def save(self, path: str | os.PathLike[str], epoch: int) -> Path:
        """Checkpoint the run after ``epoch``; refuse (ValueError) if the weights diverged.

        A diverged run (non-finite loss or weights) never overwrites a checkpoint.
        """
        losses = self.history.get("train_loss", [])
        bad_loss = bool(losses) and not math.isfinite(losses[-1])
        if bad_loss or not all(np.isfinite(v).all() for v in self.model.state_dict().values()):
            raise ValueError(
                f"training diverged at epoch {epoch} (loss {losses[-1] if losses else 'nan'}): "
                f"{path} not written; try a smaller --lr"
            )
        return io.save(
            self.model, path, self.optimizer, epoch=epoch, rng=self.rng, extra=self.extra()
        )


def start_run(
    settings: TrainSettings,
    *,
    backend: Any = "numpy",
    device: Any = None,
    checkpoint: io.Checkpoint | None = None,
    new_lr: float | None = None,
    data: datasets.Splits | None = None,
    save_best: str | os.PathLike[str] | None = None,
) -> Run:
    """Build a fresh run from ``settings``, or continue ``checkpoint`` (model, optimizer, RNG).

    With a checkpoint the optimizer goes on at its saved (possibly decayed) rate, unless
    ``new_lr`` restarts it there. ``save_best`` writes the best checkpoint (on the
    validation accuracy) there; early stopping and save-best resume their state from
    the checkpoint. A fresh model is built for ``data``'s image shape and
    class count (the named nets adapt through ``input_shape``) and keeps its class names.
    """
    if checkpoint is None:
        shape = {} if data is None else datasets.describe(data)
        if shape == {"input_shape": (1, 28, 28), "num_classes": 10}:
            shape = {}  # MNIST's shape: the named nets as they are
        model = build_model(
            settings.model, backend=backend, device=device, seed=settings.seed, **shape
        )
        model.scale = settings.scale
        if data is not None and data.classes is not None:
            model.classes = list(data.classes)
        decay = settings.weight_decay
        optimizer = make_optimizer(
            settings.optimizer, model, settings.lr,
            weight_decay=decay if decay or settings.optimizer != "adam" else None,
        )  # fmt: skip
        run = Run(settings, model, optimizer, np.random.default_rng(settings.seed))
        state: dict[str, Any] = {}
    else:
        optimizer = checkpoint.optimizer
        assert optimizer is not None  # resolve_settings refused a checkpoint without one
        if new_lr is not None:
            optimizer.lr = float(new_lr)
        checkpoint.model.scale = settings.scale
        history = checkpoint.extra.get("history")
        history = {k: list(v) for k, v in history.items()} if isinstance(history, dict) else {}
        rng = checkpoint.rng() or np.random.default_rng(settings.seed)
        start = int(checkpoint.epoch or 0)
        run = Run(settings, checkpoint.model, optimizer, rng, start, history)
        train = checkpoint.extra.get("train")
        state = train.get("state") if isinstance(train, dict) else None
        state = state if isinstance(state, dict) else {}
    if settings.early_stopping is not None:
        run.early = EarlyStopping(settings.early_stopping)
        _restore(run.early, state.get("early_stopping"))
    if save_best is not None:
        run.best = BestCheckpoint(save_best, run.model, run.optimizer, rng=run.rng)
        run.best.extra = run.extra
        _restore(run.best, state.get("save_best"))
    return run


def _restore(callback: Any, state: Any) -> None:
    if state is None:
        return
    try:
        callback.load_state_dict(state)
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(
            f"the recorded {type(callback).__name__} state is unusable ({e})"
        ) from None


def _first(x: np.ndarray, n: int | None, option: str, what: str) -> np.ndarray:
    """The first ``n`` items (all when None); more than there are is an error."""
    if n is None:
        return x
    if n > len(x):
        raise ValueError(f"{option} {n} is more than the {len(x)} {what}")
    return x[:n]


def load_data(name: str, progress: bool, image_size: int | None = None) -> datasets.Splits:
    """:func:`xcnn.datasets.load_data`: ``progress`` is for downloads, ``image_size`` resizes
    a picture folder."""
    return datasets.load_data(name, progress=progress, size=image_size)


def load_splits(
    data: str,
    train_size: int | None,
    test_size: int | None,
    *,
    progress: bool = False,
    image_size: int | None = None,
) -> datasets.Splits:
    """The :class:`~xcnn.datasets.Splits` of ``data``, trimmed to the sizes given."""
    splits = load_data(data, progress, image_size)
    x_train = _first(splits.x_train, train_size, "--train-size", f"training images of {data}")
    x_test = _first(splits.x_test, test_size, "--test-size", f"test images of {data}")
    return datasets.Splits(
        x_train, splits.y_train[: len(x_train)], x_test, splits.y_test[: len(x_test)],
        splits.classes,
    )  # fmt: skip
