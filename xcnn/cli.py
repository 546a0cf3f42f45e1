"""The ``xcnn`` command line: train, evaluate, predict, sobel.

A thin layer over :mod:`xcnn.training`, :mod:`xcnn.io`, :mod:`xcnn.models`
and :mod:`xcnn.datasets`. User errors (a missing file, a bad option value, an
unknown backend, CuPy absent, bad data, a corrupt checkpoint) print one line,
``xcnn: error: ...``, to stderr and exit with status 1 (2 for a malformed
command line); set ``XCNN_DEBUG=1`` to see the traceback instead. SIGTERM and
SIGHUP stop a run as Ctrl-C does (temp files removed, the last checkpoint kept);
a closed stdout (``xcnn train | head -3``) silences the output but not the run.

Each command is one function (``_train``, ``_evaluate``, ...) with its own
parser builder (``_train_parser``, ...); the work is in :mod:`xcnn.runs`,
:mod:`xcnn.images` and the modules they use.

Examples
--------
``xcnn train``: the tutorial's net on the embedded MNIST sample, in seconds.
``xcnn train --model lenet --data mnist --save lenet.npz``, then
``xcnn evaluate lenet.npz`` or ``xcnn predict lenet.npz digit.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, datasets, distributed, images, io, runs, schedules
from .atomic import check_writable
from .augment import parse_augment
from .backend import BackendError
from .models import MODELS, RECIPES, build_model
from .optim import MAX_LR, OPTIMIZERS
from .training import SCALES, evaluate, fit, validation_split_indices

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


def _number(low: float, high: float):
    """A finite float in ``(low, high]``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and low < value <= high):
            raise argparse.ArgumentTypeError(f"must be > {low:g} and at most {high:g}, got {text}")
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
        help="array library by module name: numpy (CPU, default), cupy (CUDA GPU), torch, "
        "jax.numpy, dask.array, array_api_strict or any array-API namespace",
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
    parser.add_argument("--version", action="version", version=f"xcnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _train_parser,
        _evaluate_parser,
        _predict_parser,
        _sobel_parser,
        _summary_parser,
        _export_parser,
        _serve_parser,
    ):
        add(sub)
    return parser


def _train_parser(sub: Any) -> None:
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
    t.add_argument("--lr", type=_number(0, MAX_LR), help="learning rate (default: the recipe's)")
    t.add_argument(
        "--lr-decay",
        type=_number(0, 1),
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
        "--distributed",
        choices=distributed.DISTRIBUTED,
        default="auto",
        help="data-parallel over the ranks of 'mpiexec -n N xcnn train ...': mpi, nccl (CuPy, "
        "one rank per GPU), auto (default: mpi when launched on more than one rank) or none",
    )
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


def _evaluate_parser(sub: Any) -> None:
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


def _predict_parser(sub: Any) -> None:
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


def _sobel_parser(sub: Any) -> None:
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


# -- export and serve (#14): the work is done in xcnn.export and xcnn.serve --


def _export_parser(sub: Any) -> None:
    x = sub.add_parser(
        "export",
        help="write a model as ONNX or safetensors",
        description="Export a checkpoint (or an xcnn safetensors file): ONNX for ONNX Runtime "
        "(input 'images' = pixels/255 (N, C, H, W), the model's scaling inside; output "
        "'logits'), or safetensors (weights and running statistics, architecture in the "
        "metadata; see docs/deploy.md).",
    )
    x.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint or .safetensors file")
    x.add_argument("--format", required=True, choices=("onnx", "safetensors"))
    x.add_argument("-o", "--output", required=True, metavar="FILE", help="file to write")
    x.add_argument("--probabilities", action="store_true", help="onnx: also output 'probabilities'")
    x.add_argument("--opset", type=_count(1), help="onnx: the opset (default: 17)")
    x.set_defaults(
        func=lambda a: importlib.import_module("xcnn.export").export_command(
            a.checkpoint, a.output, format=a.format, probabilities=a.probabilities, opset=a.opset
        )
    )


def _serve_parser(sub: Any) -> None:
    v = sub.add_parser(
        "serve",
        help="a web page to draw digits on and watch the model read them",
        description="Serve a page (and a JSON API, POST /api/predict) where a drawn digit is "
        "classified live, with the first conv layer's feature maps. Stop with Ctrl-C.",
    )
    v.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint or .safetensors file")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    v.add_argument("--port", type=_count(0), default=8000, help="port (default: 8000; 0: any)")
    v.set_defaults(
        func=lambda a: importlib.import_module("xcnn.serve").serve_file(
            a.checkpoint, host=a.host, port=a.port
        )
    )


# -- summary -------------------------------------------------------------------


def _summary_parser(sub: Any) -> None:
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


