"""Training and inference loops: :func:`fit`, :func:`evaluate`, :func:`predict`.

Data flow (see docs/DESIGN): host images and labels go to the model's device
once per call; integer images stay integers there (uint8: a quarter of float32's
memory) and each batch is scaled to the model's dtype when it is used; every
batch is a slice (``xp.take`` with a shuffled index array) of those device
arrays, so no batch ever crosses the host-device boundary. Running sums of
the loss and of correct predictions stay on the device too and are read back
only a few times per second (progress bar) and once per epoch.

Input conventions shared by all three functions:

- ``x`` integer (e.g. uint8 MNIST) arrays hold pixel intensities 0..255 and
  are scaled on the device as ``scale`` says (:data:`SCALES`);
- ``x`` floating arrays are used as given (only cast to the model's dtype):
  scale them yourself, the same way the model was trained;
- ``y`` integer class indices ``(N,)``.

Loops run over batches, never over samples.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import functional as F
from .backend import array_namespace, to_numpy
from .callbacks import Callback, EarlyStopping
from .distributed import Communicator, abort_on_error
from .distributed import resolve as resolve_distributed
from .losses import check_labels, softmax_cross_entropy
from .model import Sequential
from .optim import Optimizer
from .schedules import Schedule

Array = Any
History = dict[str, list[float]]

__all__ = [
    "SCALES",
    "History",
    "NonFiniteLossError",
    "fit",
    "evaluate",
    "predict",
    "scale_images",
    "validation_split_indices",
]

#: Input scalings of integer images, by name: ``x -> (x / 255 - shift) / div``.
#: "unit": [0, 1]; "centered": [-0.5, 0.5] (the tutorial's); "standard":
#: zero mean, unit variance over the MNIST training set (mean 0.1307, std 0.3081).
SCALES: dict[str, tuple[float, float]] = {
    "unit": (0.0, 1.0),
    "centered": (0.5, 1.0),
    "standard": (0.1307, 0.3081),
}

#: Seconds between progress-bar refreshes (each one reads three numbers back from the device).
_REFRESH_S = 0.25
#: Without a bar: seconds between the finite-loss checks, and between progress lines.
_CHECK_S = 1.0
_LINE_S = 30.0
#: Images per forward pass when validating inside fit (memory, not results, depends on it).
_EVAL_BATCH = 1000


def _on_model_device(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``func(model, ...)`` with the model's device current.

    CuPy launches kernels on the *current* GPU, so the scaling, slicing and
    sums here must run where the model's arrays live (e.g. GPU 1), as
    ``Sequential.forward``/``backward`` do.
    """

    @functools.wraps(func)
    def wrapper(model: Sequential, *args: Any, **kwargs: Any) -> Any:
        with model.backend.activate():
            return func(model, *args, **kwargs)

    return wrapper


def scale_images(x: Array, scale: str, dtype: Any) -> Array:
    """Integer pixel intensities 0..255 -> floats in the chosen scaling, in any namespace.

    Parameters
    ----------
    x : array (N, ...) of any integer or floating dtype; values are intensities 0..255.
    scale : "unit", "centered" or "standard" (:data:`SCALES`).
    dtype : the target floating dtype object of ``x``'s namespace.

    Returns
    -------
    array like ``x``, same namespace and device, dtype ``dtype``.
    """
    shift, div = _scale_constants(scale)
    xp = array_namespace(x)
    x = xp.astype(x, dtype) / 255.0
    if shift:
        x = x - shift
    if div != 1.0:
        x = x / div
    return x


def _scale_constants(scale: str) -> tuple[float, float]:
    try:
        return SCALES[scale]
    except (KeyError, TypeError):
        raise ValueError(f"unknown scale {scale!r}: choose one of {sorted(SCALES)}") from None


def _images_to_device(model: Sequential, x: Any, scale: str, what: str = "x") -> Array:
    """Host (or device) images -> the model's device, in one transfer.

    Integer images cross and stay as integers (uint8: 4x less traffic and device
    memory than float32); :func:`_batch` scales them one batch at a time.
    Floating images are cast to the model's dtype here.
    """
    _scale_constants(scale)  # fail before any transfer
    if not model.backend.owns(x):
        x = np.asarray(to_numpy(x))
        if x.dtype.kind not in "uif":
            raise TypeError(f"{what}: expected integer or floating images, got dtype {x.dtype}")
        x = model.asarray(x)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(
            f"{what}: expected a non-empty batch of images (N, ...), got shape {tuple(x.shape)}"
        )
    xp, dtype = model.xp, model.backend.dtype(model.dtype)
    if xp.isdtype(x.dtype, "integral"):
        return x
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{what}: expected integer or floating images, got dtype {x.dtype}")
    return x if x.dtype == dtype else xp.astype(x, dtype)


