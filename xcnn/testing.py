"""Tools for users' own correctness tests: gradient checking and backend parity.

The xcnn test suite uses exactly these, so what users run is what we run.

- :func:`check_gradients`: analytic backward against float64 central
  differences, for any layer or model.
- :func:`check_parity`: the same model (one seed) on several backends, the
  same batch forward and backward, the largest differences reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from array_api_compat import device

from .backend import resolve_backend, to_numpy
from .layers import Layer
from .losses import softmax_cross_entropy
from .model import Sequential

__all__ = [
    "GradCheckResult",
    "ParityReport",
    "check_gradients",
    "check_parity",
    "default_tolerance",
]


@dataclass
class GradCheckResult:
    """Worst errors of an analytic gradient against central differences.

    ``errors`` maps each checked tensor (``"input"``, ``"0.weight"``, ...) to
    ``(relative error, index of the worst entry)``; the relative error is
    ``max |analytic - numeric| / max(max |numeric|, max |analytic|)`` over the
    checked entries, so tiny entries are judged on the tensor's own scale.
    """

    errors: dict[str, tuple[float, tuple[int, ...]]] = field(default_factory=dict)

    @property
    def worst(self) -> tuple[str, float, tuple[int, ...]]:
        """``(tensor name, relative error, index)`` of the worst tensor."""
        name = max(self.errors, key=lambda k: self.errors[k][0])
        return name, *self.errors[name]

    def ok(self, rtol: float = 1e-6) -> bool:
        return all(err <= rtol for err, _ in self.errors.values())

    def __str__(self) -> str:
        rows = [f"  {k:<14} rel err {e:.2e} at {i}" for k, (e, i) in self.errors.items()]
        return "gradient check:\n" + "\n".join(rows)


def _as_model(target: Layer | Sequential) -> tuple[Sequential | None, list[Layer]]:
    if isinstance(target, Sequential):
        return target, target.layers
    if isinstance(target, Layer):
        return None, [target]
    raise TypeError(
        f"check_gradients: expected a Layer or a Sequential, got {type(target).__name__}"
    )


def check_gradients(
    target: Layer | Sequential,
    x: Any,
    *,
    eps: float = 1e-6,
    max_entries: int = 200,
    seed: int = 0,
    check_input: bool = True,
) -> GradCheckResult:
    """Compare ``backward`` with float64 central differences ``(L(p+eps) - L(p-eps)) / 2eps``.

    The scalar checked is ``L = sum(forward(x) * R)`` for a fixed random ``R``,
    so ``dL/dout = R`` exercises every output.

    Parameters
    ----------
    target : Layer or Sequential
        Built in float64 (``layer.build(dtype="float64")`` or
        ``Sequential(..., dtype="float64")``) on any backend with float64.
    x : host array (NumPy), the input batch.
    eps : float
        Step of the central difference.
    max_entries : int
        At most this many entries of each tensor are perturbed (chosen at
        random with ``seed``); all of them if the tensor is smaller.
    check_input : bool
        Also check ``dL/dx``.

    Returns
    -------
    GradCheckResult, whose ``.ok(rtol)`` says whether every tensor passed.
    """
    model, layers = _as_model(target)
    params = [lay.params for lay in layers]
    probe = next((p for lp in params for p in lp.values()), None)
    backend = (
        model.backend
        if model is not None
        else resolve_backend(_namespace_of(probe), device(probe))  # the layer's own device
        if probe is not None
        else resolve_backend("numpy")
    )
    dt = "float64"
    x_host = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)

    def forward(xh: np.ndarray) -> Any:
        out = backend.asarray(xh, dt)
        for lay in layers:
            out = lay.forward(out)
        return out

    r_host = rng.standard_normal(to_numpy(forward(x_host)).shape)

    def loss(xh: np.ndarray) -> float:
        return float(np.sum(to_numpy(forward(xh)) * r_host))

    # Analytic gradients.
    forward(x_host)
    d = backend.asarray(r_host, dt)
    for lay in reversed(layers):
        d = lay.backward(d)
    analytic: dict[str, np.ndarray] = {"input": to_numpy(d)} if check_input else {}
    for i, lay in enumerate(layers):
        for name, g in lay.grads.items():
            analytic[f"{i}.{name}"] = to_numpy(g)

    def numeric_at(name: str, idx: tuple[int, ...]) -> float:
        if name == "input":
            plus, minus = x_host.copy(), x_host.copy()
            plus[idx] += eps
            minus[idx] -= eps
            return (loss(plus) - loss(minus)) / (2 * eps)
        i, pname = name.split(".", 1)
        lay = layers[int(i)]
        orig = lay.params[pname]
        base = to_numpy(orig)
        values = []
        for step in (eps, -eps):
            moved = base.copy()
            moved[idx] += step
            lay.params[pname] = backend.asarray(moved, dt)
            values.append(loss(x_host))
        lay.params[pname] = orig
        return (values[0] - values[1]) / (2 * eps)

    result = GradCheckResult()
    for name, a in analytic.items():
        flat = np.arange(a.size)
        if a.size > max_entries:
            flat = rng.choice(a.size, max_entries, replace=False)
        idxs = [np.unravel_index(k, a.shape) for k in flat]
        num = np.array([numeric_at(name, tuple(int(j) for j in idx)) for idx in idxs])
        ana = np.array([a[idx] for idx in idxs])
        diff = np.abs(ana - num)
        scale = max(np.abs(num).max(initial=0.0), np.abs(ana).max(initial=0.0), 1e-300)
        k = int(np.argmax(diff)) if diff.size else 0
        worst = tuple(int(j) for j in idxs[k]) if idxs else ()
        result.errors[name] = (float(diff.max(initial=0.0) / scale), worst)
    return result


def _namespace_of(x: Any) -> Any:
    from array_api_compat import array_namespace

    return array_namespace(x)


# ---------------------------------------------------------------------------
# Parity across backends
# ---------------------------------------------------------------------------


def default_tolerance(dtype: str) -> float:
    """Relative tolerance for comparing two backends: 1e-5 in float32, 1e-12 in float64."""
    return {"float32": 1e-5, "float64": 1e-12}[dtype]


@dataclass
class ParityReport:
    """Largest differences of each backend against the reference backend.

    ``diffs[backend][tensor] = relative difference``, where tensor is
    ``"output"``, ``"loss"``, ``"input_grad"`` or ``"<layer>.<param>"`` (a
    parameter gradient), and the relative difference is
    ``max |a - ref| / max |ref|`` over the tensor.
    """

    reference: str
    dtype: str
    rtol: float
    diffs: dict[str, dict[str, float]] = field(default_factory=dict)

    def failures(self) -> list[str]:
        return [
            f"{b} {t}: {d:.2e} > {self.rtol:.0e}"
            for b, per in self.diffs.items()
            for t, d in per.items()
            if not d <= self.rtol
        ]

    def ok(self) -> bool:
        return not self.failures()

    def __str__(self) -> str:
        lines = [f"parity against {self.reference} ({self.dtype}, rtol {self.rtol:.0e}):"]
        for b, per in self.diffs.items():
            lines += [f"  {b:<28} {t:<12} {d:.2e}" for t, d in per.items()]
        return "\n".join(lines)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    if a.shape != ref.shape:
        return float("inf")
    scale = max(float(np.abs(ref).max(initial=0.0)), 1e-30)
    return float(np.abs(a - ref).max(initial=0.0) / scale)


def check_parity(
    make_layers: Callable[[], Sequence[Layer]] | Sequential,
    x: Any,
    *,
    labels: Any = None,
    backends: Sequence[Any] = ("numpy", "array_api_strict"),
    dtype: str = "float32",
    seed: int = 0,
    rtol: float | None = None,
) -> ParityReport:
    """Build one model per backend from one seed and compare forward and backward.

    Parameters
    ----------
    make_layers : callable returning fresh layers, or a Sequential (rebuilt from its config)
    x : host array (N, ...), the batch.
    labels : host int array (N,), optional
        With labels, backward starts from ``softmax_cross_entropy``'s gradient
        and the loss is compared too; without, from a fixed random ``dL/dout``.
    backends : backend specs, or ``(spec, device)`` pairs; the first is the reference.
    dtype : "float32" or "float64"
    rtol : defaults to :func:`default_tolerance` of ``dtype``.

    Returns
    -------
    ParityReport; ``.ok()`` is True when every difference is within ``rtol``.
    """
    if isinstance(make_layers, Sequential):
        config = make_layers.config()

        def build(spec: Any, device: Any) -> Sequential:
            return Sequential.from_config(
                config, backend=spec, device=device, dtype=dtype, seed=seed
            )
    else:

        def build(spec: Any, device: Any) -> Sequential:
            return Sequential(make_layers(), backend=spec, device=device, dtype=dtype, seed=seed)

    results: list[tuple[str, dict[str, np.ndarray]]] = []
    dy_host = None
    for entry in backends:
        spec, device = entry if isinstance(entry, tuple) else (entry, None)
        model = build(spec, device)
        out = model.forward(model.asarray(x))
        tensors = {"output": to_numpy(out)}
        if labels is not None:
            loss, dy = softmax_cross_entropy(out, model.asarray(labels))
            tensors["loss"] = to_numpy(loss)
        else:
            if dy_host is None:
                dy_host = np.random.default_rng(seed).standard_normal(tensors["output"].shape)
            dy = model.asarray(dy_host)
        tensors["input_grad"] = to_numpy(model.backward(dy))
        for key, layer, name in model.named_params():
            tensors[key] = to_numpy(layer.grads[name])
        label = model.backend.name + ("" if device is None else f":{device}")
        results.append((label, tensors))
    ref_name, ref = results[0]
    report = ParityReport(ref_name, dtype, default_tolerance(dtype) if rtol is None else rtol)
    for name, tensors in results[1:]:
        report.diffs[name] = {t: _rel(v, ref[t]) for t, v in tensors.items()}
    return report
