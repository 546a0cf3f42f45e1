"""Shape inference, summary, modes, named parameters and buffers, and the named models."""

from __future__ import annotations

import numpy as np
import pytest

import xcnn
from xcnn import io
from xcnn.layers import ShapeError
from xcnn.models import build_model


def test_sizes_are_inferred_from_the_input_shape():
    model = xcnn.Sequential(
        [
            xcnn.Conv2D(out_channels=8, kernel_size=3),
            xcnn.MaxPool2D(2),
            xcnn.Flatten(),
            xcnn.Dense(10),
        ],
        input_shape=(1, 28, 28),
        seed=0,
    )
    assert model.layers[0].in_channels == 1 and model.layers[3].in_features == 13 * 13 * 8
    assert model.shapes == [(8, 26, 26), (8, 13, 13), (1352,), (10,)]
    # The same weights as the explicit form: inference only fills in sizes.
    explicit = xcnn.Sequential(
        [xcnn.Conv2D(1, 8, 3), xcnn.MaxPool2D(2), xcnn.Flatten(), xcnn.Dense(1352, 10)], seed=0
    )
    for key, value in explicit.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[key], value)
    assert model.forward(model.asarray(np.zeros((2, 1, 28, 28)))).shape == (2, 10)


def test_a_layer_without_its_input_size_needs_an_input_shape():
    with pytest.raises(ShapeError, match=r"layer 0 Dense\(10\) has no in_features: pass input_sha"):
        xcnn.Sequential([xcnn.Dense(10)])
    with pytest.raises(ShapeError, match=r"layer 0 Conv2D\(out_channels=4.*in_channels"):
        xcnn.Sequential([xcnn.Conv2D(out_channels=4, kernel_size=3)])
    with pytest.raises(TypeError, match="out_channels and kernel_size are required"):
        xcnn.Conv2D(3)
    with pytest.raises(ShapeError, match=r"layer 2: Dense\(10\): expects .*put a Flatten"):
        xcnn.Sequential(
            [xcnn.Conv2D(out_channels=4, kernel_size=3), xcnn.ReLU(), xcnn.Dense(10)],
            input_shape=(1, 8, 8),
        )
    with pytest.raises(
        ShapeError, match=r"layer 0: Conv2D\(3, 4.*expects \(C=3, H, W\).*\(1, 8, 8\)"
    ):
        xcnn.Sequential([xcnn.Conv2D(3, 4, 3)], input_shape=(1, 8, 8))
    with pytest.raises(ShapeError, match=r"layer 0: MaxPool2D\(4\).*H, W >= 4"):
        xcnn.Sequential([xcnn.MaxPool2D(4)], input_shape=(1, 3, 3))


def test_summary_table():
    model = build_model("lenet5")
    table = model.summary()
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "output", "shape", "params"]
    assert "(N, 6, 28, 28)" in lines[2] and lines[2].rstrip().endswith("156")
    assert "Dense(400, 120)" in table and "48,120" in table
    assert lines[-1] == "total: 61,706 parameters, input (N, 1, 28, 28)"
    res = build_model("resnet").summary()
    assert "  layers.0 Conv2D(16, 16" in res and "shortcut.0 Conv2D(16, 32, kernel_size=1" in res
    # Without an input shape: counts, but the shapes are unknown.
    plain = xcnn.Sequential([xcnn.Dense(4, 2)]).summary()
    assert "?" in plain and plain.splitlines()[-1] == "total: 10 parameters"


def test_named_models_adapt_to_input_shape_and_classes():
    assert build_model("lenet5").num_params() == 61_706
    assert build_model("lenet").num_params() == 1_199_882
    assert build_model("seed").num_params() == 13_602
    assert build_model("resnet").num_params() == 77_754
    for name in ("seed", "lenet", "lenet5", "resnet"):
        model = build_model(name, input_shape=(3, 32, 32), num_classes=7)
        y = model.forward(model.asarray(np.zeros((2, 3, 32, 32))), train=False)
        assert y.shape == (2, 7) and model.input_shape == (3, 32, 32)
    with pytest.raises(ShapeError, match="lenet5|Conv2D|MaxPool2D"):
        build_model("lenet5", input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"input_shape must be \(C, H, W\)"):
        build_model("resnet", input_shape=(28, 28))


