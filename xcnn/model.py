"""Sequential: a stack of layers that owns the backend, dtype and seed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from . import blocks  # noqa: F401  (registers BatchNorm2D, Dropout, ... for from_config)
from .backend import Backend, resolve_backend, to_numpy
from .init import make_rng
from .layers import Conv2D, Layer, MaxPool2D, ReLU, ShapeError, layer_from_config

Array = Any

__all__ = ["Sequential"]


def _fusion(layers: Sequence[Layer], i: int, train: bool) -> tuple[ReLU | None, MaxPool2D | None]:
    """The ReLU and the max-pool after ``layers[i]`` that run as one op with it (None: not fused).

    Conv2D -> ReLU -> MaxPool2D and Conv2D -> MaxPool2D (while training) and
    Conv2D -> ReLU run through the fused ops of :mod:`xcnn.functional`, so a
    kernel set can apply the ReLU and the pool while the convolution's output
    is in cache; the results are those of the layers one by one. Exact types:
    a subclass may have a forward of its own.
    """
    if type(layers[i]) is not Conv2D:
        return None, None
    after = list(layers[i + 1 : i + 3])
    relu = after.pop(0) if after and type(after[0]) is ReLU else None
    pool = after[0] if train and after and type(after[0]) is MaxPool2D else None
    return relu, pool  # (exact types checked above)


class Sequential:
    """Layers applied in order, all on one backend.

    Parameters
    ----------
    layers : sequence of Layer
        Unbuilt layers; the model draws their parameters (in order, from one
        host generator seeded with ``seed``) and moves them to the backend.
    input_shape : (C, H, W), optional
        The shape of one input image. Given, every layer is built from the
        shape that reaches it, so sizes may be left out (``Dense(10)``,
        ``Conv2D(out_channels=8, kernel_size=3)``) and :meth:`summary` shows
        output shapes; a layer that cannot take the shape fails here, by name.
    backend : "numpy", "cupy", "torch", "array_api_strict" or an array-API namespace
    device : optional
        ``"cupy"``: CUDA device index. Namespaces: one of their devices.
    dtype : "float32" or "float64"
    seed : int
        The same seed gives the same initial weights on every backend; it
        also seeds ``model.rng``, the host generator of dropout masks.
    scale : str
        How integer images are scaled for this model (a name in
        :data:`xcnn.training.SCALES`); ``fit``/``evaluate``/``predict`` use it
        by default, and it is saved with the model.
    classes : list of str, optional
        Class names, index = label (saved with the model).

    Attributes
    ----------
    training : bool
        The mode: True after construction and :meth:`train`, False after
        :meth:`eval`. ``forward(x)`` uses it unless ``train=`` is given.
    rng : numpy.random.Generator
        Draws dropout masks; its state is saved in checkpoints so a resumed
        run continues the same stream.

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
        input_shape: Sequence[int] | None = None,
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
        from .training import SCALES  # training imports this module

        if scale not in SCALES:
            raise ValueError(f"Sequential: unknown scale {scale!r}: choose one of {sorted(SCALES)}")
        self.scale = scale
        self.classes = None if classes is None else [str(c) for c in classes]
        self.input_shape: tuple[int, ...] | None = None
        self.shapes: list[tuple[int, ...]] | None = None  # output shape of each layer
        if input_shape is not None:
            self.input_shape = tuple(int(d) for d in input_shape)
            if len(self.input_shape) < 1 or min(self.input_shape) < 1:
                raise ValueError(
                    f"Sequential: input_shape must be positive sizes such as (C, H, W), "
                    f"got {tuple(input_shape)}"
                )
            self.shapes = self._resolve(self.input_shape)
        self.backend = resolve_backend(backend, device)
        self.dtype = dtype
        self.seed = seed
        self._out_shape: tuple[int, ...] | None = None
        self.training = True
        # A stream apart from the weights' (seed, 1), so adding dropout never changes them.
        self.rng = make_rng((seed, 1))
        self._dt = self.backend.dtype(dtype)
        rng = make_rng(seed)
        for i, layer in enumerate(self.layers):
            missing = layer.unresolved()
            if missing is not None:
                raise ShapeError(
                    f"Sequential: layer {i} {layer!r} has no {missing}: pass "
                    "input_shape=(C, H, W) to Sequential so it can be inferred, or give it"
                )
            layer.build(self.backend, dtype, rng)
        for layer in self.leaves():
            if hasattr(layer, "rng"):
                layer.rng = self.rng

    def _resolve(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        shapes = []
        for i, layer in enumerate(self.layers):
            try:
                shape = layer.resolve(shape)
            except ShapeError as e:
                raise ShapeError(f"Sequential: layer {i}: {e}") from None
            shapes.append(shape)
        return shapes

    def leaves(self) -> Iterator[Layer]:
        """Every non-container layer, containers (Residual) opened, in order."""
        for layer in self.layers:
            sub = getattr(layer, "sublayers", None)
            if sub is None:
                yield layer
            else:
                yield from (inner for _, inner in sub())

    # -- modes ------------------------------------------------------------------
    def train(self) -> Sequential:
        """Training mode: batch statistics in BatchNorm2D, dropout on. Returns self."""
        self.training = True
        return self

    def eval(self) -> Sequential:
        """Evaluation mode: running statistics in BatchNorm2D, dropout off. Returns self."""
        self.training = False
        return self

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
    def forward(self, x: Array, *, train: bool | None = None) -> Array:
        """Run every layer; with ``train=True`` each keeps what its backward needs.

        ``train=None`` uses the model's mode (:attr:`training`); ``True``
        also means batch statistics and dropout, ``False`` running statistics
        and no dropout (see :meth:`train`, :meth:`eval`).

        x (N, ...) -> logits (N, K) (or whatever the last layer gives).
        """
        train = self.training if train is None else bool(train)
        self.check_input(x)
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(
                f"Sequential: empty batch (input shape {tuple(x.shape)}): give at least one sample"
            )
        with self.backend.activate():
            layers, i = self.layers, 0
            while i < len(layers):
                layer, (relu, pool) = layers[i], _fusion(layers, i, train)
                if pool is not None:
                    x = layer.forward_pool(x, relu, pool, train=train)
                elif relu is not None:
                    x = layer.forward_relu(x, relu, train=train)
                else:
                    x = layer.forward(x, train=train)
                i += 1 + (relu is not None) + (pool is not None)
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
    def _named(self, attr: str) -> Iterator[tuple[str, Layer, str]]:
        for i, layer in enumerate(self.layers):
            sub = getattr(layer, "sublayers", None)
            pairs = [("", layer)] if sub is None else [(f"{p}.", inner) for p, inner in sub()]
            for path, leaf in pairs:
                for name in getattr(leaf, attr):
                    yield f"{i}.{path}{name}", leaf, name

    def named_params(self) -> Iterator[tuple[str, Layer, str]]:
        """Yield ``(key, layer, name)`` for every trainable parameter.

        ``key`` is ``"<layer index>.<name>"``; inside a container it is the
        dotted path, ``"<i>.layers.<j>.<name>"`` or ``"<i>.shortcut.<j>.<name>"``;
        ``layer`` is the layer holding it, so ``layer.params[name]`` is the array.
        """
        return self._named("params")

    def named_buffers(self) -> Iterator[tuple[str, Layer, str]]:
        """Like :meth:`named_params`, for non-trainable state (``layer.buffers[name]``)."""
        return self._named("buffers")

    def state_dict(self) -> dict[str, Any]:
        """Every parameter and buffer as a host NumPy array, keyed as :meth:`named_params`."""
        state = {key: to_numpy(layer.params[name]) for key, layer, name in self.named_params()}
        state.update(
            {key: to_numpy(layer.buffers[name]) for key, layer, name in self.named_buffers()}
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy arrays (:meth:`state_dict`, or any backend's) into parameters and buffers.

        Shapes are checked; values cross as :meth:`asarray` says.
        """
        slots = [(k, lay, n, "params") for k, lay, n in self.named_params()]
        slots += [(k, lay, n, "buffers") for k, lay, n in self.named_buffers()]
        expected = {key for key, _, _, _ in slots}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"state does not fit this model: missing {missing}, unexpected {extra}"
            )
        for key, layer, name, attr in slots:
            value, store = state[key], getattr(layer, attr)
            if tuple(value.shape) != tuple(store[name].shape):
                raise ValueError(
                    f"state {key!r} has shape {tuple(value.shape)}, layer {layer!r} "
                    f"expects {tuple(store[name].shape)}"
                )
            store[name] = self.asarray(value)

    def to(self, backend: str | Backend | Any, device: Any = None) -> Sequential:
        """Move every parameter to another backend/device (in place; returns self).

        Caches and gradients are dropped: they belong to the old device.
        """
        state = self.state_dict()
        self.backend = resolve_backend(backend, device)
        self._dt = self.backend.dtype(self.dtype)
        for layer in self.leaves():
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
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "scale": self.scale,
            "classes": self.classes,
        }

    @classmethod
    def from_config(
        cls, config: dict[str, Any], *, backend: Any = "numpy", device: Any = None, **overrides: Any
    ) -> Sequential:
        """Build a fresh model (new initial weights from the seed) from :meth:`config`."""
        kwargs = {"dtype": config.get("dtype", "float32"), "seed": config.get("seed", 0)}
        for key in ("input_shape", "scale", "classes"):  # absent from older checkpoints
            if config.get(key) is not None:
                kwargs[key] = config[key]
        kwargs.update(overrides)
        layers = [layer_from_config(c) for c in config["layers"]]
        return cls(layers, backend=backend, device=device, **kwargs)

    def summary(self) -> str:
        """A table of every layer, its output shape and parameter count, and the total.

        Output shapes need ``input_shape``; without it they show as ``?``.
        Containers (Residual) list their inner layers indented below them.
        """
        rows: list[tuple[str, str, str]] = []

        def count(layer: Layer) -> int:
            total = 0
            for value in layer.params.values():
                size = 1
                for d in value.shape:
                    size *= d
                total += size
            return total

        def shape_text(shape: tuple[int, ...] | None) -> str:
            return "?" if shape is None else str(("N", *shape)).replace("'", "")

        def add(prefix: str, layer: Layer, shape: tuple[int, ...] | None, indent: str) -> None:
            sub = layer.layers if hasattr(layer, "sublayers") else None
            name = f"{type(layer).__name__}" if sub is not None else repr(layer)
            rows.append((f"{indent}{prefix} {name}", shape_text(shape), f"{count(layer):,}"))
            if sub is not None:
                inner_shapes = getattr(layer, "shapes", {})
                for group in ("layers", "shortcut"):
                    known = inner_shapes.get(group) or [None] * len(getattr(layer, group))
                    for j, inner in enumerate(getattr(layer, group)):
                        add(f"{group}.{j}", inner, known[j], indent + "  ")

        shapes = self.shapes or [None] * len(self.layers)
        for i, (layer, shape) in enumerate(zip(self.layers, shapes, strict=True)):
            add(str(i), layer, shape, "")
        head = ("layer", "output shape", "params")
        total = f"total: {self.num_params():,} parameters"
        if self.input_shape is not None:
            total += f", input {shape_text(self.input_shape)}"
        widths = [max(len(r[k]) for r in [head, *rows]) for k in range(3)]

        def line(r: tuple[str, str, str]) -> str:
            return f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}"

        rule = "-" * len(line(head))
        return "\n".join([line(head), rule, *map(line, rows), rule, total])

    def __repr__(self) -> str:
        inner = "".join(f"\n    {layer!r}," for layer in self.layers)
        return (
            f"Sequential([{inner}\n], backend={self.backend.name!r}, dtype={self.dtype!r}, "
            f"seed={self.seed})"
        )
