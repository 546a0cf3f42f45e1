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

from . import datasets, images, io
from .augment import parse_augment
from .backend import BackendError
from .models import MODELS, RECIPES, Recipe, build_model
from .optim import OPTIMIZERS, make_optimizer
from .training import SCALES, evaluate, fit

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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _augment_spec(text: str) -> str:
    try:
        return parse_augment(text).spec()
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
        help="sample (embedded MNIST subset), mnist, fashion-mnist, cifar-10, a directory "
        "(the four MNIST-format IDX files, or a folder of pictures: <class>/*.png or "
        "train/<class>/* and test/<class>/*), or an .npz of x_train, y_train, x_test, y_test "
        f"(default: {default_note})",
    )
    p.add_argument(
        "--image-size",
        type=_count(1),
        metavar="N",
        help="resize a folder's pictures to NxN (default: they must all be one size)",
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
        "--scale",
        choices=sorted(SCALES),
        help="input scaling: unit x/255, centered x/255-0.5 (default), "
        "standard (x/255-0.1307)/0.3081",
    )
    t.add_argument("--seed", type=int, help="seed of initial weights and shuffling (default: 0)")
    t.add_argument(
        "--augment",
        type=_augment_spec,
        metavar="LIST",
        help="augment training batches on the device: shift[=PIXELS] (default 2), "
        "rotate[=DEGREES] (default 10), flip (not for digits), comma-separated",
    )
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
        "--json", action="store_true", help="print the final metrics as JSON (last line)"
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
        help="classify pictures (PNG, JPEG, ... or .npy)",
        description="Print the most likely class and its probability for each picture, of any "
        "size or mode (PNG/JPEG/BMP need Pillow; .npy holds uint8 0..255 or floats 0..1). For "
        "MNIST-shaped models the digit is centred as MNIST was made and a dark-on-light "
        "picture is inverted (with a note); other models get a plain resize.",
    )
    p.add_argument("checkpoint", metavar="PATH", help="checkpoint written by 'xcnn train --save'")
    p.add_argument("files", metavar="FILE", nargs="+", help="PNG or .npy images")
    p.add_argument(
        "--invert",
        action=argparse.BooleanOptionalAction,
        help="invert (or --no-invert: never) the pictures; default: detect dark-on-light "
        "pictures for digit models",
    )
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
    return parser


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


def _load_data(name: str, progress: bool, size: int | None = None) -> datasets.Splits:
    """``datasets.load_data``; ``progress`` is for downloads, ``size`` for picture folders."""
    return datasets.load_data(name, progress=progress, size=size)


def _classes(model: Any, extra: dict[str, Any]) -> list[str] | None:
    """Class names of a loaded model (``model.classes``, else the checkpoint's extra)."""
    return getattr(model, "classes", None) or extra.get("classes")


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
        recipe = recipe._replace(optimizer=opt_name, lr=0.01, lr_decay=1.0)
    return recipe


def _fresh_start(args: argparse.Namespace, splits: datasets.Splits) -> _Start:
    name = args.model or "seed"
    seed = 0 if args.seed is None else args.seed
    opt_name = args.optimizer or RECIPES[name].optimizer
    recipe = _recipe(name, opt_name)
    shape = datasets.describe(splits)
    # The named nets adapt to the data (contract 1); MNIST's shape needs no arguments.
    fit_data = {} if shape == {"input_shape": (1, 28, 28), "num_classes": 10} else shape
    model = build_model(
        name, backend=args.backend, device=_device(args.device), seed=seed, **fit_data
    )
    if splits.classes is not None:
        model.classes = list(splits.classes)
    optimizer = make_optimizer(opt_name, model, recipe.lr if args.lr is None else args.lr)
    return _Start(name, model, optimizer, opt_name, np.random.default_rng(seed), seed, recipe)


