"""Layers: parameters, hyperparameters and the forward cache around :mod:`xcnn.functional`.

Every layer has ``forward(x)`` (which caches what backprop needs) and
``backward(dy)`` (``dL/dout`` in, ``dL/din`` out, parameter gradients stored
in ``grads``). Parameters live in ``params``, a dict ``name -> array``; a new
array may be assigned there at any time and is used from then on.

Non-trainable state (BatchNorm's running statistics) lives in ``buffers``,
saved in checkpoints beside the parameters but never touched by optimizers.

Layers are built (their parameters drawn and moved to a backend) by
:class:`xcnn.Sequential`, or directly with :meth:`Layer.build`. Before that,
:meth:`Layer.resolve` takes the per-sample shape reaching the layer, fills in
any size the user left out (``Dense(10)``, ``Conv2D(out_channels=8,
kernel_size=3)``) and returns the shape that leaves it: shape inference and
``model.summary()`` are built on it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from . import functional as F
from .backend import Backend, array_namespace, resolve_backend
from .init import initialise, make_rng

Array = Any

__all__ = [
    "Layer",
    "Conv2D",
    "MaxPool2D",
    "AvgPool2D",
    "Dense",
    "ReLU",
    "Flatten",
    "Softmax",
    "ShapeError",
    "LAYERS",
    "layer_from_config",
]


class ShapeError(ValueError):
    """An input of the wrong rank, shape or channel count."""


class Layer:
    """Base class: holds ``params``/``grads``, checks inputs, knows its config."""

    #: expected input rank, checked before any compute
    input_ndim: ClassVar[int | None] = None

    def __init__(self) -> None:
        self.params: dict[str, Array] = {}
        self.grads: dict[str, Array] = {}
        self.buffers: dict[str, Array] = {}
        self.cache: dict[str, Any] = {}

    # -- construction -----------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Constructor arguments as JSON: ``type(layer)(**layer.config())`` rebuilds it."""
        return {}

    def init_params(self, rng: Any) -> dict[str, Any]:
        """Draw this layer's initial parameters as float64 host arrays (none by default)."""
        return {}

    def init_buffers(self) -> dict[str, Any]:
        """Initial non-trainable state as float64 host arrays (none by default)."""
        return {}

    def resolve(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample input shape (no batch axis) -> output shape; fills in inferred sizes.

        Raises :class:`ShapeError`, naming the layer, for a shape it cannot take.
        """
        return tuple(shape)

    def unresolved(self) -> str | None:
        """The constructor argument still to be inferred from the input shape, if any."""
        return None

    def build(
        self, backend: str | Backend | Any = "numpy", dtype: str = "float32", seed: Any = 0
    ) -> Layer:
        """Draw parameters from ``seed`` (an int or a numpy Generator) onto ``backend``."""
        rng = make_rng(seed)
        backend = resolve_backend(backend)
        missing = self.unresolved()
        if missing is not None:
            raise ShapeError(
                f"{self!r}: {missing} is not given and no input shape tells it: pass "
                "input_shape=(C, H, W) to Sequential, or give the layer its input size"
            )
        self.params = {k: backend.asarray(v, dtype) for k, v in self.init_params(rng).items()}
        self.buffers = {k: backend.asarray(v, dtype) for k, v in self.init_buffers().items()}
        self.grads, self.cache = {}, {}
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # -- checks -----------------------------------------------------------
    def check_input(self, x: Array) -> None:
        """Raise a clear error, naming this layer, for an input it cannot take."""
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{self!r}: expected an array, got {type(x).__name__}")
        xp = array_namespace(x)
        if not xp.isdtype(x.dtype, "real floating"):
            raise TypeError(
                f"{self!r}: expected a floating-point input, got dtype {x.dtype}; "
                "convert images explicitly (e.g. x / 255) before the model"
            )
        if self.input_ndim is not None and x.ndim != self.input_ndim:
            raise ShapeError(
                f"{self!r}: expected a {self.input_ndim}-D input "
                f"{self.input_layout()}, got shape {tuple(x.shape)}"
            )

    def input_layout(self) -> str:
        return ""

    # -- computation --------------------------------------------------------
    def forward(self, x: Array, *, train: bool = True) -> Array:
        raise NotImplementedError

    def backward(self, dy: Array, *, need_dx: bool = True) -> Array | None:
        raise NotImplementedError

    def _cached(self, key: str) -> Any:
        try:
            return self.cache[key]
        except KeyError:
            raise RuntimeError(
                f"{self!r}: backward() called without a forward(x, train=True) before it"
            ) from None


class Conv2D(Layer):
    """2-D convolution over an NCHW batch: overlay each filter, multiply, sum.

    Parameters
    ----------
    in_channels, out_channels : int
        ``C`` and ``F``. ``in_channels`` may be left out in the keyword form,
        ``Conv2D(out_channels=8, kernel_size=3)``: it is then taken from the
        input shape (``Sequential(..., input_shape=(C, H, W))``).
    kernel_size : int or (int, int)
        ``KH, KW``; odd or even.
    stride : int
        ``S >= 1``.
    padding : "valid", "same" or int
        ``"valid"``: no padding. ``"same"``: output ``ceil(H / S)`` (TensorFlow's
        rule; the extra row/column of an even kernel goes bottom/right). int:
        that many zeros on every side.
    bias : bool
    init : "he" (default), "glorot" or "tutorial" (randn / (KH*KW*C)).

    Shapes
    ------
    x (N, C, H, W) -> y (N, F, OH, OW), ``OH = (H + PT + PB - KH) // S + 1``.
    weight (F, C, KH, KW), bias (F,).
    """

    input_ndim = 4

    def __init__(
        self,
        in_channels: int | None = None,
        out_channels: int | None = None,
        kernel_size: int | tuple[int, int] | None = None,
        *,
        stride: int = 1,
        padding: str | int = "valid",
        bias: bool = True,
        init: str = "he",
    ) -> None:
        super().__init__()
        if out_channels is None or kernel_size is None:
            raise TypeError(
                "Conv2D: out_channels and kernel_size are required, e.g. Conv2D(1, 8, 3) or "
                f"Conv2D(out_channels=8, kernel_size=3); got out_channels={out_channels!r}, "
                f"kernel_size={kernel_size!r}"
            )
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        known_in = 1 if in_channels is None else in_channels
        if min(known_in, out_channels, kh, kw, stride) < 1:
            raise ValueError(
                "Conv2D: channels, kernel_size and stride must be >= 1, got "
                f"in={in_channels}, out={out_channels}, kernel={kernel_size}, stride={stride}"
            )
        if not (padding in ("valid", "same") or (isinstance(padding, int) and padding >= 0)):
            raise ValueError(
                f"Conv2D: padding must be 'valid', 'same' or an int >= 0, got {padding!r}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kh, kw), stride, padding
        self.bias, self.init = bias, init

    def config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": self.stride,
            "padding": self.padding,
            "bias": self.bias,
            "init": self.init,
        }

    def __repr__(self) -> str:
        kh, kw = self.kernel_size
        k = kh if kh == kw else (kh, kw)
        extra = "".join(
            f", {name}={getattr(self, name)!r}"
            for name, default in (("stride", 1), ("padding", "valid"), ("bias", True))
            if getattr(self, name) != default
        )
        if self.in_channels is None:
            return f"Conv2D(out_channels={self.out_channels}, kernel_size={k}{extra})"
        return f"Conv2D({self.in_channels}, {self.out_channels}, kernel_size={k}{extra})"

    def input_layout(self) -> str:
        return f"(N, C={self.in_channels}, H, W)"

    def unresolved(self) -> str | None:
        return "in_channels" if self.in_channels is None else None

    def resolve(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) != 3:
            raise ShapeError(f"{self!r}: expects per-sample input (C, H, W), got {tuple(shape)}")
        c, h, w = shape
        if self.in_channels is None:
            self.in_channels = c
        kh, kw = self.kernel_size
        top, bottom, left, right = F.pad_amounts(h, w, kh, kw, self.stride, self.padding)
        if c != self.in_channels or h + top + bottom < kh or w + left + right < kw:
            raise ShapeError(
                f"{self!r}: expects (C={self.in_channels}, H, W) with padded H >= {kh} and "
                f"W >= {kw}, got {tuple(shape)}"
            )
        oh = (h + top + bottom - kh) // self.stride + 1
        ow = (w + left + right - kw) // self.stride + 1
        return (self.out_channels, oh, ow)

    def init_params(self, rng: Any) -> dict[str, Any]:
        kh, kw = self.kernel_size
        fan_in, fan_out = self.in_channels * kh * kw, self.out_channels * kh * kw
        shape = (self.out_channels, self.in_channels, kh, kw)
        params = {"weight": initialise(self.init, shape, fan_in, fan_out, rng)}
        if self.bias:
            params["bias"] = initialise("zeros", (self.out_channels,), fan_in, fan_out, rng)
        return params

    def check_input(self, x: Array) -> None:
        super().check_input(x)
        n, c, h, w = x.shape
        kh, kw = self.kernel_size
        top, bottom, left, right = F.pad_amounts(h, w, kh, kw, self.stride, self.padding)
        if c != self.in_channels or h + top + bottom < kh or w + left + right < kw:
            raise ShapeError(
                f"{self!r}: expected input (N, C={self.in_channels}, H, W) with padded "
                f"H >= {kh} and W >= {kw}, got shape {tuple(x.shape)}"
            )

    def forward(self, x: Array, *, train: bool = True) -> Array:
        self.check_input(x)
        y, saved = F.conv2d(
            x,
            self.params["weight"],
            self.params.get("bias"),
            stride=self.stride,
            padding=self.padding,
        )
        # saved: a Conv2DSaved (the input, and the stacked windows on the generic path).
        self.cache = {"saved": saved} if train else {}
        return y

    def forward_relu(self, x: Array, relu: ReLU, *, train: bool = True) -> Array:
        """``relu.forward(self.forward(x))`` as one op (:func:`xcnn.functional.conv2d_relu`).

        :class:`xcnn.Sequential` calls this for a Conv2D followed by a ReLU.
        This layer's :meth:`backward` then applies the ReLU's mask too, and
        the ReLU's backward passes its gradient through unchanged.
        """
        self.check_input(x)
        y, saved, mask = F.conv2d_relu(
            x,
            self.params["weight"],
            self.params.get("bias"),
            stride=self.stride,
            padding=self.padding,
        )
        self.cache = {"saved": saved, "relu_mask": mask} if train else {}
        relu.cache = {"fused": True} if train else {}
        return y

    def forward_pool(
        self, x: Array, relu: ReLU | None, pool: MaxPool2D, *, train: bool = True
    ) -> Array:
        """``pool.forward(relu.forward(self.forward(x)))`` as one op.

        The op is :func:`xcnn.functional.conv2d_max_pool2d`; ``relu`` None: no
        ReLU between. :class:`xcnn.Sequential` calls this while training for a
        Conv2D [-> ReLU] -> MaxPool2D. This layer's :meth:`backward` then takes
        the gradient of the pooled output and routes it through the pool and
        the ReLU too; their backward passes it through unchanged. An output
        too small for the pool runs the layers one by one, so that the pool's
        own error is raised.
        """
        self.check_input(x)
        _, oh, ow = self.resolve(tuple(x.shape[1:]))  # the convolution's output size
        k = pool.kernel_size
        if min(oh, ow) < k:
            y = self.forward(x, train=train)
            return pool.forward(y if relu is None else relu.forward(y, train=train), train=train)
        y, saved, route = F.conv2d_max_pool2d(
            x,
            self.params["weight"],
            self.params.get("bias"),
            stride=self.stride,
            padding=self.padding,
            with_relu=relu is not None,
            kernel_size=k,
            pool_stride=pool.stride,
        )
        self.cache = {"saved": saved, "route": route, "pool": (k, pool.stride)} if train else {}
        for layer in (relu, pool):
            if layer is not None:
                layer.cache = {"fused": True} if train else {}
        return y

    def backward(self, dy: Array, *, need_dx: bool = True) -> Array | None:
        saved, w, mask = self._cached("saved"), self.params["weight"], self.cache.get("relu_mask")
        how = {"stride": self.stride, "padding": self.padding, "need_dx": need_dx}
        if "route" in self.cache:  # forward_pool: the pool's and the ReLU's masks apply here
            k, s = self.cache["pool"]
            dx, dw, db = F.conv2d_max_pool2d_backward(
                dy, saved, self.cache["route"], w, kernel_size=k, pool_stride=s, **how
            )
        elif mask is None:
            dx, dw, db = F.conv2d_backward(dy, saved, w, **how)
        else:  # forward_relu: the ReLU's mask is applied here
            dx, dw, db = F.conv2d_relu_backward(dy, saved, mask, w, **how)
        self.grads = {"weight": dw, "bias": db} if self.bias else {"weight": dw}
        return dx


class _Pool2D(Layer):
    input_ndim = 4

    def __init__(self, kernel_size: int, *, stride: int | None = None) -> None:
        super().__init__()
        stride = kernel_size if stride is None else stride
        if kernel_size < 1 or stride < 1:
            raise ValueError(
                f"{type(self).__name__}: kernel_size and stride must be >= 1, "
                f"got {kernel_size} and {stride}"
            )
        self.kernel_size, self.stride = kernel_size, stride

    def config(self) -> dict[str, Any]:
        return {"kernel_size": self.kernel_size, "stride": self.stride}

    def __repr__(self) -> str:
        extra = "" if self.stride == self.kernel_size else f", stride={self.stride}"
        return f"{type(self).__name__}({self.kernel_size}{extra})"

    def input_layout(self) -> str:
        return "(N, C, H, W)"

    def resolve(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        k, s = self.kernel_size, self.stride
        if len(shape) != 3 or shape[1] < k or shape[2] < k:
            raise ShapeError(f"{self!r}: expects (C, H, W) with H, W >= {k}, got {tuple(shape)}")
        c, h, w = shape
        return (c, (h - k) // s + 1, (w - k) // s + 1)

    def check_input(self, x: Array) -> None:
        super().check_input(x)
        if x.shape[2] < self.kernel_size or x.shape[3] < self.kernel_size:
            raise ShapeError(
                f"{self!r}: input (N, C, H, W) must have H, W >= {self.kernel_size}, "
                f"got shape {tuple(x.shape)}"
            )


class MaxPool2D(_Pool2D):
    """Max over each KxK window; backward routes each window's gradient to its first max.

    Rows/columns that don't fill a window are dropped (the tutorial's
    ``h // 2``) and get zero gradient.

    Shapes
    ------
    x (N, C, H, W) -> y (N, C, OH, OW), ``OH = (H - K) // S + 1``; ``S`` defaults to ``K``.
    """

    def forward(self, x: Array, *, train: bool = True) -> Array:
        self.check_input(x)
        if not train:  # inference: the maxima only, no argmax mask
            self.cache = {}
            return F.max_pool2d_values(x, self.kernel_size, self.stride)
        y, mask = F.max_pool2d(x, self.kernel_size, self.stride)
        self.cache = {"mask": mask, "x_shape": tuple(x.shape)}
        return y

    def backward(self, dy: Array, *, need_dx: bool = True) -> Array:
        if self.cache.get("fused"):  # the convolution before routes dy (Conv2D.forward_pool)
            return dy
        return F.max_pool2d_backward(
            dy, self._cached("mask"), self.cache["x_shape"], self.kernel_size, self.stride
        )


class AvgPool2D(_Pool2D):
    """Mean over each KxK window; backward spreads ``dy / K^2`` evenly.

    Shapes
    ------
    x (N, C, H, W) -> y (N, C, OH, OW), ``OH = (H - K) // S + 1``; ``S`` defaults to ``K``.
    """

    def forward(self, x: Array, *, train: bool = True) -> Array:
        self.check_input(x)
        self.cache = {"x_shape": tuple(x.shape)} if train else {}
        return F.avg_pool2d(x, self.kernel_size, self.stride)

    def backward(self, dy: Array, *, need_dx: bool = True) -> Array:
        return F.avg_pool2d_backward(dy, self._cached("x_shape"), self.kernel_size, self.stride)


class Dense(Layer):
    """Fully connected layer ``y = x @ weight + bias``.

    Parameters
    ----------
    in_features, out_features : int
        ``Dense(I, O)``; or ``Dense(O)``, and ``I`` is taken from the input
        shape (``Sequential(..., input_shape=(C, H, W))``).
    bias : bool
    init : "glorot" (default), "he" or "tutorial" (randn / in_features).

    Shapes
    ------
    x (N, I) -> y (N, O); weight (I, O) as in the tutorial (the transpose of
    PyTorch's Linear), bias (O,).
    """

    input_ndim = 2

    def __init__(
        self,
        in_features: int | None = None,
        out_features: int | None = None,
        *,
        bias: bool = True,
        init: str = "glorot",
    ) -> None:
        super().__init__()
        if out_features is None:  # Dense(O): the one size given is the output's
            in_features, out_features = None, in_features
        if out_features is None:
            raise TypeError("Dense: out_features is required, e.g. Dense(10) or Dense(128, 10)")
        if min(1 if in_features is None else in_features, out_features) < 1:
            raise ValueError(
                f"Dense: features must be >= 1, got in={in_features}, out={out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.bias, self.init = bias, init

    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias,
            "init": self.init,
        }

    def __repr__(self) -> str:
        extra = "" if self.bias else ", bias=False"
        if self.in_features is None:
            return f"Dense({self.out_features}{extra})"
        return f"Dense({self.in_features}, {self.out_features}{extra})"

    def input_layout(self) -> str:
        return f"(N, {self.in_features})"

    def unresolved(self) -> str | None:
        return "in_features" if self.in_features is None else None

    def resolve(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) != 1:
            raise ShapeError(
                f"{self!r}: expects per-sample input (features,), got {tuple(shape)}; "
                "put a Flatten() or GlobalAvgPool2D() before it"
            )
        if self.in_features is None:
            self.in_features = shape[0]
        if shape[0] != self.in_features:
            raise ShapeError(f"{self!r}: expects ({self.in_features},), got {tuple(shape)}")
        return (self.out_features,)

    def init_params(self, rng: Any) -> dict[str, Any]:
        i, o = self.in_features, self.out_features
        params = {"weight": initialise(self.init, (i, o), i, o, rng)}
        if self.bias:
            params["bias"] = initialise("zeros", (o,), i, o, rng)
        return params

    def check_input(self, x: Array) -> None:
        super().check_input(x)
        if x.shape[1] != self.in_features:
            raise ShapeError(
                f"{self!r}: expected input (N, {self.in_features}), got shape {tuple(x.shape)}"
            )

    def forward(self, x: Array, *, train: bool = True) -> Array:
        self.check_input(x)
        self.cache = {"x": x} if train else {}
        return F.dense(x, self.params["weight"], self.params.get("bias"))

    def backward(self, dy: Array, *, need_dx: bool = True) -> Array | None:
        dx, dw, db = F.dense_backward(dy, self._cached("x"), self.params["weight"])
        self.grads = {"weight": dw, "bias": db} if self.bias else {"weight": dw}
        return dx if need_dx else None


class ReLU(Layer):
    """``y = max(x, 0)``; the gradient passes only where ``x > 0``. Any shape."""

    def forward(self, x: Array, *, train: bool = True) -> Array:
        self.check_input(x)
        y, mask = F.relu(x)
        self.cache = {"mask": mask} if train else {}
        return y

    def backward(self, dy: Array, *, need_dx: bool = True) -> Array:
        if self.cache.get("fused"):  # the convolution before applies the mask (forward_relu/_pool)
            return dy
        return F.relu_backward(dy, self._cached("mask"))


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W), in C, H, W order (as ``torch.flatten(x, 1)``)."""

    def resolve(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        size = 1
        for d in shape:
            size *= d
        return (size,)

    def check_input(self, x: Array) -> None:
        super().check_input(x)
        if x.ndim < 2:
            raise ShapeError(
                f"{self!r}: expected an input (N, ...) with >= 2 axes, got {tuple(x.shape)}"
            )

    def forward(self, x: Array, *, train: bool = True) -> Array:
        self.check_input(x)
        self.cache = {"x_shape": tuple(x.shape)} if train else {}
        return array_namespace(x).reshape(x, (x.shape[0], -1))

    def backward(self, dy: Array, *, need_dx: bool = True) -> Array:
        return array_namespace(dy).reshape(dy, self._cached("x_shape"))


class Softmax(Layer):
    """Scores to probabilities along the last axis; (N, K) -> (N, K).

    For training, prefer :func:`xcnn.softmax_cross_entropy` on the logits:
    its fused gradient is simpler and stable for large logits.
    """

    input_ndim = 2

    def input_layout(self) -> str:
        return "(N, K)"

    def resolve(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) != 1:
            raise ShapeError(f"{self!r}: expects per-sample input (K,), got {tuple(shape)}")
        return tuple(shape)

    def forward(self, x: Array, *, train: bool = True) -> Array:
        self.check_input(x)
        y = F.softmax(x)
        self.cache = {"y": y} if train else {}
        return y

    def backward(self, dy: Array, *, need_dx: bool = True) -> Array:
        return F.softmax_backward(dy, self._cached("y"))


LAYERS: dict[str, type[Layer]] = {
    cls.__name__: cls for cls in (Conv2D, MaxPool2D, AvgPool2D, Dense, ReLU, Flatten, Softmax)
}


def layer_from_config(cfg: dict[str, Any]) -> Layer:
    """Rebuild an (unbuilt) layer from ``{"type": name, "config": {...}}``.

    :data:`LAYERS` is the one registry of layer types; :mod:`xcnn.blocks` adds
    its layers to it. Containers (``Residual``) rebuild their inner layers
    through this same function.
    """
    try:
        cls = LAYERS[cfg["type"]]
    except KeyError:
        raise ValueError(
            f"unknown layer type {cfg.get('type')!r}; known: {sorted(LAYERS)}"
        ) from None
    kwargs = dict(cfg.get("config", {}))
    if isinstance(kwargs.get("kernel_size"), list):  # JSON has no tuples
        kwargs["kernel_size"] = tuple(kwargs["kernel_size"])
    from_config = getattr(cls, "from_config", None)
    return from_config(kwargs) if from_config is not None else cls(**kwargs)
