"""fit / evaluate / predict: learning, determinism, data handling, metrics."""

from __future__ import annotations

import numpy as np
import pytest

import xcnn
from xcnn import datasets, training
from xcnn.backend import Backend
from xcnn.models import RECIPES, build_model
from xcnn.training import evaluate, fit, predict, scale_images


@pytest.fixture(scope="module")
def sample():
    return datasets.sample()


@pytest.fixture(scope="module")
def small(sample):
    """512 training and 200 test images of the embedded sample (balanced enough)."""
    return sample.x_train[:512], sample.y_train[:512], sample.x_test[:200], sample.y_test[:200]


def _model(case=None, **kw):
    spec, device = ("numpy", None) if case is None else (case.spec, case.device)
    return build_model("seed", backend=spec, device=device, **kw)


def _fit(model, data, **kw):
    x, y, xt, yt = data
    opt = xcnn.make_optimizer("adam", model, 0.005)
    kw.setdefault("validation_data", (xt, yt))
    return fit(model, opt, x, y, progress=False, **kw), opt


def test_fit_lowers_the_loss_on_every_backend(backend, small):
    model = _model(backend)
    before = evaluate(model, small[2], small[3])["loss"]
    history, _ = _fit(model, small, epochs=2, batch_size=32)
    assert history["epoch"] == [1, 2]
    assert history["train_loss"][1] < history["train_loss"][0]
    assert history["val_loss"][-1] < 0.7 * before
    assert history["val_accuracy"][-1] > 0.6
    assert all(s > 0 for s in history["seconds"])


def test_history_matches_numpy_on_every_backend(other_backend, small):
    ref, _ = _fit(_model(), small, epochs=1, batch_size=64)
    got, _ = _fit(_model(other_backend), small, epochs=1, batch_size=64)
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-3)
    # Same shuffles (host generator), same weights: at most a borderline image or two differs.
    np.testing.assert_allclose(got["val_accuracy"], ref["val_accuracy"], atol=0.011)


