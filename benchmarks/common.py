"""Shared pieces of the benchmarks: models on both frameworks, timing, memory, environment.

Nothing here imports :mod:`torch` or :mod:`cupy` at import time: both are
optional, and every function that needs one says so by taking a ``Target``
that was built only after the import succeeded.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import xcnn
from benchmarks import torch_ref

ROOT = Path(__file__).resolve().parents[1]
NETS = ("seed", "lenet")
IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
EPOCH_IMAGES = 60_000  # MNIST training set, for the epoch-time estimate


# ----------------------------------------------------------------------------- models
def build_xcnn(name: str, backend: str, *, seed: int = 0) -> xcnn.Sequential:
    """A named net (:func:`xcnn.models.build_model`) in float32 on ``backend``."""
    return xcnn.models.build_model(name, backend=backend, dtype="float32", seed=seed)


def torch_params(model: xcnn.Sequential) -> list[dict[str, np.ndarray]]:
    """The model's parameters in :mod:`benchmarks.torch_ref` layout (a zero bias where none).

    ``torch_ref`` builds every conv/dense with a bias; a layer built with
    ``bias=False`` gets zeros here and :func:`build_torch` removes it again.
    """
    out = []
    for layer in model.layers:
        p = {k: xcnn.to_numpy(v) for k, v in layer.params.items()}
        if "weight" in p and "bias" not in p:
            p["bias"] = np.zeros(p["weight"].shape[0 if p["weight"].ndim == 4 else 1], np.float32)
        out.append(p)
    return out


def build_torch(name: str, model: xcnn.Sequential, device: str) -> Any:
    """The PyTorch twin of ``model`` with the same weights (and no bias where xcnn has none)."""
    module = torch_ref.build(name, torch_params(model), device=device)
    for layer, twin in zip(model.layers, module, strict=True):
        if "weight" in layer.params and "bias" not in layer.params:
            twin.register_parameter("bias", None)  # the same program: no bias to train
    return module


def xcnn_step(model: xcnn.Sequential, lr: float = 0.01) -> Callable[[Any, Any], Any]:
    """One SGD training step of ``model``: forward, fused loss, backward, update."""
    opt = xcnn.SGD(model, lr)

    def step(x: Any, y: Any) -> Any:
        logits = model.forward(x)
        loss, d = xcnn.softmax_cross_entropy(logits, y, check=False)
        model.backward(d, input_grad=False)
        opt.step()
        return loss

    return step


class _GraphStep:
    """:func:`xcnn_step` through :func:`xcnn.cuda_graph.training_step` with graphs on."""

    def __init__(self, model: xcnn.Sequential, lr: float) -> None:
        from xcnn import cuda_graph

        self.step = cuda_graph.training_step(model, xcnn.SGD(model, lr), graphs=True)

    @property
    def graph_reason(self) -> str | None:
        """Why the step runs eagerly (None: it replays graphs; "" off the GPU)."""
        return getattr(self.step, "reason", "not on CuPy: the eager step")

    def __call__(self, x: Any, y: Any) -> Any:
        return self.step(x, y)[0]


def xcnn_graph_step(model: xcnn.Sequential, lr: float = 0.01) -> Callable[[Any, Any], Any]:
    """The same SGD step as :func:`xcnn_step`, captured as a CUDA graph where it can be."""
    return _GraphStep(model, lr)


def has_torch_twin(name: str) -> bool:
    """Whether benchmarks/torch_ref.py can build the PyTorch twin of net ``name``."""
    try:
        torch_ref.layer_kinds(name)
    except ValueError:
        return False
    return True


def gpu_peak_in_process(framework: str, net: str, batch: int, target: Target) -> float:
    """Peak device memory (MiB) of 3 training steps, measured in this process.

    Each framework's caching allocator is measured on its own (CuPy's default
    pool, PyTorch's reserved bytes), so both can share one process; the data and
    the model are built first and are not counted.
    """
    x, y = make_data(batch)
    model = build_xcnn(net, target.xcnn_backend)
    if framework == "xcnn":
        xd, yd = model.asarray(x), model.asarray(y)
        return _gpu_peak("xcnn", xcnn_step(model), xd, yd, syncs(target, model)[0])
    import torch

    set_torch_mode("fp32")
    module = build_torch(net, model, target.torch_device)
    xd = torch.as_tensor(x, device=target.torch_device)
    yd = torch.as_tensor(y, device=target.torch_device)
    peak = _gpu_peak("torch", torch_step(module), xd, yd, syncs(target)[1])
    del module, xd, yd
    torch.cuda.empty_cache()
    return peak


def torch_step(module: Any, lr: float = 0.01) -> Callable[[Any, Any], Any]:
    """The same step in PyTorch (``torch.optim.SGD``, mean cross-entropy)."""
    return torch_ref.train_step_fn(module, "sgd", lr)


# ----------------------------------------------------------------------------- targets
@dataclass
class Target:
    """Where a benchmark runs: xcnn's backend, torch's device, and how to wait for each.

    ``kind`` is what the run stands for ("cpu" or "gpu"); with ``dry`` the GPU
    run's code path executes on NumPy / torch CPU so it can be checked anywhere.
    """

    kind: str
    dry: bool
    xcnn_backend: str  # "numpy" or "cupy"
    torch_device: str | None  # "cpu", "cuda", or None when torch is unavailable
    torch_missing: str = ""  # why torch_device is None

    @property
    def on_gpu(self) -> bool:
        return self.xcnn_backend == "cupy"

    def torch_modes(self) -> list[str]:
        """PyTorch variants raced: strict float32 and PyTorch's default (TF32 convs) on CUDA."""
        if self.torch_device is None:
            return []
        return ["fp32", "default"] if self.kind == "gpu" else ["cpu"]


