"""Checkpoints: save and load a model (and optimizer, epoch, shuffle RNG) without pickle.

File format (``.npz``, a zip of ``.npy`` files, read with ``allow_pickle=False``
so loading never executes code):

- ``param.<layer>.<name>``: every weight, as ``model.state_dict()`` names it;
- ``optim.<layer>.<name>.<slot>``: optimizer state (momentum, Adam moments);
- ``__xcnn__``: UTF-8 JSON metadata stored as a uint8 array: format name and
  version, the architecture (``model.config()``), dtype, optimizer type,
  hyperparameters and step count, epoch, the shuffle generator's
  ``bit_generator.state``, user ``extra`` data, and for every array its
  shape, dtype and the SHA-256 of its bytes;
- ``__xcnn_sha256__``: SHA-256 of the metadata bytes, so any change to an
  array or to the metadata is detected on load. (This guards against
  corruption and accidental edits; it is not a signature: whoever can write
  the file can recompute the hashes.)

Files are written atomically (temp file in the same directory, fsync,
``os.replace``): a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .layers import layer_from_config
from .model import Sequential
from .optim import SGD, Adam, AdamW, Optimizer

__all__ = [
    "FORMAT",
    "VERSION",
    "Checkpoint",
    "CheckpointError",
    "save",
    "load",
    "load_checkpoint",
    "restore_rng",
]

FORMAT = "xcnn-checkpoint"
VERSION = 1

_META = "__xcnn__"
_DIGEST = "__xcnn_sha256__"
_PARAM, _OPTIM = "param.", "optim."
_OPTIMIZERS: dict[str, type[Optimizer]] = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}
# Bit generators a checkpoint may name; anything else is refused rather than looked up.
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


class CheckpointError(ValueError):
    """A file is not a readable xcnn checkpoint (truncated, tampered, wrong version, ...)."""


@dataclass
class Checkpoint:
    """Everything :func:`load_checkpoint` restores.

    Attributes
    ----------
    model : Sequential
        Rebuilt from the saved architecture, weights loaded, on the requested backend.
    optimizer : Optimizer or None
        Rebuilt for ``model`` with its hyperparameters, step count and state.
    epoch : int or None
        Epochs completed when saved.
    rng_state : dict or None
        The shuffle generator's ``bit_generator.state``; :func:`restore_rng` turns
        it back into a generator.
    extra : dict
        The JSON data given to :func:`save` (``{}`` if none).
    """

    model: Sequential
    optimizer: Optimizer | None = None
    epoch: int | None = None
    rng_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def rng(self) -> np.random.Generator | None:
        """A generator in the saved state (None if none was saved)."""
        return None if self.rng_state is None else restore_rng(self.rng_state)


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _write_npz(fh: Any, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` to an open binary file."""
    np.savez(fh, **arrays)


def save(
    model: Sequential,
    path: str | os.PathLike[str],
    optimizer: Optimizer | None = None,
    *,
    epoch: int | None = None,
    rng: np.random.Generator | dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of ``model`` (and optionally its optimizer) to ``path``, atomically.

    Parameters
    ----------
    model : Sequential
        Any backend: weights are copied to the host first.
    path : path-like
        Written exactly as given (no suffix is added; ``.npz`` is conventional).
    optimizer : Optimizer, optional
        Built for ``model``; its hyperparameters, step count and state are saved
        so training can resume exactly.
    epoch : int, optional
        Epochs completed.
    rng : numpy.random.Generator or its ``bit_generator.state`` dict, optional
        The shuffle generator, so a resumed run draws the same batches.
    extra : dict, optional
        Any JSON-serialisable data (e.g. the training history and settings).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    if optimizer is not None and optimizer.model is not model:
        raise ValueError("save: the optimizer was built for another model")
    if isinstance(rng, np.random.Generator):
        rng = rng.bit_generator.state
    arrays = {_PARAM + k: v for k, v in model.state_dict().items()}
    bad = [k for k, v in arrays.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if bad:  # refuse before touching the file: the last good checkpoint stays
        raise ValueError(f"save: {path}: not written, non-finite values in {bad[:3]}")
    optim_meta = None
    if optimizer is not None:
        state = optimizer.state_dict()
        arrays.update({_OPTIM + k: v for k, v in state["arrays"].items()})
        optim_meta = {k: state[k] for k in ("type", "hyperparams", "steps")}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.config(),
        "dtype": model.dtype,
        "optimizer": optim_meta,
        "epoch": None if epoch is None else int(epoch),
        "rng_state": rng,
        "model_rng_state": model.rng.bit_generator.state,  # dropout masks
        "extra": {} if extra is None else extra,
        "arrays": {
            k: {"shape": list(v.shape), "dtype": v.dtype.str, "sha256": _sha256(v)}
            for k, v in arrays.items()
        },
    }
    try:
        meta_bytes = json.dumps(meta, sort_keys=True).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"save: extra and rng state must be JSON-serialisable ({e})") from None
    arrays[_META] = np.frombuffer(meta_bytes, dtype=np.uint8)
    arrays[_DIGEST] = np.frombuffer(hashlib.sha256(meta_bytes).hexdigest().encode(), dtype=np.uint8)
    path = Path(path)
    _atomic_write(path, arrays)
    return path


