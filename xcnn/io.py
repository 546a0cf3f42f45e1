"""Checkpoints: save and load a model (and optimizer, epoch, shuffle RNG) without pickle.

File format (``.npz``, a zip of ``.npy`` files; never unpickled, so loading executes no code):

- ``param.<key>``: every weight, as ``model.state_dict()`` names it;
- ``optim.<key>.<slot>``: optimizer state (momentum, Adam moments);
- ``__xcnn__``: UTF-8 JSON metadata stored as a uint8 array: format name and
  version, the architecture (``model.config()``, which holds the input scaling
  and class names), dtype, optimizer type, hyperparameters and step count, epoch,
  the shuffle generator's ``bit_generator.state``, user ``extra`` data, and for
  every array its shape, dtype and the SHA-256 of its bytes;
- ``__xcnn_sha256__``: SHA-256 of the metadata bytes, so any change to an
  array or to the metadata is detected on load. (This guards against
  corruption and accidental edits; it is not a signature: whoever can write
  the file can recompute the hashes.)

Reading treats the file as hostile until proven otherwise, and bounds memory by what
the metadata declares *before* allocating: the zip's central directory is checked
(member names, compression method, no encryption, declared sizes) before any member
is decompressed; the metadata member is read with a size cap and its JSON checked
for types and nesting depth; the weights the metadata lists are checked against
the parameter shapes the architecture implies before any model is built; every
``.npy`` header is checked against the metadata before its data is read, and the
data is streamed into a buffer of exactly the declared size while being hashed.
Anything wrong is a :class:`CheckpointError` naming the file.

Files are written atomically through :mod:`xcnn.atomic` (temp file in the same
directory, fsync, rename; symlinks followed, devices and FIFOs never replaced).
"""

from __future__ import annotations

import hashlib
import io as _bytesio
import json
import math
import os
import re
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .atomic import atomic_write
from .datasets import read_into
from .layers import layer_from_config
from .model import Sequential
from .optim import OPTIMIZER_CLASSES, Optimizer
from .training import SCALES

__all__ = [
    "FORMAT",
    "VERSION",
    "MAX_METADATA_BYTES",
    "Checkpoint",
    "CheckpointError",
    "save",
    "load",
    "load_checkpoint",
    "restore_rng",
]

FORMAT = "xcnn-checkpoint"
VERSION = 1
#: The metadata member is refused above this size (the JSON of a large model is a few KB).
MAX_METADATA_BYTES = 16 << 20
#: Deepest JSON nesting accepted in the metadata (``extra`` included).
MAX_METADATA_DEPTH = 32
#: Most members a checkpoint may have (a parameter and its optimizer slots each are one).
MAX_MEMBERS = 100_000