# -- running a command --------------------------------------------------------------


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _Stopped(signum)


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP -> the same clean stop as SIGINT, while a command runs."""
    names = [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    try:
        old = {n: signal.signal(getattr(signal, n), _raise_stopped) for n in names}
    except ValueError:  # Not the main thread (main() called from a thread): leave them.
        old = {}
    try:
        yield
    finally:
        for n, handler in old.items():
            signal.signal(getattr(signal, n), handler)


class _Out:
    """stdout that survives its reader going away: ``xcnn train | head -3`` keeps training."""

    closed = False

    @classmethod
    def say(cls, *args: Any, **kwargs: Any) -> None:
        if cls.closed:
            return
        try:
            print(*args, **kwargs, flush=True)
        except BrokenPipeError:
            cls.closed = True
            # Point fd 1 at /dev/null so that no later write (or the flush at exit) fails.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


def _summary(args: argparse.Namespace) -> int:
    model = build_model(args.model, input_shape=args.input_shape, num_classes=args.classes)
    print(model.summary())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``xcnn`` command line; return the exit status (0 on success)."""
    parser = build_parser()
    _Out.closed = False
    try:
        args = parser.parse_args(argv)
        with _stop_signals():
            return int(args.func(args) or 0)
    except _Exit as e:
        return e.status
    except _UsageError as e:
        _error(str(e))
        return 2
    except _Stopped as e:
        _error(f"interrupted ({signal.Signals(e.signum).name})")
        return 128 + e.signum
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
    _Out.say(json.dumps(obj, sort_keys=True))


