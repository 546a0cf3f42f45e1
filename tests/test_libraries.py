"""Any array library for real: names, devices, immutable (JAX) and lazy (Dask) arrays.

The entry-point tests run on array_api_strict's "device1", which raises on
any operation mixing devices: an array made without ``device=`` (it lands on
the default CPU_DEVICE) fails them at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xcnn
from xcnn import functional as F
from xcnn.backend import BackendError
from xcnn.testing import check_gradients, check_parity

ROOT = Path(__file__).resolve().parents[1]
DEVICE1 = ("array_api_strict", "device1")


def small_net():
    return [
        xcnn.Conv2D(1, 3, 3, padding="same"),
        xcnn.ReLU(),
        xcnn.MaxPool2D(2),
        xcnn.Conv2D(3, 4, 2, stride=2, padding=1),
        xcnn.AvgPool2D(2, stride=1),
        xcnn.Flatten(),
        xcnn.Dense(4 * 2 * 2, 3),
    ]


def data(n=6, hw=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, hw, hw)), rng.integers(0, 3, n)


# ----------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    "spec,name",
    [
        ("numpy", "numpy"),
        ("torch", "torch"),
        ("jax.numpy", "jax.numpy"),
        ("dask.array", "dask.array"),
        ("array_api_strict", "array_api_strict"),
        ("array_api_compat.numpy", "numpy"),
        ("array_api_compat.dask.array", "dask.array"),
    ],
)
def test_backends_by_module_name(spec, name):
    pytest.importorskip(spec.partition(".")[0])
    backend = xcnn.resolve_backend(spec)
    assert backend.name == name
    assert xcnn.resolve_backend(backend.name).xp is backend.xp  # the name round-trips
    x = backend.asarray(np.ones((2, 3)), "float32")
    assert backend.owns(x)


def test_backends_by_module_object():
    import array_api_strict
    import dask.array
    import jax.numpy

    assert xcnn.resolve_backend(dask.array).name == "dask.array"
    assert xcnn.resolve_backend(jax.numpy).name == "jax.numpy"
    assert xcnn.resolve_backend(array_api_strict, "device1").device == array_api_strict.Device(
        "device1"
    )


def test_a_module_that_is_no_array_library_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'json': the module is not an array-API"):
        xcnn.resolve_backend("json")
    with pytest.raises(ValueError, match="json is not an array-API namespace"):
        xcnn.resolve_backend(json)
    with pytest.raises(ValueError, match="unknown backend 'no_such_lib'"):
        xcnn.resolve_backend("no_such_lib")


def test_jax_default_device_is_where_its_arrays_land():
    jnp = pytest.importorskip("jax.numpy")
    assert jnp.__array_namespace_info__().default_device() is None  # why this matters
    backend = xcnn.resolve_backend("jax.numpy")
    assert backend.device is not None
    assert backend.owns(jnp.zeros(3))


def test_torch_devices_compare_canonically():
    from xcnn.backend import _same_device

    assert _same_device("cuda", "cuda:0") and not _same_device("cuda:0", "cuda:1")
    torch = pytest.importorskip("torch")
    assert _same_device(torch.device("cuda"), torch.device("cuda:0"))
    backend = xcnn.resolve_backend("torch", "cpu")
    assert backend.owns(torch.zeros(2))
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="torch cannot use device 'cuda'"):
            xcnn.resolve_backend("torch", "cuda")


def test_cli_backend_takes_module_names(capsys):
    from xcnn import cli

    status = cli.main(["train", "--backend", "json", "--train-size", "10", "--no-progress"])
    err = capsys.readouterr().err
    assert status != 0 and err.startswith("xcnn: error:") and "unknown backend 'json'" in err


# ----------------------------------------------------------------------------- arrays in
def _libraries():
    libs = [("numpy", None), ("array_api_strict", "device1"), ("torch", None)]
    libs += [("jax.numpy", None), ("dask.array", None)]
    return libs


@pytest.mark.parametrize("source", _libraries(), ids=lambda s: s[0])
@pytest.mark.parametrize("target", _libraries(), ids=lambda s: s[0])
def test_asarray_and_load_state_dict_take_any_library(source, target):
    """DLPack where both sides speak it, else the host: values and dtype arrive intact."""
    pytest.importorskip(source[0].partition(".")[0])
    pytest.importorskip(target[0].partition(".")[0])
    src = xcnn.Sequential(small_net(), backend=source[0], device=source[1], dtype="float64")
    dst = xcnn.Sequential(small_net(), backend=target[0], device=target[1], dtype="float32", seed=9)
    host = np.arange(6.0).reshape(2, 3)
    arr = dst.asarray(src.asarray(host))
    assert dst.backend.owns(arr) and arr.dtype == dst.backend.dtype("float32")
    np.testing.assert_array_equal(xcnn.to_numpy(arr), host)
    # Parameters as the source library's arrays, straight into the target model.
    state = {key: layer.params[name] for key, layer, name in src.named_params()}
    dst.load_state_dict(state)
    for key, value in dst.state_dict().items():
        np.testing.assert_allclose(value, src.state_dict()[key], rtol=1e-6)
    assert all(dst.backend.owns(layer.params[n]) for _, layer, n in dst.named_params())


# ----------------------------------------------------------------------------- device1
def test_every_entry_point_on_a_second_device(tmp_path):
    """Models, layers, losses, optimizers, checkers and plots on strict's device1."""
    x, y = data()
    model = xcnn.Sequential(small_net(), backend=DEVICE1[0], device=DEVICE1[1], dtype="float64")
    assert str(model.device) == "array_api_strict.Device('device1')"
    xd, yd = model.asarray(x), model.asarray(y)
    for name in ("sgd", "momentum", "adam"):
        opt = xcnn.make_optimizer(name, model, 0.01)
        for _ in range(2):
            loss, d = xcnn.softmax_cross_entropy(model.forward(xd), yd)
            model.backward(d)
            opt.step()
        for _, layer, pname in model.named_params():
            assert model.backend.owns(layer.params[pname])
        opt.load_state_dict(opt.state_dict())  # state arrays back onto device1
        opt.step()
    # Layers called directly, and the functional ops under them.
    conv = xcnn.Conv2D(1, 2, 4, stride=2, padding=1).build(model.backend, "float64")
    yc = conv.forward(xd)
    assert model.backend.owns(conv.backward(yc))
    pool = xcnn.AvgPool2D(3, stride=2).build(model.backend)
    assert model.backend.owns(pool.backward(pool.forward(xd)))
    mp = xcnn.MaxPool2D(2).build(model.backend)
    assert model.backend.owns(mp.backward(mp.forward(xd)))
    assert model.backend.owns(F.log_softmax(model.forward(xd)))
    # Checkers.
    assert check_gradients(conv, x[:2], max_entries=20).ok(1e-6)
    assert check_gradients(model, x[:2], max_entries=10).ok(1e-6)
    report = check_parity(small_net, x, labels=y, backends=["numpy", DEVICE1], dtype="float64")
    assert report.ok(), str(report)
    # Training loops and plots.
    history = xcnn.fit(model, xcnn.make_optimizer("sgd", model, 0.1), (x * 255).astype(np.uint8),
                       y, epochs=1, batch_size=4, progress=False)  # fmt: skip
    assert len(history["train_loss"]) == 1
    assert xcnn.evaluate(model, x, y)["confusion"].sum() == len(y)
    assert xcnn.predict(model, x).shape == (len(y), 3)
    pytest.importorskip("matplotlib")
    from xcnn import plots

    paths = plots.training_plots(
        tmp_path, history=history, model=model, confusion=np.eye(3, dtype=int), image=x[0, 0]
    )
    assert all(p.exists() for p in paths)


