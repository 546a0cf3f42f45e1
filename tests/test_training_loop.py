"""Validation split, early stopping, callbacks, schedules, weight decay, finite losses, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest

import xcnn
from xcnn import io, schedules
from xcnn.callbacks import EarlyStopping
from xcnn.training import NonFiniteLossError, fit, validation_split_indices


@pytest.fixture(scope="module")
def small():
    s = xcnn.datasets.sample()
    return s.x_train[:240], s.y_train[:240]


def _net(seed=0):
    return xcnn.Sequential(
        [
            xcnn.Conv2D(out_channels=4, kernel_size=3, bias=False),
            xcnn.BatchNorm2D(),
            xcnn.ReLU(),
            xcnn.MaxPool2D(2),
            xcnn.Residual([xcnn.Conv2D(out_channels=4, kernel_size=3, padding=1), xcnn.ReLU()]),
            xcnn.GlobalAvgPool2D(),
            xcnn.Dropout(0.3),
            xcnn.Dense(10),
        ],
        input_shape=(1, 28, 28),
        seed=seed,
    )


# -- validation split -----------------------------------------------------------------


def test_validation_split_is_stratified_seeded_and_disjoint():
    y = np.repeat(np.arange(4), [50, 30, 15, 5])
    train, val = validation_split_indices(y, 0.2, seed=0)
    assert np.bincount(y[val]).tolist() == [10, 6, 3, 1]
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 100
    again = validation_split_indices(y, 0.2, seed=0)
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(validation_split_indices(y, 0.2, seed=1)[1], val)
    with pytest.raises(ValueError, match=r"validation_split must be in \(0, 1\)"):
        validation_split_indices(y, 1.0, seed=0)


def test_fit_with_validation_split_reports_val_metrics(small):
    model = _net()
    opt = xcnn.make_optimizer("adam", model, 0.01)
    history = fit(model, opt, *small, epochs=2, validation_split=0.25, progress=False)
    assert len(history["val_accuracy"]) == 2 and all(v > 0 for v in history["val_loss"])
    _, val = validation_split_indices(small[1], 0.25, seed=0)
    with pytest.raises(ValueError, match="either validation_data or validation_split"):
        fit(model, opt, *small, validation_split=0.1, validation_data=small, progress=False)


# -- callbacks and early stopping -----------------------------------------------------


def test_callbacks_can_stop_training(small):
    class StopAfterOne:
        def __init__(self):
            self.calls = []

        def on_epoch_end(self, epoch, logs):
            self.calls.append(epoch)
            return True

    model = _net()
    opt = xcnn.make_optimizer("sgd", model, 0.01)
    stopper = StopAfterOne()
    seen = []
    history = fit(
        model,
        opt,
        *small,
        epochs=5,
        progress=False,
        callbacks=[stopper, lambda e, logs: seen.append(e)],
    )
    assert history["epoch"] == [1] and stopper.calls == [1] and seen == [1]
    history = fit(model, opt, *small, epochs=5, progress=False, callbacks=[lambda e, logs: e >= 2])
    assert history["epoch"] == [1, 2]
    with pytest.raises(TypeError, match="has no on_epoch_end and is not callable"):
        fit(model, opt, *small, progress=False, callbacks=[42])


def test_early_stopping_waits_patience_epochs():
    stop = EarlyStopping(2)
    results = [stop.on_epoch_end(e, {"val_accuracy": a}) for e, a in
               enumerate([0.5, 0.6, 0.6, 0.55, 0.7], start=1)]  # fmt: skip
    assert results == [False, False, False, True, False] and stop.stopped_epoch == 4
    assert stop.best == 0.7 and stop.best_epoch == 5
    loss = EarlyStopping(0, monitor="val_loss")
    assert loss.on_epoch_end(1, {"val_loss": 1.0}) is False
    assert loss.on_epoch_end(2, {"val_loss": 1.1}) is True
    with pytest.raises(ValueError, match="unknown monitor"):
        EarlyStopping(1, monitor="acc")
    with pytest.raises(ValueError, match="no 'val_accuracy' in the epoch's logs"):
        EarlyStopping(1).on_epoch_end(1, {"train_loss": 1.0})


def test_fit_early_stopping_needs_validation_and_stops(small):
    model = _net()
    opt = xcnn.make_optimizer("adam", model, 1e-6)  # too small to improve: stops at once
    with pytest.raises(ValueError, match="needs validation_split"):
        fit(model, opt, *small, early_stopping=1, progress=False)
    stop = EarlyStopping(0, monitor="val_loss", min_delta=1.0)
    history = fit(
        model, opt, *small, epochs=5, validation_split=0.2, early_stopping=stop, progress=False
    )
    assert history["epoch"] == [1, 2] and stop.stopped_epoch == 2


# -- schedules ---------------------------------------------------------------------------


def test_schedule_values():
    cos = schedules.cosine(0.1, epochs=4)
    assert cos(0) == 0.1 and math.isclose(cos(2), 0.05) and cos(4) == 0 and cos(9) == 0
    st = schedules.step(1.0, gamma=0.5, every=2)
    assert [st(e) for e in (0, 1.9, 2, 4.5)] == [1, 1, 0.5, 0.25]
    warm = schedules.warmup(schedules.constant(0.2), epochs=2)
    assert math.isclose(warm(1), 0.1) and warm(2) == 0.2 and 0 < warm(0) < 0.001
    made = schedules.make_schedule("cosine", 0.3, epochs=5, warmup_epochs=1)
    assert math.isclose(made(1), 0.3) and math.isclose(made(3), 0.15) and made(5) == 0
    for sch in (cos, st, warm, made, schedules.constant(1.0)):
        assert schedules.schedule_from_config(sch.config()) == sch
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        schedules.make_schedule("linear", 0.1, epochs=2)
    with pytest.raises(ValueError, match="warm-up must be >= 0 and shorter"):
        schedules.make_schedule("cosine", 0.1, epochs=2, warmup_epochs=2)


def test_fit_follows_the_schedule_step_by_step(small):
    model = _net()
    opt = xcnn.make_optimizer("sgd", model, 1.0)
    sch = schedules.make_schedule("cosine", 0.05, epochs=2, warmup_epochs=0.5)
    rates = []
    step = opt.step

    def recording_step():
        rates.append(opt.lr)
        step()

    opt.step = recording_step
    fit(model, opt, *small, epochs=2, batch_size=60, schedule=sch, progress=False)
    assert rates == [sch(k / 4) for k in range(8)]
    with pytest.raises(ValueError, match="either a schedule or lr_decay"):
        fit(model, opt, *small, schedule=sch, lr_decay=0.5, progress=False)


# -- weight decay -------------------------------------------------------------------------


def _one_param_model(w):
    model = xcnn.Sequential([xcnn.Dense(3, 2, bias=False)], dtype="float64")
    model.layers[0].params["weight"] = model.asarray(w)
    return model


def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0, grads = rng.standard_normal((3, 2)), rng.standard_normal((4, 3, 2))
    model = _one_param_model(w0)
    opt = xcnn.AdamW(model, 0.01, weight_decay=0.1)
    p = torch.tensor(w0, requires_grad=True)
    ref = torch.optim.AdamW([p], lr=0.01, weight_decay=0.1)
    for g in grads:
        model.layers[0].grads = {"weight": model.asarray(g)}
        opt.step()
        p.grad = torch.tensor(g)
        ref.step()
    np.testing.assert_allclose(model.state_dict()["0.weight"], p.detach().numpy(), rtol=1e-12)


def test_sgd_weight_decay_is_decoupled():
    rng = np.random.default_rng(1)
    w0, grads = rng.standard_normal((3, 2)), rng.standard_normal((3, 3, 2))
    model = _one_param_model(w0)
    opt = xcnn.SGD(model, 0.1, momentum=0.9, weight_decay=0.5)
    w, v = w0.copy(), None
    for g in grads:
        model.layers[0].grads = {"weight": model.asarray(g)}
        opt.step()
        v = g if v is None else 0.9 * v + g  # the decay never enters the velocity
        w = w * (1 - 0.1 * 0.5) - 0.1 * v
    np.testing.assert_allclose(model.state_dict()["0.weight"], w, rtol=1e-12)
    with pytest.raises(ValueError, match="adam has no weight decay: use the optimizer adamw"):
        xcnn.make_optimizer("adam", model, 0.1, weight_decay=0.1)
    assert xcnn.make_optimizer("momentum", model, 0.1, weight_decay=0.2).weight_decay == 0.2


def test_weight_decay_spares_buffers(small):
    model = _net()
    opt = xcnn.make_optimizer("adamw", model, 0.01, weight_decay=0.5)
    fit(model, opt, *small, epochs=1, progress=False)
    assert "1.running_mean" not in {f"{k}" for k in opt.state}


# -- finite numbers only -----------------------------------------------------------------


def test_non_finite_loss_names_epoch_and_step(small, tmp_path):
    x = small[0].astype(np.float32) / 255
    bad = 100  # this image holds a NaN: find the step of the first epoch that draws it
    x[bad, 0, 5, 5] = np.nan
    order = np.random.default_rng(0).permutation(len(x))
    step = int(np.flatnonzero(order == bad)[0]) // 32 + 1
    model = xcnn.models.build_model("seed")  # no ReLU: a NaN pixel reaches the loss
    opt = xcnn.make_optimizer("adam", model, 0.01)
    path = tmp_path / "ck.npz"
    saved = []

    def save(epoch, logs):
        saved.append(epoch)
        io.save(model, path, opt, epoch=epoch)

    with pytest.raises(
        NonFiniteLossError, match=rf"non-finite \(NaN or inf\) at epoch 1, step {step} of 8"
    ):
        fit(model, opt, x, small[1], epochs=2, batch_size=32, progress=False, callback=save)
    assert saved == [] and not path.exists()  # no checkpoint from the broken epoch
    assert isinstance(NonFiniteLossError("x"), ValueError)
    # A ReLU maps NaN to 0, so here the loss stays finite while the weights do not.
    model = _net()
    opt = xcnn.make_optimizer("adam", model, 0.01)
    with pytest.raises(NonFiniteLossError, match=r"weights became non-finite .* in epoch 1 \(0.w"):
        fit(model, opt, x, small[1], epochs=2, batch_size=32, progress=False, callback=save)
    assert saved == []


# -- resume ------------------------------------------------------------------------------


def test_two_epochs_equal_one_plus_resumed_one_bit_for_bit(small, tmp_path):
    """Dropout masks, BatchNorm statistics, the schedule and early stopping all resume."""

    def run(epochs, start_epoch=0, ck=None):
        if ck is None:
            model, rng = _net(seed=4), np.random.default_rng(4)
            opt = xcnn.make_optimizer("adamw", model, 0.01, weight_decay=0.05)
            early = EarlyStopping(3)
        else:
            model, opt, rng = ck.model, ck.optimizer, ck.rng()
            early = EarlyStopping(3)
            early.load_state_dict(ck.extra["early"])
        sch = schedules.make_schedule("cosine", 0.01, epochs=2, warmup_epochs=0.5)
        history = fit(
            model, opt, *small, epochs=epochs, batch_size=50, validation_split=0.2,
            schedule=sch, early_stopping=early, seed=4, rng=rng, start_epoch=start_epoch,
            progress=False,
        )  # fmt: skip
        return model, opt, rng, early, history

    full, full_opt, _, full_early, full_hist = run(2)
    model, opt, rng, early, _ = run(1)
    path = io.save(model, tmp_path / "one.npz", opt, epoch=1, rng=rng,
                   extra={"early": early.state_dict()})  # fmt: skip
    resumed, resumed_opt, _, resumed_early, hist = run(1, 1, io.load_checkpoint(path))
    for key, value in full.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], value, err_msg=key)
    assert resumed.rng.bit_generator.state == full.rng.bit_generator.state
    assert resumed_opt.steps == full_opt.steps and resumed_opt.lr == full_opt.lr
    assert resumed_early.state_dict() == full_early.state_dict()
    assert hist["val_accuracy"] == full_hist["val_accuracy"][1:]
    assert hist["train_loss"] == full_hist["train_loss"][1:]
