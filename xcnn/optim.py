"""Optimizers: turn the gradients recorded by ``model.backward`` into new parameters.

Parameters are rebound (``p = p - lr * g``), never updated in place, so the
code stays correct for read-only and immutable arrays. Optimizer state
(momentum, Adam moments) lives on the model's device, keyed like
``model.named_params()``.

Weight decay is decoupled from the gradient (Loshchilov & Hutter, 2019):
``p <- p - lr * wd * p`` beside the gradient step, so it never enters the
momentum or Adam's moment estimates. (For plain SGD the two forms coincide.)
Only trainable parameters decay; BatchNorm's running statistics are buffers.
"""

from __future__ import annotations

import math
from typing import Any

from .backend import to_numpy
from .model import Sequential
from .updates import adam_update, momentum_update, sgd_update

Array = Any

__all__ = [
    "Optimizer", "SGD", "Adam", "AdamW", "make_optimizer", "OPTIMIZERS", "OPTIMIZER_CLASSES",
]  # fmt: skip

#: Largest learning rate accepted: beyond it one step overflows float32 weights.
MAX_LR = 1e6


def _number(owner: str, name: str, value: Any, low: float, high: float, *,
            low_open: bool = False, high_open: bool = False) -> float:  # fmt: skip
    """``value`` as a float, if finite and within the bounds; else a ValueError naming it."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a number, got {value!r}") from None
    below = v <= low if low_open else v < low
    above = v >= high if high_open else v > high
    if not math.isfinite(v) or below or above:
        if low_open and not high_open:
            rule = f"> {low:g} and at most {high:g}"
        else:
            rule = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{owner}: {name} must be {rule}, got {value!r}")
    return v


class Optimizer:
    """Base class. Subclasses implement :meth:`update` for one parameter.

    Subclasses list the per-parameter state they keep after the first step in
    :meth:`slot_names`, so state read from a file can be checked against it.
    """

    def __init__(self, model: Sequential, lr: float) -> None:
        self.model = model
        self.lr = _number(type(self).__name__, "lr", lr, 0, MAX_LR, low_open=True)
        self.steps = 0
        self.state: dict[str, dict[str, Array]] = {}

    def step(self) -> None:
        """Apply one update to every parameter that has a gradient."""
        self.steps += 1
        for key, layer, name in self.model.named_params():
            if name not in layer.grads:
                raise RuntimeError(
                    f"{type(self).__name__}.step(): {layer!r} has no gradient for {name!r}; "
                    "call model.backward(...) first"
                )
            slots = self.state.setdefault(key, {})
            # (The update functions run with the parameter's device current.)
            layer.params[name] = self.update(layer.params[name], layer.grads[name], slots)
        backend = self.model.backend
        if backend.lazy:
            # Compute and keep the new values now, or every later read would replay
            # every step since the start (Dask): the per-step time stays flat.
            holders = [(layer.params, name) for _, layer, name in self.model.named_params()]
            holders += [(slots, s) for slots in self.state.values() for s in slots]
            values = backend.materialise(*(d[k] for d, k in holders))
            for (d, k), value in zip(holders, values, strict=True):
                d[k] = value

    def update(self, p: Array, g: Array, slots: dict[str, Array]) -> Array:
        raise NotImplementedError

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr}

    def slot_names(self) -> tuple[str, ...]:
        """State kept per parameter once a step has been taken (none by default)."""
        return ()

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, step count and per-parameter state as host arrays."""
        arrays = {
            f"{key}.{slot}": to_numpy(v)
            for key, slots in self.state.items()
            for slot, v in slots.items()
        }
        return {
            "type": type(self).__name__,
            "hyperparams": self.hyperparams(),
            "steps": self.steps,
            "arrays": arrays,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave, moving arrays to the model's device."""
        if state.get("type") != type(self).__name__:
            raise ValueError(
                f"optimizer state is for {state.get('type')!r}, not {type(self).__name__}"
            )
        # Through the constructor, so the values are validated as a user's would be.
        hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in state["hyperparams"].items()}
        checked = type(self)(self.model, **hyper)
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"optimizer steps must be an integer >= 0, got {steps!r}")
        shapes = {
            key: tuple(layer.params[name].shape) for key, layer, name in self.model.named_params()
        }
        slots = checked.slot_names()
        expected = {f"{key}.{slot}" for key in shapes for slot in slots} if steps else set()
        given = set(state["arrays"])
        if given != expected:
            missing, extra = sorted(expected - given), sorted(given - expected)
            raise ValueError(
                f"optimizer state does not fit the model after {steps} steps: "
                f"missing {missing[:5]}, unexpected {extra[:5]}"
            )
        new: dict[str, dict[str, Array]] = {}
        for full, value in state["arrays"].items():
            key, slot = full.rsplit(".", 1)
            dtype = getattr(value, "dtype", None)
            if dtype is None or getattr(dtype, "kind", "f") != "f":
                raise ValueError(f"optimizer state {full!r} has dtype {dtype}, not real floating")
            if tuple(value.shape) != shapes[key]:
                raise ValueError(
                    f"optimizer state {full!r} has shape {tuple(value.shape)}, "
                    f"the parameter {shapes[key]}"
                )
            new.setdefault(key, {})[slot] = self.model.asarray(value)
        for k in hyper:
            setattr(self, k, getattr(checked, k))
        self.steps, self.state = steps, new

    def to_device(self) -> None:
        """Move the state to the model's current backend (after ``model.to(...)``)."""
        self.load_state_dict(self.state_dict())


