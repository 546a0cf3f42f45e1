"""Run the CuPy kernel set on the CPU: its exact CUDA sources, compiled as C++ by the host compiler.

Two tools for tests that have no GPU:

- :func:`host_kernel` compiles one source of :mod:`xcnn.kernels.cuda_sources`
  with a tiny shim (``__global__`` and ``__device__`` vanish, the launch is one
  thread of one block, so each kernel's grid-stride loop visits every output
  element in turn) and returns a callable that takes CuPy-style launch
  arguments (NumPy arrays and NumPy scalars);
- :func:`load_on_host` imports :mod:`xcnn.kernels.cupy` under another name with
  a fake ``cupy`` module made of NumPy functions and :func:`host_kernel`, so the
  Python around the kernels (chunking, geometry, argument order) runs too.

What this cannot check: anything about parallel execution (the kernels write
each output element once and read only inputs, so there are no races to find),
CUDA's float rounding (the host compiler runs with ``-ffp-contract=off``), and
cuBLAS (NumPy's matmul stands in).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np

from xcnn.kernels.cuda_sources import CTYPES, cuda_source

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")

_SHIM = r"""
#include <cmath>
struct xcnn_dim3 { unsigned x; };
static const xcnn_dim3 blockIdx = {0}, threadIdx = {0}, blockDim = {1}, gridDim = {1};
#define __global__
#define __device__
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
using std::exp; using std::log; using std::sqrt;
"""

_BUILD = Path(tempfile.mkdtemp(prefix="xcnn-host-kernels-"))


def _param_types(source: str, name: str) -> list[str]:
    """The C types of ``name``'s parameters, read from its definition in ``source``."""
    m = re.search(rf"{name}\s*\((.*?)\)\s*\{{", source, re.S)
    if m is None:
        raise ValueError(f"no definition of {name} in its source")
    return [" ".join(p.split()[:-1]) for p in m.group(1).split(",")]


def host_kernel(name: str, dtype: str, label_dtype: str = "int64") -> Any:
    """Compile kernel ``name`` for the host; call as ``k(grid, block, args)``, as a RawKernel."""
    return compile_host(cuda_source(name, dtype, label_dtype), name, dtype)


@functools.cache
def compile_host(source: str, name: str, dtype: str) -> Any:
    """Compile one kernel source (as :func:`~xcnn.kernels.cuda_sources.cuda_source` gives it)."""
    if CXX is None:
        raise RuntimeError("no C++ compiler (g++) on this machine")
    stem = _BUILD / f"{name}_{abs(hash(source)):x}"
    stem.with_suffix(".cpp").write_text(_SHIM + source)
    lib = stem.with_suffix(".so")
    cmd = [CXX, "-O1", "-shared", "-fPIC", "-ffp-contract=off", "-o", str(lib)]
    subprocess.run([*cmd, str(stem.with_suffix(".cpp"))], check=True, capture_output=True)
    func = getattr(ctypes.CDLL(str(lib)), name)
    float_c = ctypes.c_float if dtype == "float32" else ctypes.c_double
    scalars = {
        "int": ctypes.c_int,
        "long long": ctypes.c_longlong,
        "T": float_c,
    }
    types_ = _param_types(source, name)
    func.argtypes = [ctypes.c_void_p if t.endswith("*") else scalars[t] for t in types_]
    func.restype = None

    def call(grid: tuple, block: tuple, args: tuple) -> None:
        if len(args) != len(types_):
            raise TypeError(f"{name}: {len(args)} arguments for {len(types_)} parameters")
        cargs = []
        for a, t in zip(args, types_, strict=True):
            if t.endswith("*"):
                if not (isinstance(a, np.ndarray) and a.flags.c_contiguous):
                    raise TypeError(f"{name}: pointer argument must be a contiguous array")
                if not t.startswith("const") and not a.flags.writeable:
                    raise TypeError(f"{name}: output argument is read-only")
                cargs.append(a.ctypes.data)
            else:
                if not isinstance(a, np.generic):
                    raise TypeError(f"{name}: scalar {a!r} must be a NumPy scalar (as for CuPy)")
                if t == "T" and a.dtype != np.dtype(dtype):
                    raise TypeError(f"{name}: float scalar of dtype {a.dtype}, kernel is {dtype}")
                cargs.append(a.item())
        func(*cargs)

    return call


class _HostRawKernel:
    def __init__(self, code: str, name: str, **_: Any) -> None:
        # Recover which dtype the kernel set asked for from the typedefs it wrote.
        ctype = re.search(r"typedef (\w+) T;", code).group(1)
        dtype = {v: k for k, v in CTYPES.items()}[ctype]
        self._call = compile_host(code, name, dtype)

    def __call__(self, grid: tuple, block: tuple, args: tuple) -> None:
        self._call(grid, block, args)


def fake_cupy() -> types.ModuleType:
    """A ``cupy`` stand-in with just what xcnn/kernels/cupy.py uses, over NumPy."""
    m = types.ModuleType("cupy")
    m.RawKernel = _HostRawKernel
    m.bool_, m.uint8 = np.bool_, np.uint8
    for name in ("empty", "zeros", "empty_like", "ascontiguousarray", "matmul", "sum"):
        setattr(m, name, getattr(np, name))
    return m


def load_on_host(registered: dict[str, Any] | None = None) -> types.ModuleType:
    """Import xcnn/kernels/cupy.py afresh over :func:`fake_cupy`, registering nothing.

    ``registered`` (if given) receives ``op -> function`` for every ``@register``.
    """
    import xcnn.kernels as seam

    record = {} if registered is None else registered

    def register(lib: str, op: str) -> Any:
        assert lib == "cupy" and op in seam.OPS, (lib, op)

        def deco(func: Any) -> Any:
            record[op] = func
            return func

        return deco

    name = "xcnn.kernels._cupy_on_host"
    spec = importlib.util.spec_from_file_location(name, ROOT / "xcnn" / "kernels" / "cupy.py")
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("cupy"), seam.register
    sys.modules["cupy"], seam.register = fake_cupy(), register
    try:
        spec.loader.exec_module(module)
    finally:
        if saved[0] is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved[0]
        seam.register = saved[1]
    return module
