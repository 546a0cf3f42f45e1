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
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from tqdm.auto import tqdm

from . import functional as F
from .backend import to_numpy
from .distributed import Communicator, abort_on_error
from .distributed import resolve as resolve_distributed
from .losses import check_labels, softmax_cross_entropy
from .model import Sequential
from .optim import Optimizer

Array = Any
History = dict[str, list[float]]

__all__ = ["SCALES", "History", "fit", "evaluate", "predict", "scale_images"]

#: Input scalings of integer images, by name: ``x -> (x / 255 - shift) / div``.
#: "unit": [0, 1]; "centered": [-0.5, 0.5] (the tutorial's); "standard":
#: zero mean, unit variance over the MNIST training set (mean 0.1307, std 0.3081).
SCALES: dict[str, tuple[float, float]] = {
    "unit": (0.0, 1.0),
    "centered": (0.5, 1.0),
    "standard": (0.1307, 0.3081),
}

#: Seconds between progress-bar refreshes (each one reads two numbers back from the device).
_REFRESH_S = 0.25
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
    scale: str | None = None,
    lr_decay: float = 1.0,
    seed: int = 0,
    rng: np.random.Generator | None = None,
    start_epoch: int = 0,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    distributed: Any = None,
    augment: Callable[[Array, np.random.Generator], Array] | None = None,
) -> History:
    """Train ``model`` with mini-batch gradient descent; return the per-epoch history.

    Each step: ``forward`` -> :func:`xcnn.softmax_cross_entropy` ->
    ``model.backward(dlogits, input_grad=False)`` -> ``optimizer.step()``.

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
    scale : "unit", "centered", "standard", or None for ``model.scale``
        Scaling of integer images (:data:`SCALES`): ``x / 255``,
        ``x / 255 - 0.5`` (the tutorial's, default) or
        ``(x / 255 - 0.1307) / 0.3081``. Ignored for floating inputs.
    lr_decay : float
        Step decay: after every epoch ``optimizer.lr *= lr_decay`` (``1``: a
        constant rate). The rate lives in the optimizer, whose checkpoint
        (:func:`xcnn.io.save`) therefore carries the schedule across a resume.
    seed : int
        Seeds the shuffle when ``rng`` is not given.
    rng : numpy.random.Generator, optional
        The shuffle generator; it draws one permutation per epoch and is
        advanced in place. Pass the generator restored from a checkpoint
        (:func:`xcnn.io.load_checkpoint`) to resume exactly.
    start_epoch : int
        Epochs already done (when resuming); only numbers the epochs.
    progress : bool
        Show a tqdm bar per epoch (loss, accuracy, images/s) on stderr.
    callback : callable, optional
        ``callback(epoch, logs)`` after every epoch, with ``epoch`` counted
        from 1 (including ``start_epoch``) and ``logs`` that epoch's entries
        of the history (e.g. to print or save a checkpoint).
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
        ``"val_loss"``, ``"val_accuracy"`` (with ``validation_data``) and
        ``"seconds"`` (training time of the epoch, validation excluded).
    """
    _check_positive("epochs", epochs, 0)
    _check_positive("batch_size", batch_size)
    _check_positive("start_epoch", start_epoch, 0)
    if optimizer.model is not model:
        raise ValueError("fit: the optimizer was built for another model")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay!r}")
    scale = model.scale if scale is None else scale
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
    progress = progress and comm.is_root
    comm.check_in_sync(model, optimizer, rng, "fit start")

    history: History = {"epoch": [], "train_loss": [], "train_accuracy": []}
    if val is not None:
        history.update(val_loss=[], val_accuracy=[])
    history["seconds"] = []
    for epoch in range(start_epoch + 1, start_epoch + epochs + 1):
        label = f"epoch {epoch}/{start_epoch + epochs}"
        loss, accuracy, seconds = _train_epoch(
            model, optimizer, x, y, batch_size, rng, progress, label, comm, scale, augment
        )
        comm.check_in_sync(model, optimizer, rng, f"epoch {epoch}")
        logs = {"epoch": epoch, "train_loss": loss, "train_accuracy": accuracy}
        if val is not None:
            val_loss, pred = comm.evaluate(
                _evaluate_device, model, val[0], val[1], batch_size=_EVAL_BATCH, scale=scale
            )
            logs["val_loss"] = val_loss
            logs["val_accuracy"] = float(np.mean(pred == val[2]))
        logs["seconds"] = seconds
        for key, value in logs.items():
            history[key].append(value)
        # Before the callback, so a checkpoint saved there holds the next epoch's rate.
        optimizer.lr *= lr_decay
        if callback is not None:
            callback(epoch, logs)
    return history


