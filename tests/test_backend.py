"""The backend switch: names, namespaces, devices, moving arrays in and out."""

from __future__ import annotations

import numpy as np
import pytest

import xcnn


def test_resolve_by_name_and_by_namespace():
    import array_api_strict

    assert xcnn.resolve_backend("numpy").name == "numpy"
    by_module = xcnn.resolve_backend(array_api_strict, "device1")
    by_name = xcnn.resolve_backend("array_api_strict", "device1")
    assert by_module.xp is by_name.xp is array_api_strict
    assert str(by_module.device) == str(by_name.device)
    assert xcnn.resolve_backend(np).name == "numpy"
    assert xcnn.resolve_backend(by_name) is by_name


def test_round_trip_to_numpy(backend):
    b = backend.resolve()
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    arr = b.asarray(host, "float32")
    assert b.owns(arr)
    np.testing.assert_array_equal(xcnn.to_numpy(arr), host)
    labels = b.asarray(np.array([1, 2, 3], np.int64))
    assert xcnn.to_numpy(labels).dtype.kind == "i"  # integers keep their dtype


def test_asarray_casts_floats_on_the_host_first():
    b = xcnn.resolve_backend("array_api_strict", "no_float64")
    arr = b.asarray(np.ones(3, np.float64), "float32")  # a float64 host array is fine
    assert arr.dtype == b.dtype("float32")


def test_model_properties():
    model = xcnn.Sequential([xcnn.Dense(4, 3), xcnn.ReLU(), xcnn.Dense(3, 2)], seed=1)
    assert model.num_params() == 4 * 3 + 3 + 3 * 2 + 2
    assert "Dense(4, 3)" in repr(model)
    config = model.config()
    clone = xcnn.Sequential.from_config(config)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(clone.state_dict()[k], v)  # same seed, same weights
    with pytest.raises(ValueError, match="missing"):
        model.load_state_dict({})
    bad = model.state_dict()
    bad["0.weight"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(2, 2\)"):
        model.load_state_dict(bad)


def test_initialisers():
    rng = np.random.default_rng(0)
    conv = xcnn.Conv2D(16, 32, 3).build(seed=0)
    w = xcnn.to_numpy(conv.params["weight"])
    assert w.std() == pytest.approx(np.sqrt(2 / (16 * 9)), rel=0.05)  # He
    tut = xcnn.Conv2D(1, 8, 3, init="tutorial").build(seed=0, dtype="float64")
    expected = np.random.default_rng(0).standard_normal((8, 1, 3, 3)) / 9
    np.testing.assert_array_equal(tut.params["weight"], expected)
    dense = xcnn.Dense(1352, 10, init="tutorial").build(seed=rng, dtype="float64")
    assert dense.params["weight"].std() == pytest.approx(1 / 1352, rel=0.1)
    glorot = xcnn.Dense(300, 100).build(seed=0, dtype="float64").params["weight"]
    assert np.abs(glorot).max() <= np.sqrt(6 / 400)


def test_array_namespace_is_array_api_compats_remembered_per_types():
    import array_api_compat
    import array_api_strict

    from xcnn import backend

    cases = [
        (np.ones(2, np.float32),),
        (np.ones(2), np.arange(3), None, 1.5),
        (array_api_strict.asarray([1.0]),),
    ]
    for args in cases:
        for _ in range(2):  # the second answer comes from the cache
            assert backend.array_namespace(*args) is array_api_compat.array_namespace(*args)
    with pytest.raises(TypeError):  # not remembered, raised every time
        backend.array_namespace(np.ones(2), array_api_strict.asarray([1.0]))
    with pytest.raises(TypeError):
        backend.array_namespace(np.ones(2), array_api_strict.asarray([1.0]))
    void = np.zeros(2, dtype=[("float0", "V")])  # JAX's zero-gradient dtype: never cached
    assert backend.array_namespace(void) is array_api_compat.array_namespace(void)
    assert backend.array_namespace(np.ones(2)) is array_api_compat.numpy
