"""Careless runs and hostile surroundings: writes, signals, pipes, numbers, downloads, resumes."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import xcnn
from xcnn import atomic, cli, datasets, io, runs
from xcnn.io import CheckpointError
from xcnn.optim import SGD, Adam

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--train-size", "300", "--test-size", "100", "--no-progress"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), XCNN_DEBUG="")


def _model_and_opt(kind="adam", steps=1):
    model = xcnn.Sequential([xcnn.Dense(4, 3)], seed=1)
    opt = Adam(model, 0.01) if kind == "adam" else SGD(model, 0.1, momentum=0.9)
    for _ in range(steps):
        model.backward(model.forward(model.asarray(np.ones((2, 4)))))
        opt.step()
    return model, opt


def _tmp_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".xcnn-tmp-" in p.name)


# -- atomic writes ---------------------------------------------------------------------------


def test_save_through_a_symlink_replaces_the_target(tmp_path):
    model, _ = _model_and_opt()
    target = tmp_path / "real.npz"
    link = tmp_path / "link.npz"
    io.save(model, target)
    link.symlink_to(target)
    model.layers[0].params["weight"] = model.layers[0].params["weight"] + 1
    io.save(model, link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    np.testing.assert_array_equal(
        io.load(target).state_dict()["0.weight"], model.state_dict()["0.weight"]
    )


def test_a_dangling_symlink_creates_its_target(tmp_path):
    model, _ = _model_and_opt()
    link = tmp_path / "link.npz"
    link.symlink_to(tmp_path / "new.npz")
    io.save(model, link)
    assert link.is_symlink() and (tmp_path / "new.npz").is_file()


def test_never_replaces_a_fifo_directory_or_device(tmp_path):
    model, _ = _model_and_opt()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(atomic.UnsafeTargetError, match="FIFO"):
        io.save(model, fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(IsADirectoryError):
        io.save(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="empty"):
        io.save(model, "")
    if os.path.exists("/dev/null"):
        with pytest.raises(atomic.UnsafeTargetError, match="device"):
            io.save(model, "/dev/null")
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    link = tmp_path / "to-null"
    link.symlink_to(fifo)
    with pytest.raises(atomic.UnsafeTargetError):
        io.save(model, link)
    assert _tmp_names(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_file_modes_follow_the_umask(tmp_path, umask):
    model, _ = _model_and_opt()
    old = os.umask(umask)
    try:
        io.save(model, tmp_path / "m.npz")
        with atomic.atomic_write(tmp_path / "plain.bin") as fh:
            fh.write(b"x")
    finally:
        os.umask(old)
    for name in ("m.npz", "plain.bin"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.npz.xcnn-tmp-{dead.pid}"
    stale.write_bytes(b"half a checkpoint")
    alive = tmp_path / f".m.npz.xcnn-tmp-{os.getppid()}"  # a live process: kept
    alive.write_bytes(b"in progress")
    unrelated = tmp_path / ".m.npz.tmp"
    unrelated.write_bytes(b"not ours")
    model, _ = _model_and_opt()
    io.save(model, tmp_path / "m.npz")
    assert not stale.exists() and alive.exists() and unrelated.exists()


def test_a_save_killed_with_sigkill_is_cleaned_up_by_the_next(tmp_path):
    path = tmp_path / "m.npz"
    code = (
        "import time, numpy as np, xcnn\n"
        "from xcnn import io\n"
        "def slow(fh, arrays):\n"
        "    fh.write(b'PK' + bytes(1000)); fh.flush()\n"
        "    print('writing', flush=True); time.sleep(60)\n"
        "io._write_npz = slow\n"
        f"io.save(xcnn.Sequential([xcnn.Dense(4, 3)]), {str(path)!r})\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV
    ) as child:
        assert child.stdout.readline().strip() == "writing"
        child.kill()
    assert len(_tmp_names(tmp_path)) == 1 and not path.exists()
    model, _ = _model_and_opt()
    io.save(model, path)
    assert _tmp_names(tmp_path) == [] and path.is_file()


def test_check_writable(tmp_path):
    assert atomic.check_writable(tmp_path / "ok.npz") == tmp_path / "ok.npz"
    with pytest.raises(FileNotFoundError, match="No such directory"):
        atomic.check_writable(tmp_path / "no" / "x.npz")
    with pytest.raises(IsADirectoryError):
        atomic.check_writable(tmp_path)
    with pytest.raises(FileNotFoundError):
        atomic.check_writable("")


# -- the CLI: found before training, signals, pipes ----------------------------------------------


def _cli(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--save", ""], "empty path"),
        (["--save", "{tmp}"], "is a directory"),
        (["--save", "{tmp}/missing/x.npz"], "No such directory"),
        (["--save", "{fifo}"], "FIFO"),
        (["--plots", "{file}"], "names a file"),
        (["--plots", "{file}/sub"], "not a directory"),
    ],
)
def test_bad_output_paths_fail_before_training(capsys, tmp_path, extra, fragment):
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    argv = [a.format(tmp=tmp_path, file=tmp_path / "file", fifo=tmp_path / "fifo") for a in extra]
    start = time.perf_counter()
    status, out, err = _cli(capsys, "train", *SMALL, "--epochs", "1", *argv)
    assert status == 1 and fragment in err and err.count("\n") == 1, err
    assert "training" not in out and "epoch" not in out
    assert time.perf_counter() - start < 5


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_unwritable_save_directory_fails_before_training(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    os.chmod(tmp_path, 0o755)
    code = (
        "import os, sys; os.setgid(65534); os.setuid(65534)\n"
        "from xcnn import cli\n"
        f"sys.exit(cli.main(['train', '--train-size', '50', '--test-size', '20', '--epochs', '1',"
        f" '--no-progress', '--save', {str(locked / 'm.npz')!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120
    )
    if "xcnn: error" not in done.stderr:
        pytest.skip("the unprivileged user cannot run this Python (its files are root's)")
    assert done.returncode == 1, done.stderr
    assert "not writable" in done.stderr and "training" not in done.stdout


def test_unwritable_save_directory_is_found_first(capsys, tmp_path, monkeypatch):
    """As root every directory is writable: os.access stands in for the permission bits."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    status, out, err = _cli(capsys, "train", *SMALL, "--save", locked / "m.npz")
    assert status == 1 and "not writable" in err and str(locked) in err and "training" not in out
    status, out, err = _cli(capsys, "train", *SMALL, "--plots", locked / "plots")
    assert status == 1 and "not writable" in err and "training" not in out


