"""Every array library xcnn is tested on: float64 parity with NumPy and training-step time.

Run from the repository root::

    python -m benchmarks.backends                 # all libraries installed, 30 steps each
    python -m benchmarks.backends --steps 60 --libraries numpy,dask.array

Parity: the tutorial net and a net mixing "same" padding, an even kernel with
stride 2 and integer padding, and overlapping average pooling, in float64,
built from one seed on each library: the largest relative difference to
NumPy (``max |a - ref| / max |ref|`` per tensor) over the outputs, loss,
input and parameter gradients, and the weights after each of three SGD
steps. Step time: the tutorial net (Conv2D(1, 8, 3), MaxPool2D(2), Dense) in
float32, batch 32, one step = forward, softmax cross-entropy, backward, SGD
update (and for lazy libraries the materialisation after it); the median
over ``--steps`` steps after 3 warm-up steps, and the means of the first and
last five timed steps, which show whether the time per step stays flat.
The numbers on a shared machine are noisy: compare libraries within one run.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import numpy as np

import xcnn

LIBRARIES = ("numpy", "array_api_strict", "torch", "jax.numpy", "dask.array")


def tutorial() -> list[xcnn.Layer]:
    return [xcnn.Conv2D(1, 8, 3), xcnn.MaxPool2D(2), xcnn.Flatten(), xcnn.Dense(13 * 13 * 8, 10)]


def mixed() -> list[xcnn.Layer]:
    return [
        xcnn.Conv2D(2, 4, 3, padding="same"),
        xcnn.ReLU(),
        xcnn.Conv2D(4, 5, 4, stride=2, padding=1),
        xcnn.ReLU(),
        xcnn.AvgPool2D(3, stride=2),
        xcnn.MaxPool2D(2, stride=1),
        xcnn.Flatten(),
        xcnn.Dense(5, 4),
    ]


NETS = {"tutorial": (tutorial, (4, 1, 28, 28), 10), "mixed": (mixed, (3, 2, 12, 12), 4)}


def _tensors(model: xcnn.Sequential, opt: xcnn.Optimizer, x: np.ndarray, y: np.ndarray) -> dict:
    out = model.forward(model.asarray(x))
    loss, d = xcnn.softmax_cross_entropy(out, model.asarray(y))
    found = {"output": out, "loss": loss, "input_grad": model.backward(d)}
    found.update({k: lay.grads[n] for k, lay, n in model.named_params()})
    opt.step()
    found.update({f"stepped {k}": lay.params[n] for k, lay, n in model.named_params()})
    return {k: xcnn.to_numpy(v) for k, v in found.items()}


def parity(library: str) -> float:
    """Worst relative difference to NumPy over both nets and three SGD steps (float64)."""
    worst = 0.0
    for make, shape, classes in NETS.values():
        rng = np.random.default_rng(5)
        x, y = rng.random(shape), rng.integers(0, classes, shape[0])
        models = [xcnn.Sequential(make(), backend=b, dtype="float64", seed=3)
                  for b in ("numpy", library)]  # fmt: skip
        opts = [xcnn.make_optimizer("sgd", m, 0.1) for m in models]
        for _ in range(3):
            ref, got = (_tensors(m, o, x, y) for m, o in zip(models, opts, strict=True))
            for key, r in ref.items():
                err = float(np.abs(got[key] - r).max()) / max(float(np.abs(r).max()), 1e-30)
                worst = max(worst, err)
    return worst


def step_times(library: str, steps: int, batch: int) -> list[float]:
    """Seconds per training step of the tutorial net, float32, after 3 warm-up steps."""
    rng = np.random.default_rng(0)
    model = xcnn.Sequential(tutorial(), backend=library, dtype="float32", seed=0)
    opt = xcnn.make_optimizer("sgd", model, 0.01)
    x, y = model.asarray(rng.random((batch, 1, 28, 28))), model.asarray(rng.integers(0, 10, batch))
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        loss, d = xcnn.softmax_cross_entropy(model.forward(x), y, check=False)
        model.backward(d, input_grad=False)
        opt.step()
        float(loss)  # the step is done only once its result is read (JAX and Dask are lazy)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per library (default 30)")
    p.add_argument("--batch", type=int, default=32, help="batch size of the timed steps")
    p.add_argument("--libraries", default=",".join(LIBRARIES), help="comma-separated names")
    args = p.parse_args(argv)
    try:
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 on JAX for the parity column
    except ImportError:
        pass
    print(f"steps {args.steps}, batch {args.batch}; numpy {np.__version__}")
    print("| library | float64 parity vs NumPy | ms/step (median) | first 5 | last 5 |")
    print("| --- | --- | --- | --- | --- |")
    for lib in args.libraries.split(","):
        try:
            importlib.import_module(lib)
        except ImportError:
            print(f"| `{lib}` | not installed | | | |")
            continue
        diff = "reference" if lib == "numpy" else f"{parity(lib):.1e}"
        t = step_times(lib, args.steps, args.batch)
        first, last = statistics.mean(t[:5]) * 1e3, statistics.mean(t[-5:]) * 1e3
        print(
            f"| `{lib}` | {diff} | {statistics.median(t) * 1e3:.1f} | {first:.1f} | {last:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
