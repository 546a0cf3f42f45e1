"""Bad input gets a clear error, raised before any compute, that says what is wrong."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import xcnn
from xcnn.layers import ShapeError


def tutorial_net(**kw):
    layers = [xcnn.Conv2D(1, 8, 3), xcnn.MaxPool2D(2), xcnn.Flatten(), xcnn.Dense(13 * 13 * 8, 10)]
    return xcnn.Sequential(layers, **kw)


@pytest.mark.parametrize(
    "shape,pattern",
    [
        (
            (1, 28, 28),
            r"Conv2D\(1, 8, kernel_size=3\): expected a 4-D input .*got shape \(1, 28, 28\)",
        ),
        (
            (2, 3, 28, 28),
            r"Conv2D\(1, 8, kernel_size=3\): expected input \(N, C=1, H, W\).*\(2, 3, 28, 28\)",
        ),
        ((2, 1, 2, 28), r"Conv2D\(1, 8, kernel_size=3\).*H >= 3.*\(2, 1, 2, 28\)"),
        ((2, 1, 30, 30), r"Dense\(1352, 10\): expected input \(N, 1352\), got shape \(2, 1568\)"),
    ],
)
def test_wrong_shapes_name_the_layer_and_shapes(backend, shape, pattern):
    model = tutorial_net(backend=backend.spec, device=backend.device)
    with pytest.raises(ShapeError, match=pattern):
        model.forward(model.asarray(np.zeros(shape, np.float32)))


def test_shape_error_comes_before_any_compute(monkeypatch):
    model = tutorial_net()
    called = []
    monkeypatch.setattr(xcnn.functional, "conv2d", lambda *a, **k: called.append(1))
    with pytest.raises(ShapeError):
        model.forward(np.zeros((1, 2, 28, 28), np.float32))
    assert not called


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.bool_])
def test_non_float_input_is_refused(backend, dtype):
    model = tutorial_net(backend=backend.spec, device=backend.device)
    x = model.asarray(np.zeros((1, 1, 28, 28), dtype))
    with pytest.raises(TypeError, match=r"dtype .*(uint8|int64|bool).*x / 255"):
        model.forward(x)
    layer = xcnn.ReLU().build(backend.spec)
    with pytest.raises(TypeError, match=r"ReLU\(\): expected a floating-point input"):
        layer.forward(x)


def test_wrong_float_dtype_is_refused():
    model = tutorial_net(dtype="float32")
    with pytest.raises(TypeError, match="float64.*does not match the model's float32"):
        model.forward(np.zeros((1, 1, 28, 28)))


def test_labels_checked(backend):
    b = backend.resolve()
    logits = b.asarray(np.zeros((3, 4)), "float32")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), got values in \[0, 4\]"):
        xcnn.softmax_cross_entropy(logits, b.asarray(np.array([0, 1, 4])))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\), got values in \[-1, 1\]"):
        xcnn.softmax_cross_entropy(logits, b.asarray(np.array([0, 1, -1])))
    with pytest.raises(ValueError, match=r"expected labels of shape \(3,\), got \(2,\)"):
        xcnn.softmax_cross_entropy(logits, b.asarray(np.array([0, 1])))
    with pytest.raises(TypeError, match="labels must be integer class indices, got dtype"):
        xcnn.softmax_cross_entropy(logits, b.asarray(np.array([0.0, 1.0, 2.0]), "float32"))


def test_logits_checked():
    with pytest.raises(ValueError, match=r"expected logits \(N, K\), got shape \(3,\)"):
        xcnn.softmax_cross_entropy(np.zeros(3), np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="logits must be floating"):
        xcnn.softmax_cross_entropy(np.zeros((3, 2), int), np.array([0, 1, 1]))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"unknown backend 'jax-gpu': use 'numpy', 'cupy'"):
        tutorial_net(backend="jax-gpu")
    with pytest.raises(ValueError, match="not an array-API namespace"):
        tutorial_net(backend=sys)
    with pytest.raises(ValueError, match="array_api_strict has no device 'device9'"):
        tutorial_net(backend="array_api_strict", device="device9")
    with pytest.raises(ValueError, match="dtype must be one of"):
        tutorial_net(dtype="float16")


def test_missing_cupy_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(xcnn.BackendError, match=r"pip install 'xcnn\[cuda12\]'.*backend='numpy'"):
        tutorial_net(backend="cupy")


def test_cupy_without_a_device_says_so(monkeypatch):
    import types

    class CUDARuntimeError(RuntimeError):
        pass

    def no_device():
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_device))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(xcnn.BackendError, match="no CUDA device answers.*use backend='numpy'"):
        tutorial_net(backend="cupy")
    fake.cuda.runtime.getDeviceCount = lambda: 1
    with pytest.raises(xcnn.BackendError, match=r"CUDA device 3 does not exist.*valid: 0..0"):
        tutorial_net(backend="cupy", device=3)


def test_no_float64_device_refuses_float64():
    with pytest.raises(xcnn.BackendError, match="does not support float64"):
        tutorial_net(backend="array_api_strict", device="no_float64", dtype="float64")


def test_array_from_another_backend_or_device(backend):
    model = tutorial_net(backend="array_api_strict", device="device1")
    with pytest.raises(
        TypeError, match=r"input is a numpy array .*array_api_strict device.*model.asarray"
    ):
        model.forward(np.zeros((1, 1, 28, 28), np.float32))
    other = xcnn.resolve_backend("array_api_strict", "device2").asarray(
        np.zeros((1, 1, 28, 28)), "float32"
    )
    with pytest.raises(TypeError, match=r"array_api_strict array on device .*device2.*device1"):
        model.forward(other)
    if backend.id != "numpy":
        x = backend.resolve().asarray(np.zeros((1, 1, 28, 28)), "float32")
        with pytest.raises(TypeError, match="model.asarray"):
            tutorial_net().forward(x)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="Conv2D: channels, kernel_size and stride must be >= 1"):
        xcnn.Conv2D(1, 8, 3, stride=0)
    with pytest.raises(ValueError, match="padding must be 'valid', 'same' or an int"):
        xcnn.Conv2D(1, 8, 3, padding="full")
    with pytest.raises(ValueError, match="MaxPool2D: kernel_size and stride must be >= 1"):
        xcnn.MaxPool2D(0)
    with pytest.raises(ValueError, match="unknown initialiser 'lecun'"):
        xcnn.Sequential([xcnn.Dense(3, 2, init="lecun")])
    with pytest.raises(TypeError, match="item 1 is not a Layer"):
        xcnn.Sequential([xcnn.ReLU(), "relu"])


def test_backward_before_forward():
    with pytest.raises(RuntimeError, match=r"Dense\(3, 2\): backward\(\) called without a forward"):
        xcnn.Dense(3, 2).build().backward(np.zeros((1, 2), np.float32))


def test_step_before_backward():
    model = tutorial_net()
    with pytest.raises(RuntimeError, match="call model.backward"):
        xcnn.SGD(model, 0.1).step()
