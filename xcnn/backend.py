"""The one place that knows array backends by name.

A :class:`Backend` answers four questions for the rest of xcnn: which array
namespace (``xp``) to compute with, on which device, how to bring a host
(NumPy) array in, and how to take an array back out (:func:`to_numpy`).
It is resolved once, when a model is built, and carried by the model: there
is no global "current backend".

Everything outside this module finds the namespace of its inputs with
:func:`array_namespace` (``array_api_compat``'s, remembered per argument
types) and never imports NumPy or CuPy for array math.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "Backend",
    "BackendError",
    "resolve_backend",
    "to_numpy",
    "device_context",
    "array_namespace",
    "FLOAT_DTYPES",
]

FLOAT_DTYPES = ("float32", "float64")


class BackendError(RuntimeError):
    """A backend was asked for that cannot be used here (not installed, no device, ...)."""


@dataclass(frozen=True, eq=False)
class Backend:
    """A resolved array backend: namespace plus device.

    Attributes
    ----------
    name : str
        The module name it resolves from: ``"numpy"``, ``"cupy"``, ``"torch"``,
        ``"jax.numpy"``, ``"dask.array"``, ``"array_api_strict"``, ...
    xp : module
        The array-API namespace (``array_api_compat`` wrapped where needed).
    device : object
        The device every array of the model lives on.
    """

    name: str
    xp: ModuleType
    device: Any

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, device={self.device!r})"

    def dtype(self, name: str) -> Any:
        """The namespace's dtype object for ``"float32"``/``"float64"``, checked on the device."""
        if name not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {name!r}")
        info = self.xp.__array_namespace_info__()
        dtypes = info.dtypes(device=self.device, kind="real floating")
        if name not in dtypes:
            raise BackendError(
                f"{self.name} device {self.device!r} does not support {name}; "
                f"use one of {sorted(dtypes)}"
            )
        return dtypes[name]

    @property
    def lazy(self) -> bool:
        """Whether arrays are lazy expressions until computed (Dask)."""
        return self.name == "dask.array"

    def materialise(self, *arrays: Any) -> tuple[Any, ...]:
        """Compute lazy arrays now and keep the results (``dask.persist``); others as given.

        Called after every optimizer step on the parameters and optimizer
        state: without it each Dask parameter would stay an expression of
        every step before it, and each read would replay them all.
        """
        if not self.lazy or not arrays:
            return arrays
        import dask

        return tuple(dask.persist(*arrays))

    def asarray(self, data: Any, dtype: str | None = None) -> Any:
        """Bring an array to this backend's device: a host array, or any backend's array.

        Floating inputs are cast to ``dtype`` (``"float32"``/``"float64"``) when
        given (host arrays on the host, before the copy); integer and boolean
        inputs (labels, uint8 images) keep their kind, in an integer dtype the
        namespace has (JAX without x64: int32). Arrays of another library or
        device cross through DLPack where both sides support it, else through
        the host.
        """
        if not isinstance(data, np.ndarray | np.generic) and array_api_compat.is_array_api_obj(
            data
        ):
            x = data if self.owns(data) else self._import(data)
            if x is not None:
                if dtype is not None and self.xp.isdtype(x.dtype, "real floating"):
                    want = self.dtype(dtype)
                    if x.dtype != want:
                        x = self.xp.astype(x, want)
                return x
            data = to_numpy(data)
        host = np.asarray(data)
        if dtype is not None and np.issubdtype(host.dtype, np.floating):
            self.dtype(dtype)  # a clear error if the device lacks it
            host = host.astype(dtype, copy=False)
        elif host.dtype.kind in "iu" and host.dtype.name not in self._supported():
            host = host.astype(self.default_int, copy=False)
        if self.name == "numpy":
            return host
        if self.name == "cupy":
            import cupy

            with cupy.cuda.Device(self.device.id):
                return cupy.asarray(host)
        if self.name == "torch":
            import torch

            return torch.from_numpy(np.ascontiguousarray(host)).to(self.device)
        return self.xp.asarray(host, device=self.device)

    def _supported(self) -> dict[str, Any]:
        return self.xp.__array_namespace_info__().dtypes(device=self.device)

    @property
    def default_int(self) -> Any:
        """The namespace's default integer dtype on this device (int64, or int32 for JAX)."""
        info = self.xp.__array_namespace_info__()
        default = info.default_dtypes(device=self.device)["integral"]
        return np.dtype(next(k for k, v in self._supported().items() if v == default))

    def _import(self, x: Any) -> Any:
        """Another library's (or device's) array on this device by DLPack; None if it can't."""
        try:
            y = self.xp.from_dlpack(x)
            if not _same_device(array_api_compat.device(y), self.device):
                y = array_api_compat.to_device(y, self.device)
        except Exception:  # BufferError, TypeError, RuntimeError, ...: each library its own
            return None
        return y if self.owns(y) else None

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Make this backend's device current for the code inside ``with``.

        CuPy launches kernels on the *current* device, so work on an array
        held by GPU 1 must run with GPU 1 current; other backends need nothing.
        """
        if self.name == "cupy":
            with self.device:
                yield
        else:
            yield

    def owns(self, x: Any) -> bool:
        """Whether ``x`` is an array of this backend on this backend's device."""
        try:
            xp = array_api_compat.array_namespace(x)
        except TypeError:
            return False
        return xp is self.xp and _same_device(array_api_compat.device(x), self.device)

    def describe(self, x: Any) -> str:
        """A short human description of where an array lives, for error messages."""
        try:
            xp = array_api_compat.array_namespace(x)
        except TypeError:
            return type(x).__name__
        name = _NAMESPACE_NAMES.get(xp.__name__, xp.__name__)
        return f"{name} array on device {array_api_compat.device(x)!r}"


