"""The ``xcnn`` command line: train, evaluate, predict, sobel.

A thin layer over :mod:`xcnn.training`, :mod:`xcnn.io`, :mod:`xcnn.models`
and :mod:`xcnn.datasets`. User errors (a missing file, a bad option value, an
unknown backend, CuPy absent, bad data, a corrupt checkpoint) print one line,
``xcnn: error: ...``, to stderr and exit with status 1 (2 for a malformed
command line); set ``XCNN_DEBUG=1`` to see the traceback instead.

Examples
--------
``xcnn train``: the tutorial's net on the embedded MNIST sample, in seconds.
``xcnn train --model lenet --data mnist --save lenet.npz``, then
``xcnn evaluate lenet.npz`` or ``xcnn predict lenet.npz digit.png``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, datasets, io, schedules
from .backend import BackendError
from .callbacks import BestCheckpoint, EarlyStopping
from .models import MODELS, RECIPES, Recipe, build_model
from .optim import OPTIMIZERS, make_optimizer
from .training import SCALES, evaluate, fit, predict, scale_images, validation_split_indices

__all__ = ["main", "build_parser"]

#: Exceptions that mean "the user asked for something that cannot be done":
#: reported in one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, BackendError, ImportError)


class _UsageError(Exception):
    """A malformed command line (argparse's errors, without its usage block)."""


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line and never calls sys.exit (main returns)."""

    def error(self, message: str) -> Any:
        raise _UsageError(f"{message} (see '{self.prog} --help')")

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


# -- option types: a bad value becomes argparse's one-line "invalid value" error --


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 1,28,28, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three sizes >= 1 (C,H,W), got {text!r}")
    return shape


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _device(text: str | None) -> Any:
    """``"1"`` -> 1 (a CUDA index); other names (e.g. ``"device1"``) as given."""
    if text is None:
        return None
    return int(text) if text.isdigit() else text


# -- parser -------------------------------------------------------------------


def _add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        default="numpy",
        help="numpy (CPU, default) or cupy (CUDA GPU); torch and array_api_strict also work",
    )
    p.add_argument("--device", help="device of the backend, e.g. the CUDA device index")


def _add_data(p: argparse.ArgumentParser, default_note: str) -> None:
    p.add_argument(
        "--data",
        help="sample (embedded MNIST subset), mnist, fashion-mnist, or a directory holding "
        f"the four MNIST-format IDX files (default: {default_note})",
    )
    p.add_argument(
        "--test-size",
        type=_count(1),
        metavar="N",
        help="use only the first N test images (default: all)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``xcnn`` argument parser (exposed for documentation tools)."""
    parser = _Parser(
        prog="xcnn",
        description="Train and use small CNNs written from scratch against the array API.",
    )
    parser.add_argument("--version", action="version", version=f"xcnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    recipes = "; ".join(
        f"{name}: {r.optimizer} lr {r.lr} (x{r.lr_decay} per epoch), batch {r.batch_size}, "
        f"{r.epochs} epochs"
        for name, r in RECIPES.items()
    )

    t = sub.add_parser(
        "train",
        help="train a model and report its test accuracy",
        description="Train a named model; with no options, the tutorial's net on the embedded "
        f"MNIST sample. Defaults come from the model's recipe ({recipes}). The test set is "
        "evaluated after every epoch.",
    )
    t.add_argument("--model", choices=sorted(MODELS), help="architecture (default: seed)")
    _add_data(t, "sample, or the checkpoint's with --resume")
    t.add_argument(
        "--train-size", type=_count(1), metavar="N", help="use only the first N training images"
    )
    _add_backend(t)
    t.add_argument(
        "--epochs",
        type=_count(1),
        help="epochs to run (with --resume: this many more; default: the recipe's)",
    )
    t.add_argument("--batch-size", type=_count(1), help="images per step (default: the recipe's)")
    t.add_argument("--lr", type=_positive_float, help="learning rate (default: the recipe's)")
    t.add_argument(
        "--lr-decay",
        type=_positive_float,
        metavar="F",
        help="multiply the learning rate by F after every epoch (default: the recipe's)",
    )
    t.add_argument("--optimizer", choices=OPTIMIZERS, help="default: the recipe's")
    t.add_argument(
        "--weight-decay",
        type=_nonnegative_float,
        metavar="WD",
        help="decoupled weight decay (sgd, momentum, adamw; default: the recipe's)",
    )
    t.add_argument(
        "--schedule",
        choices=schedules.SCHEDULES,
        help="learning-rate schedule over the run: constant, step (x --lr-decay per epoch), "
        "cosine (to 0 at the last epoch) (default: the recipe's)",
    )
    t.add_argument(
        "--warmup",
        type=_nonnegative_float,
        metavar="EPOCHS",
        help="linear learning-rate warm-up over the first EPOCHS (may be fractional)",
    )
    t.add_argument(
        "--val-split",
        type=_fraction,
        metavar="F",
        help="hold out a stratified, seeded fraction F of the training images for validation "
        "after every epoch (default: 0, the test set is evaluated after every epoch instead)",
    )
    t.add_argument(
        "--early-stopping",
        type=_count(0),
        metavar="N",
        help="stop when the validation accuracy has not improved for N epochs (needs --val-split)",
    )
    t.add_argument(
        "--save-best",
        metavar="PATH",
        help="write a checkpoint here whenever the validation accuracy improves "
        "(needs --val-split)",
    )
    t.add_argument(
        "--scale",
        choices=sorted(SCALES),
        help="input scaling: unit x/255, centered x/255-0.5 (default), "
        "standard (x/255-0.1307)/0.3081",
    )
    t.add_argument("--seed", type=int, help="seed of initial weights and shuffling (default: 0)")
    t.add_argument(
        "--save", metavar="PATH", help="write a checkpoint here after every epoch (atomically)"
    )
    t.add_argument(
        "--resume",
        metavar="PATH",
        help="continue from a checkpoint: model, optimizer state, epoch count and shuffle order",
    )
    t.add_argument("--plots", metavar="DIR", help="write training plots here (needs matplotlib)")
    t.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per epoch, then the final metrics as JSON (last line); "
        "the human-readable text goes to stderr",
    )
    t.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (it is shown only when stderr is a terminal anyway)",
    )
    t.set_defaults(func=_train)

    e = sub.add_parser(
        "evaluate",
        help="test accuracy, loss and confusion matrix of a checkpoint",
        description="Evaluate a saved model on a test set.",
    )
    e.add_argument("checkpoint", metavar="PATH", help="checkpoint written by 'xcnn train --save'")
    _add_data(e, "the data the model was trained on, else sample")
    _add_backend(e)
    e.add_argument("--batch-size", type=_count(1), default=1000, help="images per forward pass")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON (last line)")
    e.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "predict",
        help="classify 28x28 images (PNG or .npy)",
        description="Print the most likely class and its probability for each image. Images are "
        "28x28 grayscale, white digit on black as in MNIST: PNG (needs Pillow) or .npy "
        "holding uint8 0..255 or floats 0..1.",
    )
    p.add_argument("checkpoint", metavar="PATH", help="checkpoint written by 'xcnn train --save'")
    p.add_argument("files", metavar="FILE", nargs="+", help="PNG or .npy images")
    p.add_argument("--invert", action="store_true", help="invert images (for black on white)")
    _add_backend(p)
    p.add_argument("--json", action="store_true", help="print the predictions as JSON (last line)")
    p.set_defaults(func=_predict)

    s = sub.add_parser(
        "sobel",
        help="figure of an image and its Sobel edge filters",
        description="Filter an image with the horizontal and vertical Sobel kernels and save a "
        "figure (needs matplotlib).",
    )
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("image", nargs="?", metavar="IMAGE", help="a PNG (needs Pillow) or .npy image")
    src.add_argument(
        "--digit",
        type=int,
        choices=range(10),
        metavar="N",
        help="use the first test image of digit N from the embedded sample",
    )
    s.add_argument("--out", required=True, metavar="FILE", help="figure to write (e.g. sobel.png)")
    s.set_defaults(func=_sobel)

    m = sub.add_parser(
        "summary",
        help="table of a named model's layers, output shapes and parameters",
        description="Print each layer of a named model with its output shape and parameter "
        "count, and the total.",
    )
    m.add_argument("--model", required=True, choices=sorted(MODELS), help="architecture")
    m.add_argument(
        "--input-shape",
        type=_shape,
        metavar="C,H,W",
        help="one image's shape (default: 1,28,28, MNIST)",
    )
    m.add_argument("--classes", type=_count(1), default=10, metavar="K", help="number of classes")
    m.set_defaults(func=_summary)
    return parser


