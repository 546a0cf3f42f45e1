"""CLI options of issue #11: --val-split, --early-stopping, --save-best, --schedule, --warmup,
--weight-decay, per-epoch --json, --version, summary, progress lines, exact resume."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import xcnn
from xcnn import cli, io

SMALL = ["--train-size", "300", "--test-size", "100", "--no-progress"]


def run(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def json_lines(out):
    return [json.loads(line) for line in out.strip().splitlines()]


def test_version(capsys):
    status, out, _ = run(capsys, "--version")
    assert status == 0 and out.strip() == f"xcnn {xcnn.__version__}"


def test_summary_command(capsys):
    status, out, _ = run(capsys, "summary", "--model", "lenet5")
    assert status == 0 and out.strip() == xcnn.build_model("lenet5").summary()
    status, out, _ = run(capsys, "summary", "--model", "resnet", "--input-shape", "3,32,32")
    assert status == 0 and "input (N, 3, 32, 32)" in out and "GlobalAvgPool2D" in out
    status, _, err = run(capsys, "summary", "--model", "lenet5", "--input-shape", "1,4,4")
    assert status == 1 and err.startswith("xcnn: error: ") and "layer 3: Conv2D(6, 16" in err


def test_json_per_epoch_with_validation_split(capsys):
    status, out, err = run(
        capsys, "train", *SMALL, "--epochs", "2", "--val-split", "0.2", "--json",
        "--optimizer", "momentum", "--weight-decay", "0.01", "--schedule", "cosine",
        "--warmup", "0.5",
    )  # fmt: skip
    assert status == 0, err
    rows = json_lines(out)  # stdout: JSON only
    assert [r["epoch"] for r in rows[:2]] == [1, 2] and len(rows) == 3
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"} <= set(
        rows[0]
    )
    final = rows[-1]
    assert final["train_images"] == 240 and final["val_images"] == 60
    assert 0 <= final["test_accuracy"] <= 1 and final["weight_decay"] == 0.01
    assert final["schedule"] == "cosine" and final["warmup"] == 0.5
    assert 0 < rows[1]["lr"] < rows[0]["lr"] * 0.1  # cosine: near 0 at the last step
    assert "epoch 1: train loss" in err and "| val loss" in err and "held out" in err


def test_early_stopping_and_save_best(capsys, tmp_path):
    best = tmp_path / "best.npz"
    status, out, err = run(
        capsys, "train", *SMALL, "--epochs", "6", "--val-split", "0.2", "--lr", "1e-7",
        "--early-stopping", "1", "--save-best", best, "--json",
    )  # fmt: skip
    assert status == 0, err
    final = json_lines(out)[-1]
    assert final["stopped_early"] and final["epochs"] == 2  # no gain at lr 1e-7
    assert "early stopping after epoch 2" in err
    ck = io.load_checkpoint(best)
    assert ck.epoch == 1 and final["best_val_accuracy"] == ck.extra["history"]["val_accuracy"][0]
    status, _, err = run(capsys, "train", *SMALL, "--early-stopping", "2")
    assert status == 1 and "give --val-split" in err


def test_progress_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(xcnn.training, "_LINE_S", 0.0)  # a line at every check
    monkeypatch.setattr(xcnn.training, "_CHECK_S", 0.0)
    argv = ["train", "--train-size", "64", "--test-size", "32", "--epochs", "1", "--batch-size", 16]
    status, _, err = run(capsys, *argv)
    assert status == 0
    lines = [line for line in err.splitlines() if "images, loss" in line]
    assert lines and lines[0].startswith("epoch 1/1: 16/64 images, loss") and "img/s" in lines[0]
    assert "\r" not in err  # no bar


def test_python_dash_m_json_stdout_is_only_json(tmp_path):
    argv = [sys.executable, "-m", "xcnn", "train", *SMALL, "--epochs", "1", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json_lines(done.stdout)
    assert rows[0]["epoch"] == 1 and "test_accuracy" in rows[-1]
    assert "test accuracy:" in done.stderr


@pytest.mark.parametrize("model", ["resnet"])
def test_resume_is_exact_with_dropout_batchnorm_schedule_and_early_stopping(
    capsys, tmp_path, model
):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    common = ["train", "--model", model, "--train-size", "200", "--test-size", "50",
              "--no-progress", "--batch-size", "50", "--val-split", "0.2", "--early-stopping",
              "5", "--schedule", "step", "--lr-decay", "0.5", "--warmup", "0.5"]  # fmt: skip
    assert run(capsys, *common, "--epochs", "2", "--save", a)[0] == 0
    assert run(capsys, *common, "--epochs", "1", "--save", b)[0] == 0
    status, _, err = run(capsys, "train", "--resume", b, "--epochs", "1", "--save", b)
    assert status == 0, err
    full, resumed = io.load_checkpoint(a), io.load_checkpoint(b)
    for key, value in full.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[key], value, err_msg=key)
    assert resumed.model.rng.bit_generator.state == full.model.rng.bit_generator.state
    assert resumed.optimizer.steps == full.optimizer.steps
    assert resumed.extra["train"]["state"] == full.extra["train"]["state"]
    assert resumed.extra["history"]["val_accuracy"] == full.extra["history"]["val_accuracy"]
    status, _, err = run(capsys, "train", "--resume", b, "--schedule", "cosine")
    assert status == 1 and "--schedule cannot be combined with --resume" in err