def _slow_train(tmp_path, *extra):
    argv = [sys.executable, "-m", "xcnn", "train", *SMALL, "--epochs", "400", "--batch-size", "8",
            "--save", str(tmp_path / "m.npz"), *extra]  # fmt: skip
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_sigterm_and_sighup_stop_like_ctrl_c(tmp_path, signum):
    with _slow_train(tmp_path) as child:
        # After epoch 2's line, epoch 1's checkpoint is on disk; the signal may come mid-save.
        while "epoch 2:" not in child.stdout.readline():
            assert child.poll() is None, child.stderr.read()
        child.send_signal(signum)
        _, err = child.communicate(timeout=60)
    assert child.returncode == (130 if signum == signal.SIGINT else 128 + signum), err
    assert err.strip().splitlines()[-1].startswith("xcnn: error: interrupted"), err
    assert "Traceback" not in err
    assert io.load_checkpoint(tmp_path / "m.npz").epoch >= 1
    assert _tmp_names(tmp_path) == []


def test_piping_into_head_does_not_stop_training(tmp_path):
    argv = [sys.executable, "-m", "xcnn", "train", *SMALL, "--epochs", "3",
            "--save", str(tmp_path / "m.npz")]  # fmt: skip
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=tmp_path
    ) as child:
        child.stdout.readline()
        child.stdout.close()  # what `| head -1` does
        err = child.stderr.read().decode()
        assert child.wait(timeout=120) == 0, err
    assert err == "", err
    assert io.load_checkpoint(tmp_path / "m.npz").epoch == 3


