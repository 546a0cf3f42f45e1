"""PyTorch twins of xcnn's two named nets, built from given weights.

The benchmarks use these to check that xcnn and PyTorch compute the same loss and
gradients on one batch, and to time PyTorch training steps on the same models.

PyTorch is optional: importing this module never imports :mod:`torch`;
:func:`available` tells whether it can be used, and :func:`build` raises an
:class:`ImportError` with install instructions when it cannot.

Layouts (xcnn's contract)
-------------------------
* ``Conv2D``: weight ``(F, C, KH, KW)``, bias ``(F,)``; NCHW, "valid", stride 1
  (same as :class:`torch.nn.Conv2d`).
* ``Dense``: weight ``(in_features, out_features)``, bias ``(out_features,)``
  (the transpose of :class:`torch.nn.Linear`'s ``(out, in)`` weight).
* ``Flatten``: ``(N, C, H, W) -> (N, C*H*W)`` in C, H, W order (``torch.flatten(x, 1)``).
* ``MaxPool2D(2)``: ``torch.nn.functional.max_pool2d(x, 2)``.
* Loss: mean softmax cross-entropy over the batch (``torch.nn.functional.cross_entropy``).

Parameters travel as a list with one entry per xcnn layer, in order: a dict
``{"weight": ndarray, "bias": ndarray}`` for ``Conv2D``/``Dense`` and an empty
dict for parameter-free layers (``ReLU``, ``MaxPool2D``, ``Flatten``). The torch
module is a :class:`torch.nn.Sequential` whose children match that list one to one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "ARCHITECTURES",
    "available",
    "build",
    "grads",
    "layer_kinds",
    "loss_and_grads",
    "make_params",
    "train_step_fn",
]

_MISSING_TORCH = "PyTorch is optional for benchmarks: pip install torch==2.13.0"

# Layer specs, one per xcnn layer:
#   ("conv", in_channels, out_channels, kernel)  ("dense", in_features, out_features)
#   ("relu",)  ("pool", size)  ("flatten",)
# derived from xcnn.models, the one definition of the named nets.


def _spec(layer: Any) -> tuple[Any, ...] | None:
    """The torch twin's spec of one xcnn layer, or None if the twin has no such layer."""
    kind = type(layer).__name__
    if kind == "Conv2D" and layer.stride == 1 and layer.padding == "valid":
        kh, kw = layer.kernel_size
        return ("conv", layer.in_channels, layer.out_channels, kh) if kh == kw else None
    if kind == "Dense":
        return ("dense", layer.in_features, layer.out_features)
    if kind == "MaxPool2D" and layer.stride == layer.kernel_size:
        return ("pool", layer.kernel_size)
    return {"ReLU": ("relu",), "Flatten": ("flatten",)}.get(kind)


def _architectures() -> dict[str, tuple[tuple[Any, ...], ...]]:
    from xcnn.models import MODELS

    out = {}
    for name, layers in MODELS.items():
        specs = tuple(_spec(layer) for layer in layers())
        if all(s is not None for s in specs):
            out[name] = specs
    return out


#: The named nets of :mod:`xcnn.models` that the torch twin can mirror.
ARCHITECTURES: dict[str, tuple[tuple[Any, ...], ...]] = _architectures()

Params = list[dict[str, np.ndarray]]


def available() -> bool:
    """Return whether PyTorch can be imported.

    Returns
    -------
    bool
    """
    try:
        _torch()
    except ImportError:
        return False
    return True


def _torch() -> Any:
    """Import and return :mod:`torch`, or raise an ImportError with install advice."""
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise ImportError(_MISSING_TORCH) from exc


def _arch(name: str) -> tuple[tuple[Any, ...], ...]:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown net {name!r}; expected one of {sorted(ARCHITECTURES)}") from None


def layer_kinds(name: str) -> list[str]:
    """Return the kind of each layer of a named net, e.g. ``["conv", "pool", ...]``.

    Parameters
    ----------
    name : {"seed", "lenet"}

    Returns
    -------
    list of str
    """
    return [spec[0] for spec in _arch(name)]