_META = "__xcnn__"
_DIGEST = "__xcnn_sha256__"
_PARAM, _OPTIM = "param.", "optim."
_NAME = re.compile(r"^(param|optim)\.[A-Za-z0-9_.]{1,200}$")
# Weights and optimizer slots are real floating point, nothing else (no objects, no records).
_ARRAY_DTYPE = re.compile(r"^[<>|=]?f[248]$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_NPY_HEADER = 1 << 16
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
        Rebuilt from the saved architecture, weights loaded, on the requested backend;
        ``model.scale`` is the input scaling it was trained with.
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
        Any backend: weights are copied to the host first. Its input scaling
        (``model.scale``) is part of the saved architecture.
    path : path-like
        Written exactly as given (no suffix is added; ``.npz`` is conventional).
        A symlink is followed; a directory, device or FIFO is refused.
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
        meta_bytes = json.dumps(meta, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"save: extra and rng state must be JSON-serialisable ({e})") from None
    if len(meta_bytes) > MAX_METADATA_BYTES:
        raise ValueError(f"save: metadata of {len(meta_bytes)} bytes is over the reader's limit")
    _check_depth(meta, "save: extra")
    arrays[_META] = np.frombuffer(meta_bytes, dtype=np.uint8)
    arrays[_DIGEST] = np.frombuffer(hashlib.sha256(meta_bytes).hexdigest().encode(), dtype=np.uint8)
    with atomic_write(path) as fh:
        _write_npz(fh, arrays)
    return Path(path)


# -- reading ----------------------------------------------------------------------------


def _open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file; a FIFO never blocks us."""
    st = os.stat(path)  # FileNotFoundError / PermissionError pass through as they are
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(21, "is a directory", str(path))
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket)")
    # O_NONBLOCK: if the path was swapped for a FIFO since the stat, open still returns.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket)")
    return os.fdopen(fd, "rb")


def _check_depth(obj: Any, where: str, depth: int = 0) -> None:
    if depth > MAX_METADATA_DEPTH:
        raise ValueError(f"{where}: JSON nested deeper than {MAX_METADATA_DEPTH} levels")
    if isinstance(obj, dict):
        for v in obj.values():
            _check_depth(v, where, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _check_depth(v, where, depth + 1)


def _is_int(v: Any, minimum: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _check_meta(meta: Any) -> None:
    """Raise ValueError for metadata whose fields have the wrong types (hashes can be forged)."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError("not an xcnn checkpoint (unknown metadata format)")
    if meta.get("version") != VERSION or isinstance(meta.get("version"), bool):
        raise CheckpointError(
            f"checkpoint format version {meta.get('version')!r} is not supported "
            f"(this xcnn reads version {VERSION})"
        )
    model = meta.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("layers"), list):
        raise ValueError("'model' must be an object with a 'layers' list")
    for i, cfg in enumerate(model["layers"]):
        if not (isinstance(cfg, dict) and isinstance(cfg.get("type"), str)):
            raise ValueError(f"layer {i} must be an object with a 'type' string")
        if not isinstance(cfg.get("config", {}), dict):
            raise ValueError(f"layer {i}: 'config' must be an object")
    if model.get("scale", "centered") not in SCALES:
        raise ValueError(f"model scale {model.get('scale')!r} is not one of {sorted(SCALES)}")
    if model.get("dtype", "float32") not in ("float32", "float64"):
        raise ValueError(f"model dtype {model.get('dtype')!r} is not float32 or float64")
    if not _is_int(model.get("seed", 0), -(2**63)):
        raise ValueError("model 'seed' must be an integer")
    if model.get("classes") is not None and not (
        isinstance(model["classes"], list) and all(isinstance(c, str) for c in model["classes"])
    ):
        raise ValueError("model 'classes' must be a list of strings")
    opt = meta.get("optimizer")
    if opt is not None:
        if not isinstance(opt, dict) or opt.get("type") not in OPTIMIZER_CLASSES:
            known = ", ".join(OPTIMIZER_CLASSES)
            raise CheckpointError(
                f"invalid optimizer state in checkpoint (type not one of {known})"
            )
        if not isinstance(opt.get("hyperparams"), dict) or not _is_int(opt.get("steps")):
            raise CheckpointError(
                "invalid optimizer state in checkpoint (needs a 'hyperparams' object and "
                "integer 'steps' >= 0)"
            )
        for k, v in opt["hyperparams"].items():
            values = v if isinstance(v, list) else [v]
            if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in values):
                raise CheckpointError(
                    f"invalid optimizer state in checkpoint (hyperparameter {k!r} is not a number)"
                )
    if meta.get("epoch") is not None and not _is_int(meta["epoch"]):
        raise ValueError("'epoch' must be an integer >= 0")
    if meta.get("rng_state") is not None and not isinstance(meta["rng_state"], dict):
        raise ValueError("'rng_state' must be an object")
    if not isinstance(meta.get("extra", {}), dict):
        raise ValueError("'extra' must be an object")
    listed = meta.get("arrays")
    if not isinstance(listed, dict):
        raise ValueError("'arrays' must be an object")
    for name, info in listed.items():
        ok = (
            _NAME.match(name)
            and isinstance(info, dict)
            and isinstance(info.get("shape"), list)
            and len(info["shape"]) <= 8
            and all(_is_int(d) for d in info["shape"])
            and isinstance(info.get("dtype"), str)
            and _ARRAY_DTYPE.match(info["dtype"])
            and isinstance(info.get("sha256"), str)
            and _HEX64.match(info["sha256"])
        )
        if not ok:
            raise ValueError(
                f"array {name!r}: needs a name param.*/optim.*, a shape of at most 8 "
                "integers >= 0, a real floating dtype and a SHA-256"
            )