# -- numbers that cannot train ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda m: SGD(m, float("inf")), "lr"),
        (lambda m: SGD(m, 1e308), "lr"),
        (lambda m: SGD(m, float("nan")), "lr"),
        (lambda m: Adam(m, -1), "lr"),
        (lambda m: SGD(m, 0.1, momentum=1.0), "momentum"),
        (lambda m: SGD(m, 0.1, momentum=float("nan")), "momentum"),
        (lambda m: SGD(m, 0.1, momentum=-0.5), "momentum"),
        (lambda m: Adam(m, betas=(1.0, 0.999)), r"betas\[0\]"),
        (lambda m: Adam(m, betas=(0.9, 1.5)), r"betas\[1\]"),
        (lambda m: Adam(m, betas=(0.9, float("nan"))), r"betas\[1\]"),
        (lambda m: Adam(m, betas=(0.9,)), "betas"),
        (lambda m: Adam(m, eps=0.0), "eps"),
        (lambda m: Adam(m, eps=float("inf")), "eps"),
        (lambda m: Adam(m, lr="fast"), "lr must be a number"),
    ],
)
def test_hyperparameters_are_validated_by_name(make, fragment):
    model = xcnn.Sequential([xcnn.Dense(4, 3)])
    with pytest.raises(ValueError, match=fragment):
        make(model)


def _rewrite_state(path, mutate):
    from tests.test_fuzz import _rehashed

    _rehashed(path, mutate)


def _set(key, value):
    def mutate(meta, arrays):
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value(arrays) if callable(value) else value
        return meta

    return mutate


def _optimizer_meta(**changes):
    def mutate(meta, arrays):
        meta["optimizer"] = {**meta["optimizer"], **changes}
        return meta

    return mutate


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (_set("optim.0.weight.m", None), "missing"),
        (_set("optim.0.weight.extra", lambda a: a["optim.0.weight.m"]), "unexpected"),
        (_set("optim.0.weight.m", np.zeros((4, 3), np.int32)), "real floating"),
        (_set("optim.0.weight.m", np.zeros((4, 3), np.complex64)), "real floating"),
        (_set("optim.0.weight.m", np.zeros((3, 4), np.float32)), "shape"),
        (_optimizer_meta(steps=0), "unexpected"),
        (_optimizer_meta(hyperparams={"lr": 1e308}), "lr"),
        (_optimizer_meta(hyperparams={"lr": 0.1, "betas": [1.0, 0.9]}), "betas"),
    ],
    ids=[
        "missing-slot",
        "extra-slot",
        "int-slot",
        "complex-slot",
        "shape",
        "steps-0",
        "lr",
        "beta",
    ],
)
def test_optimizer_state_is_checked_against_the_parameters(tmp_path, mutate, fragment):
    model, opt = _model_and_opt("adam", steps=2)
    path = tmp_path / "m.npz"
    io.save(model, path, opt)
    _rewrite_state(path, mutate)
    with pytest.raises(CheckpointError, match=fragment) as e:
        io.load_checkpoint(path)
    assert str(path) in str(e.value)


def test_integer_weights_are_refused(tmp_path):
    model, _ = _model_and_opt()
    path = tmp_path / "m.npz"
    io.save(model, path)
    _rewrite_state(
        path, lambda meta, a: (a.__setitem__("param.0.weight", np.ones((4, 3), np.int64)), meta)[1]
    )
    with pytest.raises(CheckpointError, match="real floating"):
        io.load_checkpoint(path)


def test_momentum_state_round_trips_exactly(tmp_path):
    model, opt = _model_and_opt("sgd", steps=3)
    io.save(model, tmp_path / "m.npz", opt)
    ck = io.load_checkpoint(tmp_path / "m.npz")
    assert ck.optimizer.steps == 3 and ck.optimizer.momentum == 0.9
    np.testing.assert_array_equal(
        ck.optimizer.state["0.weight"]["velocity"], opt.state["0.weight"]["velocity"]
    )