def test_the_second_device_really_refuses_mixing():
    """What makes the test above meaningful: one array on the wrong device raises."""
    import array_api_strict as xps

    a = xps.ones(3, device=xps.Device("device1"))
    with pytest.raises(ValueError):
        a + xps.ones(3)


# ----------------------------------------------------------------------------- lazy arrays
def test_dask_graphs_stay_bounded_over_many_steps():
    """After each step the parameters are persisted: their graphs never grow."""
    pytest.importorskip("dask")
    x, y = data(n=8)
    model = xcnn.Sequential(small_net(), backend="dask.array", dtype="float64")
    opt = xcnn.make_optimizer("adam", model, 0.01)
    xd, yd = model.asarray(x), model.asarray(y)
    sizes = []
    for _ in range(24):
        loss, d = xcnn.softmax_cross_entropy(model.forward(xd), yd)
        model.backward(d, input_grad=False)
        opt.step()
        sizes.append(
            sum(len(layer.params[n].__dask_graph__()) for _, layer, n in model.named_params())
            + sum(len(v.__dask_graph__()) for slots in opt.state.values() for v in slots.values())
        )
    # One task per chunk of each persisted array, the same after every step.
    assert max(sizes) == min(sizes), sizes


def test_dask_graphs_would_grow_without_the_hook(monkeypatch):
    """The check above can fail: with materialise switched off the graphs grow every step."""
    pytest.importorskip("dask")
    monkeypatch.setattr(xcnn.Backend, "materialise", lambda self, *a: a)
    x, y = data(n=4)
    model = xcnn.Sequential(small_net(), backend="dask.array", dtype="float64")
    opt = xcnn.make_optimizer("sgd", model, 0.01)
    xd, yd = model.asarray(x), model.asarray(y)
    sizes = []
    for _ in range(3):
        loss, d = xcnn.softmax_cross_entropy(model.forward(xd), yd)
        model.backward(d, input_grad=False)
        opt.step()
        sizes.append(len(model.layers[0].params["weight"].__dask_graph__()))
    assert sizes[0] < sizes[1] < sizes[2]