def make_target(kind: str, dry: bool) -> Target:
    """Resolve the target, importing CuPy/torch only when they are needed."""
    if kind not in ("cpu", "gpu"):
        raise ValueError(f"--device must be cpu or gpu, got {kind!r}")
    xb = "cupy" if kind == "gpu" and not dry else "numpy"
    if xb == "cupy":
        xcnn.resolve_backend("cupy")  # BackendError with install advice if unusable
    if not torch_ref.available():
        return Target(kind, dry, xb, None, "PyTorch not installed (pip install torch==2.13.0)")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if xb == "cupy":
        if not torch.cuda.is_available():
            return Target(kind, dry, xb, None, "this PyTorch build has no CUDA")
        return Target(kind, dry, xb, "cuda")
    return Target(kind, dry, xb, "cpu")


def set_torch_mode(mode: str) -> None:
    """Select PyTorch's float32 precision for CUDA: strict ("fp32") or its defaults.

    Strict turns TF32 off for cuDNN convolutions and cuBLAS matmuls, so both
    frameworks do IEEE float32 arithmetic; "default" restores PyTorch's
    defaults (TF32 convolutions on, TF32 matmuls off). The flags exist on
    CPU builds too, where they change nothing.
    """
    import torch

    strict = mode == "fp32"
    torch.backends.cudnn.allow_tf32 = not strict  # PyTorch default: True
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch default: False


def syncs(target: Target, model: xcnn.Sequential | None = None) -> tuple[Callable[[], None], ...]:
    """Functions that wait until all queued device work is done: (xcnn, torch).

    On the CPU both are no-ops: NumPy and eager PyTorch return when the work is done.
    """
    xs = _noop
    if target.on_gpu and model is not None:
        device = model.backend.device  # a cupy.cuda.Device

        def xs() -> None:
            device.synchronize()

    ts = _noop
    if target.torch_device == "cuda":
        import torch

        def ts() -> None:
            torch.cuda.synchronize()

    return xs, ts


def _noop() -> None:
    return None


