"""A whole fixed-shape training step as one CUDA graph (CuPy stream capture).

A training step of a small net on a fast GPU is a few dozen short kernels;
launching them one by one from Python costs more than running them at batch
128. :func:`training_step` returns ``step(xb, yb) -> (loss, logits)`` for the
training loop. With graphs on, the step for each new batch shape runs once
eagerly (which compiles the kernels and creates the optimizer's state), is
then captured once with ``cupy.cuda.Stream.begin_capture/end_capture``, and
from then on every batch of that shape is one ``graph.launch``. A batch of
another shape (an epoch's last, smaller batch) runs eagerly -- or gets its own
graph if it comes again.

**Off unless** ``XCNN_CUDA_GRAPHS=1`` (or ``graphs=True``): it has not yet run
on a GPU (see ``benchmarks/gpu_run.sh``), and it will be made the default
only where measured faster.

How the captured step stays correct when replayed:

- **Fixed addresses.** A graph replays reads and writes of the addresses it
  saw. xcnn rebinds parameters (``p = p - lr * g`` makes a new array), so the
  capture ends with one device copy of every new parameter, buffer and
  optimizer slot back into the arrays the step started from, and afterwards
  the model holds those arrays again: every replay reads and updates the same
  memory. Inputs are copied into two fixed buffers before each launch.
- **Private memory.** Everything the captured step allocates comes from a
  memory pool owned by this step object and used by nothing else, so no
  later allocation can take memory the graph still writes, and
  ``free_all_blocks`` on CuPy's default pool cannot free it.
- **Ordering.** The graph runs on a *blocking* stream, which the legacy
  default stream orders itself with, so the loop's own sums of loss and
  accuracy (on the default stream) see each step's results without a sync.
- **What cannot be captured runs eagerly**, checked before capture: host
  randomness inside the step (``Dropout`` draws its mask on the host),
  optimizers whose scalars change every step (Adam's bias correction), a
  backend other than CuPy, kernels off (CuPy refuses cuBLAS calls during
  capture, so every product must go through the kernel set's capture-safe
  GEMM: ``XCNN_CUDA_KERNELS=1``). A step whose hyperparameters changed
  (``lr_decay``, a schedule) is captured again; after :data:`MAX_CAPTURES`
  captures the step stays eager. ``GraphStep.reason`` says why it is eager.

The hook in ``xcnn/training.py`` (``_train_epoch``) is two lines: before the
loop ``step = cuda_graph.training_step(model, optimizer)``, and the four
lines forward / ``softmax_cross_entropy`` / ``backward`` / ``optimizer.step()``
become ``loss, logits = step(xb, yb)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from .losses import softmax_cross_entropy

__all__ = ["GraphStep", "MAX_CAPTURES", "eager_step", "graphs_enabled", "training_step"]

Array = Any
Step = Callable[[Array, Array], tuple[Array, Array]]

#: Captures per step object before it gives up and stays eager (a schedule that
#: changes the learning rate every step would otherwise capture every step).
MAX_CAPTURES = 8


def graphs_enabled() -> bool:
    """Whether ``XCNN_CUDA_GRAPHS`` asks for graphs (off by default: not yet measured)."""
    return os.environ.get("XCNN_CUDA_GRAPHS", "0") not in ("", "0")


def eager_step(model: Any, optimizer: Any) -> Step:
    """The plain training step: forward, fused loss, backward, update."""

    def step(xb: Array, yb: Array) -> tuple[Array, Array]:
        logits = model.forward(xb, train=True)
        loss, dlogits = softmax_cross_entropy(logits, yb, check=False)
        model.backward(dlogits, input_grad=False)
        optimizer.step()
        return loss, logits

    return step


def training_step(model: Any, optimizer: Any, *, graphs: bool | None = None) -> Step:
    """``step(xb, yb) -> (loss, logits)`` for the training loop; graphs where they apply.

    ``graphs=None`` follows ``XCNN_CUDA_GRAPHS``. On anything but CuPy, or
    with graphs off, this is :func:`eager_step`.
    """
    on = graphs_enabled() if graphs is None else graphs
    if not on or getattr(model.backend, "name", None) != "cupy":
        return eager_step(model, optimizer)
    return GraphStep(model, optimizer)


def _layers(layers: list[Any]) -> Iterator[Any]:
    for layer in layers:
        yield layer
        for attr in ("layers", "shortcut"):
            yield from _layers(list(getattr(layer, attr, None) or []))


class GraphStep:
    """A training step that replays one captured CUDA graph per batch shape.

    Call it as ``step(xb, yb) -> (loss, logits)``; ``loss`` and ``logits`` are
    fresh arrays (copies of the graph's outputs), safe to keep.

    Attributes
    ----------
    reason : str or None
        Why this step runs eagerly (None while graphs are in use).
    captures : int
        Graphs captured so far.
    """

    def __init__(self, model: Any, optimizer: Any) -> None:
        import cupy

        self.model, self.optimizer = model, optimizer
        self._cupy = cupy
        self._eager = eager_step(model, optimizer)
        self._graphs: dict[tuple, dict[str, Any]] = {}
        self._seen: set[tuple] = set()
        self._slots: list[tuple[dict, str, Array]] = []
        self._pool = cupy.cuda.MemoryPool()
        self.captures = 0
        self.reason = self._why_not()

    # -- what can be captured ---------------------------------------------------
    def _why_not(self) -> str | None:
        from .kernels import enabled

        if not enabled("cupy"):
            return (
                "the CuPy kernel set is off (XCNN_CUDA_KERNELS=1): CuPy refuses cuBLAS in capture"
            )
        for layer in _layers(list(self.model.layers)):
            if type(layer).__name__ == "Dropout" and getattr(layer, "p", 0):
                return "Dropout draws its masks on the host every step"
        if type(self.optimizer).__name__ == "Adam":
            return "Adam's bias correction changes every step (host scalars)"
        return None

    def _state(self) -> list[tuple[dict, str]]:
        """Every (container, key) whose array the step replaces: params, buffers, slots."""
        out: list[tuple[dict, str]] = []
        for _, layer, name in self.model.named_params():
            out.append((layer.params, name))
        named_buffers = getattr(self.model, "named_buffers", None)
        for _, layer, name in named_buffers() if named_buffers is not None else ():
            out.append((layer.buffers, name))
        for key in sorted(self.optimizer.state):
            slots = self.optimizer.state[key]
            out.extend((slots, slot) for slot in sorted(slots))
        return out

    def _pinned(self) -> bool:
        """Whether the model still holds the arrays the graphs update (nobody replaced them)."""
        return all(box.get(k) is a for box, k, a in self._slots) and len(self._slots) == len(
            self._state()
        )

    def _pin(self) -> None:
        """Copy the current state into the pinned arrays (after an eager step) and hold them."""
        if not self._slots or len(self._slots) != len(self._state()):
            self._slots = [(box, k, box[k]) for box, k in self._state()]
            self._graphs.clear()
            return
        for box, k, a in self._slots:
            if box[k] is not a:
                self._cupy.copyto(a, box[k])  # a device copy, queued on the current stream
                box[k] = a

    # -- the step -------------------------------------------------------------------
    def __call__(self, xb: Array, yb: Array) -> tuple[Array, Array]:
        if self.reason is not None:
            return self._eager(xb, yb)
        key = (
            tuple(xb.shape),
            str(xb.dtype),
            tuple(yb.shape),
            str(yb.dtype),
            repr(sorted(self.optimizer.hyperparams().items())),
        )
        if self._slots and not self._pinned():
            # Someone replaced the model's arrays (load_state_dict, to(...)): start over.
            self._slots, self._graphs = [], {}
        graph = self._graphs.get(key)
        if graph is None:
            if key not in self._seen or self.captures >= MAX_CAPTURES:
                # First time for this shape: eager (compiles kernels, creates optimizer
                # slots); a shape seen once more is captured.
                self._seen.add(key)
                out = self._eager(xb, yb)
                self._pin()
                if self.captures >= MAX_CAPTURES and self.reason is None:
                    self.reason = f"captured {MAX_CAPTURES} times (hyperparameters keep changing)"
                return out
            graph = self._capture(key, xb, yb)
            if graph is None:
                return self._eager(xb, yb)
        return self._launch(graph, xb, yb)

    def _capture(self, key: tuple, xb: Array, yb: Array) -> dict[str, Any] | None:
        cupy = self._cupy
        from .kernels import cupy as kernels

        self._pin()
        pinned = [(box, k, a) for box, k, a in self._slots]
        steps = self.optimizer.steps
        static_x, static_y = cupy.empty_like(xb), cupy.empty_like(yb)
        stream = cupy.cuda.Stream(non_blocking=False)
        stream.wait_event(cupy.cuda.get_current_stream().record())
        try:
            with cupy.cuda.using_allocator(self._pool.malloc), stream, kernels.capturing(stream):
                stream.begin_capture()
                try:
                    loss, logits = self._eager(static_x, static_y)
                    for box, k, a in pinned:  # the new state back into the pinned arrays
                        if box[k] is not a:
                            cupy.copyto(a, box[k])
                    loss_out, logits_out = loss.copy(), logits.copy()
                finally:
                    graph = stream.end_capture()
        except (NotImplementedError, RuntimeError) as e:
            # Something in the step cannot be captured: stay eager from now on.
            self.reason = f"capture failed: {type(e).__name__}: {e}"
            graph = None
        # Whatever capture did to the Python side, the model holds the pinned arrays again.
        for box, k, a in pinned:
            box[k] = a
        self.optimizer.steps = steps
        if graph is None:
            return None
        self.captures += 1
        entry = {
            "graph": graph,
            "stream": stream,
            "x": static_x,
            "y": static_y,
            "loss": loss_out,
            "logits": logits_out,
        }
        self._graphs[key] = entry
        return entry

    def _launch(self, entry: dict[str, Any], xb: Array, yb: Array) -> tuple[Array, Array]:
        cupy = self._cupy
        cupy.copyto(entry["x"], xb)  # default stream; the blocking graph stream waits for it
        cupy.copyto(entry["y"], yb)
        entry["graph"].launch(stream=entry["stream"])
        self.optimizer.steps += 1
        # Copies on the default stream (ordered after the graph): safe to keep past the
        # next launch, which overwrites the graph's own outputs.
        return entry["loss"].copy(), entry["logits"].copy()