def test_a_diverged_run_never_overwrites_a_checkpoint(tmp_path):
    settings = runs.resolve_settings({"epochs": 1})
    run = runs.start_run(settings)
    path = tmp_path / "m.npz"
    run.save(path, 1)
    before = path.read_bytes()
    run.history["train_loss"] = [float("nan")]
    with pytest.raises(ValueError, match="diverged"):
        run.save(path, 2)
    run.history["train_loss"] = [1.0]
    layer = run.model.layers[-1]
    layer.params["weight"] = layer.params["weight"] * np.inf
    with pytest.raises(ValueError, match="diverged"):
        run.save(path, 2)
    assert path.read_bytes() == before


# -- small things ----------------------------------------------------------------------------------


def test_backward_with_a_wrong_shaped_dy_names_the_layer_and_shapes():
    model = xcnn.Sequential([xcnn.Dense(4, 3)])
    model.forward(model.asarray(np.ones((2, 4))))
    for bad in (np.ones((2, 1)), np.ones((1, 3)), np.ones((3,))):
        with pytest.raises(ValueError, match=r"Dense\(4, 3\).*\(2, 3\)"):
            model.backward(model.asarray(bad))


def test_an_empty_batch_is_a_clear_error():
    model = xcnn.models.build_model("seed")
    with pytest.raises(ValueError, match="empty batch"):
        model.forward(model.asarray(np.zeros((0, 1, 28, 28))))
    with pytest.raises(ValueError, match="empty|at least"):
        xcnn.predict(model, np.zeros((0, 1, 28, 28), np.uint8))


def test_opening_a_fifo_as_a_checkpoint_does_not_block(tmp_path, capsys):
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    result = {}

    def load():
        try:
            io.load_checkpoint(fifo)
        except CheckpointError as e:
            result["error"] = str(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=5)
    if thread.is_alive():  # unblock it before failing
        with open(fifo, "wb"):
            pass
        pytest.fail("load_checkpoint blocked on a FIFO")
    assert str(fifo) in result["error"] and "not a regular file" in result["error"]
    status, _, err = _cli(capsys, "evaluate", fifo)
    assert status == 1 and "not a regular file" in err


def test_python_checkpoint_resumed_from_the_cli_does_not_take_the_seed_recipe(tmp_path, capsys):
    model = xcnn.models.build_model("seed")
    opt = xcnn.make_optimizer("momentum", model, 0.02)
    path = tmp_path / "py.npz"
    io.save(model, path, opt, epoch=0)
    status, _, err = _cli(capsys, "train", *SMALL, "--resume", path)
    assert status == 1 and "--epochs and --batch-size" in err and str(path) in err
    status, out, err = _cli(
        capsys, "train", *SMALL, "--resume", path, "--epochs", "1", "--batch-size", "50", "--json"
    )
    assert status == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["lr"] == pytest.approx(0.02) and report["lr_decay"] == 1.0
    assert report["batch_size"] == 50


def test_a_resume_records_the_original_learning_rate(tmp_path, capsys):
    path = tmp_path / "m.npz"
    argv = ["train", *SMALL, "--epochs", "1", "--lr", "0.004", "--lr-decay", "0.5", "--save", path]
    assert _cli(capsys, *argv)[0] == 0
    assert _cli(capsys, "train", *SMALL, "--epochs", "1", "--resume", path, "--save", path)[0] == 0
    ck = io.load_checkpoint(path)
    assert ck.extra["train"]["lr"] == 0.004
    assert ck.optimizer.lr == pytest.approx(0.004 * 0.25)  # decayed twice, from the original
    assert ck.epoch == 2


def test_settings_precedence():
    fresh = runs.resolve_settings({"model": "lenet", "batch_size": 7})
    assert (fresh.batch_size, fresh.lr, fresh.epochs) == (7, 0.001, 5)
    other = runs.resolve_settings({"optimizer": "sgd"})
    assert (other.optimizer, other.lr, other.lr_decay) == ("sgd", 0.01, 1.0)
    with pytest.raises(ValueError, match="unknown model"):
        runs.resolve_settings({"model": "nope"})