def _param_shapes(spec: tuple[Any, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes of a layer's parameters in xcnn's layout (empty for parameter-free layers)."""
    if spec[0] == "conv":
        _, c, f, k = spec
        return {"weight": (f, c, k, k), "bias": (f,)}
    if spec[0] == "dense":
        _, n_in, n_out = spec
        return {"weight": (n_in, n_out), "bias": (n_out,)}
    return {}


def make_params(name: str, seed: int = 0, dtype: Any = np.float32) -> Params:
    """Draw He-normal weights and zero biases for a named net, in xcnn's layout.

    Weights are drawn layer by layer with ``numpy.random.default_rng(seed)``:
    ``standard_normal(shape) * sqrt(2 / fan_in)``, ``fan_in = C*KH*KW`` for a
    convolution and ``in_features`` for a dense layer.

    Parameters
    ----------
    name : {"seed", "lenet"}
    seed : int, default 0
    dtype : numpy dtype, default float32

    Returns
    -------
    list of dict
        One entry per layer: ``{"weight", "bias"}`` or ``{}``.
    """
    rng = np.random.default_rng(seed)
    params: Params = []
    for spec in _arch(name):
        shapes = _param_shapes(spec)
        if not shapes:
            params.append({})
            continue
        w_shape = shapes["weight"]
        fan_in = int(np.prod(w_shape[1:])) if spec[0] == "conv" else w_shape[0]
        std = np.sqrt(2.0 / fan_in)
        params.append(
            {
                "weight": (rng.standard_normal(w_shape) * std).astype(dtype),
                "bias": np.zeros(shapes["bias"], dtype=dtype),
            }
        )
    return params


def build(
    name: str,
    params: Sequence[dict[str, np.ndarray]],
    *,
    device: Any = "cpu",
    dtype: Any = None,
) -> torch.nn.Sequential:
    """Build the PyTorch twin of a named xcnn net and copy the given weights in.

    Parameters
    ----------
    name : {"seed", "lenet"}
    params : sequence of dict
        One entry per xcnn layer in order: ``{"weight": ndarray, "bias": ndarray}``
        in xcnn's layout for ``Conv2D``/``Dense``, ``{}`` otherwise. Dense weights
        ``(in, out)`` are transposed into ``torch.nn.Linear``'s ``(out, in)``.
    device : str or torch.device, default "cpu"
    dtype : torch.dtype, default torch.float32

    Returns
    -------
    torch.nn.Sequential
        Children correspond one to one with ``params``. Takes ``(N, 1, 28, 28)``
        inputs and returns ``(N, 10)`` logits.

    Raises
    ------
    ImportError
        If PyTorch is not installed.
    ValueError
        On an unknown name or parameters of the wrong number or shape.
    """
    torch = _torch()
    nn = torch.nn
    dtype = torch.float32 if dtype is None else dtype
    arch = _arch(name)
    if len(params) != len(arch):
        raise ValueError(f"{name!r} has {len(arch)} layers, got {len(params)} parameter entries")

    layers: list[Any] = []
    for idx, (spec, p) in enumerate(zip(arch, params, strict=True)):
        shapes = _param_shapes(spec)
        if set(p) != set(shapes):
            raise ValueError(
                f"layer {idx} ({spec[0]}) expects keys {sorted(shapes)}, got {sorted(p)}"
            )
        for key, shape in shapes.items():
            if tuple(np.shape(p[key])) != shape:
                raise ValueError(
                    f"layer {idx} ({spec[0]}) {key} must have shape {shape}, "
                    f"got {tuple(np.shape(p[key]))}"
                )
        kind = spec[0]
        if kind == "conv":
            _, c, f, k = spec
            layer = nn.Conv2d(c, f, k, stride=1, padding=0, device=device, dtype=dtype)
            weight = np.asarray(p["weight"])  # (F, C, KH, KW): same as torch
        elif kind == "dense":
            _, n_in, n_out = spec
            layer = nn.Linear(n_in, n_out, device=device, dtype=dtype)
            weight = np.asarray(p["weight"]).T  # (in, out) -> torch's (out, in)
        elif kind == "relu":
            layer = nn.ReLU()
        elif kind == "pool":
            layer = nn.MaxPool2d(spec[1])
        elif kind == "flatten":
            layer = nn.Flatten(1)  # (N, C, H, W) -> (N, C*H*W), C,H,W order
        else:  # pragma: no cover - ARCHITECTURES is fixed
            raise AssertionError(kind)
        if shapes:
            with torch.no_grad():
                layer.weight.copy_(torch.as_tensor(np.ascontiguousarray(weight)))
                layer.bias.copy_(torch.as_tensor(np.ascontiguousarray(p["bias"])))
        layers.append(layer)
    return nn.Sequential(*layers)


def grads(module: torch.nn.Sequential) -> Params:
    """Return each layer's parameter gradients as numpy arrays in xcnn's layout.

    Parameters
    ----------
    module : torch.nn.Sequential
        A module from :func:`build` on which ``backward()`` has been run.

    Returns
    -------
    list of dict
        Same structure as the ``params`` given to :func:`build`: ``{"weight",
        "bias"}`` gradients (Dense weight gradients transposed back to
        ``(in, out)``) or ``{}`` for parameter-free layers.

    Raises
    ------
    RuntimeError
        If a parameter has no gradient (no backward pass yet).
    """
    torch = _torch()
    out: Params = []
    for idx, layer in enumerate(module):
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            if layer.weight.grad is None or layer.bias.grad is None:
                raise RuntimeError(f"layer {idx} has no gradient: run loss.backward() first")
            gw = layer.weight.grad.detach().cpu().numpy()
            gb = layer.bias.grad.detach().cpu().numpy()
            if isinstance(layer, torch.nn.Linear):
                gw = np.ascontiguousarray(gw.T)  # (out, in) -> xcnn's (in, out)
            out.append({"weight": gw.copy(), "bias": gb.copy()})
        else:
            out.append({})
    return out


def _as_inputs(module: torch.nn.Module, x: Any, y: Any) -> tuple[Any, Any]:
    """Convert numpy inputs/labels to tensors on the module's device (tensors pass through)."""
    torch = _torch()
    p = next(module.parameters())
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x), device=p.device, dtype=p.dtype)
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(np.asarray(y), device=p.device, dtype=torch.long)
    return x, y