def _resumed_start(args: argparse.Namespace) -> _Start:
    given = [o for o, v in (("--model", args.model), ("--optimizer", args.optimizer),
                            ("--seed", args.seed)) if v is not None]  # fmt: skip
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
    if args.save and not Path(args.save).resolve().parent.is_dir():
        # Fail now, not after the first epoch's work.
        raise FileNotFoundError(2, "No such directory", str(Path(args.save).parent))
    resuming = _resumed_start(args) if args.resume else None
    previous = resuming.previous if resuming else {}
    data = args.data or previous.get("data", "sample")
    image_size = args.image_size or previous.get("image_size")
    progress = not args.no_progress and sys.stderr.isatty()
    splits = _load_data(data, progress, image_size)
    # Data before the model: a fresh model is built for the data's shape and classes.
    start = resuming or _fresh_start(args, splits)
    model, optimizer, recipe, history = start.model, start.optimizer, start.recipe, start.history

    def setting(key: str, given: Any, default: Any) -> Any:
        # Explicit option > the resumed run's setting > the recipe.
        return given if given is not None else start.previous.get(key, default)

    train_size = setting("train_size", args.train_size, None)
    test_size = setting("test_size", args.test_size, None)
    batch_size = setting("batch_size", args.batch_size, recipe.batch_size)
    scale = setting("scale", args.scale, recipe.scale)
    lr_decay = setting("lr_decay", args.lr_decay, recipe.lr_decay)
    epochs = args.epochs if args.epochs is not None else recipe.epochs
    augment = setting("augment", args.augment, None)
    x_train = _first(splits.x_train, train_size, "--train-size", f"training images of {data}")
    y_train = splits.y_train[: len(x_train)]
    x_test = _first(splits.x_test, test_size, "--test-size", f"test images of {data}")
    y_test = splits.y_test[: len(x_test)]

    settings = {
        "model": start.name, "data": data, "train_size": train_size, "test_size": test_size,
        "batch_size": batch_size, "optimizer": start.opt_name, "lr": optimizer.lr,
        "lr_decay": lr_decay, "scale": scale, "seed": start.seed, "backend": model.backend.name,
        "augment": augment, "image_size": image_size,
        "classes": _classes(model, start.previous),
        "input_shape": list(splits.x_train.shape[1:]),
    }  # fmt: skip
    if settings["classes"] is not None:
        model.classes = settings["classes"]
    decay = f" (x{lr_decay:g} per epoch)" if lr_decay != 1 else ""
    resumed = f" from epoch {start.start_epoch}" if start.start_epoch else ""
    print(
        f"training {start.name} ({model.num_params():,} parameters) on {data}: "
        f"{len(x_train)} train / {len(x_test)} test images; {start.opt_name} lr "
        f"{optimizer.lr:g}{decay}, batch {batch_size}, {epochs} epoch{'s' * (epochs != 1)}"
        f"{resumed}, {model.backend.name} backend",
        flush=True,
    )

    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        for key, value in logs.items():
            history.setdefault(key, []).append(value)
        rate = len(x_train) / logs["seconds"] if logs["seconds"] > 0 else float("inf")
        print(
            f"epoch {epoch}: train loss {logs['train_loss']:.4f} acc {logs['train_accuracy']:.2%}"
            f" | test loss {logs['val_loss']:.4f} acc {logs['val_accuracy']:.2%}"
            f" | {logs['seconds']:.1f} s, {rate:,.0f} img/s",
            flush=True,
        )
        if args.save:
            extra = {"scale": scale, "train": settings, "history": history,
                     "classes": settings["classes"]}  # fmt: skip
            io.save(model, args.save, optimizer, epoch=epoch, rng=start.rng, extra=extra)

    run = fit(
        model,
        optimizer,
        x_train,
        y_train,
        epochs=epochs,
        batch_size=batch_size,
        validation_data=(x_test, y_test),
        scale=scale,
        lr_decay=lr_decay,
        rng=start.rng,
        start_epoch=start.start_epoch,
        progress=progress,
        callback=on_epoch,
        augment=parse_augment(augment) if augment else None,
    )
    result = evaluate(model, x_test, y_test, scale=scale)
    seconds = float(sum(run["seconds"]))
    print(
        f"test accuracy: {result['accuracy']:.2%} (loss {result['loss']:.4f}, {len(x_test)} images)"
    )
    if args.save:
        print(f"saved checkpoint to {args.save}")
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
            print(f"wrote {path}")
    if args.json:
        _emit_json(
            {
                **settings,
                "train_images": len(x_train),
                "test_images": len(x_test),
                "epochs": start.start_epoch + epochs,
                "train_loss": run["train_loss"][-1],
                "train_accuracy": run["train_accuracy"][-1],
                "test_loss": result["loss"],
                "test_accuracy": result["accuracy"],
                "seconds": seconds,
                "images_per_second": len(x_train) * epochs / seconds if seconds > 0 else None,
                "checkpoint": args.save,
            }
        )
    return 0


