"""Optimizers: turn the gradients recorded by ``model.backward`` into new parameters.

Parameters are rebound (``p = p - lr * g``), never updated in place, so the
code stays correct for read-only and immutable arrays. Optimizer state
(momentum, Adam moments) lives on the model's device, keyed like
``model.state_dict()``.
"""

from __future__ import annotations

from typing import Any

from .backend import to_numpy
from .model import Sequential
from .updates import adam_update, momentum_update, sgd_update

Array = Any

__all__ = ["Optimizer", "SGD", "Adam", "make_optimizer", "OPTIMIZERS"]


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
    """

    def __init__(self, model: Sequential, lr: float = 0.01, *, momentum: float = 0.0) -> None:
        super().__init__(model, lr)
        if not 0 <= momentum < 1:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum}

    def update(self, p: Array, g: Array, slots: dict[str, Array]) -> Array:
        if not self.momentum:
            return sgd_update(p, g, lr=self.lr)
        p, slots["velocity"] = momentum_update(
            p, g, slots.get("velocity"), lr=self.lr, momentum=self.momentum
        )
        return p


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
        b1, b2 = self.betas
        p, slots["m"], slots["v"] = adam_update(
            p, g, slots.get("m"), slots.get("v"), lr=self.lr, step=self.steps,
            beta1=b1, beta2=b2, eps=self.eps,
        )  # fmt: skip
        return p


OPTIMIZERS = ("sgd", "momentum", "adam")


def make_optimizer(name: str, model: Sequential, lr: float) -> Optimizer:
    """``"sgd"``, ``"momentum"`` (SGD with momentum 0.9) or ``"adam"``."""
    if name == "sgd":
        return SGD(model, lr)
    if name == "momentum":
        return SGD(model, lr, momentum=0.9)
    if name == "adam":
        return Adam(model, lr)
    raise ValueError(f"unknown optimizer {name!r}: use one of {OPTIMIZERS}")
