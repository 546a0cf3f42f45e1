"""ONNX and safetensors export, with ONNX Runtime and safetensors.numpy as the oracles."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import xcnn
from xcnn import cli, export
from xcnn.training import SCALES, scale_images

onnx = pytest.importorskip("onnx", reason="onnx is in the 'export' and 'test' extras")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the 'export' and 'test' extras")
st_numpy = pytest.importorskip(
    "safetensors.numpy", reason="safetensors is in the 'export' and 'test' extras"
)

TOL = 1e-4  # float32: the bound on |ONNX Runtime - xcnn|
NEW_LAYERS = ("BatchNorm2D", "Dropout", "GlobalAvgPool2D", "Residual")
needs_new_layers = pytest.mark.skipif(
    not all(hasattr(xcnn, name) for name in NEW_LAYERS),
    reason="BatchNorm2D, Dropout, GlobalAvgPool2D and Residual come with the framework "
    "branch (#11); their converters are written against its contract and run after the merge",
)


@pytest.fixture(scope="module")
def sample():
    return xcnn.datasets.sample()


def perturbed(model, seed=0):
    """Random non-zero biases and running statistics, so every parameter matters."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, value in model.state_dict().items():
        noise = rng.normal(0, 0.1, value.shape)
        if key.endswith("running_var"):
            noise = np.abs(noise) * 5 + 0.5
        elif key.endswith("weight"):
            noise = value  # keep the initialisation's scale
        state[key] = noise.astype(value.dtype)
    model.load_state_dict(state)
    return model


def run_onnx(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images})


def xcnn_logits(model, images, scale):
    """xcnn's own output for images = pixels / 255 (float32), scaled as the model is."""
    shift, div = SCALES[scale]
    x = model.asarray(((images - np.float32(shift)) / np.float32(div)).astype(np.float32))
    return np.asarray(xcnn.to_numpy(model.forward(x, train=False)))


def check_model(model, tmp_path, images, *, scale="centered", probabilities=True, **kw):
    path = export.to_onnx(
        model, tmp_path / "m.onnx", probabilities=probabilities, scale=scale, **kw
    )
    outputs = run_onnx(path, images)
    want = xcnn_logits(model, images, scale)
    assert outputs[0].shape == want.shape and outputs[0].dtype == np.float32
    assert np.abs(outputs[0] - want).max() <= TOL, np.abs(outputs[0] - want).max()
    if probabilities:
        e = np.exp(want - want.max(axis=1, keepdims=True))
        assert np.abs(outputs[1] - e / e.sum(axis=1, keepdims=True)).max() <= TOL
    return path


# -- every named model, on the embedded sample ------------------------------------------------


@pytest.mark.parametrize("name", sorted(xcnn.models.MODELS))
def test_every_named_model_matches_onnx_runtime(name, sample, tmp_path):
    model = perturbed(xcnn.build_model(name, seed=1))
    images = sample.x_test[:100].astype(np.float32) / 255  # pixels / 255, as the graph takes
    path = check_model(model, tmp_path, images)
    # The graph's output equals xcnn's own predict() on the raw uint8 images too.
    probs = run_onnx(path, images)[1]
    assert np.abs(probs - np.asarray(xcnn.predict(model, sample.x_test[:100]))).max() <= TOL


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_input_scaling_is_inside_the_graph(scale, sample, tmp_path):
    model = perturbed(xcnn.build_model("seed"))
    images = sample.x_test[:50].astype(np.float32) / 255
    check_model(model, tmp_path, images, scale=scale)
    # scale_images on uint8 is the same scaling the graph holds.
    x = scale_images(sample.x_test[:50], scale, np.float32)
    want = xcnn.to_numpy(model.forward(model.asarray(x), train=False))
    assert np.abs(run_onnx(tmp_path / "m.onnx", images)[0] - want).max() <= TOL


def test_the_check_can_fail(sample, tmp_path):
    """A graph with the wrong scaling, or one wrong weight, is caught by the comparison."""
    model = perturbed(xcnn.build_model("seed"))
    images = sample.x_test[:50].astype(np.float32) / 255
    path = export.to_onnx(model, tmp_path / "m.onnx", scale="unit")
    assert np.abs(run_onnx(path, images)[0] - xcnn_logits(model, images, "centered")).max() > 0.01
    proto = onnx.load(str(path))
    w = onnx.numpy_helper.to_array(proto.graph.initializer[0]).copy()
    w.flat[0] += 1e-2
    proto.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "0.weight"))
    onnx.save(proto, str(path))
    assert np.abs(run_onnx(path, images)[0] - xcnn_logits(model, images, "unit")).max() > TOL