def _summary(args: argparse.Namespace) -> int:
    model = build_model(args.model, input_shape=args.input_shape, num_classes=args.classes)
    print(model.summary())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``xcnn`` command line; return the exit status (0 on success)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except _Exit as e:
        return e.status
    except _UsageError as e:
        _error(str(e))
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except USER_ERRORS as e:
        if os.environ.get("XCNN_DEBUG"):
            raise
        _error(_message(e))
        return 1


def _error(message: str) -> None:
    print(f"xcnn: error: {message}", file=sys.stderr)


def _message(e: BaseException) -> str:
    """One line from an exception (multi-line messages, such as download failures, joined)."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _emit_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, sort_keys=True))


# -- data -----------------------------------------------------------------------


def _load_data(name: str, progress: bool) -> datasets.Splits:
    """``datasets.load``; ``progress`` is for downloads (the embedded sample takes no options)."""
    return datasets.load(name) if name == "sample" else datasets.load(name, progress=progress)


def _first(x: np.ndarray, n: int | None, option: str, what: str) -> np.ndarray:
    """The first ``n`` items (all when None); more than there are is an error."""
    if n is None:
        return x
    if n > len(x):
        raise ValueError(f"{option} {n} is more than the {len(x)} {what}")
    return x[:n]


# -- train ------------------------------------------------------------------------


@dataclass
class _Start:
    """Where a training run starts: fresh (from a recipe) or from a checkpoint."""

    name: str
    model: Any
    optimizer: Any
    opt_name: str
    rng: np.random.Generator
    seed: int
    recipe: Recipe
    start_epoch: int = 0
    previous: dict[str, Any] = field(default_factory=dict)  # settings of the resumed run
    history: dict[str, list[Any]] = field(default_factory=dict)  # history so far


def _recipe(name: str, opt_name: str) -> Recipe:
    """The model's recipe; another optimizer than the recipe's gets lr 0.01, no decay."""
    recipe = RECIPES.get(name, RECIPES["seed"])
    if opt_name != recipe.optimizer:
        recipe = recipe._replace(
            optimizer=opt_name, lr=0.01, lr_decay=1.0, schedule="step", warmup=0.0, weight_decay=0.0
        )
    return recipe


def _fresh_start(args: argparse.Namespace) -> _Start:
    name = args.model or "seed"
    seed = 0 if args.seed is None else args.seed
    opt_name = args.optimizer or RECIPES[name].optimizer
    recipe = _recipe(name, opt_name)
    model = build_model(name, backend=args.backend, device=_device(args.device), seed=seed)
    decay = recipe.weight_decay if args.weight_decay is None else args.weight_decay
    optimizer = make_optimizer(
        opt_name,
        model,
        recipe.lr if args.lr is None else args.lr,
        weight_decay=decay if decay or opt_name != "adam" else None,
    )
    return _Start(name, model, optimizer, opt_name, np.random.default_rng(seed), seed, recipe)


def _resumed_start(args: argparse.Namespace) -> _Start:
    given = [o for o, v in (("--model", args.model), ("--optimizer", args.optimizer),
                            ("--seed", args.seed), ("--weight-decay", args.weight_decay),
                            ("--schedule", args.schedule), ("--warmup", args.warmup),
                            ("--val-split", args.val_split)) if v is not None]  # fmt: skip
    if given:
        raise ValueError(
            f"{', '.join(given)} cannot be combined with --resume: the checkpoint holds them"
        )
    ck = io.load_checkpoint(args.resume, backend=args.backend, device=_device(args.device))
    if ck.optimizer is None:
        raise ValueError(f"{args.resume}: the checkpoint has no optimizer state to resume from")
    previous = dict(ck.extra.get("train", {}))
    name = previous.get("model", "model")
    opt_name = previous.get("optimizer", type(ck.optimizer).__name__.lower())
    seed = int(previous.get("seed", 0))
    if args.lr is not None:
        ck.optimizer.lr = args.lr
    return _Start(
        name,
        ck.model,
        ck.optimizer,
        opt_name,
        ck.rng() or np.random.default_rng(seed),
        seed,
        _recipe(name, opt_name),
        int(ck.epoch or 0),
        previous,
        {k: list(v) for k, v in ck.extra.get("history", {}).items()},
    )


def _train(args: argparse.Namespace) -> int:
    for option in (args.save, args.save_best):
        if option and not Path(option).resolve().parent.is_dir():
            # Fail now, not after the first epoch's work.
            raise FileNotFoundError(2, "No such directory", str(Path(option).parent))
    start = _resumed_start(args) if args.resume else _fresh_start(args)
    model, optimizer, recipe, history = start.model, start.optimizer, start.recipe, start.history
    # With --json, stdout carries only JSON lines; the human-readable text goes to stderr.
    out = sys.stderr if args.json else sys.stdout

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    def setting(key: str, given: Any, default: Any) -> Any:
        # Explicit option > the resumed run's setting > the recipe.
        return given if given is not None else start.previous.get(key, default)

    data = setting("data", args.data, "sample")
    train_size = setting("train_size", args.train_size, None)
    test_size = setting("test_size", args.test_size, None)
    batch_size = setting("batch_size", args.batch_size, recipe.batch_size)
    scale = setting("scale", args.scale, recipe.scale)
    lr_decay = setting("lr_decay", args.lr_decay, recipe.lr_decay)
    val_split = setting("val_split", args.val_split, 0.0)
    patience = setting("early_stopping", args.early_stopping, None)
    epochs = args.epochs if args.epochs is not None else recipe.epochs
    if (patience is not None or args.save_best) and not val_split:
        raise ValueError("--early-stopping and --save-best watch the validation accuracy: "
                         "give --val-split (e.g. 0.1)")  # fmt: skip

    # The schedule is fixed when a run starts (over its --epochs) and saved, so a
    # resumed run follows the same rates. "step" without warm-up is --lr-decay itself.
    schedule_config = start.previous.get("schedule_config")
    name = setting("schedule", args.schedule, recipe.schedule)
    warmup = setting("warmup", args.warmup, recipe.warmup)
    if schedule_config is None and (name != "step" or warmup):
        schedule_config = schedules.make_schedule(
            name, optimizer.lr, epochs=epochs, warmup_epochs=warmup, gamma=lr_decay
        ).config()
    schedule = None if schedule_config is None else schedules.schedule_from_config(schedule_config)

    progress = False if args.no_progress else (True if sys.stderr.isatty() else "lines")
    splits = _load_data(data, progress is True)
    x_train = _first(splits.x_train, train_size, "--train-size", f"training images of {data}")
    y_train = splits.y_train[: len(x_train)]
    x_test = _first(splits.x_test, test_size, "--test-size", f"test images of {data}")
    y_test = splits.y_test[: len(x_test)]

    settings = {
        "model": start.name, "data": data, "train_size": train_size, "test_size": test_size,
        "batch_size": batch_size, "optimizer": start.opt_name, "lr": optimizer.lr,
        "lr_decay": lr_decay, "scale": scale, "seed": start.seed, "backend": model.backend.name,
        "weight_decay": getattr(optimizer, "weight_decay", 0.0), "schedule": name,
        "warmup": warmup, "schedule_config": schedule_config, "val_split": val_split,
        "early_stopping": patience,
    }  # fmt: skip
    if schedule is not None:
        decay = f" ({name} schedule" + (f", {warmup:g} warm-up epochs)" if warmup else ")")
    else:
        decay = f" (x{lr_decay:g} per epoch)" if lr_decay != 1 else ""
    resumed = f" from epoch {start.start_epoch}" if start.start_epoch else ""
    n_train = (
        len(validation_split_indices(y_train, val_split, start.seed)[0])
        if val_split
        else len(x_train)
    )
    held = f" ({len(x_train) - n_train} held out for validation)" if val_split else ""
    say(
        f"training {start.name} ({model.num_params():,} parameters) on {data}: "
        f"{n_train} train{held} / {len(x_test)} test images; {start.opt_name} lr "
        f"{optimizer.lr:g}{decay}, batch {batch_size}, {epochs} epoch{'s' * (epochs != 1)}"
        f"{resumed}, {model.backend.name} backend"
    )

    def record(epoch: int, logs: dict[str, float]) -> None:
        for key, value in logs.items():
            history.setdefault(key, []).append(value)

    # In this order: the history first, so the checkpoints written after hold this epoch.
    hooks: list[Any] = [record]
    early = None
    if patience is not None:
        early = EarlyStopping(patience)
        if "early_stopping" in start.previous.get("state", {}):
            early.load_state_dict(start.previous["state"]["early_stopping"])
        hooks.append(early)
    best = None
    if args.save_best:
        best = BestCheckpoint(args.save_best, model, optimizer, rng=start.rng)
        if "save_best" in start.previous.get("state", {}):
            best.load_state_dict(start.previous["state"]["save_best"])
        hooks.append(best)
    val = "val" if val_split else "test"  # what the per-epoch metrics were measured on

    def extra() -> dict[str, Any]:
        state = {"early_stopping": early.state_dict() if early else None,
                 "save_best": best.state_dict() if best else None}  # fmt: skip
        state = {k: v for k, v in state.items() if v is not None}
        return {"scale": scale, "train": {**settings, "state": state}, "history": history}

    if best is not None:
        best.extra = extra

    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        rate = n_train / logs["seconds"] if logs["seconds"] > 0 else float("inf")
        say(
            f"epoch {epoch}: train loss {logs['train_loss']:.4f} acc {logs['train_accuracy']:.2%}"
            f" | {val} loss {logs['val_loss']:.4f} acc {logs['val_accuracy']:.2%}"
            f" | {logs['seconds']:.1f} s, {rate:,.0f} img/s"
        )
        if args.json:
            row = {k: v for k, v in logs.items() if not k.startswith("val_")}
            row.update({f"{val}_loss": logs["val_loss"], f"{val}_accuracy": logs["val_accuracy"]})
            _emit_json({**row, "lr": optimizer.lr})
        if args.save:
            io.save(model, args.save, optimizer, epoch=epoch, rng=start.rng, extra=extra())

    hooks.append(on_epoch)
    run = fit(
        model,
        optimizer,
        x_train,
        y_train,
        epochs=epochs,
        batch_size=batch_size,
        validation_data=None if val_split else (x_test, y_test),
        validation_split=val_split,
        scale=scale,
        lr_decay=1.0 if schedule is not None else lr_decay,
        schedule=schedule,
        seed=start.seed,
        rng=start.rng,
        start_epoch=start.start_epoch,
        progress=progress,
        callbacks=hooks,
    )
    stopped = early is not None and early.stopped_epoch is not None
    if stopped:
        say(
            f"early stopping after epoch {early.stopped_epoch}: no better val accuracy for "
            f"{early.wait} epochs (best {early.best:.2%} at epoch {early.best_epoch})"
        )
    result = evaluate(model, x_test, y_test, scale=scale)
    seconds = float(sum(run["seconds"]))
    epochs_run = len(run["epoch"])
    say(
        f"test accuracy: {result['accuracy']:.2%} (loss {result['loss']:.4f}, {len(x_test)} images)"
    )
    if args.save:
        say(f"saved checkpoint to {args.save}")
    if best is not None and best.best_epoch is not None:
        say(f"best checkpoint (val accuracy {best.best:.2%}, epoch {best.best_epoch}): "
            f"{args.save_best}")  # fmt: skip
    if args.plots:
        plots = importlib.import_module("xcnn.plots")
        written = plots.training_plots(
            args.plots,
            history=history,
            model=model,
            confusion=result["confusion"],
            image=np.asarray(x_test[0, 0]),
        )
        for path in written:
            say(f"wrote {path}")
    if args.json:
        final = {
            **{k: v for k, v in settings.items() if k != "schedule_config"},
            "train_images": n_train,
            "val_images": len(x_train) - n_train,
            "test_images": len(x_test),
            "epochs": start.start_epoch + epochs_run,
            "train_loss": run["train_loss"][-1] if epochs_run else None,
            "train_accuracy": run["train_accuracy"][-1] if epochs_run else None,
            "test_loss": result["loss"],
            "test_accuracy": result["accuracy"],
            "seconds": seconds,
            "images_per_second": n_train * epochs_run / seconds if seconds > 0 else None,
            "checkpoint": args.save,
            "stopped_early": stopped,
        }
        if val_split and epochs_run:
            final["val_accuracy"] = run["val_accuracy"][-1]
        if best is not None:
            final.update(best_checkpoint=args.save_best, best_val_accuracy=best.best)
        _emit_json(final)
    return 0


# -- evaluate -------------------------------------------------------------------------


def _evaluate(args: argparse.Namespace) -> int:
    ck = io.load_checkpoint(args.checkpoint, backend=args.backend, device=_device(args.device))
    trained = ck.extra.get("train", {})
    data = args.data or trained.get("data", "sample")
    splits = _load_data(data, sys.stderr.isatty())
    x = _first(splits.x_test, args.test_size, "--test-size", f"test images of {data}")
    y = splits.y_test[: len(x)]
    scale = ck.extra.get("scale", "centered")
    start = time.perf_counter()
    result = evaluate(ck.model, x, y, batch_size=args.batch_size, scale=scale)
    seconds = time.perf_counter() - start
    name = trained.get("model", "model")
    print(f"{args.checkpoint}: {name}, epoch {ck.epoch}, on {data} ({len(x)} test images)")
    print(f"test accuracy: {result['accuracy']:.2%}, loss {result['loss']:.4f} ({seconds:.1f} s)")
    print("confusion matrix (rows: true class, columns: predicted):")
    print(_format_confusion(result["confusion"]))
    if args.json:
        _emit_json(
            {
                "checkpoint": args.checkpoint,
                "data": data,
                "test_size": len(x),
                "test_accuracy": result["accuracy"],
                "test_loss": result["loss"],
                "confusion": result["confusion"].tolist(),
                "seconds": seconds,
            }
        )
    return 0


def _format_confusion(confusion: np.ndarray) -> str:
    k = confusion.shape[0]
    width = max(4, len(str(int(confusion.max()))) + 1)
    lines = ["     " + "".join(f"{j:>{width}}" for j in range(k))]
    lines += [f"{i:>4} " + "".join(f"{v:>{width}}" for v in row) for i, row in enumerate(confusion)]
    return "\n".join(lines)


# -- images ----------------------------------------------------------------------------


def _read_image(path: str) -> np.ndarray:
    """A 2-D grayscale image from a PNG (or any format Pillow reads) or a .npy file.

    Returns uint8 0..255 (integers) or float 0..1 (floats), singleton axes removed.
    """
    if Path(path).suffix.lower() == ".npy":
        if not Path(path).is_file():
            raise FileNotFoundError(2, "No such file or directory", path)
        try:
            image = np.load(path, allow_pickle=False)
        except (ValueError, EOFError) as e:
            raise ValueError(f"{path}: not a readable .npy array ({e})") from None
    else:
        try:
            from PIL import Image
        except ImportError:
            raise ImportError(
                f"{path}: reading PNG images needs Pillow: pip install 'xcnn[png]' "
                "(or save the image as a .npy array)"
            ) from None
        with Image.open(path) as img:  # a missing file or unknown format is an OSError
            image = np.asarray(img.convert("L"))
    image = np.squeeze(image)
    if image.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D grayscale image, got shape {image.shape}")
    if image.dtype.kind == "f":
        if image.size and not (np.isfinite(image).all() and 0 <= image.min() and image.max() <= 1):
            raise ValueError(f"{path}: float images must hold intensities in [0, 1]")
    elif image.dtype.kind in "iub":
        if image.size and (image.min() < 0 or image.max() > 255):
            raise ValueError(f"{path}: integer images must hold intensities in 0..255")
    else:
        raise ValueError(f"{path}: unsupported image dtype {image.dtype}")
    return image


def _intensities(image: np.ndarray) -> np.ndarray:
    """Any image from :func:`_read_image` as float64 intensities 0..255."""
    x = image.astype(np.float64)
    return x * 255.0 if image.dtype.kind == "f" else x


def _predict(args: argparse.Namespace) -> int:
    ck = io.load_checkpoint(args.checkpoint, backend=args.backend, device=_device(args.device))
    images = []
    for path in args.files:
        image = _read_image(path)
        if image.shape != (28, 28):
            raise ValueError(
                f"{path}: expected a 28x28 image, got {image.shape[0]}x{image.shape[1]}"
            )
        images.append(_intensities(image))
    x = np.stack(images)[:, None]  # (N, 1, 28, 28)
    if args.invert:
        x = 255.0 - x
    # Scaled here, as in training, so predict() takes the floats as given.
    x = scale_images(x, ck.extra.get("scale", "centered"), np.dtype(ck.model.dtype))
    probs = predict(ck.model, x)
    rows = []
    for path, p in zip(args.files, probs, strict=True):
        k = int(np.argmax(p))
        rows.append({"file": path, "class": k, "probability": float(p[k])})
        print(f"{path}: {k} ({p[k]:.1%})")
    if args.json:
        _emit_json({"checkpoint": args.checkpoint, "predictions": rows})
    return 0


# -- sobel -------------------------------------------------------------------------------


def _sobel(args: argparse.Namespace) -> int:
    if args.image is not None:
        image = _read_image(args.image)
        if image.dtype.kind == "f":
            image = np.round(image * 255.0)
        image = image.astype(np.uint8)
    else:
        test = datasets.sample()
        image = test.x_test[int(np.flatnonzero(test.y_test == args.digit)[0]), 0]
    plots = importlib.import_module("xcnn.plots")
    written = plots.sobel_figure(image, args.out)
    print(f"wrote {written if written is not None else args.out}")
    return 0
