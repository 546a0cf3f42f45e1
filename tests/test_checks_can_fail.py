"""Tests that show the suite's checkers can fail, and cover what an audit found untested.

- ``check_parity`` reports a deliberately perturbed backend;
- ``MaxPool2D``'s evaluation-mode forward (its own code path) with overlapping and
  strided windows, against a loop reference;
- the loss gradient's ``1/N``, from several directions;
- the layer tests again with the fast NumPy kernels off (the generic code every other
  array library runs);
- a model loaded on another backend agrees within a tolerance derived from the dtype.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xcnn
from xcnn import functional as F
from xcnn.testing import check_parity, default_tolerance

ROOT = Path(__file__).resolve().parents[1]
GUARD = "XCNN_GENERIC_RERUN"


def _net():
    return [xcnn.Conv2D(1, 2, 3), xcnn.MaxPool2D(2), xcnn.Flatten(), xcnn.Dense(2 * 3 * 3, 4)]


def test_check_parity_fails_on_a_perturbed_backend(monkeypatch):
    x = np.random.default_rng(0).random((3, 1, 8, 8))
    assert check_parity(_net, x, backends=["numpy", "array_api_strict"]).ok()
    dense = F.dense

    def perturbed(x, w, b=None):
        y = dense(x, w, b)
        # Only on array_api_strict: a backend off by one part in 10^4.
        return y * 1.0001 if "array_api_strict" in type(y).__module__ else y

    monkeypatch.setattr(F, "dense", perturbed)
    report = check_parity(_net, x, backends=["numpy", "array_api_strict"])
    assert not report.ok()
    assert any("output" in f for f in report.failures()), report.failures()


def test_check_parity_fails_on_a_perturbed_gradient(monkeypatch):
    x = np.random.default_rng(1).random((3, 1, 8, 8))
    backward = F.dense_backward

    def perturbed(dy, x, w):
        dx, dw, db = backward(dy, x, w)
        return (dx, dw * 1.001, db) if "array_api_strict" in type(dw).__module__ else (dx, dw, db)

    monkeypatch.setattr(F, "dense_backward", perturbed)
    report = check_parity(
        _net, x, labels=np.array([0, 1, 2]), backends=["numpy", "array_api_strict"]
    )
    assert [f.split(":")[0] for f in report.failures()] == [f"{list(report.diffs)[0]} 3.weight"], (
        report.failures()
    )


# -- MaxPool2D in evaluation mode ----------------------------------------------------------


def _pool_loops(x, k, s):
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    y = np.full((n, c, oh, ow), -np.inf)
    for i in range(oh):
        for j in range(ow):
            for a in range(k):
                for b in range(k):
                    y[:, :, i, j] = np.maximum(y[:, :, i, j], x[:, :, i * s + a, j * s + b])
    return y


@pytest.mark.parametrize(
    "k,s,hw",
    [
        (3, 1, (7, 8)),
        (3, 2, (9, 10)),
        (2, 1, (5, 6)),
        (2, 3, (8, 9)),
        (3, 3, (10, 11)),
        (1, 2, (5, 5)),
    ],
    ids=["overlap-s1", "overlap-s2", "overlap-2x2", "gaps-s3", "tiling-3", "k1-s2"],
)
def test_maxpool_eval_forward_matches_loops(backend, k, s, hw):
    x = np.random.default_rng(k * 10 + s).standard_normal((2, 3, *hw)).astype(np.float32)
    model = backend.model([xcnn.MaxPool2D(k, stride=s)], dtype="float32")
    expected = _pool_loops(x, k, s)
    y_eval = xcnn.to_numpy(model.forward(model.asarray(x), train=False))
    np.testing.assert_array_equal(y_eval, expected)
    # The training path agrees with the evaluation path.
    np.testing.assert_array_equal(xcnn.to_numpy(model.forward(model.asarray(x))), expected)


def test_maxpool_eval_through_predict_uses_the_stride():
    x = np.random.default_rng(2).standard_normal((4, 1, 9, 9)).astype(np.float32)
    model = xcnn.Sequential([xcnn.MaxPool2D(3, stride=2), xcnn.Flatten()], dtype="float32")
    logits = model.forward(model.asarray(x), train=False)
    assert logits.shape == (4, 16)
    np.testing.assert_array_equal(logits, _pool_loops(x, 3, 2).reshape(4, -1))


# -- the loss gradient's 1/N -----------------------------------------------------------------


def _numeric_grad(logits, labels, eps=1e-6):
    num = np.zeros_like(logits)
    for idx in np.ndindex(logits.shape):
        hi, lo = logits.copy(), logits.copy()
        hi[idx] += eps
        lo[idx] -= eps
        num[idx] = (
            float(xcnn.softmax_cross_entropy(hi, labels)[0])
            - float(xcnn.softmax_cross_entropy(lo, labels)[0])
        ) / (2 * eps)
    return num


@pytest.mark.parametrize("n", [1, 2, 7])
def test_loss_gradient_matches_differences_for_every_batch_size(n):
    rng = np.random.default_rng(n)
    logits, labels = rng.standard_normal((n, 5)) * 2, rng.integers(0, 5, n)
    _, d = xcnn.softmax_cross_entropy(logits, labels)
    num = _numeric_grad(logits, labels)
    assert np.abs(num - d).max() <= 1e-8 + 1e-6 * np.abs(num).max()


def test_loss_gradient_is_softmax_minus_onehot_over_n(backend):
    rng = np.random.default_rng(3)
    n, k = 6, 4
    logits, labels = rng.standard_normal((n, k)), rng.integers(0, k, n)
    model = backend.model([xcnn.Flatten()], dtype="float32")
    _, d = xcnn.softmax_cross_entropy(model.asarray(logits), model.asarray(labels))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = (p - np.eye(k)[labels]) / n
    np.testing.assert_allclose(xcnn.to_numpy(d), expected, rtol=1e-5, atol=1e-7)


def test_duplicating_the_batch_keeps_the_loss_and_halves_each_gradient_row():
    rng = np.random.default_rng(4)
    logits, labels = rng.standard_normal((5, 3)), rng.integers(0, 3, 5)
    loss1, d1 = xcnn.softmax_cross_entropy(logits, labels)
    loss2, d2 = xcnn.softmax_cross_entropy(
        np.concatenate([logits] * 2), np.concatenate([labels] * 2)
    )
    assert float(loss2) == pytest.approx(float(loss1), rel=1e-12)
    np.testing.assert_allclose(d2[:5], d1 / 2, rtol=1e-12)
    # Each row of the gradient sums to zero (softmax - onehot), and the rows to 1/N per row norm.
    np.testing.assert_allclose(d1.sum(1), 0, atol=1e-15)


def test_one_sgd_step_uses_the_mean_gradient():
    """A step on a batch of N equal samples moves the weights as a step on one sample."""
    x1 = np.random.default_rng(5).standard_normal((1, 4))
    y1 = np.array([2])
    moved = []
    for n in (1, 8):
        model = xcnn.Sequential([xcnn.Dense(4, 3)], dtype="float64", seed=0)
        opt = xcnn.SGD(model, lr=0.5)
        logits = model.forward(model.asarray(np.repeat(x1, n, 0)))
        _, d = xcnn.softmax_cross_entropy(logits, model.asarray(np.repeat(y1, n)))
        model.backward(d)
        opt.step()
        moved.append(model.state_dict()["0.weight"])
    np.testing.assert_allclose(moved[0], moved[1], rtol=1e-12)


# -- the layer tests with the fast kernels off ------------------------------------------------


@pytest.mark.skipif(bool(os.environ.get(GUARD)), reason="inside the generic-code rerun")
def test_layer_tests_pass_with_the_fast_kernels_off():
    """tests/test_layers.py on NumPy with XCNN_FAST=0: the generic array-API code itself."""
    env = dict(os.environ, XCNN_FAST="0", PYTHONPATH=str(ROOT), **{GUARD: "1"})
    env["XCNN_BACKENDS"] = "numpy"
    probe = subprocess.run(
        [sys.executable, "-c", "import xcnn.kernels as K; print(K.enabled('numpy'))"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert probe.stdout.strip() == "False", probe.stdout + probe.stderr
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/test_layers.py",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


# -- cross-backend checkpoint tolerance from the dtype -----------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_checkpoint_on_another_backend_within_dtype_tolerance(other_backend, tmp_path, dtype):
    if dtype == "float64" and not other_backend.float64:
        pytest.skip(f"{other_backend.id} has no float64")
    model = xcnn.models.build_model("seed", dtype=dtype)
    x = np.random.default_rng(0).integers(0, 256, (16, 1, 28, 28), dtype=np.uint8)
    expected = xcnn.predict(model, x)
    xcnn.save(model, tmp_path / "m.npz")
    other = xcnn.load(tmp_path / "m.npz", backend=other_backend.spec, device=other_backend.device)
    got = xcnn.predict(other, x)
    # Probabilities in [0, 1], through ~1,400 products and a softmax: a few hundred ulps.
    tol = 512 * float(np.finfo(dtype).eps)
    np.testing.assert_allclose(got, expected, rtol=0, atol=tol)
    assert tol <= default_tolerance(dtype) * 10 or dtype == "float32"