# -- every layer and option ------------------------------------------------------------------


def conv_net(padding, stride, kernel, bias, pool, c=2, h=11, w=9):
    pooled = xcnn.MaxPool2D(3, stride=2) if pool == "max" else xcnn.AvgPool2D(2)
    layers = [xcnn.Conv2D(c, 3, kernel, stride=stride, padding=padding, bias=bias), xcnn.ReLU()]
    model = xcnn.Sequential([*layers, pooled], seed=3)
    shape = tuple(model.forward(model.asarray(np.zeros((1, c, h, w), np.float32))).shape[1:])
    tail = [xcnn.Flatten(), xcnn.Dense(int(np.prod(shape)), 4, bias=bias), xcnn.Softmax()]
    return perturbed(xcnn.Sequential([*layers, pooled, *tail], seed=3))


@pytest.mark.parametrize("padding", ["valid", "same", 1, 2])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("kernel", [3, 2, (2, 3)])
def test_conv_paddings_strides_kernels(padding, stride, kernel, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((3, 2, 11, 9), dtype=np.float32)
    bias, pool = stride != 2, "max" if stride != 3 else "avg"
    model = conv_net(padding, stride, kernel, bias, pool)
    # Known input size: explicit pads from xcnn's rule. Unknown: auto_pad for "same".
    check_model(model, tmp_path, images, input_shape=(2, 11, 9))
    conv_only = perturbed(
        xcnn.Sequential([xcnn.Conv2D(2, 3, kernel, stride=stride, padding=padding)], seed=4)
    )
    for h, w in [(11, 9), (8, 13), (7, 7)]:
        x = rng.random((2, 2, h, w), dtype=np.float32)
        check_model(conv_only, tmp_path, x, probabilities=False)


def test_pools_drop_incomplete_windows(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.random((2, 3, 7, 10), dtype=np.float32)
    for pool in (xcnn.MaxPool2D(2), xcnn.AvgPool2D(3, stride=2), xcnn.MaxPool2D(3, stride=1)):
        model = xcnn.Sequential([pool])
        check_model(
            model, tmp_path, images, scale="unit", input_shape=(3, 7, 10), probabilities=False
        )


def test_dense_without_bias_and_float64_models(sample, tmp_path):
    layers = [xcnn.Flatten(), xcnn.Dense(784, 16, bias=False), xcnn.ReLU(), xcnn.Dense(16, 10)]
    model = perturbed(xcnn.Sequential(layers, dtype="float64", seed=2))
    images = sample.x_test[:20].astype(np.float32) / 255
    check_model(model, tmp_path, images, scale="standard", input_shape=(1, 28, 28))


def test_any_backend_exports(backend, sample, tmp_path):
    model = xcnn.build_model("seed", backend=backend.spec, device=backend.device)
    perturbed(model)
    check_model(model, tmp_path, sample.x_test[:20].astype(np.float32) / 255)


def new_layers_model():
    """Every layer of the framework branch (#11), nested Residuals included."""
    bn = xcnn.BatchNorm2D
    block = xcnn.Residual([xcnn.Conv2D(4, 4, 3, padding="same"), bn(4), xcnn.ReLU()])
    projected = xcnn.Residual(
        [xcnn.Conv2D(4, 6, 3, stride=2, padding="same"), bn(6), xcnn.Dropout(0.3)],
        shortcut=[xcnn.Conv2D(4, 6, 1, stride=2), bn(6)],
    )
    nested = xcnn.Residual([xcnn.Residual([xcnn.Conv2D(6, 6, 3, padding=1)]), xcnn.ReLU()])
    layers = [xcnn.Conv2D(1, 4, 3), bn(4), xcnn.ReLU(), block, projected, nested]
    layers += [xcnn.GlobalAvgPool2D(), xcnn.Dropout(0.5), xcnn.Dense(6, 10)]
    return perturbed(xcnn.Sequential(layers, input_shape=(1, 28, 28), seed=5))


@needs_new_layers
def test_batchnorm_dropout_global_pool_residual(sample, tmp_path):
    model = new_layers_model()
    model.eval()
    images = sample.x_test[:30].astype(np.float32) / 255
    path = check_model(model, tmp_path, images)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    for op in ("BatchNormalization", "GlobalAveragePool", "Add", "Identity"):
        assert op in ops
    names = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert set(model.state_dict()) <= names  # initializers named as the state dict


@needs_new_layers
def test_batchnorm_statistics_in_safetensors(tmp_path):
    model = new_layers_model()
    path = export.to_safetensors(model, tmp_path / "m.safetensors")
    tensors = st_numpy.load_file(str(path))
    assert any(k.endswith("running_mean") for k in tensors)
    assert any(".layers." in k and k.endswith("running_var") for k in tensors)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(tensors[key], value)
    again = xcnn.load(path)
    x = again.asarray(np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32))
    model.eval(), again.eval()
    np.testing.assert_array_equal(xcnn.to_numpy(again.forward(x)), xcnn.to_numpy(model.forward(x)))


# -- graph interface and errors -----------------------------------------------------------------


def test_graph_interface_and_metadata(tmp_path):
    model = xcnn.build_model("seed")
    path = export.to_onnx(model, tmp_path / "m.onnx", probabilities=True, input_shape=(1, 28, 28))
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import] == [export.DEFAULT_OPSET]
    (inp,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "images" and dims == ["N", 1, 28, 28]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["xcnn.config"]) == model.config() and meta["xcnn.scale"] == "centered"
    assert proto.producer_name == "xcnn"
    plain = onnx.load(str(export.to_onnx(model, tmp_path / "p.onnx")))
    assert [o.name for o in plain.graph.output] == ["logits"]
    # Without a known input shape, the channels come from the first layer; H, W are dynamic.
    conv = xcnn.Sequential([xcnn.Conv2D(3, 2, 3, padding="same")])
    assert getattr(conv, "input_shape", None) is None
    proto = onnx.load(str(export.to_onnx(conv, tmp_path / "c.onnx")))
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]