def _atomic_write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temp file beside ``path``, fsync, then rename over it.

    ``os.replace`` is atomic on POSIX and Windows when both names are on one
    file system, which the same directory guarantees: readers see the old
    file or the new one, never a mix.
    """
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_npz(fh, arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a half-written temp file behind.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories can't be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and verify the file: metadata digest, format, version, every array's hash."""
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    try:
        # Our own file object: numpy leaves its own open when a zip is malformed.
        with open(path, "rb") as fh:
            npz = np.load(fh, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise CheckpointError(
                    f"{path}: not an xcnn checkpoint (a single .npy array, not an .npz)"
                )
            with npz:
                arrays = {k: npz[k] for k in npz.files}
    except (FileNotFoundError, IsADirectoryError, PermissionError, CheckpointError):
        raise
    # What numpy and zipfile raise for truncated or foreign bytes varies with the
    # point where the data ends; all of it means "not a readable checkpoint".
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        with open(path, "rb") as fh:
            is_zip = fh.read(4) == b"PK\x03\x04"
        # numpy's own message for foreign bytes suggests allow_pickle: not advice to pass on.
        why = f"truncated or damaged: {e}" if is_zip else "not an .npz file"
        raise CheckpointError(f"{path}: not a readable xcnn checkpoint ({why})") from None
    if _META not in arrays:
        raise CheckpointError(f"{path}: not an xcnn checkpoint (no {_META!r} metadata entry)")
    meta_bytes = arrays.pop(_META).tobytes()
    digest = arrays.pop(_DIGEST, np.zeros(0, np.uint8)).tobytes().decode("ascii", "replace")
    if hashlib.sha256(meta_bytes).hexdigest() != digest:
        raise CheckpointError(
            f"{path}: corrupted or modified checkpoint: the metadata does not match its SHA-256"
        )
    try:
        meta = json.loads(meta_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an xcnn checkpoint (unknown metadata format)")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('version')!r} is not supported "
            f"(this xcnn reads version {VERSION})"
        )
    listed = meta.get("arrays")
    if not isinstance(listed, dict) or set(listed) != set(arrays):
        listed = listed if isinstance(listed, dict) else {}
        missing, unexpected = sorted(set(listed) - set(arrays)), sorted(set(arrays) - set(listed))
        raise CheckpointError(
            f"{path}: corrupted checkpoint: missing arrays {missing}, unexpected {unexpected}"
        )
    for name, a in arrays.items():
        info = listed[name]
        ok = isinstance(info, dict) and list(a.shape) == info.get("shape")
        if not (ok and a.dtype.str == info.get("dtype") and _sha256(a) == info.get("sha256")):
            raise CheckpointError(
                f"{path}: corrupted or modified checkpoint: array {name!r} does not match "
                "its recorded shape, dtype or SHA-256"
            )
    return meta, arrays


def restore_rng(state: dict[str, Any]) -> np.random.Generator:
    """A numpy Generator in ``state`` (a saved ``bit_generator.state``)."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in _BIT_GENERATORS:
        raise ValueError(f"unknown bit generator {name!r} (known: {', '.join(_BIT_GENERATORS)})")
    bit_generator = getattr(np.random, name)()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def load_checkpoint(
    path: str | os.PathLike[str], *, backend: Any = "numpy", device: Any = None
) -> Checkpoint:
    """Read a checkpoint written by :func:`save`, rebuilding model and optimizer on ``backend``.

    Parameters
    ----------
    path : path-like
    backend, device
        Where to put the model, as for :class:`xcnn.Sequential`; need not be
        the backend it was trained on.

    Returns
    -------
    Checkpoint

    Raises
    ------
    FileNotFoundError
        No such file.
    CheckpointError
        Truncated, corrupted or modified file, a different format version,
        or not an xcnn checkpoint at all. The message names the file.
    xcnn.BackendError
        The backend cannot be used here (e.g. CuPy not installed).
    """
    path = Path(path)
    meta, arrays = _read(path)
    params = {k[len(_PARAM) :]: v for k, v in arrays.items() if k.startswith(_PARAM)}
    optim_arrays = {k[len(_OPTIM) :]: v for k, v in arrays.items() if k.startswith(_OPTIM)}
    try:
        config = meta["model"]
        # Validate the layer list before building anything on a device.
        for cfg in config["layers"]:
            layer_from_config(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model description in checkpoint ({e})") from None
    model = Sequential.from_config(config, backend=backend, device=device)
    try:
        model.load_state_dict(params)
    except ValueError as e:
        raise CheckpointError(f"{path}: weights do not fit the saved architecture ({e})") from None
    optimizer = _restore_optimizer(path, model, meta.get("optimizer"), optim_arrays)
    if meta.get("model_rng_state") is not None:
        try:
            model.rng.bit_generator.state = restore_rng(meta["model_rng_state"]).bit_generator.state
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: invalid model RNG state in checkpoint ({e})") from None
    rng_state = meta.get("rng_state")
    if rng_state is not None:
        try:
            restore_rng(rng_state)
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: invalid RNG state in checkpoint ({e})") from None
    return Checkpoint(model, optimizer, meta.get("epoch"), rng_state, meta.get("extra") or {})


def _restore_optimizer(
    path: Path, model: Sequential, info: dict[str, Any] | None, arrays: dict[str, np.ndarray]
) -> Optimizer | None:
    if info is None:
        if arrays:
            raise CheckpointError(f"{path}: optimizer arrays but no optimizer description")
        return None
    try:
        cls = _OPTIMIZERS[info["type"]]
        # The constructor validates the hyperparameters (and rejects unknown ones).
        optimizer = cls(model, **info["hyperparams"])
        optimizer.load_state_dict({**info, "arrays": arrays})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid optimizer state in checkpoint ({e!r})") from None
    return optimizer


def load(path: str | os.PathLike[str], *, backend: Any = "numpy", device: Any = None) -> Sequential:
    """Load just the model of a checkpoint, on ``backend`` (see :func:`load_checkpoint`)."""
    return load_checkpoint(path, backend=backend, device=device).model
