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

Array = Any

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "make_optimizer", "OPTIMIZERS"]


class Optimizer:
    """Base class. Subclasses implement :meth:`update` for one parameter."""

    def __init__(self, model: Sequential, lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"{type(self).__name__}: lr must be > 0, got {lr}")
        self.model, self.lr = model, float(lr)
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
            layer.params[name] = self.update(layer.params[name], layer.grads[name], slots)

    def update(self, p: Array, g: Array, slots: dict[str, Array]) -> Array:
        raise NotImplementedError

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr}

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
        for k, v in state["hyperparams"].items():
            setattr(self, k, tuple(v) if isinstance(v, list) else v)
        self.steps = int(state["steps"])
        keys = {key for key, _, _ in self.model.named_params()}
        self.state = {}
        for full, value in state["arrays"].items():
            key, slot = full.rsplit(".", 1)
            if key not in keys:
                raise ValueError(f"optimizer state {full!r} names no parameter of the model")
            self.state.setdefault(key, {})[slot] = self.model.asarray(value)

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
        if not 0 <= momentum < 1:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.weight_decay = _check_decay(self, weight_decay)

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}

    def update(self, p: Array, g: Array, slots: dict[str, Array]) -> Array:
        if self.momentum:
            v = slots.get("velocity")
            g = g if v is None else self.momentum * v + g
            slots["velocity"] = g
        if self.weight_decay:
            p = p * (1.0 - self.lr * self.weight_decay)
        return p - self.lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with bias-corrected moment estimates.

    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
    ``p <- p - lr * m_hat / (sqrt(v_hat) + eps)``.
    """

    def __init__(
        self,
        model: Sequential,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(model, lr)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps}

    def update(self, p: Array, g: Array, slots: dict[str, Array]) -> Array:
        xp = self.model.xp
        b1, b2 = self.betas
        m = (1 - b1) * g if "m" not in slots else b1 * slots["m"] + (1 - b1) * g
        v = (1 - b2) * g * g if "v" not in slots else b2 * slots["v"] + (1 - b2) * g * g
        slots["m"], slots["v"] = m, v
        # Bias correction folded into the step size: one scalar instead of two arrays.
        step = self.lr * math.sqrt(1 - b2**self.steps) / (1 - b1**self.steps)
        eps = self.eps * math.sqrt(1 - b2**self.steps)
        return p - step * m / (xp.sqrt(v) + eps)


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

    def update(self, p: Array, g: Array, slots: dict[str, Array]) -> Array:
        if self.weight_decay:
            # Decayed first, as PyTorch does: the Adam step applies to the decayed weight.
            p = p * (1.0 - self.lr * self.weight_decay)
        return super().update(p, g, slots)


def _check_decay(opt: Optimizer, weight_decay: float) -> float:
    if isinstance(weight_decay, bool) or not weight_decay >= 0:
        raise ValueError(f"{type(opt).__name__}: weight_decay must be >= 0, got {weight_decay!r}")
    return float(weight_decay)


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