@pytest.mark.parametrize("opset", [export.MIN_OPSET, 15, 18, 21])
def test_opsets(opset, sample, tmp_path):
    model = perturbed(xcnn.build_model("seed"))
    path = check_model(model, tmp_path, sample.x_test[:10].astype(np.float32) / 255, opset=opset)
    assert onnx.load(str(path)).opset_import[0].version == opset


def test_errors(tmp_path):
    model = xcnn.build_model("seed")
    with pytest.raises(ValueError, match="opset must be an int from 13"):
        export.to_onnx(model, tmp_path / "m.onnx", opset=12)
    with pytest.raises(ValueError, match="unknown scale"):
        export.to_onnx(model, tmp_path / "m.onnx", scale="bogus")
    with pytest.raises(ValueError, match=r"input_shape must be \(C, H, W\)"):
        export.to_onnx(model, tmp_path / "m.onnx", input_shape=(28, 28))

    class Odd(xcnn.Layer):
        pass

    odd = xcnn.Sequential([xcnn.Conv2D(1, 2, 3), Odd()])
    with pytest.raises(ValueError, match=r"layer 1 \(Odd\(\)\) has no ONNX converter"):
        export.to_onnx(odd, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()  # nothing half-written
    with pytest.raises(
        ValueError, match=r"probabilities need \(N, K\) logits; .* \(N, 2, 26, 26\)"
    ):
        conv = xcnn.Sequential([xcnn.Conv2D(1, 2, 3)])
        export.to_onnx(conv, tmp_path / "m.onnx", probabilities=True, input_shape=(1, 28, 28))
    flat = xcnn.Sequential([xcnn.Flatten(), xcnn.Dense(4, 2)])
    with pytest.raises(ValueError, match="input shape is unknown"):
        export.to_onnx(flat, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_missing_packages_are_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    model = xcnn.build_model("seed")
    with pytest.raises(ImportError, match=r"pip install 'xcnn\[export\]'"):
        export.to_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(ImportError, match=r"pip install 'xcnn\[export\]'"):
        export.to_safetensors(model, tmp_path / "m.safetensors")


# -- safetensors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(xcnn.models.MODELS))
def test_safetensors_round_trip(name, sample, tmp_path):
    model = perturbed(xcnn.build_model(name, seed=2))
    path = export.to_safetensors(model, tmp_path / "m.safetensors")
    tensors = st_numpy.load_file(str(path))
    state = model.state_dict()
    assert set(tensors) == set(state)
    for key, value in state.items():
        assert tensors[key].dtype == value.dtype
        np.testing.assert_array_equal(tensors[key], value)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata()
    assert meta["format"] == "xcnn" and meta["version"] == "1" and meta["scale"] == "centered"
    assert json.loads(meta["config"]) == model.config()
    again = xcnn.load(path)  # xcnn.load dispatches on the content
    x = sample.x_test[:20]
    np.testing.assert_array_equal(
        np.asarray(xcnn.predict(again, x)), np.asarray(xcnn.predict(model, x))
    )


def test_safetensors_errors(tmp_path):
    from safetensors.numpy import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(foreign))
    assert export.is_safetensors(foreign)
    with pytest.raises(ValueError, match="not one written by xcnn"):
        xcnn.load(foreign)
    model = xcnn.build_model("seed")
    good = export.to_safetensors(model, tmp_path / "good.safetensors")
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors"):
        xcnn.load(cut)
    size = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + size])
    meta["__metadata__"]["config"] = json.dumps({"layers": [{"type": "Nope"}]})
    header = json.dumps(meta).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + size :])
    with pytest.raises(ValueError, match="bad.safetensors"):
        xcnn.load(bad)
    checkpoint = xcnn.save(model, tmp_path / "ck.npz")
    assert not export.is_safetensors(checkpoint) and not export.is_safetensors(tmp_path / "no")
    assert xcnn.load(checkpoint).num_params() == model.num_params()


