"""The kernel seam: native implementations of :mod:`xcnn.functional` ops, by array library.

Every op below is written once, generically, in :mod:`xcnn.functional` (or
:mod:`xcnn.updates`) and decorated with :func:`delegate`. A call looks at the
type of its first array argument, takes the library it comes from
(``type(x).__module__`` up to the first dot: ``"numpy"``, ``"cupy"``,
``"torch"``, ...), and if a kernel set for that library is registered and on,
calls its kernel for the op; the kernel either returns the result or the
:data:`FALLBACK` sentinel, and then the generic code runs. That is the only
way a fast path is reached: no checks at call sites, no ``None`` results, no
dict keys that say which path ran. (The idea is array-api-extra's
"delegation" and Chainer's ``Fallback``.)

Every delegated call also runs with the device of its first array argument
current (:func:`xcnn.backend.device_context`), so CuPy's ``zeros``/``arange``
and kernel launches land on the GPU that holds the data.

Kernel sets
-----------
A kernel set is a module ``xcnn/kernels/<lib>.py`` (``numpy.py``, ``cupy.py``)
that registers its kernels with ``@register("<lib>", "<op>")`` at import. It is
imported the first time an array of that library reaches a delegated op.
Each kernel has *exactly* the generic function's signature (parameter names,
kinds and defaults; this is checked when the set loads) and may return
:data:`FALLBACK` for any input it does not handle (a dtype, a stride, a NaN).

- ``numpy`` is on unless the environment has ``XCNN_FAST=0``;
- ``cupy`` is off unless the environment has ``XCNN_CUDA_KERNELS=1``;
- any other library's set is on when its module exists.

:func:`set_enabled` / :func:`disabled` switch a set at run time (tests use it to
compare kernels with the generic code); ``F.<op>.generic`` is the generic code.

Delegated ops (names in :data:`OPS`; the exact signatures a kernel must have)
-----------------------------------------------------------------------------
From :mod:`xcnn.functional`::

    windows(x, kh, kw, stride, oh, ow) -> cols (N, C, KH*KW, OH, OW)
    fold(cols, shape, kh, kw, stride) -> x (N, C, H, W)
    conv2d(x, w, b=None, *, stride=1, padding="valid") -> (y (N, F, OH, OW), Conv2DSaved)
    conv2d_backward(dy, saved, w, *, stride=1, padding="valid", need_dx=True)
        -> (dx (N, C, H, W) or None, dw (F, C, KH, KW), db (F,))
    conv2d_relu(x, w, b=None, *, stride=1, padding="valid")
        -> (y (N, F, OH, OW), Conv2DSaved, mask (N, F, OH, OW) bool)
    conv2d_relu_backward(dy, saved, mask, w, *, stride=1, padding="valid", need_dx=True)
        -> (dx (N, C, H, W) or None, dw (F, C, KH, KW), db (F,))
    conv2d_max_pool2d(x, w, b=None, *, stride=1, padding="valid", with_relu=False,
                      kernel_size=2, pool_stride=2)
        -> (y (N, F, PH, PW), Conv2DSaved, route (N, F, K*K, PH, PW) bool)
    conv2d_max_pool2d_backward(dy, saved, route, w, *, stride=1, padding="valid",
                               kernel_size=2, pool_stride=2, need_dx=True)
        -> (dx (N, C, H, W) or None, dw (F, C, KH, KW), db (F,))
    max_pool2d(x, kernel_size, stride) -> (y (N, C, OH, OW), mask (N, C, K*K, OH, OW) bool)
    max_pool2d_values(x, kernel_size, stride) -> y
    max_pool2d_backward(dy, mask, x_shape, kernel_size, stride) -> dx
    avg_pool2d(x, kernel_size, stride) -> y
    avg_pool2d_backward(dy, x_shape, kernel_size, stride) -> dx
    dense(x, w, b=None) -> y (N, O)
    dense_backward(dy, x, w) -> (dx, dw, db)
    relu(x) -> (y, mask)
    relu_backward(dy, mask) -> dx
    softmax(x, axis=-1) -> p
    log_softmax(x, axis=-1) -> logp
    softmax_backward(dy, y, axis=-1) -> dx
    softmax_cross_entropy(logits, labels) -> (loss 0-d, dlogits (N, K))

From :mod:`xcnn.updates` (pure optimizer updates; decoupled weight decay
``p <- p - lr * weight_decay * p`` in the same expression; a state of None
means "first step", i.e. zeros)::

    sgd_update(p, g, *, lr, weight_decay=0.0) -> p
    momentum_update(p, g, velocity, *, lr, momentum, weight_decay=0.0) -> (p, velocity)
    adam_update(p, g, m, v, *, lr, step, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.0) -> (p, m, v)

Saved state
-----------
``xcnn.functional.Conv2DSaved`` (a frozen dataclass), what ``conv2d`` hands to
``conv2d_backward``::

    x: Array               # the input (N, C, H, W); x_shape = tuple(x.shape)
    col: Array | None      # generic windows (N, C*KH*KW, OH*OW), or None: rebuilt from x
    workspace: Any = None  # private to the kernel set that made it (any other ignores it)

Any ``conv2d_backward`` (generic or kernel) accepts a ``Conv2DSaved`` from any
``conv2d`` of the same library: the generic backward uses ``col`` when present
and rebuilds it from ``x`` otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from xcnn.backend import device_context  # the one module that knows libraries by name

__all__ = [
    "FALLBACK",
    "OPS",
    "delegate",
    "register",
    "unregister",
    "kernel",
    "enabled",
    "set_enabled",
    "disabled",
    "library_of",
]

Func = TypeVar("Func", bound=Callable[..., Any])

#: Every op that may be delegated to a kernel set (the list in the module docstring).
OPS = (
    "windows",
    "fold",
    "conv2d",
    "conv2d_backward",
    "conv2d_relu",
    "conv2d_relu_backward",
    "conv2d_max_pool2d",
    "conv2d_max_pool2d_backward",
    "max_pool2d",
    "max_pool2d_values",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "dense",
    "dense_backward",
    "relu",
    "relu_backward",
    "softmax",
    "log_softmax",
    "softmax_backward",
    "softmax_cross_entropy",
    "sgd_update",
    "momentum_update",
    "adam_update",
)


class _Fallback:
    """The one value a kernel returns to say "not for these inputs: run the generic code"."""

    _instance: _Fallback | None = None

    def __new__(cls) -> _Fallback:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "FALLBACK"

    def __reduce__(self) -> str:
        return "FALLBACK"


#: Returned by a kernel that does not handle its inputs; the generic code then runs.
FALLBACK = _Fallback()

#: Which kernel sets are on, by library, from the environment (see the module docstring).
_ENABLED: dict[str, bool] = {
    "numpy": os.environ.get("XCNN_FAST", "1") != "0",
    "cupy": os.environ.get("XCNN_CUDA_KERNELS", "0") not in ("", "0"),
}

_GENERIC: dict[str, Callable[..., Any]] = {}  # op -> generic function
_KERNELS: dict[str, dict[str, Callable[..., Any]]] = {}  # lib -> op -> kernel (registered)
_TABLES: dict[str, dict[str, Callable[..., Any]]] = {}  # lib -> active table (after loading)


def library_of(x: Any) -> str:
    """The array library of ``x``: its type's top-level module (``"numpy"``, ``"cupy"``, ...)."""
    return type(x).__module__.partition(".")[0]