def test_same_seed_gives_an_identical_history_and_weights(small):
    runs = []
    for _ in range(2):
        model = _model()
        history, _ = _fit(model, small, epochs=2, batch_size=50, seed=7)
        del history["seconds"]
        runs.append((history, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for key, value in runs[0][1].items():
        np.testing.assert_array_equal(value, runs[1][1][key])
    other, _ = _fit(_model(), small, epochs=1, batch_size=50, seed=8)
    assert other["train_loss"][0] != runs[0][0]["train_loss"][0]


def test_embedded_sample_reaches_90_percent(sample):
    """The default recipe of the seed net, as ``xcnn train`` runs it."""
    recipe = RECIPES["seed"]
    model = build_model("seed")
    opt = xcnn.make_optimizer(recipe.optimizer, model, recipe.lr)
    fit(
        model,
        opt,
        sample.x_train,
        sample.y_train,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr_decay=recipe.lr_decay,
        progress=False,
    )
    assert evaluate(model, sample.x_test, sample.y_test)["accuracy"] >= 0.90


def test_last_partial_batch_is_used_and_labels_checked_once(small, monkeypatch):
    calls = []
    real = training.check_labels
    monkeypatch.setattr(training, "check_labels", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _model()
    _, opt = _fit(
        model, (small[0][:70], small[1][:70], small[2], small[3]), epochs=2, batch_size=32
    )
    assert opt.steps == 2 * 3  # 32 + 32 + 6 per epoch
    assert len(calls) == 2  # training labels and validation labels, once each


def test_data_moves_to_the_device_once(small, monkeypatch):
    """Transfers grow with epochs (one index array each), not with batches."""
    count = {"n": 0}
    real = Backend.asarray

    def counting(self, host, dtype=None):
        count["n"] += 1
        return real(self, host, dtype)

    # Not NumPy: there host arrays already are "on the device" and nothing is copied.
    model = build_model("seed", backend="array_api_strict")
    monkeypatch.setattr(Backend, "asarray", counting)
    _fit(model, small, epochs=3, batch_size=16)  # 32 batches per epoch
    # x, y, validation x, validation y, and one permutation per epoch.
    assert count["n"] == 4 + 3


def test_lr_decay_callback_and_start_epoch(small):
    model = _model()
    opt = xcnn.make_optimizer("sgd", model, 0.1)
    seen = []

    def callback(epoch, logs):
        seen.append((epoch, sorted(logs), opt.lr))

    x, y = small[0][:64], small[1][:64]
    history = fit(model, opt, x, y, epochs=2, start_epoch=3, lr_decay=0.5, progress=False,
                  callback=callback)  # fmt: skip
    assert history["epoch"] == [4, 5]
    assert "val_loss" not in history
    assert [s[0] for s in seen] == [4, 5]
    assert seen[0][1] == ["epoch", "seconds", "train_accuracy", "train_loss"]
    assert [s[2] for s in seen] == pytest.approx([0.05, 0.025])


def test_zero_epochs_trains_nothing(small):
    model = _model()
    before = model.state_dict()
    history, opt = _fit(model, small, epochs=0)
    assert history["epoch"] == [] and opt.steps == 0
    np.testing.assert_array_equal(model.state_dict()["0.weight"], before["0.weight"])


def test_progress_bar_shows_loss_accuracy_and_rate(small, capsys):
    model = _model()
    opt = xcnn.make_optimizer("adam", model, 0.005)
    fit(model, opt, small[0][:64], small[1][:64], batch_size=32, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "img/s" in err and "loss=" in err and "acc=" in err
    fit(model, opt, small[0][:64], small[1][:64], batch_size=32, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("scale", "lo", "hi"),
    [("unit", 0.0, 1.0), ("centered", -0.5, 0.5), ("standard", -0.1307 / 0.3081, 0.8693 / 0.3081)],
)
def test_scales(scale, lo, hi):
    x = np.array([0, 255], dtype=np.uint8)
    got = scale_images(x, scale, np.float32)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [lo, hi], rtol=1e-6)


def test_float_inputs_are_used_as_given(small):
    x, y, xt, yt = small
    xf, xtf = x.astype(np.float64) / 255 - 0.5, xt.astype(np.float64) / 255 - 0.5
    a, b = _model(), _model()
    ha, _ = _fit(a, (x, y, xt, yt), epochs=1, scale="centered")
    hb, _ = _fit(b, (xf, y, xtf, yt), epochs=1, scale="unit")  # scale ignored for floats
    np.testing.assert_allclose(ha["train_loss"], hb["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(predict(a, xt), predict(b, xtf), atol=1e-5)


def test_evaluate_confusion_and_accuracy_agree(backend, small):
    model = _model(backend)
    _fit(model, small, epochs=1, validation_data=None)
    xt, yt = small[2], small[3]
    result = evaluate(model, xt, yt, batch_size=64)  # 200 = 3 full batches + 8
    confusion = result["confusion"]
    assert confusion.shape == (10, 10) and confusion.dtype == np.int64
    assert confusion.sum() == len(yt)
    np.testing.assert_array_equal(confusion.sum(axis=1), np.bincount(yt, minlength=10))
    probs = predict(model, xt, batch_size=64)
    assert probs.shape == (200, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    pred = probs.argmax(axis=1)
    np.testing.assert_array_equal(confusion.sum(axis=0), np.bincount(pred, minlength=10))
    assert result["accuracy"] == pytest.approx(np.trace(confusion) / len(yt))
    assert result["accuracy"] == pytest.approx(np.mean(pred == yt))
    # The loss does not depend on how the set is batched.
    assert evaluate(model, xt, yt, batch_size=1000)["loss"] == pytest.approx(
        result["loss"], rel=1e-5
    )


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        (np.full(64, 10), ValueError, r"labels must lie in \[0, 10\)"),
        (np.zeros(63, dtype=np.int64), ValueError, r"expected labels of shape \(64,\)"),
        (np.zeros(64, dtype=np.float32), TypeError, "integer class indices"),
    ],
)
def test_bad_labels_fail_before_training(small, labels, error, match):
    model = _model()
    opt = xcnn.make_optimizer("sgd", model, 0.1)
    with pytest.raises(error, match=match):
        fit(model, opt, small[0][:64], labels, progress=False)
    assert opt.steps == 0


def test_argument_errors(small):
    model = _model()
    opt = xcnn.make_optimizer("sgd", model, 0.1)
    x, y = small[0][:8], small[1][:8]
    with pytest.raises(ValueError, match="another model"):
        fit(_model(), opt, x, y, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        fit(model, opt, x, y, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="unknown scale 'wide'"):
        fit(model, opt, x, y, scale="wide", progress=False)
    with pytest.raises(ValueError, match="lr_decay"):
        fit(model, opt, x, y, lr_decay=1.5, progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        evaluate(model, x[:0], y[:0])