def _check_plots_dir(path: str) -> None:
    """Fail now if ``--plots`` names a file, or a folder that cannot be created or written."""
    p = Path(path) if path else None
    if p is None:
        raise FileNotFoundError(2, "empty path", "--plots ''")
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(20, "--plots names a file, not a directory", path)
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(20, "not a directory", str(existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(13, "directory is not writable", str(existing))


def _classes(model: Any, extra: dict[str, Any]) -> list[str] | None:
    """Class names of a loaded model (``model.classes``, else an older checkpoint's extra)."""
    return getattr(model, "classes", None) or extra.get("classes")


# -- train ------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    # --distributed: rank 0 alone prints, saves and plots; NCCL picks this rank's GPU.
    comm = distributed.resolve(args.distributed)
    comm.mute_unless_root()
    if not comm.is_root:
        args.save, args.save_best, args.plots, args.json = None, None, None, False
    if args.device is None and comm.device is not None:
        args.device = str(comm.device)
    # Everything that can be checked is checked before any training.
    for path in (args.save, args.save_best):
        if path is not None:
            check_writable(path)
    if args.plots is not None:
        _check_plots_dir(args.plots)
    ck = None
    if args.resume:
        ck = io.load_checkpoint(args.resume, backend=args.backend, device=_device(args.device))
    try:
        settings = runs.resolve_settings(vars(args), ck)
    except ValueError as e:
        raise ValueError(f"{args.resume}: {e}" if ck is not None else str(e)) from None
    s = settings
    if (s.early_stopping is not None or args.save_best) and not s.val_split:
        raise ValueError("--early-stopping and --save-best watch the validation accuracy: "
                         "give --val-split (e.g. 0.1)")  # fmt: skip
    # With --json, stdout carries only JSON lines; the human-readable text goes to stderr.
    say = _Out.say if not args.json else functools.partial(print, file=sys.stderr, flush=True)
    progress = False if args.no_progress else (True if sys.stderr.isatty() else "lines")
    # Data before the model: a fresh model is built for the data's shape and classes.
    splits = runs.load_splits(
        s.data, s.train_size, s.test_size, progress=progress is True, image_size=s.image_size
    )
    x_train, y_train, x_test, y_test = splits[:4]
    run = runs.start_run(
        settings,
        backend=args.backend,
        device=_device(args.device),
        checkpoint=ck,
        new_lr=args.lr,
        data=splits,
        save_best=args.save_best,
    )
    model, optimizer, schedule = run.model, run.optimizer, run.schedule()
    if schedule is not None:
        decay = f" ({s.schedule} schedule" + (
            f", {s.warmup:g} warm-up epochs)" if s.warmup else ")"
        )
    else:
        decay = f" (x{s.lr_decay:g} per epoch)" if s.lr_decay != 1 else ""
    resumed = f" from epoch {run.start_epoch}" if run.start_epoch else ""
    n_train = len(x_train)
    if s.val_split:
        n_train = len(validation_split_indices(y_train, s.val_split, s.seed)[0])
    held = f" ({len(x_train) - n_train} held out for validation)" if s.val_split else ""
    say(
        f"training {s.model} ({model.num_params():,} parameters) on {s.data}: "
        f"{n_train} train{held} / {len(x_test)} test images; {s.optimizer} lr "
        f"{optimizer.lr:g}{decay}, batch {s.batch_size}, {s.epochs} epoch{'s' * (s.epochs != 1)}"
        f"{resumed}, {model.backend.name} backend"
    )
    val = "val" if s.val_split else "test"  # what the per-epoch metrics were measured on

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
            run.save(args.save, epoch)

    # In this order: the history first, so the checkpoints written after hold this epoch.
    hist = fit(
        model,
        optimizer,
        x_train,
        y_train,
        epochs=s.epochs,
        batch_size=s.batch_size,
        validation_data=None if s.val_split else (x_test, y_test),
        validation_split=s.val_split,
        scale=s.scale,
        lr_decay=1.0 if schedule is not None else s.lr_decay,
        schedule=schedule,
        seed=s.seed,
        rng=run.rng,
        start_epoch=run.start_epoch,
        progress=progress,
        callbacks=[run.record_epoch, *run.callbacks(), on_epoch],
        distributed=comm,
        augment=parse_augment(s.augment) if s.augment else None,
    )
    early, best = run.early, run.best
    stopped = early is not None and early.stopped_epoch is not None
    if stopped:
        say(
            f"early stopping after epoch {early.stopped_epoch}: no better val accuracy for "
            f"{early.wait} epochs (best {early.best:.2%} at epoch {early.best_epoch})"
        )
    result = evaluate(model, x_test, y_test, scale=s.scale)
    seconds = float(sum(hist["seconds"]))
    epochs_run = len(hist["epoch"])
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
            history=run.history,
            model=model,
            confusion=result["confusion"],
            image=np.asarray(x_test[0, 0]),
        )
        for path in written:
            say(f"wrote {path}")
    if args.json:
        final = {
            **{k: v for k, v in s.record().items() if k != "schedule_config"},
            "backend": model.backend.name,
            "classes": model.classes,
            "train_images": n_train,
            "val_images": len(x_train) - n_train,
            "test_images": len(x_test),
            "epochs": run.start_epoch + epochs_run,
            "train_loss": hist["train_loss"][-1] if epochs_run else None,
            "train_accuracy": hist["train_accuracy"][-1] if epochs_run else None,
            "test_loss": result["loss"],
            "test_accuracy": result["accuracy"],
            "seconds": seconds,
            "images_per_second": n_train * epochs_run / seconds if seconds > 0 else None,
            "checkpoint": args.save,
            "stopped_early": stopped,
        }
        if s.val_split and epochs_run:
            final["val_accuracy"] = hist["val_accuracy"][-1]
        if best is not None:
            final.update(best_checkpoint=args.save_best, best_val_accuracy=best.best)
        _emit_json(final)
    return 0


# -- evaluate -------------------------------------------------------------------------


def _evaluate(args: argparse.Namespace) -> int:
    ck = io.load_checkpoint(args.checkpoint, backend=args.backend, device=_device(args.device))
    trained = ck.extra.get("train")
    trained = trained if isinstance(trained, dict) else {}
    data = args.data or trained.get("data", "sample")
    image_size = args.image_size or trained.get("image_size")
    _, _, x, y, _ = runs.load_splits(
        data, 1, args.test_size, progress=sys.stderr.isatty(), image_size=image_size
    )
    start = time.perf_counter()
    result = evaluate(ck.model, x, y, batch_size=args.batch_size)  # scaled as model.scale says
    seconds = time.perf_counter() - start
    name = trained.get("model", "model")
    _Out.say(f"{args.checkpoint}: {name}, epoch {ck.epoch}, on {data} ({len(x)} test images)")
    _Out.say(
        f"test accuracy: {result['accuracy']:.2%}, loss {result['loss']:.4f} ({seconds:.1f} s)"
    )
    classes = _classes(ck.model, ck.extra)
    if classes:
        _Out.say("classes: " + ", ".join(f"{i} {c}" for i, c in enumerate(classes)))
    _Out.say("confusion matrix (rows: true class, columns: predicted):")
    _Out.say(_format_confusion(result["confusion"]))
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


# -- predict ----------------------------------------------------------------------------


def _predict(args: argparse.Namespace) -> int:
    ck = io.load_checkpoint(args.checkpoint, backend=args.backend, device=_device(args.device))
    shape = getattr(ck.model, "input_shape", None) or ck.extra.get("train", {}).get(
        "input_shape", (1, 28, 28)
    )
    probs, notes = images.predict_files(
        ck.model, args.files, input_shape=shape, invert=args.invert,
        scale=ck.model.scale,
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
        _Out.say(f"{path}: {classes[k]} ({p[k]:.1%})")
    if args.json:
        _emit_json({"checkpoint": args.checkpoint, "classes": classes, "predictions": rows})
    return 0


# -- sobel -------------------------------------------------------------------------------


def _sobel(args: argparse.Namespace) -> int:
    if Path(args.out).parent.is_dir():  # (a missing folder is created by the figure's save)
        check_writable(args.out)
    if args.image is not None:
        grey = images.to_grayscale(images.read_image(args.image))
        image = np.round(grey * 255.0).astype(np.uint8)
    else:
        test = datasets.sample()
        image = test.x_test[int(np.flatnonzero(test.y_test == args.digit)[0]), 0]
    plots = importlib.import_module("xcnn.plots")
    written = plots.sobel_figure(image, args.out)
    _Out.say(f"wrote {written if written is not None else args.out}")
    return 0