def register(lib: str, op: str) -> Callable[[Func], Func]:
    """Decorator: make ``func`` the ``lib`` kernel of ``op`` (returns ``func`` unchanged)."""
    if op not in OPS:
        raise ValueError(f"register: unknown op {op!r}; delegated ops are {OPS}")

    def deco(func: Func) -> Func:
        _KERNELS.setdefault(lib, {})[op] = func
        _TABLES.pop(lib, None)  # rebuilt (and checked) on the next call
        return func

    return deco


def unregister(lib: str, op: str) -> None:
    """Remove the ``lib`` kernel of ``op``, if any (the generic code runs from then on)."""
    _KERNELS.get(lib, {}).pop(op, None)
    _TABLES.pop(lib, None)


def _signature(func: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(func).parameters.values()]


def _table(lib: str) -> dict[str, Callable[..., Any]]:
    """The active kernels of ``lib``: its set imported once, each kernel's signature checked."""
    table = _TABLES.get(lib)
    if table is not None:
        return table
    if not _ENABLED.get(lib, True):
        table = {}
    else:
        if lib not in _KERNELS and lib.isidentifier():
            name = f"{__name__}.{lib}"
            if importlib.util.find_spec(name) is not None:
                importlib.import_module(name)  # registers its kernels
        table = dict(_KERNELS.get(lib, {}))
        for op, func in table.items():
            generic = _GENERIC.get(op)
            if generic is not None and _signature(func) != _signature(generic):
                raise TypeError(
                    f"kernel {lib}.{op}{inspect.signature(func)} does not have the signature "
                    f"of the generic {op}{inspect.signature(generic)}"
                )
    _TABLES[lib] = table
    return table


def kernel(lib: str, op: str) -> Callable[..., Any] | None:
    """The active ``lib`` kernel of ``op``, or None (no set, no such kernel, or switched off)."""
    return _table(lib).get(op)


def enabled(lib: str) -> bool:
    """Whether ``lib``'s kernel set is on."""
    return _ENABLED.get(lib, True)


def set_enabled(lib: str, on: bool) -> None:
    """Switch ``lib``'s kernel set on or off for this process."""
    _ENABLED[lib] = bool(on)
    _TABLES.pop(lib, None)


@contextlib.contextmanager
def disabled(lib: str = "numpy") -> Iterator[None]:
    """Run the code inside ``with`` on the generic path for ``lib``'s arrays."""
    before = enabled(lib)
    set_enabled(lib, False)
    try:
        yield
    finally:
        set_enabled(lib, before)


def delegate(func: Func) -> Func:
    """Decorator on a generic op: try the kernel of the first argument's library first.

    The wrapper also makes the first argument's device current while the op
    runs, and exposes the undecorated function as ``.generic``.
    """
    op = func.__name__
    if op not in OPS:
        raise ValueError(f"delegate: {op!r} is not in kernels.OPS")
    _GENERIC[op] = func

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        lib = type(x).__module__.partition(".")[0]
        table = _TABLES.get(lib)
        if table is None:
            table = _table(lib)
        impl = table.get(op)
        with device_context(x, lib):
            if impl is not None:
                out = impl(*args, **kwargs)
                if out is not FALLBACK:
                    return out
            return func(*args, **kwargs)

    wrapper.generic = func  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
