"""One backend fixture, parametrized over every backend present.

- numpy and array_api_strict (its default device, "device1" and the
  float32-only "no_float64" device) always;
- cupy where CuPy imports and a CUDA device answers (marked ``gpu``);
- torch, JAX (``jax.numpy`` on the CPU) and Dask (``dask.array``, through
  array-api-compat) where they are installed.

JAX computes in float32 unless ``jax_enable_x64`` is set; it is set once
here, for the whole session, so float64 tests run on JAX as on the others
(the CLI test of ``--backend jax.numpy`` runs in a subprocess, without it).

``XCNN_BACKENDS=numpy,cupy`` narrows the set (names as in the test ids, e.g.
``strict-device1``). ``XCNN_REQUIRE_CUPY=1`` (set it on GPU runners) turns a
missing CuPy or GPU from a skip into a failure, so a GPU run can never pass
by skipping.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import pytest

import xcnn
from xcnn.backend import BackendError


@dataclass(frozen=True)
class Case:
    """One backend to test on: ``xcnn.Sequential(..., backend=case.spec, device=case.device)``."""

    id: str
    spec: Any
    device: Any = None
    float64: bool = True

    def resolve(self) -> xcnn.Backend:
        return xcnn.resolve_backend(self.spec, self.device)

    def model(self, layers, **kw) -> xcnn.Sequential:
        return xcnn.Sequential(layers, backend=self.spec, device=self.device, **kw)


def _cupy_status() -> str | None:
    """None if CuPy with a device is usable, else why not."""
    try:
        xcnn.resolve_backend("cupy")
    except BackendError as e:
        return str(e)
    return None


def _optional(case: Case, module: str, why: str) -> Any:
    """A case for an optional library: skipped, saying so, where it is not installed."""
    try:
        importlib.import_module(module)
    except ImportError:
        return pytest.param(case, id=case.id, marks=pytest.mark.skip(reason=f"{module} {why}"))
    return pytest.param(case, id=case.id)


try:
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:
    pass
try:
    import dask

    # The test arrays are small: one thread computes them faster than a pool wakes up.
    dask.config.set(scheduler="synchronous")
except ImportError:
    pass


def _cases() -> list:
    cases = [
        pytest.param(Case("numpy", "numpy"), id="numpy"),
        pytest.param(Case("strict", "array_api_strict"), id="strict"),
        pytest.param(Case("strict-device1", "array_api_strict", "device1"), id="strict-device1"),
        pytest.param(
            Case("strict-no_float64", "array_api_strict", "no_float64", float64=False),
            id="strict-no_float64",
        ),
    ]
    why = _cupy_status()
    require = os.environ.get("XCNN_REQUIRE_CUPY", "") not in ("", "0")
    marks = [pytest.mark.gpu]
    if why is not None and not require:
        marks.append(pytest.mark.skip(reason=f"CuPy backend unavailable: {why}"))
    # With XCNN_REQUIRE_CUPY set and CuPy missing, the case still runs and
    # fails on its first model: a GPU run can never pass by skipping.
    cases.append(pytest.param(Case("cupy", "cupy"), id="cupy", marks=marks))
    cases.append(_optional(Case("torch", "torch"), "torch", "not installed (optional)"))
    cases.append(_optional(Case("jax", "jax.numpy"), "jax", "not installed (pip install jax)"))
    cases.append(
        _optional(Case("dask", "dask.array"), "dask.array", "not installed (pip install dask)")
    )
    only = os.environ.get("XCNN_BACKENDS")
    if only:
        keep = {s.strip() for s in only.split(",")}
        cases = [c for c in cases if c.id in keep]
    return cases


BACKENDS = _cases()


@pytest.fixture(params=BACKENDS)
def backend(request) -> Case:
    """Every backend present; the test is written once and runs on each."""
    return request.param


@pytest.fixture(params=[c for c in BACKENDS if c.id != "numpy"])
def other_backend(request) -> Case:
    """Every backend except NumPy, for parity tests against NumPy."""
    return request.param


def pytest_report_header(config) -> list[str]:
    why = _cupy_status()
    return [
        "xcnn backends: " + ", ".join(c.id for c in BACKENDS),
        "cupy: " + ("available" if why is None else f"not tested ({why})"),
    ]
