"""Data-parallel training (xcnn.distributed): fakes in-process, then real MPI ranks.

The in-process tests run the shared training logic over a thread-backed fake
communicator (one thread per rank). The MPI tests launch ``mpiexec -n 2``
from the ``mpich`` wheel (the ``distributed`` extra, part of ``test``), each
with a subprocess timeout, and are skipped, saying why, only where mpi4py or
the launcher is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import xcnn
from xcnn import datasets, distributed
from xcnn.distributed import Communicator, DriftError, resolve
from xcnn.models import build_model

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
MPIEXEC = distributed.find_mpiexec()
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(
    not (HAVE_MPI4PY and MPIEXEC),
    reason="needs mpi4py and an mpiexec (pip install 'xcnn[distributed]')",
)
TIMEOUT = 60  # seconds per launch: a hang fails the test instead of the suite


# -- fakes: ranks as threads ------------------------------------------------------


class _World:
    def __init__(self, size: int) -> None:
        self.size, self.barrier = size, threading.Barrier(size, timeout=30)
        self.slots: list = [None] * size
        self.aborted: list[int] = []

    def exchange(self, rank: int, value):
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before all have read
        return values


class ThreadComm(Communicator):
    """Collectives between threads of one process (a fake of MPICommunicator)."""

    name = "thread"

    def __init__(self, world: _World, rank: int) -> None:
        super().__init__(rank, world.size)
        self.world, self.calls = world, 0

    def allreduce_sum(self, buffer):
        self.calls += 1
        host = np.asarray(xcnn.to_numpy(buffer))
        return np.sum(self.world.exchange(self.rank, host), axis=0).astype(host.dtype)

    def bcast(self, obj, root=0):
        return self.world.exchange(self.rank, obj)[root]

    def allgather(self, obj):
        return self.world.exchange(self.rank, obj)

    def abort(self, code=1):
        self.world.aborted.append(self.rank)  # recorded; the exception then propagates


def _train(comm, n, batch, *, seed=0, epochs=1, opt="sgd"):
    data = datasets.sample()
    model = build_model("seed", seed=seed)
    optimizer = xcnn.make_optimizer(opt, model, 0.01)
    history = xcnn.fit(
        model,
        optimizer,
        data.x_train[:n],
        data.y_train[:n],
        epochs=epochs,
        batch_size=batch,
        validation_data=(data.x_test[:101], data.y_test[:101]),
        progress=False,
        distributed=comm,
    )
    return model, optimizer, history


def _run_ranks(size, target):
    world = _World(size)
    results, errors = [None] * size, [None] * size

    def work(rank):
        try:
            results[rank] = target(ThreadComm(world, rank))
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            errors[rank] = e

    threads = [threading.Thread(target=work, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return world, results, errors


def _max_rel(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in b)


@pytest.mark.parametrize(("size", "n", "batch"), [(2, 601, 25), (3, 200, 32), (2, 64, 1)])
def test_fake_ranks_match_one_process(size, n, batch):
    """Uneven shards, a last batch smaller than the world, even batch 1 (a stand-in per step)."""
    world, results, errors = _run_ranks(size, lambda c: _train(c, n, batch, opt="momentum"))
    assert errors == [None] * size
    ref, ref_opt, ref_hist = _train(None, n, batch, opt="momentum")
    for model, optimizer, hist in results:
        assert _max_rel(model.state_dict(), ref.state_dict()) < 1e-5
        assert optimizer.steps == ref_opt.steps == -(-n // batch)
        assert hist["train_accuracy"] == ref_hist["train_accuracy"]
        assert hist["val_accuracy"] == ref_hist["val_accuracy"]
        assert np.allclose(hist["train_loss"], ref_hist["train_loss"], rtol=1e-5)
        assert np.allclose(hist["val_loss"], ref_hist["val_loss"], rtol=1e-5)


def test_one_all_reduce_per_step():
    world, results, errors = _run_ranks(2, lambda c: (c, _train(c, 100, 10)))
    assert errors == [None, None]
    comm = results[0][0]
    assert comm.calls == 10  # one flat buffer per step, never one call per parameter


def test_drift_is_caught_and_names_the_rank():
    world, _, errors = _run_ranks(2, lambda c: _train(c, 60, 10, seed=c.rank))
    for e in errors:
        assert isinstance(e, DriftError)
        assert "fit start: rank 1 of 2 holds other weights" in str(e)
    assert sorted(world.aborted) == [0, 1]  # a failure inside fit aborts every rank


def test_shard_covers_each_batch_once():
    idx = np.arange(10, 17)  # m = 7 images over 3 ranks: 3, 2, 2
    comms = [Communicator(r, 3) for r in range(3)]
    parts = [c.shard(idx) for c in comms]
    assert [p.tolist() for p in parts] == [[10, 11, 12], [13, 14], [15, 16]]
    two = np.arange(2)  # m = 2 < 3 ranks: rank 2 gets a zero-weight stand-in
    assert [c.shard(two).tolist() for c in comms] == [[0], [1], [0]]
    assert [(c._count, c._total) for c in comms] == [(1, 2), (1, 2), (0, 2)]


# -- resolve -------------------------------------------------------------------------


def test_resolve_names_and_errors():
    assert resolve("none").size == 1 and resolve(None).is_root
    comm = Communicator(1, 4)
    assert resolve(comm) is comm and not comm.is_root

    class Plain:  # the Collectives protocol, no base class
        rank, size = 0, 1

        def allreduce_sum(self, buffer):
            return buffer

        def bcast(self, obj, root=0):
            return obj

        def allgather(self, obj):
            return [obj]

        def barrier(self):
            pass

        def abort(self, code=1):
            raise SystemExit(code)

    adapted = resolve(Plain())
    assert isinstance(adapted, Communicator) and adapted.is_root
    _train(adapted, 40, 8)
    with pytest.raises(ValueError, match="unknown distributed 'gloo'"):
        resolve("gloo")
    with pytest.raises(TypeError, match="distributed must be one of"):
        resolve(3)


@pytest.mark.parametrize(
    ("env", "size"),
    [
        ({}, None),
        ({"PMI_SIZE": "4"}, 4),
        ({"OMPI_COMM_WORLD_SIZE": "1"}, 1),
        ({"MV2_COMM_WORLD_SIZE": "2"}, 2),
        ({"PMIX_RANK": "0"}, 0),
    ],
)
def test_launched_world_size(env, size):
    assert distributed.launched_world_size(env) == size


def test_auto_in_a_plain_process_never_imports_mpi():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "OMPI_", "MV2_"))}
    code = (
        "import sys, xcnn.distributed as d; c = d.resolve('auto'); "
        "assert c.size == 1 and type(c) is d.Communicator, c; "
        "assert 'mpi4py' not in sys.modules; print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "ok", done.stderr


def test_missing_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails as if absent
    with pytest.raises(ImportError, match=r"pip install 'xcnn\[distributed\]'"):
        distributed._import_mpi("distributed='mpi'")


def test_digest_changes_with_weights_optimizer_and_shuffle():
    model = build_model("seed", seed=0)
    opt = xcnn.SGD(model, 0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    base = distributed.state_digest(model, opt, rng)
    assert distributed.state_digest(model, opt, np.random.default_rng(0)) == base
    rng.permutation(3)
    assert distributed.state_digest(model, opt, rng) != base
    rng = np.random.default_rng(0)
    opt.lr = 0.02
    assert distributed.state_digest(model, opt, rng) != base
    opt.lr = 0.01
    model.layers[0].params["weight"] = model.layers[0].params["weight"] * 1.0000001
    assert distributed.state_digest(model, opt, rng) != base


# -- NCCL, with fakes of CuPy, NCCL and MPI (no GPU here) -------------------------------


class _FakeNccl:
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0
    made: list = []

    @staticmethod
    def get_unique_id():
        return (1, 2, 3)

    class NcclCommunicator:
        def __init__(self, ndev, uid, rank):
            _FakeNccl.made.append((ndev, uid, rank))
            self.calls = []

        def allReduce(self, send, recv, count, dtype, op, stream):  # noqa: N802 (CuPy's name)
            self.calls.append((send, recv, count, dtype, op, stream))

        def abort(self):
            self.calls.append("abort")


class _FakeDeviceArray(np.ndarray):
    @property
    def data(self):
        return type("Mem", (), {"ptr": self.ctypes.data})()

    @property
    def device(self):
        return type("Dev", (), {"id": 0})()


def _fake_cupy():
    import contextlib
    import types

    cupy = types.ModuleType("cupy")
    cupy.ndarray = _FakeDeviceArray
    cupy.ascontiguousarray = lambda a: a

    class Device(contextlib.nullcontext):
        def __init__(self, index):
            super().__init__()
            self.index = index

        def use(self):
            cupy.current = self.index

    cupy.cuda = types.SimpleNamespace(
        nccl=_FakeNccl,
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 2),
        Device=Device,
        get_current_stream=lambda: types.SimpleNamespace(ptr=42, synchronize=lambda: None),
    )
    return cupy


class _FakeMPIComm:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def Get_rank(self):  # noqa: N802 (mpi4py's names)
        return self.rank

    def Get_size(self):  # noqa: N802
        return self.size

    def Split_type(self, kind, key=0):  # noqa: N802
        return type("Node", (), {"Get_rank": lambda s: self.rank % 2, "Free": lambda s: None})()

    def bcast(self, obj, root=0):
        return (1, 2, 3)

    def Abort(self, code):  # noqa: N802
        raise SystemExit(code)


@pytest.mark.skipif(not HAVE_MPI4PY, reason="NCCLCommunicator imports mpi4py's MPI constants")
def test_nccl_reduces_the_device_buffer_in_place(monkeypatch):
    cupy = _fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cupy.cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", _FakeNccl)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    comm = distributed.NCCLCommunicator(_FakeMPIComm(rank=3, size=4))
    assert (comm.rank, comm.size, comm.device) == (3, 4, 1)  # GPU = rank on its host
    assert cupy.current == 1
    assert _FakeNccl.made[-1] == (4, (1, 2, 3), 3)
    buf = np.arange(5, dtype=np.float32).view(_FakeDeviceArray)
    assert comm.allreduce_sum(buf) is buf
    assert comm.nccl_comm.calls == [(buf.ctypes.data, buf.ctypes.data, 5, 7, 0, 42)]
    with pytest.raises(TypeError, match="reduces CuPy device arrays"):
        comm.allreduce_sum(np.zeros(3, np.float32))
    with pytest.raises(SystemExit):
        comm.abort(1)
    assert comm.nccl_comm.calls[-1] == "abort"


# -- real MPI ranks ------------------------------------------------------------------------


def _env(threads: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    env.update(OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def _launch(ranks: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *args]
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=cwd)


def _trained(path: Path) -> tuple[dict, dict]:
    with np.load(path) as f:
        history = json.loads(str(f["history"]))
        return {k: f[k] for k in f.files if k != "history"}, history


@needs_mpi
def test_two_ranks_give_the_weights_of_one_process(tmp_path):
    """One epoch of SGD, float32, global batch 25 (shards 13 + 12), 4001 images (last batch 1)."""
    two = _launch(2, str(WORKER), "train", "mpi", "two.npz", "4001", "25", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    one = _launch(0, str(WORKER), "train", "none", "one.npz", "4001", "25", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    (w2, h2), (w1, h1) = _trained(tmp_path / "two.npz"), _trained(tmp_path / "one.npz")
    for key in w1:
        rel = np.linalg.norm(w2[key] - w1[key]) / np.linalg.norm(w1[key])
        assert rel < 1e-4, (key, rel)
    assert h2["train_accuracy"] == h1["train_accuracy"]
    assert h2["val_accuracy"] == h1["val_accuracy"]
    assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)


@needs_mpi
def test_cli_two_ranks_then_resume_on_one(tmp_path):
    common = ["--train-size", "1001", "--test-size", "200", "--optimizer", "sgd"]
    common += ["--batch-size", "25"]
    two = _launch(2, "-m", "xcnn", "train", *common, "--epochs", "1", "--save", "a.npz",
                  "--distributed", "mpi", cwd=tmp_path)  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("epoch 1:") == 1  # rank 0 alone prints
    more = _launch(0, "-m", "xcnn", "train", "--resume", "a.npz", "--epochs", "1", "--save",
                   "a.npz", cwd=tmp_path)  # fmt: skip
    assert more.returncode == 0, more.stderr
    ref = _launch(0, "-m", "xcnn", "train", *common, "--epochs", "2", "--save", "b.npz",
                  cwd=tmp_path)  # fmt: skip
    assert ref.returncode == 0, ref.stderr
    a, b = xcnn.io.load_checkpoint(tmp_path / "a.npz"), xcnn.io.load_checkpoint(tmp_path / "b.npz")
    assert a.epoch == b.epoch == 2
    assert _max_rel(a.model.state_dict(), b.model.state_dict()) < 1e-4
    assert a.rng_state == b.rng_state


@needs_mpi
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_stops_the_job(tmp_path, how):
    start = time.monotonic()
    done = _launch(2, str(WORKER), how, "mpi", "ck.npz", cwd=tmp_path)
    assert time.monotonic() - start < TIMEOUT  # bounded: no hang (the timeout would raise)
    assert done.returncode != 0
    if how == "raise":
        assert (
            "xcnn: error: rank 1 of 2 failed: RuntimeError: simulated failure on rank 1"
            in done.stderr
        )
    else:  # the launcher notices the dead rank and ends the job
        assert "BAD TERMINATION" in done.stdout + done.stderr
    ck = xcnn.io.load_checkpoint(tmp_path / "ck.npz")  # intact: written atomically
    assert ck.epoch in (1, 2)


@needs_mpi
def test_drift_between_real_ranks_fails_loudly(tmp_path):
    done = _launch(2, str(WORKER), "drift", "mpi", "x.npz", cwd=tmp_path)
    assert done.returncode != 0
    assert "epoch 2: rank 1 of 2 holds other weights" in done.stderr


@needs_mpi
def test_non_numpy_buffers_go_through_the_host(tmp_path):
    done = _launch(2, str(WORKER), "staging", "mpi", "-", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "rank 0 ok" in done.stdout and "rank 1 ok" in done.stdout, done.stdout


def test_dropout_streams_follow_rank_0_then_split():
    def target(comm):
        model = build_model("seed", seed=0)
        model.rng = np.random.default_rng(100 + comm.rank)  # ranks start apart
        comm.check_in_sync(model, None, None, "test")
        return model.rng.bit_generator.state

    _, states, errors = _run_ranks(2, target)
    assert errors == [None, None]
    shared = np.random.default_rng(100).bit_generator
    assert states[0] == shared.state  # rank 0: the shared stream, as checkpoints hold it
    assert states[1] == shared.jumped(1).state  # rank 1: its own stream