def _train_epoch(
    model: Sequential,
    optimizer: Optimizer,
    x: Array,
    y: Array,
    batch_size: int,
    rng: np.random.Generator,
    progress: bool,
    label: str,
    comm: Communicator,
    scale: str = "centered",
    augment: Callable[[Array, np.random.Generator], Array] | None = None,
) -> tuple[float, float, float]:
    """One pass over (x, y) in a fresh random order; returns (loss, accuracy, seconds)."""
    xp, n = model.xp, int(x.shape[0])
    start = time.perf_counter()
    # The permutation is drawn on the host (the array API has no RNG, and one
    # host stream keeps runs identical across backends) and moved once.
    order = model.asarray(rng.permutation(n))
    loss_sum = xp.zeros((), dtype=model.backend.dtype(model.dtype), device=model.device)
    correct = xp.zeros((), dtype=y.dtype, device=model.device)  # (no int64: JAX without x64)
    seen, shown, last = 0, 0, start
    with tqdm(total=n, desc=label, unit="img", disable=not progress, leave=True) as bar:
        for i in range(0, n, batch_size):
            # Clamped stop: the array API leaves out-of-range slice stops unspecified.
            idx = comm.shard(order[i : min(i + batch_size, n)])  # this rank's part
            xb, yb = xp.take(x, idx, axis=0), xp.take(y, idx, axis=0)
            if augment is not None:
                xb = augment(xb, rng)
            logits = model.forward(_batch(model, xb, scale), train=True)
            loss, dlogits = softmax_cross_entropy(logits, yb, check=False)
            model.backward(dlogits, input_grad=False)
            hits = xp.sum(xp.astype(xp.argmax(logits, axis=1) == yb, y.dtype))
            nb, batch_loss, hits = comm.reduce_step(model, loss, hits)  # gradients averaged
            optimizer.step()
            seen += nb
            loss_sum = loss_sum + batch_loss
            correct = correct + hits
            loss_sum, correct = model.backend.materialise(loss_sum, correct)  # Dask: compute now
            now = time.perf_counter()
            if progress and (now - last >= _REFRESH_S or seen == n):
                # The only device reads inside the epoch: a few per second.
                bar.set_postfix(
                    loss=f"{float(loss_sum) / seen:.4f}",
                    acc=f"{int(correct) / seen:.4f}",
                    refresh=False,
                )
                bar.update(seen - shown)
                shown, last = seen, now
        mean_loss, accuracy = float(loss_sum) / n, int(correct) / n
    return mean_loss, accuracy, time.perf_counter() - start


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
    """Loss, accuracy and confusion matrix of ``model`` on ``(x, y)`` (``train=False``).

    Parameters
    ----------
    model : Sequential
    x : (N, C, H, W) array
        Integer intensities (scaled as ``scale`` says) or floats (used as given).
    y : (N,) integer class indices in ``[0, K)``.
    batch_size : int
        Images per forward pass (memory vs. speed; results do not depend on it).
    scale : "unit", "centered", "standard", or None for ``model.scale``
        As for :func:`fit`; use the one the model was trained with.

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
    """Class probabilities ``softmax(model(x))`` as a host array.

    Parameters
    ----------
    model : Sequential
    x : (N, C, H, W) array
        Integer intensities (scaled as ``scale`` says) or floats (used as given).
    batch_size : int
    scale : "unit", "centered", "standard", or None for ``model.scale``

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
