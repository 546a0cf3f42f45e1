"""Named architectures: shapes, parameter counts, initialisation, errors."""

from __future__ import annotations

import numpy as np
import pytest

import xcnn
from xcnn.models import MODELS, RECIPES, build_model
from xcnn.training import SCALES


@pytest.mark.parametrize(
    ("name", "params", "layers"),
    [
        ("seed", 8 * 9 + 1352 * 10 + 10, ["Conv2D", "MaxPool2D", "Flatten", "Dense"]),
        (
            "lenet",
            (32 * 9 + 32) + (64 * 32 * 9 + 64) + (9216 * 128 + 128) + (128 * 10 + 10),
            ["Conv2D", "ReLU", "Conv2D", "ReLU", "MaxPool2D", "Flatten", "Dense", "ReLU", "Dense"],
        ),
    ],
)
def test_architecture_and_param_count(name, params, layers):
    model = build_model(name)
    assert [type(layer).__name__ for layer in model.layers] == layers
    assert model.num_params() == params


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_shape_on_every_backend(backend, name):
    model = build_model(name, backend=backend.spec, device=backend.device, dtype="float32")
    x = model.asarray(np.zeros((3, 1, 28, 28), dtype=np.float32))
    y = model.forward(x, train=False)
    assert tuple(y.shape) == (3, 10)
    assert backend.resolve().owns(y)


def test_seed_net_is_the_tutorials():
    conv, _, _, dense = build_model("seed").layers
    # The tutorial: 8 bias-free 3x3 filters (randn / 9), softmax weights randn / 1352.
    assert conv.config()["bias"] is False and conv.init == "tutorial"
    assert dense.init == "tutorial" and tuple(dense.params["weight"].shape) == (1352, 10)
    w = np.asarray(conv.params["weight"], dtype=np.float64)
    assert 0.03 < w.std() < 0.3  # randn / 9 has std 0.111
    assert np.all(np.asarray(dense.params["bias"]) == 0)


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = build_model("seed", seed=3), build_model("seed", seed=3), build_model("seed", seed=4)
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(value, b.state_dict()[key])
    assert not np.array_equal(a.state_dict()["0.weight"], c.state_dict()["0.weight"])


def test_dtype_and_config_round_trip():
    model = build_model("lenet", dtype="float64", seed=1)
    assert model.state_dict()["0.weight"].dtype == np.float64
    again = xcnn.Sequential.from_config(model.config())
    assert again.config() == model.config()


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'vgg'.*lenet.*resnet.*seed"):
        build_model("vgg")


def test_recipes_are_complete_and_valid():
    assert set(RECIPES) == set(MODELS)
    for recipe in RECIPES.values():
        assert recipe.optimizer in xcnn.optim.OPTIMIZERS
        assert recipe.lr > 0 and recipe.batch_size >= 1 and recipe.epochs >= 1
        assert 0 < recipe.lr_decay <= 1 and recipe.scale in SCALES