def _batch(model: Sequential, xb: Array, scale: str | None) -> Array:
    """A device batch in the model's dtype: integer images are scaled here, per batch.

    ``scale`` None is the model's own (``model.scale``), as in :func:`fit`.
    """
    if scale is None:
        scale = getattr(model, "scale", None) or "centered"
    dtype = model.backend.dtype(model.dtype)
    return scale_images(xb, scale, dtype) if model.xp.isdtype(xb.dtype, "integral") else xb


def _labels_to_device(model: Sequential, y: Any, n: int, num_classes: int, what: str) -> Array:
    """Check labels once (on the host when they are host arrays), then move them."""
    if not model.backend.owns(y):
        y = np.asarray(to_numpy(y))
        if y.dtype.kind in "iu":  # the namespace's default integer (int32 on JAX without x64)
            y = y.astype(model.backend.default_int, copy=False)
    check_labels(y, n, num_classes, where=what)
    return y if model.backend.owns(y) else model.asarray(y)


def _num_classes(model: Sequential, x: Array, scale: str = "centered") -> int:
    """K, from the model itself: one forward of a single image."""
    logits = model.forward(_batch(model, x[:1, ...], scale), train=False)
    if logits.ndim != 2:
        raise ValueError(f"model output must be (N, K) logits, got shape {tuple(logits.shape)}")
    return int(logits.shape[1])


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class NonFiniteLossError(FloatingPointError, ValueError):
    """The training loss became NaN or infinite; the message names the epoch and step.

    A ValueError too, so the CLI reports it in one line (usually the learning
    rate is too high for the model).
    """