class _Shaped:
    """Stands in for a drawn array: has a shape, survives arithmetic, allocates nothing."""

    def __init__(self, shape: Any) -> None:
        self.shape = tuple(int(d) for d in (shape if isinstance(shape, tuple) else (shape,)))

    def _same(self, *_: Any) -> _Shaped:
        return self

    __mul__ = __rmul__ = __truediv__ = __add__ = __radd__ = __sub__ = __rsub__ = _same
    __neg__ = astype = _same


class _ShapeProbe:
    """A stand-in ``numpy.random.Generator``: ``init_params(probe)`` reveals shapes only."""

    def standard_normal(self, size: Any = None, *args: Any, **kwargs: Any) -> _Shaped:
        return _Shaped(size)

    def normal(self, loc: Any = 0, scale: Any = 1, size: Any = None) -> _Shaped:
        return _Shaped(size)

    def uniform(self, low: Any = 0, high: Any = 1, size: Any = None) -> _Shaped:
        return _Shaped(size)


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes the architecture implies, keyed as ``state_dict``.

    No weights are drawn.

    Only drawn initialisers are probed; a ``"zeros"`` bias is created for real, which
    is small beside its layer's weight (and that weight's shape is known by then).
    Containers (a layer with ``layers``/``shortcut`` lists) are probed recursively,
    keyed ``"<i>.layers.<j>.<name>"`` as ``model.named_params()`` keys them.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def probe(layer: Any, prefix: str) -> None:
        for name, value in layer.init_params(_ShapeProbe()).items():
            shapes[prefix + name] = tuple(int(d) for d in value.shape)
        # Buffers (BatchNorm's running statistics) are made for real: (C,) vectors.
        for name, value in layer.init_buffers().items():
            shapes[prefix + name] = tuple(int(d) for d in value.shape)
        for attr in ("layers", "shortcut"):
            for j, child in enumerate(getattr(layer, attr, None) or ()):
                probe(child, f"{prefix}{attr}.{j}.")

    for i, cfg in enumerate(config["layers"]):
        probe(layer_from_config(cfg), f"{i}.")
    return shapes