# ----------------------------------------------------------------------------- JAX
def test_jax_arrays_are_immutable_and_the_generic_code_never_writes():
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.asarray(np.random.default_rng(0).random((2, 3, 5, 5)))
    w = jnp.asarray(np.random.default_rng(1).random((4, 3, 2, 2)))
    y, saved = F.conv2d(x, w, None, stride=2, padding=1)  # padding and fold
    dx, dw, db = F.conv2d_backward(jnp.ones(y.shape), saved, w, stride=2, padding=1)
    xh, wh = np.asarray(x), np.asarray(w)
    saved_h = F.conv2d(xh, wh, None, stride=2, padding=1)[1]
    ref = F.conv2d_backward(np.ones(y.shape), saved_h, wh, stride=2, padding=1)
    np.testing.assert_allclose(np.asarray(dx), ref[0], rtol=1e-12)
    with pytest.raises(TypeError):
        x[0, 0, 0, 0] = 1.0  # noqa: B018 -- JAX refuses what the old _pad/fold did


def test_xcnn_train_with_jax_numpy(tmp_path):
    """``xcnn train --backend jax.numpy`` end to end, in float32 without x64 (a fresh process)."""
    pytest.importorskip("jax")
    argv = [sys.executable, "-W", "error", "-m", "xcnn", "train", "--backend", "jax.numpy",
            "--train-size", "60", "--test-size", "20", "--epochs", "1", "--no-progress",
            "--save", str(tmp_path / "jax.npz")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("JAX_ENABLE_X64", None)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "jax.numpy backend" in done.stdout


# ----------------------------------------------------------------------------- read-only NumPy
def _readonly(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("path", ["kernels", "generic"])
def test_nothing_writes_into_inputs_parameters_or_gradients(path):
    """Read-only NumPy arrays everywhere (STYLE.md): a hidden in-place write would raise."""
    from contextlib import nullcontext

    from xcnn import kernels

    x, y = data()
    with kernels.disabled("numpy") if path == "generic" else nullcontext():
        for name in ("sgd", "momentum", "adam"):
            model = xcnn.Sequential(small_net(), dtype="float64", seed=1)
            opt = xcnn.make_optimizer(name, model, 0.01)
            for _ in range(2):
                for _, layer, pname in model.named_params():
                    layer.params[pname] = _readonly(layer.params[pname])
                loss, d = xcnn.softmax_cross_entropy(model.forward(_readonly(x)), _readonly(y))
                model.backward(_readonly(d))
                for layer in model.layers:
                    layer.grads = {k: _readonly(v) for k, v in layer.grads.items()}
                for slots in opt.state.values():
                    slots.update({k: _readonly(v) for k, v in slots.items()})
                opt.step()