class SGD(Optimizer):
    """Stochastic gradient descent, optionally with momentum.

    ``momentum=0``: the tutorial's update ``p <- p - lr * g``.
    ``momentum=mu``: ``v <- mu * v + g``, ``p <- p - lr * v`` (PyTorch's form).
    ``weight_decay=wd``: also ``p <- p - lr * wd * p`` (decoupled: not in ``v``).
    """

    def __init__(
        self,
        model: Sequential,
        lr: float = 0.01,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(model, lr)
        self.momentum = _number("SGD", "momentum", momentum, 0, 1, high_open=True)
        self.weight_decay = _check_decay(self, weight_decay)

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}

    def slot_names(self) -> tuple[str, ...]:
        return ("velocity",) if self.momentum else ()

    def update(self, p: Array, g: Array, slots: dict[str, Array]) -> Array:
        if not self.momentum:
            return sgd_update(p, g, lr=self.lr, weight_decay=self.weight_decay)
        p, slots["velocity"] = momentum_update(
            p, g, slots.get("velocity"), lr=self.lr, momentum=self.momentum,
            weight_decay=self.weight_decay,
        )  # fmt: skip
        return p


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with bias-corrected moment estimates.

    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
    ``p <- p - lr * m_hat / (sqrt(v_hat) + eps)``.
    """

    #: Decoupled weight decay: none in Adam (see :class:`AdamW`).
    weight_decay = 0.0

    def __init__(
        self,
        model: Sequential,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(model, lr)
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"Adam: betas must be a pair of numbers, got {betas!r}")
        self.betas = (
            _number("Adam", "betas[0]", betas[0], 0, 1, high_open=True),
            _number("Adam", "betas[1]", betas[1], 0, 1, high_open=True),
        )
        self.eps = _number("Adam", "eps", eps, 0, 1, low_open=True)

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps}

    def slot_names(self) -> tuple[str, ...]:
        return ("m", "v")

    def update(self, p: Array, g: Array, slots: dict[str, Array]) -> Array:
        b1, b2 = self.betas
        p, slots["m"], slots["v"] = adam_update(
            p, g, slots.get("m"), slots.get("v"), lr=self.lr, step=self.steps,
            beta1=b1, beta2=b2, eps=self.eps, weight_decay=self.weight_decay,
        )  # fmt: skip
        return p


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    The Adam step, plus ``p <- p - lr * weight_decay * p``: the decay is not
    divided by ``sqrt(v_hat)``, so every weight shrinks at the same relative
    rate (in Adam with L2 in the gradient, weights with large gradients
    would barely decay). PyTorch's ``AdamW`` with the same defaults.
    """

    def __init__(
        self,
        model: Sequential,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(model, lr, betas=betas, eps=eps)
        self.weight_decay = _check_decay(self, weight_decay)

    def hyperparams(self) -> dict[str, Any]:
        return {**super().hyperparams(), "weight_decay": self.weight_decay}


#: Optimizer classes by type name: what checkpoints record and how they are read back.
OPTIMIZER_CLASSES: dict[str, type[Optimizer]] = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}


def _check_decay(opt: Optimizer, weight_decay: float) -> float:
    if isinstance(weight_decay, bool):
        name = type(opt).__name__
        raise ValueError(f"{name}: weight_decay must be a number, got {weight_decay!r}")
    return _number(type(opt).__name__, "weight_decay", weight_decay, 0, MAX_LR)


OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


def make_optimizer(
    name: str, model: Sequential, lr: float, *, weight_decay: float | None = None
) -> Optimizer:
    """``"sgd"``, ``"momentum"`` (SGD with momentum 0.9), ``"adam"`` or ``"adamw"``.

    ``weight_decay`` (decoupled) applies to sgd, momentum and adamw (whose
    default is 0.01); plain Adam has none: ask for adamw instead.
    """
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    if name == "sgd":
        return SGD(model, lr, **decay)
    if name == "momentum":
        return SGD(model, lr, momentum=0.9, **decay)
    if name == "adam":
        if weight_decay:
            raise ValueError("adam has no weight decay: use the optimizer adamw (decoupled)")
        return Adam(model, lr)
    if name == "adamw":
        return AdamW(model, lr, **decay)
    raise ValueError(f"unknown optimizer {name!r}: use one of {OPTIMIZERS}")
