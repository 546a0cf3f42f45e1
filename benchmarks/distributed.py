"""Data-parallel scaling on one machine: 1 process x T threads against T MPI ranks x 1 thread.

Run from the repository root (needs the ``distributed`` extra)::

    nice -n 10 python benchmarks/distributed.py                 # seed and lenet, 3 repeats
    nice -n 10 python benchmarks/distributed.py --nets seed --repeats 1 --json out.json

Each configuration is a fresh process tree: ``python`` alone with
``OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=MKL_NUM_THREADS=T``, or ``mpiexec -n T``
with one thread per rank. Each trains the net for two epochs on the first
``--images`` images of the embedded MNIST sample (Adam, the net's recipe
batch as the global batch) and reports the second epoch (the first one pays
for allocations and caches): images/s over the whole global batch stream,
and ("in reduce") the share of rank 0's epoch spent in
:meth:`~xcnn.distributed.Communicator.reduce_step` (pack, MPI ``Allreduce``,
unpack, *and waiting for the slower rank*), the most that overlapping the
all-reduce with backward could win; "all-reduce" is one ``Allreduce`` of the
step's flat buffer alone (ranks lined up by a barrier, mean of 20) against
"step", the mean time of one training step. A 1 process x 1 thread run is the
per-core reference. The medians of ``--repeats`` runs are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = {"seed": 32, "lenet": 64}
IMAGES = {"seed": 8000, "lenet": 1024}


def worker(net: str, images: int, batch: int, dist: str) -> None:
    """One configuration (runs in the launched processes); rank 0 prints one JSON line."""
    import numpy as np

    import xcnn
    from xcnn import datasets, distributed
    from xcnn.models import build_model

    comm = distributed.resolve(dist)
    spent = [0.0]
    reduce_step = comm.reduce_step

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return reduce_step(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t

    comm.reduce_step = timed  # the whole averaging: pack, all-reduce, unpack
    data = datasets.sample()
    model = build_model(net, seed=0)
    optimizer = xcnn.make_optimizer("adam", model, 1e-3)
    marks = []

    def callback(epoch, logs):
        marks.append(spent[0])

    history = xcnn.fit(
        model,
        optimizer,
        data.x_train[:images],
        data.y_train[:images],
        epochs=2,
        batch_size=batch,
        rng=np.random.default_rng(0),
        progress=False,
        callback=callback,
        distributed=comm,
    )
    seconds = history["seconds"][-1]
    # The all-reduce alone: the flat buffer of one step, all ranks lined up by a barrier.
    flat = np.zeros(model.num_params() + 2, np.dtype(model.dtype))
    comm.barrier()
    t = time.perf_counter()
    for _ in range(20):
        comm.allreduce_sum(flat)
    allreduce_s = (time.perf_counter() - t) / 20
    steps = -(-images // batch)
    if comm.is_root:
        out = {
            "images_per_s": images / seconds,
            "reduce_share": (marks[1] - marks[0]) / seconds,
            "allreduce_ms": 1e3 * allreduce_s,
            "step_ms": 1e3 * seconds / steps,
            "params": model.num_params(),
        }
        print(json.dumps(out), flush=True)


def _run(net: str, images: int, ranks: int, threads: int, timeout: float) -> dict:
    from xcnn.distributed import find_mpiexec

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    dist = "mpi" if ranks > 1 else "none"
    cmd = [sys.executable, __file__, "--worker", net, str(images), str(BATCH[net]), dist]
    if ranks > 1:
        mpiexec = find_mpiexec()
        if mpiexec is None:
            raise SystemExit("no mpiexec: pip install 'xcnn[distributed]'")
        cmd = [mpiexec, "-n", str(ranks), *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["seed", "lenet"], choices=sorted(BATCH))
    parser.add_argument("--workers", type=int, default=2, help="threads / ranks (default 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, help="training images (default: per net)")
    parser.add_argument("--json", metavar="PATH", help="also write every run as JSON")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        net, images, batch, dist = args.worker
        worker(net, int(images), int(batch), dist)
        return 0
    t = args.workers
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()}, workers: {t}")
    print(f"{'net':6} {'batch':>5} {'images':>6} | {'1 proc x 1 thr':>16} | "
          f"{'1 proc x ' + str(t) + ' thr':>16} | {str(t) + ' ranks x 1 thr':>16} "
          f"{'vs threads':>10} {'in reduce':>9} {'all-reduce':>10} {'step':>8}")  # fmt: skip
    results = {}
    for net in args.nets:
        images = args.images or IMAGES[net]
        runs = {"single": [], "threads": [], "ranks": []}
        for _ in range(args.repeats):  # interleaved, so load changes hit all alike
            runs["single"].append(_run(net, images, 1, 1, 600))
            runs["threads"].append(_run(net, images, 1, t, 600))
            runs["ranks"].append(_run(net, images, t, 1, 600))
        single = statistics.median(r["images_per_s"] for r in runs["single"])
        one = statistics.median(r["images_per_s"] for r in runs["threads"])
        many = statistics.median(r["images_per_s"] for r in runs["ranks"])
        share = statistics.median(r["reduce_share"] for r in runs["ranks"])
        ar = statistics.median(r["allreduce_ms"] for r in runs["ranks"])
        step = statistics.median(r["step_ms"] for r in runs["ranks"])
        results[net] = runs
        print(f"{net:6} {BATCH[net]:>5} {images:>6} | {single:>12,.0f} img/s | "
              f"{one:>12,.0f} img/s | {many:>12,.0f} img/s {many / one:>9.2f}x "
              f"{share:>9.1%} {ar:>7.2f} ms {step:>5.1f} ms")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