def loss_and_grads(module: torch.nn.Module, x: Any, y: Any) -> tuple[float, Params]:
    """Compute the mean cross-entropy and its gradients on one batch (no update).

    Parameters
    ----------
    module : torch.nn.Sequential
        A module from :func:`build`; its gradients are overwritten.
    x : numpy.ndarray or torch.Tensor
        ``(N, 1, 28, 28)`` inputs.
    y : numpy.ndarray or torch.Tensor
        ``(N,)`` integer labels.

    Returns
    -------
    loss : float
    grads : list of dict
        As returned by :func:`grads`.
    """
    torch = _torch()
    x, y = _as_inputs(module, x, y)
    module.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(module(x), y)  # mean over the batch
    loss.backward()
    return float(loss.item()), grads(module)


def train_step_fn(
    module: torch.nn.Module, optimizer_name: str, lr: float, momentum: float = 0.9
) -> Callable[[Any, Any], torch.Tensor]:
    """Make a training-step function for a module.

    Parameters
    ----------
    module : torch.nn.Module
    optimizer_name : {"sgd", "momentum", "adam"}
        ``torch.optim.SGD(lr)``, ``torch.optim.SGD(lr, momentum=momentum)``
        (PyTorch's form ``v = momentum * v + g; p -= lr * v``) or
        ``torch.optim.Adam(lr)`` with default betas/eps.
    lr : float
    momentum : float, default 0.9
        Only used by ``"momentum"``.

    Returns
    -------
    callable
        ``step(x, y) -> loss``: zero_grad, forward, mean cross-entropy, backward,
        optimizer step. ``x`` is ``(N, 1, 28, 28)``, ``y`` is ``(N,)`` integer
        labels (tensors on the module's device, or numpy arrays converted on every
        call). Returns the detached loss tensor before the update (no
        host synchronisation: call ``.item()`` when needed).
    """
    torch = _torch()
    params = list(module.parameters())
    if optimizer_name == "sgd":
        opt = torch.optim.SGD(params, lr=lr)
    elif optimizer_name == "momentum":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    elif optimizer_name == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        raise ValueError(
            f"unknown optimizer {optimizer_name!r}; expected 'sgd', 'momentum' or 'adam'"
        )
    cross_entropy = torch.nn.functional.cross_entropy

    def step(x: Any, y: Any) -> torch.Tensor:
        x, y = _as_inputs(module, x, y)
        opt.zero_grad(set_to_none=True)
        loss = cross_entropy(module(x), y)  # mean over the batch
        loss.backward()
        opt.step()
        return loss.detach()

    step.optimizer = opt  # type: ignore[attr-defined]
    return step