def _npy_header(fp: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp, max_header_size=_MAX_NPY_HEADER)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(fp, max_header_size=_MAX_NPY_HEADER)
    raise ValueError(f"unsupported .npy version {version}")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, shape: tuple[int, ...],
                 dtype: np.dtype, sha256: str | None) -> np.ndarray:  # fmt: skip
    """Stream one ``.npy`` member into a buffer of exactly its declared size, hashing it."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not nbytes <= info.file_size <= nbytes + _MAX_NPY_HEADER + 16:
        raise ValueError(
            f"member {info.filename!r} is {info.file_size} bytes, its metadata says "
            f"{nbytes} bytes of data"
        )
    with zf.open(info) as fp:
        got_shape, fortran, got_dtype = _npy_header(fp)
        if tuple(got_shape) != shape or got_dtype != dtype:
            raise ValueError(
                f"member {info.filename!r}: header says {got_dtype} {tuple(got_shape)}, "
                f"the metadata {dtype} {shape}"
            )
        buf, got = read_into(fp, nbytes)
        if got < nbytes:
            raise ValueError(f"member {info.filename!r} is truncated")
        if fp.read(1):  # Also makes zipfile check the member's CRC.
            raise ValueError(f"member {info.filename!r} has trailing data")
    flat = np.frombuffer(buf, dtype=dtype)
    a = flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
    if sha256 is not None and _sha256(a) != sha256:
        raise CheckpointError(
            f"corrupted or modified checkpoint: array {info.filename[:-4]!r} does not match "
            "its recorded shape, dtype or SHA-256"
        )
    return a.astype(dtype.newbyteorder("="), copy=False)


def _members(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The central directory, checked before anything is decompressed."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise ValueError(f"{len(infos)} members, more than {MAX_MEMBERS}")
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        if not name.endswith(".npy") or name[:-4] in members:
            raise ValueError(f"unexpected or repeated member {name!r}")
        if info.flag_bits & 0x1:
            raise ValueError(f"member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ValueError(f"member {name!r} uses unsupported compression {info.compress_type}")
        members[name[:-4]] = info
    return members


def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and verify the file: metadata digest, format, version, every array's hash."""
    with _open_regular(path) as fh:
        magic = fh.read(4)
        fh.seek(0)
        try:
            return _read_zip(path, fh)
        except CheckpointError as e:
            text = str(e)
            raise CheckpointError(
                text if text.startswith(f"{path}:") else f"{path}: {text}"
            ) from None
        # Whatever zipfile, zlib or numpy raise on hostile bytes (BadZipFile,
        # NotImplementedError for a flipped compression method, RuntimeError for a
        # flipped "encrypted" bit, struct/Unicode/EOF errors, ...): not a checkpoint.
        except (Exception, RecursionError) as e:  # noqa: BLE001
            if isinstance(e, MemoryError):
                raise  # never expected: sizes are checked before allocating
            why = f"truncated or damaged: {e}" if magic == b"PK\x03\x04" else "not an .npz file"
            if magic[:2] == b"\x93N":
                why = "a single .npy array, not an .npz"
            raise CheckpointError(f"{path}: not a readable xcnn checkpoint ({why})") from None


def _read_zip(path: Path, fh: BinaryIO) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with zipfile.ZipFile(fh) as zf:
        members = _members(zf)
        if _META not in members:
            raise CheckpointError(f"not an xcnn checkpoint (no {_META!r} metadata entry)")
        for name in (_META, _DIGEST):
            if name in members and members[name].file_size > MAX_METADATA_BYTES + 256:
                raise ValueError(f"{name!r} is over {MAX_METADATA_BYTES} bytes")
        info = members.pop(_META)
        with zf.open(info) as fp:
            raw = fp.read(MAX_METADATA_BYTES + 256)
        meta_bytes = _uint8_npy(raw)
        digest = b""
        if _DIGEST in members:
            with zf.open(members.pop(_DIGEST)) as fp:
                digest = _uint8_npy(fp.read(256))
        if hashlib.sha256(meta_bytes).hexdigest().encode() != digest:
            raise CheckpointError(
                "corrupted or modified checkpoint: the metadata does not match its SHA-256"
            )
        try:
            meta = json.loads(meta_bytes)
            _check_depth(meta, "metadata")
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
            raise CheckpointError(f"unreadable checkpoint metadata ({e})") from None
        try:
            _check_meta(meta)
        except CheckpointError:
            raise
        except ValueError as e:
            raise CheckpointError(f"invalid checkpoint metadata: {e}") from None
        listed = meta["arrays"]
        if set(listed) != set(members):
            missing, unexpected = (
                sorted(set(listed) - set(members)),
                sorted(set(members) - set(listed)),
            )
            raise CheckpointError(
                f"corrupted checkpoint: missing arrays {missing}, unexpected {unexpected}"
            )
        _check_architecture(meta["model"], listed)
        arrays = {}
        for name, info in members.items():
            entry = listed[name]
            shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
            arrays[name] = _read_member(zf, info, shape, dtype, entry["sha256"])
    return meta, arrays