# ----------------------------------------------------------------------------- data
def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` MNIST-shaped float32 images in [0, 1) (N, 1, 28, 28) and int64 labels (N,)."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, *IMAGE_SHAPE), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, size=n, dtype=np.int64)
    return x, y


def batches(x: Any, y: Any, batch: int) -> list[tuple[Any, Any]]:
    """Consecutive slices of device arrays, as a training loop takes them."""
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, x.shape[0] - batch + 1, batch)]


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Throughput of one contestant: images/s of every repeat."""

    rates: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return float(np.median(self.rates)) if self.rates else float("nan")

    @property
    def spread(self) -> float:
        """Half the min-max range, as a fraction of the median."""
        if len(self.rates) < 2:
            return 0.0
        return (max(self.rates) - min(self.rates)) / 2 / self.median

    def fmt(self) -> str:
        if not self.rates:
            return "-"
        return f"{_num(self.median)} ±{self.spread * 100:.0f}%"

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "spread": self.spread, "rates": self.rates}


@dataclass
class Contestant:
    """A step to time: ``run()`` does one unit of work on ``images`` images."""

    name: str
    run: Callable[[], Any]
    images: int
    sync: Callable[[], None] = _noop
    before: Callable[[], None] = _noop  # e.g. select PyTorch's precision mode
    block_s: float | None = None  # its own block length (the tutorial's loop is slow)


def race(
    contestants: Sequence[Contestant],
    *,
    repeats: int,
    block_s: float,
    warmup_s: float,
    settle_s: float = 0.3,
    rewarm_s: float = 0.0,
) -> dict[str, Timing]:
    """Time every contestant, interleaving their repeats so drift hits all alike.

    Each contestant first warms up (at least 2 steps and ``warmup_s`` seconds,
    which also calibrates how many steps make a ``block_s``-second block);
    then ``repeats`` rounds time one block of each (in reverse order every
    other round), with the device synchronised before starting the clock and
    before stopping it.

    Before every block the process sleeps ``settle_s``: thread pools that were
    just busy spin for a while before they sleep (OpenBLAS ~0.1 s, OpenMP
    runtimes up to 0.2 s), and on a small machine those spinning threads would
    steal cores from the next contestant. Then the contestant runs untimed
    steps for ``rewarm_s``: after the pause the CPUs come back to speed over
    tens of milliseconds (on the project's VM a LeNet step right after 0.3 s
    idle took 48 ms against 29 ms, PyTorch's 25.6 against 24.2 ms), and a
    training loop, which never pauses, does not see that.
    """
    steps = {}
    for c in contestants:
        c.before()
        time.sleep(settle_s)
        c.sync()
        t0, n = time.perf_counter(), 0
        while n < 2 or time.perf_counter() - t0 < warmup_s:
            c.run()
            if n == 0:  # the first step pays one-time costs: restart the clock
                c.sync()
                t0 = time.perf_counter()
            n += 1
        c.sync()
        per_step = (time.perf_counter() - t0) / max(n - 1, 1)
        block = block_s if c.block_s is None else c.block_s
        steps[c.name] = max(1, math.ceil(block / max(per_step, 1e-9)))
    out = {c.name: Timing() for c in contestants}
    for r in range(repeats):
        # Every other round in reverse order, so that no contestant always runs
        # first (right after the previous configuration, or after the pause).
        for c in contestants if r % 2 == 0 else contestants[::-1]:
            c.before()
            k = steps[c.name]
            time.sleep(settle_s)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < rewarm_s:
                c.run()
            c.sync()
            t0 = time.perf_counter()
            for _ in range(k):
                c.run()
            c.sync()
            out[c.name].rates.append(k * c.images / (time.perf_counter() - t0))
    return out


def _num(v: float) -> str:
    if not math.isfinite(v):
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


# ----------------------------------------------------------------------------- correctness
@dataclass
class Check:
    """xcnn against PyTorch on one batch: loss and every parameter gradient."""

    ok: bool
    worst: float  # largest relative difference over loss and gradients
    detail: str


def compare(
    name: str, model: xcnn.Sequential, module: Any, x: np.ndarray, y: np.ndarray, rtol: float
) -> Check:
    """Same loss and gradients (relative to each tensor's largest entry) within ``rtol``?

    Runs one forward/backward without an update on both, from the current weights.
    """
    import torch

    logits = model.forward(model.asarray(x))
    loss, d = xcnn.softmax_cross_entropy(logits, model.asarray(y))
    model.backward(d, input_grad=False)
    p = next(module.parameters())
    xt = torch.as_tensor(x, device=p.device)
    yt = torch.as_tensor(y, device=p.device)
    module.zero_grad(set_to_none=True)
    tloss = torch.nn.functional.cross_entropy(module(xt), yt)
    tloss.backward()

    ref_loss = float(tloss.detach().cpu())
    diffs = {"loss": abs(float(loss) - ref_loss) / max(abs(ref_loss), 1e-30)}
    for i, (layer, twin) in enumerate(zip(model.layers, module, strict=True)):
        for key, g in layer.grads.items():
            ref = getattr(twin, key).grad.detach().cpu().numpy()
            if isinstance(twin, torch.nn.Linear) and key == "weight":
                ref = ref.T  # torch (out, in) -> xcnn (in, out)
            mine = xcnn.to_numpy(g).astype(np.float64)
            scale = max(float(np.abs(ref).max()), 1e-30)
            diffs[f"{i}.{key}"] = float(np.abs(mine - ref).max()) / scale
    worst_key = max(diffs, key=diffs.get)
    ok = all(v <= rtol for v in diffs.values())
    detail = f"worst {worst_key} rel diff {diffs[worst_key]:.1e} (tolerance {rtol:.0e})"
    if not ok:
        bad = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items() if not v <= rtol)
        detail = (
            f"{name}: xcnn and PyTorch disagree on one batch ({bad}; tolerance "
            f"{rtol:.0e}): not the same program, PyTorch timings skipped"
        )
    return Check(ok, diffs[worst_key], detail)


# ----------------------------------------------------------------------------- memory
MEMORY_METHOD = {
    "rss": "peak RSS (Linux VmHWM, reset through /proc/self/clear_refs; else ru_maxrss) "
    "during 3 training steps minus the RSS after imports, data creation and model build, "
    "in a fresh process per configuration (the same method for xcnn and PyTorch)",
    "gpu": "device memory held by the framework's caching allocator at its peak "
    "(CuPy: default memory pool total_bytes(); PyTorch: max_memory_reserved()) minus "
    "what it held after data creation and model build, in a fresh process per configuration",
}


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PeakRSS:
    """Peak resident memory above a baseline, in MiB."""

    def __init__(self) -> None:
        self.resettable = _reset_peak_rss() and _status_kb("VmHWM") is not None
        now = _status_kb("VmRSS")
        if now is None:  # not Linux: ru_maxrss (kB on Linux, bytes on macOS) is all there is
            scale = 1 if sys.platform == "darwin" else 1024
            now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale // 1024
        self.base_kb = now

    def peak_mib(self) -> float:
        peak = _status_kb("VmHWM") if self.resettable else None
        if peak is None:
            scale = 1 if sys.platform == "darwin" else 1024
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale // 1024
        return (peak - self.base_kb) / 1024


def memory_probe(framework: str, net: str, batch: int, kind: str, dry: bool) -> dict[str, Any]:
    """Run in a fresh process: peak memory of 3 training steps of one configuration."""
    target = (
        make_target(kind, dry)
        if framework == "torch"
        else Target(kind, dry, "cupy" if kind == "gpu" and not dry else "numpy", None)
    )
    x, y = make_data(batch)
    model = build_xcnn(net, target.xcnn_backend)
    if framework == "xcnn":
        xd, yd = model.asarray(x), model.asarray(y)
        step = xcnn_step(model)
        sync = syncs(target, model)[0]
    else:
        import torch

        if target.torch_device is None:
            raise RuntimeError(target.torch_missing)
        set_torch_mode("fp32")
        module = build_torch(net, model, target.torch_device)
        del model
        xd = torch.as_tensor(x, device=target.torch_device)
        yd = torch.as_tensor(y, device=target.torch_device)
        step = torch_step(module)
        sync = syncs(target)[1]
    sync()
    if target.on_gpu or target.torch_device == "cuda":
        return {"method": "gpu", "peak_mib": _gpu_peak(framework, step, xd, yd, sync)}
    meter = PeakRSS()
    for _ in range(3):
        step(xd, yd)
    sync()
    return {"method": "rss", "peak_mib": meter.peak_mib()}


def _gpu_peak(framework: str, step: Callable, x: Any, y: Any, sync: Callable) -> float:
    if framework == "xcnn":
        import cupy

        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()  # the pool now holds exactly the live arrays (data, weights)
        base = pool.total_bytes()
        for _ in range(3):
            step(x, y)
        sync()
        # The pool keeps every block it ever got (until free_all_blocks), so its
        # size is the high-water mark of what the steps needed at once.
        return (pool.total_bytes() - base) / 2**20
    import torch

    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step(x, y)
    sync()
    return (torch.cuda.max_memory_reserved() - base) / 2**20


def run_child(args: list[str], timeout: float = 1800) -> dict[str, Any]:
    """Run ``python -m benchmarks.throughput ARGS`` in a fresh interpreter.

    Returns its last line of output, parsed as JSON.
    """
    cmd = [sys.executable, "-m", "benchmarks.throughput", *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_memory_probe(framework: str, net: str, batch: int, kind: str, dry: bool) -> float | None:
    """:func:`memory_probe` in a fresh interpreter; None (and a note on stderr) on failure."""
    try:
        out = run_child(["--memory-probe", f"{framework}:{net}:{batch}:{kind}:{int(dry)}"])
    except RuntimeError as e:
        print(f"  memory probe {framework} {net} {batch}: {e}", file=sys.stderr)
        return None
    return float(out["peak_mib"])


# ----------------------------------------------------------------------------- environment
def environment(target: Target) -> dict[str, Any]:
    """What the numbers depend on: machine, library versions, BLAS, threads, load."""
    env: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "xcnn": xcnn.__version__,
        "blas": _blas(),
        "thread_env": {
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith(("OPENBLAS_", "OMP_", "MKL_", "GOTO"))
        },
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "fast_paths": _fast_paths_state(),
    }
    if target.torch_device is not None:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    else:
        env["torch"] = target.torch_missing
    if target.on_gpu:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        env["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        env["cupy"] = cupy.__version__
        env["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    env["cuda_kernels"] = os.environ.get("XCNN_CUDA_KERNELS", "0")
    env["cuda_graphs"] = os.environ.get("XCNN_CUDA_GRAPHS", "0")
    return env


def _fast_paths_state() -> str:
    try:
        from xcnn import kernels
    except ImportError:
        return "none (generic array-API code only)"
    if not kernels.enabled("numpy"):
        return "off (XCNN_FAST=0)"
    try:
        from xcnn.kernels import numpy_parallel, numpy_winograd
    except ImportError:
        return "on"
    threads = f"{numpy_parallel.THREADS} chunk threads"
    winograd = "on (XCNN_WINOGRAD=1)" if numpy_winograd.ENABLED else "off"
    return f"on, {threads}, Winograd {winograd}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas() -> str:
    """BLAS behind NumPy: threadpoolctl's view if installed, else numpy's build config."""
    try:
        import threadpoolctl

        infos = [i for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
        if infos:
            return "; ".join(
                f"{i.get('internal_api')} {i.get('version')} {i.get('architecture', '')} "
                f"threads={i.get('num_threads')}"
                for i in infos
            )
    except ImportError:
        pass
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        built = f"{cfg.get('name')} {cfg.get('version')} ({cfg.get('openblas configuration', '')})"
    except KeyError as e:  # a build that does not report its BLAS
        return f"unknown ({e})"
    core = _openblas_core()  # the build config names its DYNAMIC_ARCH base, not what runs
    return built if core is None else f"{built}, running its {core} kernels"


def _openblas_core() -> str | None:
    """The kernels NumPy's bundled OpenBLAS picked for this CPU at run time, or None."""
    import ctypes

    from xcnn.kernels.numpy_parallel import bundled_openblas

    for lib in bundled_openblas():
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                     "openblas_get_corename"):  # fmt: skip
            func = getattr(lib, name, None)
            if func is not None:
                func.restype = ctypes.c_char_p
                return func().decode(errors="replace")
    return None