#: Backend names of the namespaces array-api-compat wraps (others go by their module name).
_NAMESPACE_NAMES = {
    "array_api_compat.numpy": "numpy",
    "array_api_compat.cupy": "cupy",
    "array_api_compat.torch": "torch",
    "array_api_compat.dask.array": "dask.array",
}


def _same_device(a: Any, b: Any) -> bool:
    """Device equality in a canonical form (a torch ``cuda`` and ``cuda:0`` are one device)."""
    return a == b or _canonical(a) == _canonical(b)


def _canonical(d: Any) -> str:
    text = str(d)
    return text + ":0" if text in ("cuda", "xpu", "mps") else text


def resolve_backend(spec: str | ModuleType | Backend = "numpy", device: Any = None) -> Backend:
    """Turn a user's backend choice into a :class:`Backend`.

    Parameters
    ----------
    spec : str or module or Backend
        A module, or its importable name: ``"numpy"``, ``"cupy"``, ``"torch"``,
        ``"jax.numpy"``, ``"dask.array"``, ``"array_api_strict"``, or any other
        array-API namespace or library that array-api-compat wraps.
    device : optional
        ``"cupy"``: a CUDA device index (default 0). ``"torch"``: a torch device
        (``"cpu"``, ``"cuda"``, ``"cuda:1"``). Others: one of
        ``xp.__array_namespace_info__().devices()`` or its name (e.g.
        ``"device1"`` for array_api_strict). Default: the namespace's default
        device, or where it puts a new array when it names none (JAX).

    Raises
    ------
    ValueError
        A module that is not an array library, or an unknown device.
    BackendError
        The library (CuPy, torch, ...) is not installed, or no CUDA device.
    """
    if isinstance(spec, Backend):
        return spec if device is None else resolve_backend(spec.xp, device)
    if isinstance(spec, str):
        if spec == "cupy":
            return _cupy_backend(device)
        try:
            module = importlib.import_module(spec)
        except ImportError as e:
            if spec in _INSTALL:
                raise BackendError(f"{spec} is not installed: {_INSTALL[spec]}") from e
            raise ValueError(f"unknown backend {spec!r}: {_KNOWN} ({e})") from None
        if module.__name__ not in _WRAPPED and not hasattr(module, "__array_namespace_info__"):
            raise ValueError(
                f"unknown backend {spec!r}: the module is not an array-API namespace (it has no "
                f"__array_namespace_info__) nor a library array-api-compat wraps; {_KNOWN}"
            )
        return resolve_backend(module, device)
    if not isinstance(spec, ModuleType):
        raise TypeError(f"backend must be a module name or a module, got {spec!r}")
    xp = _namespace_of_module(spec)
    name = _NAMESPACE_NAMES.get(xp.__name__, xp.__name__)
    if name == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(f"backend 'numpy' runs on the CPU only, got device={device!r}")
        return Backend("numpy", xp, "cpu")
    if name == "cupy":
        return _cupy_backend(device)
    if name == "torch":
        import torch

        try:  # a tensor's own device: "cuda" becomes "cuda:0", as tensors report it
            dev = torch.empty(0, device="cpu" if device is None else device).device
        except (RuntimeError, AssertionError) as e:
            raise BackendError(f"torch cannot use device {device!r}: {e}") from e
        return Backend("torch", xp, dev)
    return Backend(name, xp, _pick_device(xp, name, device))