# -- evaluate -------------------------------------------------------------------------


def _evaluate(args: argparse.Namespace) -> int:
    ck = io.load_checkpoint(args.checkpoint, backend=args.backend, device=_device(args.device))
    trained = ck.extra.get("train", {})
    data = args.data or trained.get("data", "sample")
    splits = _load_data(data, sys.stderr.isatty(), args.image_size or trained.get("image_size"))
    x = _first(splits.x_test, args.test_size, "--test-size", f"test images of {data}")
    y = splits.y_test[: len(x)]
    scale = ck.extra.get("scale", "centered")
    start = time.perf_counter()
    result = evaluate(ck.model, x, y, batch_size=args.batch_size, scale=scale)
    seconds = time.perf_counter() - start
    name = trained.get("model", "model")
    print(f"{args.checkpoint}: {name}, epoch {ck.epoch}, on {data} ({len(x)} test images)")
    print(f"test accuracy: {result['accuracy']:.2%}, loss {result['loss']:.4f} ({seconds:.1f} s)")
    classes = _classes(ck.model, ck.extra)
    if classes:
        print("classes: " + ", ".join(f"{i} {c}" for i, c in enumerate(classes)))
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


# -- predict ---------------------------------------------------------------------------


def _predict(args: argparse.Namespace) -> int:
    ck = io.load_checkpoint(args.checkpoint, backend=args.backend, device=_device(args.device))
    shape = getattr(ck.model, "input_shape", None) or ck.extra.get("train", {}).get(
        "input_shape", (1, 28, 28)
    )
    probs, notes = images.predict_files(
        ck.model, args.files, input_shape=shape, invert=args.invert,
        scale=ck.extra.get("scale", "centered"),
    )  # fmt: skip
    for path, note in zip(args.files, notes, strict=True):
        for line in note:
            print(f"xcnn: note: {path}: {line}", file=sys.stderr)
    classes = _classes(ck.model, ck.extra) or [str(k) for k in range(probs.shape[1])]
    rows = []
    for path, p in zip(args.files, probs, strict=True):
        k = int(np.argmax(p))
        every = {c: float(q) for c, q in zip(classes, p, strict=True)}
        rows.append(
            {"file": path, "class": k, "name": classes[k], "probability": float(p[k]),
             "probabilities": every}
        )  # fmt: skip
        print(f"{path}: {classes[k]} ({p[k]:.1%})")
    if args.json:
        _emit_json({"checkpoint": args.checkpoint, "classes": classes, "predictions": rows})
    return 0


# -- sobel -------------------------------------------------------------------------------


def _sobel(args: argparse.Namespace) -> int:
    if args.image is not None:
        grey = images.to_grayscale(images.read_image(args.image))
        image = np.round(grey * 255.0).astype(np.uint8)
    else:
        test = datasets.sample()
        image = test.x_test[int(np.flatnonzero(test.y_test == args.digit)[0]), 0]
    plots = importlib.import_module("xcnn.plots")
    written = plots.sobel_figure(image, args.out)
    print(f"wrote {written if written is not None else args.out}")
    return 0