def test_scale_is_part_of_the_model_and_checkpoint(tmp_path):
    s = datasets.sample()
    model = xcnn.models.build_model("seed")
    opt = xcnn.make_optimizer("adam", model, 0.005)
    xcnn.fit(
        model, opt, s.x_train[:200], s.y_train[:200], epochs=1, scale="standard", progress=False
    )
    assert model.scale == "standard"
    xcnn.save(model, tmp_path / "m.npz")
    loaded = xcnn.load(tmp_path / "m.npz")
    assert loaded.scale == "standard"
    np.testing.assert_allclose(
        xcnn.predict(loaded, s.x_test[:50]),
        xcnn.predict(model, s.x_test[:50], scale="standard"),
        rtol=1e-6,
    )
    assert not np.allclose(
        xcnn.predict(loaded, s.x_test[:50]), xcnn.predict(model, s.x_test[:50], scale="unit")
    )


def test_the_current_format_with_scale_in_extra_still_reads(tmp_path):
    from tests.test_fuzz import _rehashed

    model = xcnn.models.build_model("seed")
    path = tmp_path / "old.npz"
    xcnn.save(model, path, extra={"scale": "unit"})

    def old_format(meta, arrays):
        del meta["model"]["scale"], meta["model"]["classes"]
        return meta

    _rehashed(path, old_format)
    assert xcnn.load(path).scale == "unit"


# -- downloads -------------------------------------------------------------------------------------


class _Trickle(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.server.body
        self.send_response(200)
        if self.server.announce is not None:
            self.send_header("Content-Length", str(self.server.announce))
        self.end_headers()
        for i in range(0, len(body), self.server.step):
            self.wfile.write(body[i : i + self.server.step])
            self.wfile.flush()
            time.sleep(self.server.pause)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serve(body, *, step, pause, announce=None):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    server.body, server.step, server.pause, server.announce = body, step, pause, announce
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")


def _md5s(body):
    import hashlib

    return {f + ".gz": hashlib.md5(body).hexdigest() for f in datasets.FILES}


def test_a_trickling_server_hits_the_total_deadline(tmp_path, monkeypatch, no_proxy):
    monkeypatch.setattr(datasets, "DOWNLOAD_DEADLINE", 1.0)
    body = bytes(4000)
    with _serve(body, step=100, pause=0.1) as url:  # every read succeeds; the whole takes 4 s
        start = time.perf_counter()
        with pytest.raises(datasets.DownloadError, match="took over 1 s"):
            datasets.mnist(cache_dir=tmp_path, mirrors=[url], checksums=_md5s(body), progress=False)
    assert time.perf_counter() - start < 3.5
    assert os.listdir(tmp_path / "mnist") == []


@pytest.mark.parametrize("announce", [None, 10_000], ids=["unannounced", "content-length"])
def test_downloads_are_capped(tmp_path, monkeypatch, no_proxy, announce):
    monkeypatch.setattr(datasets, "MAX_DOWNLOAD_BYTES", 5000)
    body = bytes(10_000)
    with _serve(body, step=1000, pause=0, announce=announce) as url:
        with pytest.raises(datasets.DownloadError, match="5000-byte limit"):
            datasets.mnist(cache_dir=tmp_path, mirrors=[url], checksums=_md5s(body), progress=False)
    assert os.listdir(tmp_path / "mnist") == []


def test_built_in_datasets_are_never_cached_without_a_checksum(tmp_path):
    checksums = dict(datasets.MNIST_MD5, **{"t10k-labels-idx1-ubyte.gz": None})
    with pytest.raises(ValueError, match="no MD5 checksum for t10k-labels"):
        datasets.mnist(cache_dir=tmp_path, mirrors=["http://127.0.0.1:9/"], checksums=checksums)
    with pytest.raises(ValueError, match="no MD5"):
        datasets.fashion_mnist(cache_dir=tmp_path, checksums={})