def _uint8_npy(raw: bytes) -> bytes:
    """The data of a small 1-D uint8 ``.npy`` held in ``raw``."""
    fp = _bytesio.BytesIO(raw)
    shape, _, dtype = _npy_header(fp)
    data = raw[fp.tell() :]
    if dtype != np.uint8 or len(shape) != 1 or shape[0] != len(data):
        raise ValueError("metadata member is not a 1-D uint8 array of its declared length")
    return data


def _check_architecture(config: dict[str, Any], listed: dict[str, Any]) -> None:
    """The listed weights against the shapes the saved architecture needs: before building."""
    try:
        expected = _expected_shapes(config)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001  (a hostile layer config can break a constructor)
        raise CheckpointError(f"invalid model description in checkpoint ({e})") from None
    given = {k[len(_PARAM) :]: tuple(v["shape"]) for k, v in listed.items() if k.startswith(_PARAM)}
    dtype = np.dtype(config.get("dtype", "float32"))
    for key, shape in expected.items():
        if given.get(key, shape) != shape:
            raise CheckpointError(
                f"weights do not fit the saved architecture: {key!r} is {given[key]}, "
                f"the layer needs {shape}"
            )
    missing = sorted(set(expected) - set(given))
    if missing:
        raise CheckpointError(f"weights do not fit the saved architecture: missing {missing}")
    for key in given:
        if np.dtype(listed[_PARAM + key]["dtype"]).newbyteorder("=") != dtype:
            raise CheckpointError(
                f"weights do not fit the saved architecture: {key!r} is "
                f"{listed[_PARAM + key]['dtype']}, the model is {dtype}"
            )


def _iter_params(arrays: dict[str, np.ndarray], prefix: str) -> Iterator[tuple[str, np.ndarray]]:
    for k, v in arrays.items():
        if k.startswith(prefix):
            yield k[len(prefix) :], v


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
        Truncated, corrupted or modified file, a different format version, metadata
        of the wrong types, weights that do not fit the architecture, a FIFO or
        device, or not an xcnn checkpoint at all. The message names the file.
    xcnn.BackendError
        The backend cannot be used here (e.g. CuPy not installed).
    """
    path = Path(path)
    meta, arrays = _read(path)
    params = dict(_iter_params(arrays, _PARAM))
    optim_arrays = dict(_iter_params(arrays, _OPTIM))
    config = dict(meta["model"])
    # Files written before the scaling was part of the model kept it in the CLI's extra.
    legacy_scale = (meta.get("extra") or {}).get("scale")
    if "scale" not in config and isinstance(legacy_scale, str):
        config["scale"] = legacy_scale
    try:
        model = Sequential.from_config(config, backend=backend, device=device)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model description in checkpoint ({e})") from None
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
        except (ValueError, TypeError, KeyError, OverflowError) as e:
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
        cls = OPTIMIZER_CLASSES[info["type"]]
        # The constructor validates the hyperparameters (and rejects unknown ones);
        # load_state_dict checks every slot against the parameters.
        hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in info["hyperparams"].items()}
        optimizer = cls(model, **hyper)
        optimizer.load_state_dict({**info, "arrays": arrays})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid optimizer state in checkpoint ({e})") from None
    return optimizer


def load(path: str | os.PathLike[str], *, backend: Any = "numpy", device: Any = None) -> Sequential:
    """Load just the model of a checkpoint, on ``backend`` (see :func:`load_checkpoint`).

    Also reads a safetensors file written by :func:`xcnn.export.to_safetensors`
    (recognised by its content; needs the ``safetensors`` package).
    """
    from . import export  # imported on use: io stays independent of the exporters

    if export.is_safetensors(path):
        return export.read_safetensors(path, backend=backend, device=device)
    return load_checkpoint(path, backend=backend, device=device).model
