"""Layers beyond the tutorial's net: BatchNorm2D, Dropout, GlobalAvgPool2D, Residual.

The math is in :mod:`xcnn.normalization`; these classes hold parameters,
buffers and the forward cache, like those in :mod:`xcnn.layers`, and are
registered in the same :data:`xcnn.layers.LAYERS` registry so checkpoints
rebuild them.

Two of them behave differently in training and evaluation (the ``train``
flag of ``forward``, set from ``model.train()`` / ``model.eval()``):
BatchNorm2D normalises with the batch's statistics in training and with its
running estimates in evaluation; Dropout drops in training only.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping, Sequence
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as _device

from . import normalization as N
from .backend import Backend
from .init import initialise, make_rng
from .layers import LAYERS, Layer, ShapeError, layer_from_config

Array = Any

__all__ = ["BatchNorm2D", "Dropout", "GlobalAvgPool2D", "Residual"]


class BatchNorm2D(Layer):
    """Batch normalisation over the channels of an NCHW batch.

    Training: each channel is normalised with the mean and (biased) variance
    of its ``M = N*H*W`` values in the batch, then scaled and shifted,
    ``y = weight * (x - mean) / sqrt(var + eps) + bias``; the running
    estimates are updated as PyTorch does:
    ``running = (1 - momentum) * running + momentum * batch``, with the
    unbiased variance ``var * M / (M - 1)``. Evaluation: the running estimates
    replace the batch's, so outputs do not depend on the batch.

    Parameters
    ----------
    num_features : int
        ``C``; may be None in a model with an input shape (inferred).
    momentum : float
        Weight of each new batch in the running estimates, in (0, 1].
    eps : float
        Added to the variance before the square root.

    Shapes
    ------
    x (N, C, H, W) -> y (N, C, H, W). weight, bias (C,) (trainable, ones and
    zeros at first); buffers running_mean, running_var (C,) (zeros and ones).
    """

    input_ndim = 4

    def __init__(
        self, num_features: int | None = None, *, momentum: float = 0.1, eps: float = 1e-5
    ) -> None:
        super().__init__()
        if num_features is not None and num_features < 1:
            raise ValueError(f"BatchNorm2D: num_features must be >= 1, got {num_features}")
        if not 0 < momentum <= 1 or not eps > 0:
            raise ValueError(
                f"BatchNorm2D: momentum must be in (0, 1] and eps > 0, got {momentum}, {eps}"
            )
        self.num_features, self.momentum, self.eps = num_features, float(momentum), float(eps)

    def config(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "momentum": self.momentum, "eps": self.eps}

    def __repr__(self) -> str:
        return f"BatchNorm2D({self.num_features})"

    def input_layout(self) -> str:
        return f"(N, C={self.num_features}, H, W)"

    def unresolved(self) -> str | None:
        return "num_features" if self.num_features is None else None

    def resolve(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.num_features is None and len(shape) == 3:
            self.num_features = shape[0]
        if len(shape) != 3 or shape[0] != self.num_features:
            raise ShapeError(f"{self!r}: expects (C={self.num_features}, H, W), got {shape}")
        return tuple(shape)

    def init_params(self, rng: Any) -> dict[str, Any]:
        c = self.num_features
        return {
            "weight": initialise("ones", (c,), c, c, rng),
            "bias": initialise("zeros", (c,), c, c, rng),
        }

    def init_buffers(self) -> dict[str, Any]:
        c, rng = self.num_features, None
        return {
            "running_mean": initialise("zeros", (c,), c, c, rng),
            "running_var": initialise("ones", (c,), c, c, rng),
        }

    def check_input(self, x: Array) -> None:
        super().check_input(x)
        if x.shape[1] != self.num_features:
            raise ShapeError(
                f"{self!r}: expected input (N, C={self.num_features}, H, W), "
                f"got shape {tuple(x.shape)}"
            )

    def forward(self, x: Array, *, train: bool = True) -> Array:
        self.check_input(x)
        w, b = self.params["weight"], self.params["bias"]
        if not train:
            self.cache = {}
            return N.batch_norm_eval(
                x, w, b, self.buffers["running_mean"], self.buffers["running_var"], self.eps
            )
        y, xhat, inv_std, mean, var = N.batch_norm_train(x, w, b, self.eps)
        m = x.shape[0] * x.shape[2] * x.shape[3]
        rm, rv = N.running_stats(
            self.buffers["running_mean"], self.buffers["running_var"], mean, var, m, self.momentum
        )
        self.buffers = {"running_mean": rm, "running_var": rv}
        self.cache = {"xhat": xhat, "inv_std": inv_std}
        return y

    def backward(self, dy: Array, *, need_dx: bool = True) -> Array:
        dx, dw, db = N.batch_norm_backward(
            dy, self._cached("xhat"), self.cache["inv_std"], self.params["weight"]
        )
        self.grads = {"weight": dw, "bias": db}
        return dx


class Dropout(Layer):
    """Inverted dropout: in training zero each value with probability ``p``, scale the rest.

    Kept values are multiplied by ``1 / (1 - p)`` so the expected output equals
    the input and evaluation is the identity. The masks are drawn on the host
    from the model's seeded generator ``model.rng`` (saved in checkpoints), so
    a run, and a resumed run, drop the same units on every backend.

    Parameters
    ----------
    p : float
        Drop probability in [0, 1).

    Shapes
    ------
    x (N, ...) -> y, the same shape.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p!r}")
        self.p = float(p)
        #: host generator of the masks; Sequential shares its ``model.rng`` here.
        self.rng: Any = make_rng(0)

    def config(self) -> dict[str, Any]:
        return {"p": self.p}

    def forward(self, x: Array, *, train: bool = True) -> Array:
        self.check_input(x)
        if not train or self.p == 0:
            self.cache = {"keep": None} if train else {}
            return x
        # One host draw and one transfer per call (booleans: 1 byte per value), to
        # wherever x lives.
        xp = array_namespace(x)
        keep_host = self.rng.random(tuple(x.shape), dtype="float32") >= self.p
        keep = xp.asarray(keep_host, device=_device(x))
        self.cache = {"keep": keep}
        return N.dropout(x, keep, self.p)

    def backward(self, dy: Array, *, need_dx: bool = True) -> Array:
        keep = self._cached("keep")
        return dy if keep is None else N.dropout_backward(dy, keep, self.p)