# -- the command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "seed.npz"
    args = ["train", "--train-size", "300", "--test-size", "50", "--no-progress"]
    assert cli.main([*args, "--scale", "standard", "--save", str(path)]) == 0
    return path


def test_cli_export_onnx_and_safetensors(checkpoint, sample, tmp_path, capsys):
    out = tmp_path / "seed.onnx"
    assert cli.main(["export", str(checkpoint), "--format", "onnx", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    model = xcnn.load(checkpoint)
    images = sample.x_test[:30].astype(np.float32) / 255
    # The checkpoint was trained with "standard" scaling: that is what the graph holds.
    want = xcnn_logits(model, images, "standard")
    assert np.abs(run_onnx(out, images)[0] - want).max() <= TOL
    st = tmp_path / "seed.safetensors"
    assert cli.main(["export", str(checkpoint), "--format", "safetensors", "-o", str(st)]) == 0
    assert export.load_model(st)[1] == "standard"
    # A safetensors file exports to ONNX too, keeping its scaling.
    again = tmp_path / "again.onnx"
    argv = ["export", str(st), "--format", "onnx", "-o", str(again), "--probabilities"]
    assert cli.main(argv) == 0
    assert np.abs(run_onnx(again, images)[0] - want).max() <= TOL


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--format", "onnx", "-o", "{tmp}/x.onnx"], "missing.npz"),
        (["--format", "safetensors", "--opset", "17", "-o", "{tmp}/x.st"], "onnx only"),
        (["--format", "onnx", "--opset", "7", "-o", "{tmp}/x.onnx"], "opset must be"),
        (["--format", "onnx", "-o", "{tmp}/no/such/x.onnx"], "No such directory"),
        (["--format", "tflite", "-o", "{tmp}/x"], "invalid choice"),
    ],
)
def test_cli_export_errors(argv, fragment, checkpoint, tmp_path, capsys):
    source = str(tmp_path / "missing.npz") if fragment == "missing.npz" else str(checkpoint)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    status = cli.main(["export", source, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert status != 0 and len(err) == 1 and err[0].startswith("xcnn: error: ")
    assert fragment in err[0]


def test_every_registered_layer_has_a_converter():
    """A new layer in xcnn.layers.LAYERS without an ONNX converter fails here."""
    missing = set(xcnn.layers.LAYERS) - set(export.CONVERTERS)
    assert not missing, f"add ONNX converters to xcnn/export.py for {sorted(missing)}"
