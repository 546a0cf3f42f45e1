"""Training and inference throughput of xcnn against PyTorch and the tutorial's loops.

Run from the repository root::

    python -m benchmarks.throughput                  # CPU: NumPy vs PyTorch CPU
    python -m benchmarks.throughput --device gpu     # CuPy vs PyTorch CUDA
    python -m benchmarks.throughput --dry-run --device gpu   # the GPU code path on the CPU, tiny
    python -m benchmarks.throughput --quick --json results.json

One run prints the environment, a correctness check per net (xcnn and
PyTorch must compute the same loss and gradients on one batch before they
race), training throughput with peak memory, the tutorial loop baseline,
forward-only throughput at batch 1000, and the targets of issue 4.
See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

import xcnn
from benchmarks import common
from benchmarks.common import Contestant, Target, Timing, race


@dataclass(frozen=True)
class Config:
    train_batches: tuple[int, ...]
    infer_batch: int
    repeats: int
    block_s: float
    warmup_s: float
    tutorial_images: int
    check_batch: int = 16
    settle_s: float = 0.3

    @classmethod
    def make(cls, kind: str, quick: bool, dry: bool) -> Config:
        if dry:
            return cls((2, 4), 8, 2, 0.01, 0.01, 3, check_batch=4, settle_s=0.01)
        batches = (128, 1024, 8192) if kind == "gpu" else (1, 32, 128)
        if quick:
            return cls(batches, 1000, 3, 0.25, 0.25, 60)
        return cls(batches, 1000, 5, 0.6, 0.5, 300)


# What issue 4 asks for: (what, net, batch, comparison, threshold).
CPU_TARGETS = [
    ("train/torch", "seed", 32, ">=", 1.0),
    ("train/torch", "seed", 128, ">=", 1.0),
    ("train/torch", "lenet", 32, ">=", 0.75),
    ("train/torch", "lenet", 128, ">=", 0.75),
    ("infer/torch", "seed", 1000, ">=", 1.2),
    ("train/tutorial", "seed", 32, ">=", 300.0),
    ("train/tutorial", "seed", 128, ">=", 300.0),
    ("memory/torch", "lenet", 128, "<=", 1.5),
]
GPU_TARGETS = [("train/torch", net, b, ">=", 0.8) for net in common.NETS for b in (1024, 8192)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- measuring
def check_net(net: str, target: Target, mode: str, cfg: Config) -> common.Check:
    """Same loss and gradients on one batch (fresh models from the benchmark's seed)."""
    common.set_torch_mode(mode)
    model = common.build_xcnn(net, target.xcnn_backend)
    module = common.build_torch(net, model, target.torch_device)
    x, y = common.make_data(cfg.check_batch, seed=1)
    # float32 sums over up to N*OH*OW terms in different orders: 1e-4 of the largest
    # entry; TF32 convolutions (PyTorch's CUDA default) keep only 10 mantissa bits.
    rtol = 2e-2 if mode == "default" else 1e-4
    return common.compare(net, model, module, x, y, rtol)


def time_training(net: str, batch: int, target: Target, modes: list[str], cfg: Config
                  ) -> dict[str, Timing]:  # fmt: skip
    """Images/s of xcnn and of each PyTorch mode on the same net, weights and data."""
    n_batches = 4
    x, y = common.make_data(batch * n_batches)
    model = common.build_xcnn(net, target.xcnn_backend)
    contestants = []
    xd, yd = model.asarray(x), model.asarray(y)
    data = common.batches(xd, yd, batch)
    step = common.xcnn_step(model)
    xsync, tsync = common.syncs(target, model)
    contestants.append(Contestant("xcnn", _cycler(step, data), batch, xsync))
    if modes:
        import torch

        for mode in modes:
            module = common.build_torch(net, model, target.torch_device)
            xt = torch.as_tensor(x, device=target.torch_device)
            yt = torch.as_tensor(y, device=target.torch_device)
            tstep = common.torch_step(module)
            contestants.append(
                Contestant(f"torch-{mode}", _cycler(tstep, common.batches(xt, yt, batch)),
                           batch, tsync, before=_mode_setter(mode))  # fmt: skip
            )
    return race(contestants, repeats=cfg.repeats, block_s=cfg.block_s, warmup_s=cfg.warmup_s,
                settle_s=cfg.settle_s)


def time_inference(net: str, target: Target, modes: list[str], cfg: Config) -> dict[str, Timing]:
    """Forward-only images/s at one large batch (no caches kept, no autograd graph)."""
    x, _ = common.make_data(cfg.infer_batch)
    model = common.build_xcnn(net, target.xcnn_backend)
    xd = model.asarray(x)
    xsync, tsync = common.syncs(target, model)
    contestants = [Contestant("xcnn", lambda: model.forward(xd, train=False), len(x), xsync)]
    if modes:
        import torch

        for mode in modes:
            module = common.build_torch(net, model, target.torch_device)
            xt = torch.as_tensor(x, device=target.torch_device)

            def run(module: Any = module, xt: Any = xt) -> Any:
                with torch.inference_mode():
                    return module(xt)

            contestants.append(
                Contestant(f"torch-{mode}", run, len(x), tsync, before=_mode_setter(mode))
            )
    return race(contestants, repeats=cfg.repeats, block_s=cfg.block_s, warmup_s=cfg.warmup_s,
                settle_s=cfg.settle_s)


def time_tutorial(cfg: Config) -> Timing:
    """The tutorial's per-image loops (benchmarks/naive.py) on the seed net, one image a step."""
    from benchmarks.naive import NaiveNet

    model = common.build_xcnn("seed", "numpy")
    p = common.torch_params(model)
    net = NaiveNet(seed=0)
    net.set_weights(p[0]["weight"], p[3]["weight"], p[3]["bias"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(cfg.tutorial_images, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, size=cfg.tutorial_images)
    it = iter(range(10**9))

    def run() -> None:
        i = next(it) % len(images)
        net.train_step(images[i], int(labels[i]), 0.005)

    # One block of all the images per repeat: the loop is slow and very steady.
    block = cfg.tutorial_images / 40.0  # ~40 img/s: the block then covers every image
    return race([Contestant("tutorial", run, 1)], repeats=max(2, cfg.repeats // 2),
                block_s=block, warmup_s=min(block, 0.5) / 4, settle_s=cfg.settle_s)["tutorial"]  # fmt: skip


def _cycler(step: Any, data: list[tuple[Any, Any]]) -> Any:
    state = {"i": 0}

    def run() -> Any:
        x, y = data[state["i"] % len(data)]
        state["i"] += 1
        return step(x, y)

    return run


def _mode_setter(mode: str) -> Any:
    return lambda: common.set_torch_mode(mode)


# ----------------------------------------------------------------------------- report
def ratio(a: float, b: float) -> float:
    return a / b if b and np.isfinite(a) and np.isfinite(b) else float("nan")


def fmt_ratio(r: float, digits: int = 2) -> str:
    return "-" if not np.isfinite(r) else f"{r:.{digits}f}x"


def fmt_mib(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(  # noqa: E731
        c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--dry-run", action="store_true",
                    help="run the chosen device's code path on the CPU (NumPy, torch CPU) "
                    "with tiny sizes, to check the script itself")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.memory_probe:  # internal: one configuration in a fresh process
        fw, net, batch, kind, dry = args.memory_probe.split(":")
        print(json.dumps(common.memory_probe(fw, net, int(batch), kind, dry == "1")))
        return 0

    cfg = Config.make(args.device, args.quick, args.dry_run)
    target = common.make_target(args.device, args.dry_run)
    modes = target.torch_modes()
    env = common.environment(target)
    out: dict[str, Any] = {"env": env, "config": cfg.__dict__, "device": args.device,
                           "dry_run": args.dry_run, "checks": {}, "training": [],
                           "inference": [], "tutorial": None, "targets": []}  # fmt: skip
    title = f"xcnn throughput: {args.device.upper()}"
    if args.dry_run:
        title += " code path, DRY RUN on the CPU with tiny sizes (numbers mean nothing)"
    print(title)
    print(_env_lines(env, target))
    if not modes:
        print(f"PyTorch columns skipped: {target.torch_missing}")

    # 1. Correctness: the race is only between equal programs.
    allowed: dict[str, list[str]] = {}
    for net in common.NETS:
        allowed[net] = []
        for mode in modes:
            chk = check_net(net, target, mode, cfg)
            out["checks"][f"{net}/{mode}"] = chk.__dict__
            print(f"check {net:5s} vs torch-{mode}: {'ok' if chk.ok else 'FAILED'}, {chk.detail}")
            if chk.ok:
                allowed[net].append(mode)

    # 2. Training throughput.
    for net in common.NETS:
        for batch in cfg.train_batches:
            log(f"training {net} batch {batch} ...")
            t = time_training(net, batch, target, allowed[net], cfg)
            out["training"].append({"net": net, "batch": batch,
                                    **{k: v.as_dict() for k, v in t.items()}})  # fmt: skip
    # 3. The tutorial's loops (a CPU baseline).
    if args.device == "cpu":
        log(f"tutorial loop, {cfg.tutorial_images} images ...")
        out["tutorial"] = time_tutorial(cfg).as_dict()
    # 4. Inference.
    for net in common.NETS:
        log(f"inference {net} batch {cfg.infer_batch} ...")
        t = time_inference(net, target, allowed[net], cfg)
        out["inference"].append({"net": net, "batch": cfg.infer_batch,
                                 **{k: v.as_dict() for k, v in t.items()}})  # fmt: skip
    # 5. Peak memory, one fresh process per configuration.
    if not args.no_memory:
        for row in out["training"]:
            log(f"peak memory {row['net']} batch {row['batch']} ...")
            row["mem_xcnn"] = common.run_memory_probe(
                "xcnn", row["net"], row["batch"], args.device, args.dry_run)
            if modes and allowed[row["net"]]:
                row["mem_torch"] = common.run_memory_probe(
                    "torch", row["net"], row["batch"], args.device, args.dry_run)
    out["env"]["load_avg_end"] = common.os.getloadavg() if hasattr(common.os, "getloadavg") else None

    print()
    print(_training_table(out, modes))
    print()
    print(_inference_table(out, modes))
    print()
    print(_targets(out, args.device))
    print()
    print(_footer(out, target, cfg, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return 0


def _env_lines(env: dict[str, Any], target: Target) -> str:
    lines = [
        f"machine: {env['cpu']}, {env['logical_cpus']} logical CPUs ({env['usable_cpus']} usable); "
        f"{env['platform']}",
        f"python {env['python']}, numpy {env['numpy']}, xcnn {env['xcnn']} "
        f"(NumPy fast paths: {env['fast_paths']}), torch {env['torch']}"
        + (f" ({env['torch_threads']} threads)" if "torch_threads" in env else ""),
        f"BLAS: {env['blas']}",
        f"thread env: {env['thread_env'] or 'none set'}; load average at start: "
        + (" ".join(f"{v:.2f}" for v in env["load_avg"]) if env["load_avg"] else "n/a"),
    ]
    if "gpu" in env:
        lines.append(f"GPU: {env['gpu']}, CuPy {env['cupy']}, CUDA runtime {env['cuda_runtime']}")
    return "\n".join(lines)


def _training_table(out: dict[str, Any], modes: list[str]) -> str:
    tut = out["tutorial"]["median"] if out["tutorial"] else float("nan")
    header = ["net", "batch", "xcnn img/s"]
    for m in modes:
        header += [f"torch-{m} img/s", f"xcnn/torch-{m}"]
    header += ["xcnn/tutorial", "epoch s (est.)", "peak MiB xcnn", "peak MiB torch", "mem ratio"]
    rows = []
    for r in out["training"]:
        x = r["xcnn"]["median"]
        cells = [r["net"], str(r["batch"]), _t(r["xcnn"])]
        for m in modes:
            t = r.get(f"torch-{m}")
            cells += [_t(t) if t else "skipped", fmt_ratio(ratio(x, t["median"])) if t else "-"]
        mx, mt = r.get("mem_xcnn"), r.get("mem_torch")
        cells += [
            fmt_ratio(ratio(x, tut), 0) if r["net"] == "seed" else "-",
            f"{common.EPOCH_IMAGES / x:.1f}",
            fmt_mib(mx),
            fmt_mib(mt),
            fmt_ratio(ratio(mx, mt)) if mx is not None and mt else "-",
        ]
        rows.append(cells)
    text = "Training, SGD float32: images/s, median of repeats ±half the min-max spread\n"
    text += table(rows, header)
    if out["tutorial"]:
        t = out["tutorial"]
        text += (f"\ntutorial loop (benchmarks/naive.py, seed net, one image per step): "
                 f"{t['median']:.1f} img/s ±{t['spread'] * 100:.0f}%")  # fmt: skip
    return text


def _inference_table(out: dict[str, Any], modes: list[str]) -> str:
    header = ["net", "batch", "xcnn img/s"]
    for m in modes:
        header += [f"torch-{m} img/s", f"xcnn/torch-{m}"]
    rows = []
    for r in out["inference"]:
        cells = [r["net"], str(r["batch"]), _t(r["xcnn"])]
        for m in modes:
            t = r.get(f"torch-{m}")
            cells += [_t(t) if t else "skipped",
                      fmt_ratio(ratio(r["xcnn"]["median"], t["median"])) if t else "-"]  # fmt: skip
        rows.append(cells)
    return "Inference (forward only, no autograd / no caches)\n" + table(rows, header)


def _t(t: dict[str, Any]) -> str:
    return Timing(t["rates"]).fmt()


def _targets(out: dict[str, Any], device: str) -> str:
    ref = "torch-fp32" if device == "gpu" else "torch-cpu"
    lines = [f"Targets (issue 4; ratios against {ref}, same run):"]
    tut = out["tutorial"]["median"] if out["tutorial"] else float("nan")
    for what, net, batch, op, thr in GPU_TARGETS if device == "gpu" else CPU_TARGETS:
        kind, vs = what.split("/")
        rows = out["inference"] if kind == "infer" else out["training"]
        row = next((r for r in rows if r["net"] == net and r["batch"] == batch), None)
        value = float("nan")
        if row is not None:
            if kind == "memory":
                mx, mt = row.get("mem_xcnn"), row.get("mem_torch")
                value = ratio(mx, mt) if mx is not None and mt else float("nan")
            elif vs == "tutorial":
                value = ratio(row["xcnn"]["median"], tut)
            elif ref in row:
                value = ratio(row["xcnn"]["median"], row[ref]["median"])
        met = (value >= thr if op == ">=" else value <= thr) if np.isfinite(value) else None
        verdict = "n/a" if met is None else ("met" if met else "MISSED")
        label = f"{kind} {net} batch {batch}: xcnn/{vs} {op} {thr:g}x"
        lines.append(f"  {label:<46} {fmt_ratio(value, 2 if thr < 10 else 0):>8}  {verdict}")
        out["targets"].append({"target": label, "value": value, "met": met})
    return "\n".join(lines)


def _footer(out: dict[str, Any], target: Target, cfg: Config, args: Any) -> str:
    mem = common.MEMORY_METHOD["gpu" if target.on_gpu else "rss"]
    la = out["env"].get("load_avg_end")
    return "\n".join([
        "Method:",
        f"- img/s: {cfg.repeats} interleaved repeats (xcnn, torch, xcnn, ...) of a "
        f"~{cfg.block_s:g} s block of steps after >= {cfg.warmup_s:g} s warm-up; batches are "
        "slices of a device array of 4 batches of random images; one step = forward, mean "
        "softmax cross-entropy, backward (no input gradient), SGD update (lr 0.01).",
        "- both frameworks start from the same weights (xcnn's, copied into "
        "benchmarks/torch_ref.build) and were checked to give the same loss and gradients.",
        "- torch-cpu: eager PyTorch, torch.set_num_threads(os.cpu_count()); torch-fp32: "
        "CUDA with TF32 off (cudnn.allow_tf32 = matmul.allow_tf32 = False); torch-default: "
        "PyTorch's defaults (TF32 convolutions). GPU timings synchronise the device "
        "before starting and before stopping the clock.",
        f"- peak memory: {mem}." if not args.no_memory else "- peak memory: not measured.",
        f"- epoch s (est.): {common.EPOCH_IMAGES:,} / training img/s, compute only; the "
        "measured epoch time and test accuracy on MNIST are benchmarks/accuracy.py's.",
        "- xcnn/tutorial: xcnn img/s over the tutorial loop's (one image per step, "
        "Python loops over pixels).",
        "- load average at end: " + (" ".join(f"{v:.2f}" for v in la) if la else "n/a")
        + " (the machine may be shared; compare ratios, not absolute numbers).",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