def _namespace_of_module(module: ModuleType) -> ModuleType:
    """The array-API namespace of a library module (array-api-compat's wrapper if it has one)."""
    if module.__name__ in _WRAPPED:
        return importlib.import_module(_WRAPPED[module.__name__])
    if hasattr(module, "__array_namespace_info__"):
        return module  # a namespace itself: array_api_strict, jax.numpy, compat's wrappers
    raise ValueError(
        f"{module.__name__} is not an array-API namespace (it has no __array_namespace_info__) "
        "nor a library array-api-compat wraps (numpy, cupy, torch, dask.array); "
        "use e.g. 'numpy', 'torch', 'jax.numpy', 'dask.array' or 'array_api_strict'"
    )


_KNOWN = (
    "use 'numpy', 'cupy', 'torch', 'jax.numpy', 'dask.array', 'array_api_strict' or another "
    "importable array-API namespace"
)
_INSTALL = {
    "torch": "pip install torch",
    "jax.numpy": "pip install jax",
    "dask.array": "pip install 'dask[array]'",
    "array_api_strict": "pip install array-api-strict",
}

#: Library modules that are not array-API namespaces themselves, and their wrappers.
_WRAPPED = {
    "numpy": "array_api_compat.numpy",
    "cupy": "array_api_compat.cupy",
    "torch": "array_api_compat.torch",
    "dask.array": "array_api_compat.dask.array",
}


def _cupy_backend(device: Any) -> Backend:
    try:
        import cupy
    except ImportError as e:
        raise BackendError(
            "CuPy is not installed: pip install 'xcnn[cuda12]' (CUDA 12) or "
            "'xcnn[cuda13]' (CUDA 13), or use backend='numpy'"
        ) from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError when the driver is missing
        raise BackendError(
            f"CuPy is installed but no CUDA device answers ({e}); use backend='numpy'"
        ) from e
    index = 0 if device is None else int(device)
    if not 0 <= index < count:
        raise BackendError(
            f"CUDA device {index} does not exist: this machine has {count} (valid: 0..{count - 1})"
        )
    xp = importlib.import_module("array_api_compat.cupy")
    return Backend("cupy", xp, cupy.cuda.Device(index))


def _pick_device(xp: ModuleType, name: str, device: Any) -> Any:
    info = xp.__array_namespace_info__()
    if device is None:
        default = info.default_device()
        # JAX names no default device: take the one its new arrays land on.
        return default if default is not None else array_api_compat.device(xp.zeros(0))
    for d in info.devices():
        if d is None:
            continue
        if _same_device(d, device) or getattr(d, "_device", None) == device:
            return d
    devices = [d for d in info.devices() if d is not None]
    raise ValueError(f"{name} has no device {device!r}; its devices are {devices}")


_NO_CONTEXT = contextlib.nullcontext()


def array_namespace(*arrays: Any) -> ModuleType:
    """``array_api_compat.array_namespace(*arrays)``, remembered per tuple of argument types.

    Every op asks for the namespace of its inputs; array_api_compat's answer
    takes about 3 us (a tenth of a seed-net step at batch 1 went there), a
    lookup by types a tenth of that. The answer depends only on the types,
    except for NumPy arrays of a void dtype (JAX's float0 zero gradients are
    JAX's), which are never looked up here. Failures are not remembered.
    """
    key = tuple(map(type, arrays))
    xp = _NAMESPACES.get(key)
    void = False
    for a in arrays:  # (a loop, not any(): this runs on every op)
        if type(a) is np.ndarray and a.dtype.kind == "V":
            void = True
    if xp is not None and not void:
        return xp
    xp = array_api_compat.array_namespace(*arrays)
    if not void:
        _NAMESPACES[key] = xp
    return xp


_NAMESPACES: dict[tuple[type, ...], ModuleType] = {}


def device_context(x: Any, lib: str | None = None) -> contextlib.AbstractContextManager[Any]:
    """A context making the device of array ``x`` (of library ``lib``, if known) current.

    CuPy launches kernels and creates arrays on the *current* GPU whatever
    ``device=`` says, so an op on arrays held by GPU 1 must run with GPU 1
    current; the other libraries place work by their arrays' devices.
    """
    if lib is None:
        lib = type(x).__module__.partition(".")[0]
    if lib == "cupy":
        return x.device
    return _NO_CONTEXT


def to_numpy(x: Any) -> np.ndarray:
    """Copy any backend's array to a host NumPy array (no-op for NumPy).

    Works for NumPy, CuPy, PyTorch and array_api_strict arrays on any device.
    """
    if isinstance(x, np.ndarray | np.generic):
        return np.asarray(x)
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    try:
        xp = array_api_compat.array_namespace(x)
    except TypeError:
        return np.asarray(x)
    cpu = xp.__array_namespace_info__().default_device()
    if cpu is not None and not _same_device(array_api_compat.device(x), cpu):
        x = array_api_compat.to_device(x, cpu)  # array_api_strict's other devices
    return np.asarray(x)  # JAX copies to the host, Dask computes