class GlobalAvgPool2D(Layer):
    """Average each channel's whole feature map: one number per channel.

    Replaces Flatten before the classifier in all-convolutional nets: the
    classifier then has ``C`` inputs whatever the image size.

    Shapes
    ------
    x (N, C, H, W) -> y (N, C).
    """

    input_ndim = 4

    def input_layout(self) -> str:
        return "(N, C, H, W)"

    def resolve(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) != 3:
            raise ShapeError(f"{self!r}: expects (C, H, W), got {tuple(shape)}")
        return (shape[0],)

    def forward(self, x: Array, *, train: bool = True) -> Array:
        self.check_input(x)
        self.cache = {"x_shape": tuple(x.shape)} if train else {}
        return N.global_avg_pool2d(x)

    def backward(self, dy: Array, *, need_dx: bool = True) -> Array:
        return N.global_avg_pool2d_backward(dy, self._cached("x_shape"))


class _Nested(MutableMapping):
    """``params``/``grads``/``buffers`` of a container, flattened to dotted names.

    ``"layers.0.weight"`` reads and writes ``layers[0].params["weight"]``, so
    tools written for flat layers (optimizers, :func:`xcnn.testing.check_gradients`)
    work on containers unchanged.
    """

    def __init__(self, owner: Residual, attr: str) -> None:
        self.owner, self.attr = owner, attr

    def _slots(self) -> Iterator[tuple[str, Layer, str]]:
        for path, layer in self.owner.sublayers():
            for name in getattr(layer, self.attr):
                yield f"{path}.{name}", layer, name

    def _find(self, key: str) -> tuple[Layer, str]:
        path, _, name = key.rpartition(".")
        for p, layer in self.owner.sublayers():
            if p == path:
                return layer, name
        raise KeyError(key)

    def __getitem__(self, key: str) -> Array:
        layer, name = self._find(key)
        return getattr(layer, self.attr)[name]

    def __setitem__(self, key: str, value: Array) -> None:
        layer, name = self._find(key)
        getattr(layer, self.attr)[name] = value

    def __delitem__(self, key: str) -> None:
        layer, name = self._find(key)
        del getattr(layer, self.attr)[name]

    def __iter__(self) -> Iterator[str]:
        return (full for full, _, _ in self._slots())

    def __len__(self) -> int:
        return sum(1 for _ in self._slots())


