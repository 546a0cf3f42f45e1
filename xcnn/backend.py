"""The one place that knows array backends by name.

A :class:`Backend` answers four questions for the rest of xcnn: which array
namespace (``xp``) to compute with, on which device, how to bring a host
(NumPy) array in, and how to take an array back out (:func:`to_numpy`).
It is resolved once, when a model is built, and carried by the model: there
is no global "current backend".

Everything outside this module finds the namespace of its inputs with
``array_api_compat.array_namespace`` and never imports NumPy or CuPy for
array math.
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

__all__ = ["Backend", "BackendError", "resolve_backend", "to_numpy", "FLOAT_DTYPES"]

FLOAT_DTYPES = ("float32", "float64")


class BackendError(RuntimeError):
    """A backend was asked for that cannot be used here (not installed, no device, ...)."""


@dataclass(frozen=True, eq=False)
class Backend:
    """A resolved array backend: namespace plus device.

    Attributes
    ----------
    name : str
        ``"numpy"``, ``"cupy"``, ``"array_api_strict"``, ``"torch"``, ...
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

    def asarray(self, host: Any, dtype: str | None = None) -> Any:
        """Copy a host array (anything NumPy accepts) to this backend's device.

        Floating inputs are cast to ``dtype`` (``"float32"``/``"float64"``) when
        given, on the host, before the copy; integer and boolean inputs
        (labels, uint8 images) keep their dtype.
        """
        host = np.asarray(host)
        if dtype is not None and np.issubdtype(host.dtype, np.floating):
            self.dtype(dtype)  # a clear error if the device lacks it
            host = host.astype(dtype, copy=False)
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


_NAMESPACE_NAMES = {
    "array_api_compat.numpy": "numpy",
    "array_api_compat.cupy": "cupy",
    "array_api_compat.torch": "torch",
    "array_api_strict": "array_api_strict",
}


def _same_device(a: Any, b: Any) -> bool:
    return a == b or str(a) == str(b)


def resolve_backend(spec: str | ModuleType | Backend = "numpy", device: Any = None) -> Backend:
    """Turn a user's backend choice into a :class:`Backend`.

    Parameters
    ----------
    spec : str or module or Backend
        ``"numpy"``, ``"cupy"``, ``"torch"``, ``"array_api_strict"``, or an
        array-API namespace module (e.g. ``import array_api_strict``).
    device : optional
        ``"cupy"``: a CUDA device index (default 0). Namespaces: one of
        ``xp.__array_namespace_info__().devices()`` or its name (e.g.
        ``"device1"`` for array_api_strict).

    Raises
    ------
    ValueError
        Unknown backend name or device.
    BackendError
        CuPy (or another library) not installed, or no CUDA device.
    """
    if isinstance(spec, Backend):
        return spec if device is None else resolve_backend(spec.xp, device)
    if isinstance(spec, ModuleType):
        name = _NAMESPACE_NAMES.get(spec.__name__, spec.__name__)
        if name in ("numpy", "cupy", "torch"):
            return resolve_backend(name, device)
        if not hasattr(spec, "__array_namespace_info__"):
            raise ValueError(
                f"{spec.__name__} is not an array-API namespace "
                "(it has no __array_namespace_info__)"
            )
        return Backend(name, spec, _pick_device(spec, name, device))
    if not isinstance(spec, str):
        raise TypeError(f"backend must be a name or an array-API namespace, got {spec!r}")
    if spec == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(f"backend 'numpy' runs on the CPU only, got device={device!r}")
        return Backend("numpy", array_api_compat.array_namespace(np.empty(0)), "cpu")
    if spec == "cupy":
        return _cupy_backend(device)
    if spec == "torch":
        try:
            import torch
        except ImportError as e:
            raise BackendError("PyTorch is not installed: pip install torch") from e
        dev = torch.device("cpu" if device is None else device)
        return Backend("torch", array_api_compat.array_namespace(torch.empty(0)), dev)
    if spec == "array_api_strict":
        try:
            module = importlib.import_module("array_api_strict")
        except ImportError as e:
            raise BackendError(
                "array_api_strict is not installed: pip install array-api-strict"
            ) from e
        return resolve_backend(module, device)
    raise ValueError(
        f"unknown backend {spec!r}: use 'numpy', 'cupy', 'torch', 'array_api_strict' "
        "or pass an array-API namespace module"
    )


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
    return Backend("cupy", array_api_compat.array_namespace(cupy.empty(0)), cupy.cuda.Device(index))


def _pick_device(xp: ModuleType, name: str, device: Any) -> Any:
    info = xp.__array_namespace_info__()
    if device is None:
        return info.default_device()
    for d in info.devices():
        if d == device or str(d) == str(device) or getattr(d, "_device", None) == device:
            return d
    raise ValueError(f"{name} has no device {device!r}; its devices are {list(info.devices())}")


_NO_CONTEXT = contextlib.nullcontext()


def device_context(lib: str, x: Any) -> contextlib.AbstractContextManager[Any]:
    """A context making the device of ``x`` (an array of library ``lib``) current.

    CuPy launches kernels and creates arrays on the *current* GPU whatever
    ``device=`` says, so an op on arrays held by GPU 1 must run with GPU 1
    current; the other libraries place work by their arrays' devices.
    """
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
    info = xp.__array_namespace_info__()
    cpu = info.default_device()
    if array_api_compat.device(x) != cpu:
        x = array_api_compat.to_device(x, cpu)
    return np.asarray(x)