def validation_split_indices(y: Any, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of ``range(len(y))`` into (train, validation) indices.

    Each class gives ``round(fraction * count)`` of its samples (at least one
    when it has two or more), chosen with ``numpy.random.default_rng(seed)``,
    so the class balance of the validation set matches the training set's
    and the same seed always gives the same split (resumes rely on it).
    Both index arrays are sorted.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation_split must be in (0, 1) (or 0 for none), got {fraction!r}")
    labels = np.asarray(to_numpy(y)).astype(np.int64, copy=False)
    rng = np.random.default_rng(seed)
    picked = []
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        take = int(round(fraction * len(members)))
        if len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        else:
            take = 0
        picked.append(rng.choice(members, take, replace=False))
    val = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
    if len(val) == 0 or len(val) == len(labels):
        raise ValueError(
            f"validation_split {fraction} of {len(labels)} samples leaves no validation or "
            "no training data"
        )
    train = np.setdiff1d(np.arange(len(labels)), val, assume_unique=True)
    return train, val


def _subset(model: Sequential, x: Any, idx: np.ndarray) -> Any:
    """``x[idx]`` on the host for host arrays, with ``xp.take`` on the device otherwise."""
    if model.backend.owns(x):
        return model.xp.take(x, model.asarray(idx), axis=0)
    return np.asarray(to_numpy(x))[idx]


def _as_callbacks(callbacks: Any, callback: Any, early: EarlyStopping | None) -> list[Any]:
    # Early stopping first, so a checkpoint saved by a later callback holds its new state.
    out = [] if early is None else [early]
    if callback is not None:
        out.append(callback)
    out.extend(callbacks)
    for cb in out:
        if not (callable(cb) or isinstance(cb, Callback)):
            raise TypeError(f"fit: callback {cb!r} has no on_epoch_end and is not callable")
    return out


def _run_callback(cb: Any, epoch: int, logs: dict[str, Any]) -> bool:
    method = getattr(cb, "on_epoch_end", None)
    return bool(method(epoch, logs) if method is not None else cb(epoch, logs))


@abort_on_error
@_on_model_device
def fit(
    model: Sequential,
    optimizer: Optimizer,
    x_train: Any,
    y_train: Any,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    validation_data: tuple[Any, Any] | None = None,
    validation_split: float = 0.0,
    scale: str | None = None,
    lr_decay: float = 1.0,
    schedule: Schedule | None = None,
    early_stopping: int | EarlyStopping | None = None,
    callbacks: Sequence[Any] = (),
    seed: int = 0,
    rng: np.random.Generator | None = None,
    start_epoch: int = 0,
    progress: bool | str = True,
    callback: Callable[[int, dict[str, float]], Any] | None = None,
    distributed: Any = None,
    augment: Callable[[Array, np.random.Generator], Array] | None = None,
) -> History:
    """Train ``model`` with mini-batch gradient descent; return the per-epoch history.

    Each step: ``forward`` (training mode) -> :func:`xcnn.softmax_cross_entropy`
    -> ``model.backward(dlogits, input_grad=False)`` -> ``optimizer.step()``.
    Validation runs in evaluation mode (BatchNorm's running statistics, no dropout).

    Parameters
    ----------
    model : Sequential
        Maps images (N, ...) to logits (N, K).
    optimizer : Optimizer
        Built for ``model`` (e.g. ``xcnn.make_optimizer("adam", model, 1e-3)``).
    x_train : (N, C, H, W) array
        uint8 (or other integer) intensities 0..255, scaled on the device as
        ``scale`` says; or floating, used as given. Host (NumPy) arrays are
        copied to the model's device once, at the start.
    y_train : (N,) integer array
        Class indices in ``[0, K)``, checked once, at the start.
    epochs : int
        Number of epochs to run in this call (``0`` runs none).
    batch_size : int
        Images per step; the last, partial batch of an epoch is used too.
    validation_data : (x, y), optional
        Evaluated (as :func:`evaluate`) after every epoch; adds ``val_loss``
        and ``val_accuracy`` to the history.
    validation_split : float
        Hold out this fraction of ``(x_train, y_train)``, stratified by class
        and seeded with ``seed`` (:func:`validation_split_indices`), as the
        validation set; the rest is trained on. Not with ``validation_data``.
    scale : "unit", "centered" or "standard", optional
        Scaling of integer images (:data:`SCALES`); default ``model.scale``.
        ``x / 255``, ``x / 255 - 0.5`` (the tutorial's) or
        ``(x / 255 - 0.1307) / 0.3081``. Ignored for floating inputs.
    lr_decay : float
        Step decay: after every epoch ``optimizer.lr *= lr_decay`` (``1``: a
        constant rate). The rate lives in the optimizer, whose checkpoint
        (:func:`xcnn.io.save`) therefore carries the schedule across a resume.
    schedule : xcnn.schedules.Schedule, optional
        ``optimizer.lr = schedule(epochs done)`` before every step, the epochs
        done counted from ``optimizer.steps`` (so resumes follow it exactly).
        Not with ``lr_decay``.
    early_stopping : int or xcnn.callbacks.EarlyStopping, optional
        Patience: stop after this many epochs without a better
        ``val_accuracy``. Pass an ``EarlyStopping`` to choose the metric or
        to resume one (its ``state_dict`` goes in the checkpoint).
    callbacks : sequence
        Objects with ``on_epoch_end(epoch, logs)`` or functions
        ``f(epoch, logs)``, run after every epoch in order (after early
        stopping and ``callback``); a True result from any stops training
        after that epoch (:mod:`xcnn.callbacks`).
    seed : int
        Seeds the shuffle when ``rng`` is not given, and the validation split.
    rng : numpy.random.Generator, optional
        The shuffle generator; it draws one permutation per epoch and is
        advanced in place. Pass the generator restored from a checkpoint
        (:func:`xcnn.io.load_checkpoint`) to resume exactly.
    start_epoch : int
        Epochs already done (when resuming); only numbers the epochs.
    progress : bool or "lines"
        True: a tqdm bar per epoch (loss, accuracy, images/s) on stderr.
        ``"lines"``: instead a plain line about every 30 s, for logs (stderr
        not a terminal). False: nothing.
    callback : callable, optional
        ``callback(epoch, logs)`` after every epoch (before ``callbacks``),
        with ``epoch`` counted from 1 (including ``start_epoch``) and ``logs``
        that epoch's entries of the history (e.g. to print or save a checkpoint).
    distributed : "auto", "mpi", "nccl", "none", None or a Communicator
        Data-parallel training (:func:`xcnn.distributed.resolve`; None: one
        process): each rank trains on its shard of every batch of
        ``batch_size`` images; see docs/distributed.md.
    augment : callable, optional
        ``augment(xb, rng) -> xb`` on every training batch, on the device, before
        scaling (e.g. :class:`xcnn.augment.Augment`); ``rng`` is the shuffle
        generator, so the checkpointed shuffle state resumes it exactly.

    Returns
    -------
    dict of lists, one entry per epoch run
        ``"epoch"`` (int), ``"train_loss"`` (mean over the epoch's samples,
        measured while the weights changed), ``"train_accuracy"``,
        ``"val_loss"``, ``"val_accuracy"`` (with validation) and ``"seconds"``
        (training time of the epoch, validation excluded).

    Raises
    ------
    NonFiniteLossError
        The loss became NaN or infinite; names the epoch and step. Training
        stops there, before any callback could save the broken weights.
    """
    _check_positive("epochs", epochs, 0)
    _check_positive("batch_size", batch_size)
    _check_positive("start_epoch", start_epoch, 0)
    if optimizer.model is not model:
        raise ValueError("fit: the optimizer was built for another model")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay!r}")
    if schedule is not None and lr_decay != 1:
        raise ValueError("fit: give either a schedule or lr_decay, not both")
    if validation_split and validation_data is not None:
        raise ValueError("fit: give either validation_data or validation_split, not both")
    scale = model.scale if scale is None else scale
    early = (
        EarlyStopping(early_stopping)
        if early_stopping is not None and not isinstance(early_stopping, EarlyStopping)
        else early_stopping
    )
    hooks = _as_callbacks(callbacks, callback, early)
    if validation_split:
        train_idx, val_idx = validation_split_indices(y_train, validation_split, seed)
        validation_data = (_subset(model, x_train, val_idx), _subset(model, y_train, val_idx))
        x_train, y_train = _subset(model, x_train, train_idx), _subset(model, y_train, train_idx)
    if early is not None and early.monitor.startswith("val_") and validation_data is None:
        raise ValueError("fit: early stopping on a validation metric needs validation_split")
    x = _images_to_device(model, x_train, scale, "x_train")
    model.scale = scale  # the model now expects inputs scaled this way
    n = int(x.shape[0])
    num_classes = _num_classes(model, x, scale)
    y = _labels_to_device(model, y_train, n, num_classes, "y_train")
    val = None
    if validation_data is not None:
        xv = _images_to_device(model, validation_data[0], scale, "validation x")
        yv_host = np.asarray(to_numpy(validation_data[1]))
        yv = _labels_to_device(model, yv_host, int(xv.shape[0]), num_classes, "validation y")
        val = (xv, yv, yv_host)
    rng = np.random.default_rng(seed) if rng is None else rng
    comm = resolve_distributed(distributed)
    progress = progress if comm.is_root else False  # ("lines" must stay "lines")
    comm.check_in_sync(model, optimizer, rng, "fit start")
    steps_per_epoch = -(-n // batch_size)

    history: History = {"epoch": [], "train_loss": [], "train_accuracy": []}
    if val is not None:
        history.update(val_loss=[], val_accuracy=[])
    history["seconds"] = []
    for epoch in range(start_epoch + 1, start_epoch + epochs + 1):
        label = f"epoch {epoch}/{start_epoch + epochs}"

        def set_lr() -> None:
            if schedule is not None:
                optimizer.lr = float(schedule(optimizer.steps / steps_per_epoch))

        loss, accuracy, seconds = _train_epoch(
            model, optimizer, x, y, batch_size, rng, progress, label, comm, scale, augment,
            epoch, set_lr,
        )  # fmt: skip
        comm.check_in_sync(model, optimizer, rng, f"epoch {epoch}")
        logs: dict[str, Any] = {"epoch": epoch, "train_loss": loss, "train_accuracy": accuracy}
        if val is not None:
            val_loss, pred = comm.evaluate(
                _evaluate_device, model, val[0], val[1], batch_size=_EVAL_BATCH, scale=scale
            )
            logs["val_loss"] = val_loss
            logs["val_accuracy"] = float(np.mean(pred == val[2]))
        logs["seconds"] = seconds
        for key, value in logs.items():
            history[key].append(value)
        # Before the callbacks, so a checkpoint saved there holds the next epoch's rate.
        optimizer.lr *= lr_decay
        # Every callback runs (a checkpoint is saved even in the epoch that stops).
        stop = [_run_callback(cb, epoch, logs) for cb in hooks]
        if any(stop):
            break
    return history


def _train_epoch(
    model: Sequential,
    optimizer: Optimizer,
    x: Array,
    y: Array,
    batch_size: int,
    rng: np.random.Generator,
    progress: bool | str,
    label: str,
    comm: Communicator,
    scale: str = "centered",
    augment: Callable[[Array, np.random.Generator], Array] | None = None,
    epoch: int = 1,
    before_step: Callable[[], None] | None = None,
) -> tuple[float, float, float]:
    """One pass over (x, y) in a fresh random order; returns (loss, accuracy, seconds).

    Non-finite losses are caught without a device read per step: the step
    number of the first one is kept on the device (one ``where`` per step) and
    read at each progress refresh (at least every :data:`_CHECK_S` s) and at
    the end of the epoch.
    """
    xp, n = model.xp, int(x.shape[0])
    start = time.perf_counter()
    # The permutation is drawn on the host (the array API has no RNG, and one
    # host stream keeps runs identical across backends) and moved once.
    order = model.asarray(rng.permutation(n))
    loss_sum = xp.zeros((), dtype=model.backend.dtype(model.dtype), device=model.device)
    correct = xp.zeros((), dtype=y.dtype, device=model.device)  # (no int64: JAX without x64)
    # The step number counts on the device too (a host scalar per step would be a copy).
    step_number = xp.zeros((), dtype=y.dtype, device=model.device)
    first_bad = xp.asarray(-1, dtype=y.dtype, device=model.device)
    steps = -(-n // batch_size)
    lines_on = progress == "lines"
    bar_on = bool(progress) and not lines_on
    seen, shown, last, last_line = 0, 0, start, start
    with tqdm(total=n, desc=label, unit="img", disable=not bar_on, leave=True) as bar:
        for i in range(0, n, batch_size):
            if before_step is not None:
                before_step()
            # Clamped stop: the array API leaves out-of-range slice stops unspecified.
            idx = comm.shard(order[i : min(i + batch_size, n)])  # this rank's part
            xb, yb = xp.take(x, idx, axis=0), xp.take(y, idx, axis=0)
            if augment is not None:
                xb = augment(xb, rng)
            logits = model.forward(_batch(model, xb, scale), train=True)
            loss, dlogits = softmax_cross_entropy(logits, yb, check=False)
            step_number = step_number + 1
            first_bad = xp.where((first_bad < 0) & ~xp.isfinite(loss), step_number, first_bad)
            model.backward(dlogits, input_grad=False)
            hits = xp.sum(xp.astype(xp.argmax(logits, axis=1) == yb, y.dtype))
            nb, batch_loss, hits = comm.reduce_step(model, loss, hits)  # gradients averaged
            optimizer.step()
            seen += nb
            loss_sum = loss_sum + batch_loss
            correct = correct + hits
            # Dask: compute now, or every read would replay the epoch so far.
            loss_sum, correct, step_number, first_bad = model.backend.materialise(
                loss_sum, correct, step_number, first_bad
            )
            now = time.perf_counter()
            if now - last >= (_REFRESH_S if bar_on else _CHECK_S) or seen == n:
                # The only device reads inside the epoch: a few per second.
                _check_finite(first_bad, epoch, steps)
                mean_loss, acc = float(loss_sum) / seen, int(correct) / seen
                bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{acc:.4f}", refresh=False)
                bar.update(seen - shown)
                shown, last = seen, now
                if lines_on and now - last_line >= _LINE_S:
                    rate = seen / (now - start)
                    print(
                        f"{label}: {seen}/{n} images, loss {mean_loss:.4f}, acc {acc:.2%}, "
                        f"{rate:,.0f} img/s",
                        file=sys.stderr,
                        flush=True,
                    )
                    last_line = now
        _check_finite(first_bad, epoch, steps)
        _check_finite_weights(model, epoch)
        mean_loss, accuracy = float(loss_sum) / n, int(correct) / n
    return mean_loss, accuracy, time.perf_counter() - start


def _check_finite_weights(model: Sequential, epoch: int) -> None:
    """Weights can turn NaN while the loss stays finite (a ReLU maps NaN to 0): one read."""
    xp = model.xp
    flags = [xp.all(xp.isfinite(layer.params[name])) for _, layer, name in model.named_params()]
    if flags and not bool(xp.all(xp.stack(flags))):
        bad = [
            key for (key, _, _), ok in zip(model.named_params(), flags, strict=True) if not bool(ok)
        ]
        raise NonFiniteLossError(
            f"training stopped: weights became non-finite (NaN or inf) in epoch {epoch} "
            f"({', '.join(bad[:3])}); check the inputs for NaN and lower the learning rate"
        )


def _check_finite(first_bad: Array, epoch: int, steps: int) -> None:
    step = int(first_bad)
    if step >= 0:
        raise NonFiniteLossError(
            f"training stopped: the loss became non-finite (NaN or inf) at epoch {epoch}, "
            f"step {step} of {steps}; lower the learning rate (no checkpoint was written "
            "from this epoch)"
        )


def _evaluate_device(
    model: Sequential, x: Array, y: Array, *, batch_size: int, scale: str = "centered"
) -> tuple[float, np.ndarray]:
    """Mean loss and host predictions (N,) of device arrays, in forward-only batches."""
    xp, n = model.xp, int(x.shape[0])
    loss_sum = xp.zeros((), dtype=model.backend.dtype(model.dtype), device=model.device)
    preds = []
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)  # the array API leaves out-of-range slice stops unspecified
        logits = model.forward(_batch(model, x[i:j, ...], scale), train=False)
        loss, _ = F.softmax_cross_entropy(logits, y[i:j])
        loss_sum = loss_sum + loss * int(logits.shape[0])
        preds.append(xp.argmax(logits, axis=1))
    # Two reads for the whole set: the loss and the predictions.
    return float(loss_sum) / n, to_numpy(xp.concat(preds))


@_on_model_device
def evaluate(
    model: Sequential, x: Any, y: Any, *, batch_size: int = 1000, scale: str | None = None
) -> dict[str, Any]:
    """Loss, accuracy and confusion matrix of ``model`` on ``(x, y)``, in evaluation mode.

    Parameters
    ----------
    model : Sequential
    x : (N, C, H, W) array
        Integer intensities (scaled as ``scale`` says) or floats (used as given).
    y : (N,) integer class indices in ``[0, K)``.
    batch_size : int
        Images per forward pass (memory vs. speed; results do not depend on it).
    scale : "unit", "centered" or "standard", optional
        As for :func:`fit`; default ``model.scale``, the one it was built with.

    Returns
    -------
    dict
        ``loss`` (float, mean cross-entropy), ``accuracy`` (float),
        ``confusion`` (K, K) int64 NumPy array: row = true class, column =
        predicted class, so ``confusion.sum() == N`` and
        ``trace / N == accuracy``.
    """
    _check_positive("batch_size", batch_size)
    xd = _images_to_device(model, x, model.scale if scale is None else scale)
    n = int(xd.shape[0])
    k = _num_classes(model, xd, scale)
    y_host = np.asarray(to_numpy(y))
    yd = _labels_to_device(model, y_host, n, k, "evaluate")
    loss, pred = _evaluate_device(model, xd, yd, batch_size=batch_size, scale=scale)
    confusion = np.bincount(y_host.astype(np.int64) * k + pred, minlength=k * k).reshape(k, k)
    return {"loss": loss, "accuracy": float(np.trace(confusion)) / n, "confusion": confusion}


@_on_model_device
def predict(
    model: Sequential, x: Any, *, batch_size: int = 1000, scale: str | None = None
) -> np.ndarray:
    """Class probabilities ``softmax(model(x))`` (evaluation mode) as a host array.

    Parameters
    ----------
    model : Sequential
    x : (N, C, H, W) array
        Integer intensities (scaled as ``scale`` says) or floats (used as given).
    batch_size : int
    scale : "unit", "centered" or "standard", optional (default ``model.scale``)

    Returns
    -------
    numpy.ndarray (N, K) in the model's dtype; each row sums to 1.
    """
    _check_positive("batch_size", batch_size)
    xd = _images_to_device(model, x, model.scale if scale is None else scale)
    xp, n = model.xp, int(xd.shape[0])
    probs = [
        F.softmax(
            model.forward(_batch(model, xd[i : min(i + batch_size, n), ...], scale), train=False)
        )
        for i in range(0, n, batch_size)
    ]
    return to_numpy(xp.concat(probs))