class Residual(Layer):
    """A residual block: ``y = f(x) + x``, or ``y = f(x) + shortcut(x)``.

    ``f`` is the stack ``layers``; the identity path lets the gradient reach
    early layers undiminished (``dL/dx = f'(x)^T dy + dy``), which is what lets
    deep nets train (He et al., 2016). When ``f`` changes the shape (more
    channels, a stride), ``shortcut`` projects ``x`` to match, typically a
    strided 1x1 ``Conv2D`` and a ``BatchNorm2D``. No activation is applied
    after the sum: put a ``ReLU()`` after the block.

    Parameters
    ----------
    layers : sequence of Layer
        The residual branch ``f``.
    shortcut : sequence of Layer, optional
        The projection; None (or empty) for the identity.

    Shapes
    ------
    x (N, ...) -> y, the output shape of ``layers``, which must equal that of
    ``shortcut`` (or of x, for the identity).

    Attributes
    ----------
    layers, shortcut : list of Layer
        ``shortcut`` is empty for the identity. Parameter keys in a model are
        ``"<i>.layers.<j>.<name>"`` and ``"<i>.shortcut.<j>.<name>"``.
    """

    def __init__(self, layers: Sequence[Layer], *, shortcut: Sequence[Layer] | None = None) -> None:
        super().__init__()
        self.layers: list[Layer] = list(layers)
        self.shortcut: list[Layer] = list(shortcut or [])
        if not self.layers:
            raise ValueError("Residual: layers must not be empty")
        for i, layer in enumerate(self.layers + self.shortcut):
            if not isinstance(layer, Layer):
                raise TypeError(f"Residual: item {i} is not a Layer: {layer!r}")
        self.params = _Nested(self, "params")  # type: ignore[assignment]
        self.grads = _Nested(self, "grads")  # type: ignore[assignment]
        self.buffers = _Nested(self, "buffers")  # type: ignore[assignment]

    def sublayers(self) -> Iterator[tuple[str, Layer]]:
        """``("layers.<j>", layer)`` then ``("shortcut.<j>", layer)``, recursively flattened."""
        for group in ("layers", "shortcut"):
            for j, layer in enumerate(getattr(self, group)):
                if isinstance(layer, Residual):
                    for path, inner in layer.sublayers():
                        yield f"{group}.{j}.{path}", inner
                else:
                    yield f"{group}.{j}", layer

    def config(self) -> dict[str, Any]:
        def configs(layers: list[Layer]) -> list[dict[str, Any]]:
            return [{"type": type(lay).__name__, "config": lay.config()} for lay in layers]

        return {"layers": configs(self.layers), "shortcut": configs(self.shortcut)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Residual:
        layers = [layer_from_config(c) for c in config["layers"]]
        return cls(layers, shortcut=[layer_from_config(c) for c in config.get("shortcut", [])])

    def __repr__(self) -> str:
        inner = ", ".join(repr(lay) for lay in self.layers)
        short = f", shortcut=[{', '.join(repr(s) for s in self.shortcut)}]" if self.shortcut else ""
        return f"Residual([{inner}]{short})"

    def unresolved(self) -> str | None:
        for path, layer in self.sublayers():
            missing = layer.unresolved()
            if missing is not None:
                return f"{path} ({layer!r}) {missing}"
        return None

    def resolve(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        out, side = tuple(shape), tuple(shape)
        #: output shape of each inner layer, for ``model.summary()``
        self.shapes: dict[str, list[tuple[int, ...]]] = {"layers": [], "shortcut": []}
        for layer in self.layers:
            out = layer.resolve(out)
            self.shapes["layers"].append(out)
        for layer in self.shortcut:
            side = layer.resolve(side)
            self.shapes["shortcut"].append(side)
        if out != side:
            which = "the shortcut's" if self.shortcut else "the input's (identity shortcut)"
            raise ShapeError(
                f"{self!r}: the branch gives {out} but {which} is {side}; "
                "add a shortcut projection, e.g. shortcut=[Conv2D(out_channels=F, "
                "kernel_size=1, stride=S), BatchNorm2D()]"
            )
        return out

    def build(
        self, backend: str | Backend | Any = "numpy", dtype: str = "float32", seed: Any = 0
    ) -> Layer:
        missing = self.unresolved()
        if missing is not None:
            raise ShapeError(
                f"{self!r}: {missing} is not given and no input shape tells it: pass "
                "input_shape=(C, H, W) to Sequential, or give the layer its input size"
            )
        rng = make_rng(seed)  # one stream: branch then shortcut, in order
        for layer in self.layers + self.shortcut:
            layer.build(backend, dtype, rng)
        self.cache = {}
        return self

    def forward(self, x: Array, *, train: bool = True) -> Array:
        self.check_input(x)
        y = x
        for layer in self.layers:
            y = layer.forward(y, train=train)
        s = x
        for layer in self.shortcut:
            s = layer.forward(s, train=train)
        if tuple(y.shape) != tuple(s.shape):
            raise ShapeError(
                f"{self!r}: branch output {tuple(y.shape)} does not match the shortcut's "
                f"{tuple(s.shape)} for input {tuple(x.shape)}"
            )
        self.cache = {"ran": True} if train else {}
        return y + s

    def backward(self, dy: Array, *, need_dx: bool = True) -> Array:
        # y = f(x) + s(x): the gradient flows down both paths and adds at x.
        self._cached("ran")
        df = dy
        for layer in reversed(self.layers):
            df = layer.backward(df)
        ds = dy
        for layer in reversed(self.shortcut):
            ds = layer.backward(ds)
        return df + ds


LAYERS.update({cls.__name__: cls for cls in (BatchNorm2D, Dropout, GlobalAvgPool2D, Residual)})