def test_train_and_eval_modes():
    model = xcnn.Sequential([xcnn.BatchNorm2D(1), xcnn.Flatten(), xcnn.Dropout(0.5)], seed=0)
    x = model.asarray(np.random.default_rng(0).random((4, 1, 3, 3)) + 5)
    assert model.training
    y_train = model.forward(x)  # batch statistics, dropout
    assert float(np.mean(y_train == 0)) > 0.2
    assert model.eval() is model and not model.training
    y_eval = model.forward(x)  # running statistics (one update so far), no dropout
    assert float(np.mean(y_eval == 0)) == 0 and float(np.mean(y_eval)) > 3
    np.testing.assert_array_equal(model.forward(x, train=False), y_eval)
    model.train()
    assert model.training and float(np.mean(model.forward(x) == 0)) > 0.2
    # train=False never changes the running statistics.
    before = model.state_dict()["0.running_mean"].copy()
    model.forward(x, train=False)
    np.testing.assert_array_equal(model.state_dict()["0.running_mean"], before)


def test_named_params_buffers_and_state_dict_paths():
    model = build_model("resnet")
    keys = [k for k, _, _ in model.named_params()]
    assert "3.layers.0.weight" in keys and "6.shortcut.0.weight" in keys
    assert "6.shortcut.1.bias" in keys and keys[-1] == "13.bias"
    buffers = [k for k, _, _ in model.named_buffers()]
    assert "1.running_mean" in buffers and "3.layers.4.running_var" in buffers
    state = model.state_dict()
    assert set(state) == set(keys) | set(buffers)
    # Each entry names the leaf layer holding the array (never the container).
    for key, layer, name in model.named_params():
        assert not isinstance(layer, xcnn.Residual) and name in layer.params
        if ".layers." in key:
            i, _, j, _ = key.split(".")
            assert layer is model.layers[int(i)].layers[int(j)]


def test_checkpoint_round_trip_with_buffers_config_and_rng(tmp_path):
    model = build_model("resnet", input_shape=(1, 12, 12), num_classes=3, seed=2)
    model.forward(model.asarray(np.random.default_rng(0).random((4, 1, 12, 12))), train=True)
    model.rng.random(5)  # advance the dropout stream
    path = io.save(model, tmp_path / "r.npz")
    loaded = io.load(path)
    assert loaded.config() == model.config() and loaded.input_shape == (1, 12, 12)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key], value)
    assert loaded.rng.bit_generator.state == model.rng.bit_generator.state
    x = model.asarray(np.random.default_rng(1).random((2, 1, 12, 12)))
    np.testing.assert_array_equal(loaded.forward(x, train=False), model.forward(x, train=False))


def test_checkpoints_refuse_non_finite_weights(tmp_path):
    model = xcnn.Sequential([xcnn.Dense(3, 2)])
    path = io.save(model, tmp_path / "good.npz")
    before = path.read_bytes()
    model.layers[0].params["weight"] = model.asarray(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="not written, non-finite values in .*0.weight"):
        io.save(model, path)
    assert path.read_bytes() == before  # the last good checkpoint stays


def test_model_config_carries_scale_and_classes():
    model = xcnn.Sequential([xcnn.Dense(2, 2)], scale="unit", classes=["cat", "dog"])
    again = xcnn.Sequential.from_config(model.config())
    assert again.scale == "unit" and again.classes == ["cat", "dog"]
    with pytest.raises(ValueError, match="unknown scale 'bad'"):
        xcnn.Sequential([xcnn.Dense(2, 2)], scale="bad")
