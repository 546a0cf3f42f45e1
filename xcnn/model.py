"""Sequential: a stack of layers that owns the backend, dtype and seed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .backend import Backend, resolve_backend, to_numpy
from .init import make_rng
from .layers import Layer, layer_from_config

Array = Any

__all__ = ["Sequential"]


class Sequential:
    """Layers applied in order, all on one backend.

    Parameters
    ----------
    layers : sequence of Layer
        Unbuilt layers; the model draws their parameters (in order, from one
        host generator seeded with ``seed``) and moves them to the backend.
    backend : "numpy", "cupy", "torch", "array_api_strict" or an array-API namespace
    device : optional
        ``"cupy"``: CUDA device index. Namespaces: one of their devices.
    dtype : "float32" or "float64"
    seed : int
        The same seed gives the same initial weights on every backend.

    Examples
    --------
    >>> import numpy as np, xcnn
    >>> model = xcnn.Sequential(
    ...     [xcnn.Conv2D(1, 8, 3), xcnn.MaxPool2D(2), xcnn.Flatten(), xcnn.Dense(13 * 13 * 8, 10)],
    ...     backend="numpy", dtype="float32", seed=0)
    >>> model.forward(model.asarray(np.zeros((2, 1, 28, 28)))).shape
    (2, 10)
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        *,
        backend: str | Backend | Any = "numpy",
        device: Any = None,
        dtype: str = "float32",
        seed: int = 0,
        scale: str = "centered",
        classes: Sequence[str] | None = None,
    ) -> None:
        self.layers: list[Layer] = list(layers)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {i} is not a Layer: {layer!r}")
        self.backend = resolve_backend(backend, device)
        self.dtype = dtype
        self.seed = seed
        #: Input scaling of integer images (a name from ``xcnn.training.SCALES``), saved
        #: with the model so ``evaluate``/``predict`` scale the way training did.
        self.scale = scale
        #: Class names (index -> name), or None; saved with the model.
        self.classes = None if classes is None else [str(c) for c in classes]
        self._out_shape: tuple[int, ...] | None = None
        self._dt = self.backend.dtype(dtype)
        rng = make_rng(seed)
        for layer in self.layers:
            layer.build(self.backend, dtype, rng)

    # -- data in and out ----------------------------------------------------
    @property
    def xp(self) -> Any:
        """The array namespace every parameter and activation of this model uses."""
        return self.backend.xp

    @property
    def device(self) -> Any:
        return self.backend.device

    def asarray(self, host: Any) -> Array:
        """Host array, or any backend's array -> this model's backend and device.

        Floating arrays are cast to the model's dtype; integer arrays (labels,
        uint8 images) keep their dtype, so scaling images stays explicit.
        Another library's arrays cross by DLPack where both support it, else
        through the host (:meth:`xcnn.Backend.asarray`).
        """
        return self.backend.asarray(host, self.dtype)

    def check_input(self, x: Any) -> None:
        """Raise if ``x`` is not an array of this model's backend, device and dtype."""
        if not self.backend.owns(x):
            raise TypeError(
                f"Sequential: input is a {self.backend.describe(x)} but the model lives on "
                f"{self.backend.name} device {self.backend.device!r}; "
                "move it with model.asarray(x) (or xcnn.to_numpy(x) first)"
            )
        if x.dtype != self._dt:
            kind = "floating" if self.xp.isdtype(x.dtype, "real floating") else "non-floating"
            raise TypeError(
                f"Sequential: input dtype {x.dtype} ({kind}) does not match the model's "
                f"{self.dtype}; scale integer images explicitly (x / 255) and convert with "
                "model.asarray(x)"
            )

    # -- computation ----------------------------------------------------------
    def forward(self, x: Array, *, train: bool = True) -> Array:
        """Run every layer; with ``train=True`` each keeps what its backward needs.

        x (N, ...) -> logits (N, K) (or whatever the last layer gives).
        """
        self.check_input(x)
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(
                f"Sequential: empty batch (input shape {tuple(x.shape)}): give at least one sample"
            )
        with self.backend.activate():
            for layer in self.layers:
                x = layer.forward(x, train=train)
        self._out_shape = tuple(x.shape) if train else self._out_shape
        return x

    __call__ = forward

    def backward(self, dy: Array, *, input_grad: bool = True) -> Array | None:
        """Back-propagate ``dy = dL/dout`` through the layers in reverse.

        Records every layer's parameter gradients in ``layer.grads`` and
        returns ``dL/dx`` for the model input; ``input_grad=False`` skips that
        last product (the training loop never needs it) and returns None.
        """
        # A wrong-shaped dy would broadcast silently through the layers' arithmetic.
        if self._out_shape is not None and tuple(dy.shape) != self._out_shape:
            raise ValueError(
                f"Sequential.backward: dy has shape {tuple(dy.shape)}, but the last layer "
                f"{self.layers[-1]!r} gave an output of shape {self._out_shape}"
            )
        with self.backend.activate():
            for i in range(len(self.layers) - 1, -1, -1):
                dy = self.layers[i].backward(dy, need_dx=input_grad or i > 0)
        return dy

    # -- parameters -------------------------------------------------------------
    def named_params(self) -> Iterator[tuple[str, Layer, str]]:
        """Yield ``("<layer index>.<name>", layer, name)`` for every parameter."""
        for i, layer in enumerate(self.layers):
            for name in layer.params:
                yield f"{i}.{name}", layer, name

    def state_dict(self) -> dict[str, Any]:
        """Every parameter as a host NumPy array, keyed ``"<layer index>.<name>"``."""
        return {key: to_numpy(layer.params[name]) for key, layer, name in self.named_params()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy arrays (from :meth:`state_dict`, or any backend's) into the parameters.

        Shapes are checked; values cross as :meth:`asarray` says.
        """
        expected = {key for key, _, _ in self.named_params()}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"state does not fit this model: missing {missing}, unexpected {extra}"
            )
        for key, layer, name in self.named_params():
            value = state[key]
            if tuple(value.shape) != tuple(layer.params[name].shape):
                raise ValueError(
                    f"state {key!r} has shape {tuple(value.shape)}, layer {layer!r} "
                    f"expects {tuple(layer.params[name].shape)}"
                )
            layer.params[name] = self.asarray(value)

    def to(self, backend: str | Backend | Any, device: Any = None) -> Sequential:
        """Move every parameter to another backend/device (in place; returns self).

        Caches and gradients are dropped: they belong to the old device.
        """
        state = self.state_dict()
        self.backend = resolve_backend(backend, device)
        self._dt = self.backend.dtype(self.dtype)
        for layer in self.layers:
            layer.grads, layer.cache = {}, {}
        self.load_state_dict(state)
        return self

    def num_params(self) -> int:
        """Total number of scalar parameters."""
        total = 0
        for _, layer, name in self.named_params():
            size = 1
            for d in layer.params[name].shape:
                size *= d
            total += size
        return total

    # -- description ------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-serialisable architecture: enough to rebuild the model with :meth:`from_config`."""
        return {
            "layers": [{"type": type(lay).__name__, "config": lay.config()} for lay in self.layers],
            "dtype": self.dtype,
            "seed": self.seed,
            "scale": self.scale,
            "classes": self.classes,
        }

    @classmethod
    def from_config(
        cls, config: dict[str, Any], *, backend: Any = "numpy", device: Any = None, **overrides: Any
    ) -> Sequential:
        """Build a fresh model (new initial weights from the seed) from :meth:`config`."""
        kwargs = {"dtype": config.get("dtype", "float32"), "seed": config.get("seed", 0)}
        kwargs.update({k: config[k] for k in ("scale", "classes") if config.get(k) is not None})
        kwargs.update(overrides)
        layers = [layer_from_config(c) for c in config["layers"]]
        return cls(layers, backend=backend, device=device, **kwargs)

    def __repr__(self) -> str:
        inner = "".join(f"\n    {layer!r}," for layer in self.layers)
        return (
            f"Sequential([{inner}\n], backend={self.backend.name!r}, dtype={self.dtype!r}, "
            f"seed={self.seed})"
        )
