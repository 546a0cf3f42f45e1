"""benchmarks/throughput.py's target table, --contended, --check and --summarize (no timing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(_ROOT))

from benchmarks import throughput as tp  # noqa: E402


def _timing(median: float) -> dict:
    return {"median": median, "spread": 0.0, "rates": [median] * 3}


def _out(lenet_xcnn: float, loaded_xcnn: float) -> dict:
    """A run's results: every CPU target's row, torch at 100 img/s quiet and 50 loaded."""
    training = []
    for net in ("seed", "lenet"):
        for batch in (1, 32, 128):
            x = lenet_xcnn if net == "lenet" else 150.0
            row = {"net": net, "batch": batch, "xcnn": _timing(x), "torch-cpu": _timing(100.0)}
            row["tutorial"] = _timing(x / 400)
            row["mem_xcnn"], row["mem_torch"] = 100.0, 100.0
            row["contended"] = {"xcnn": _timing(x * loaded_xcnn), "torch-cpu": _timing(50.0)}
            training.append(row)
    inference = [
        {"net": n, "batch": 1000, "xcnn": _timing(200.0), "torch-cpu": _timing(100.0)}
        for n in ("seed", "lenet")
    ]
    env = {"cpu": "test CPU", "usable_cpus": 2, "python": "3", "numpy": "2", "blas": "b"}
    env.update(xcnn="0", fast_paths="on", thread_env="", load_avg=[0.1, 0.1, 0.1])
    return {
        "date": "today",
        "env": env,
        "training": training,
        "inference": inference,
        "targets": [],
    }


def test_targets_met_and_missed():
    out = _out(lenet_xcnn=120.0, loaded_xcnn=0.6)  # keeps 60% under load; torch keeps 50%
    text = tp._targets(out, "cpu", contended=True)
    assert "contended lenet batch 32: xcnn/torch >= 1x" in text
    assert tp.missed_targets(out) == []
    slow = _out(lenet_xcnn=90.0, loaded_xcnn=0.4)  # lenet 0.9x; keeps 40% under load
    tp._targets(slow, "cpu", contended=True)
    missed = tp.missed_targets(slow)
    assert "train lenet batch 32: xcnn/torch >= 1x" in missed
    assert "contended seed batch 128: xcnn/torch >= 1x" in missed
    assert "train seed batch 32: xcnn/torch >= 1.2x" not in missed


def test_contended_targets_only_with_the_option_and_unmeasured_counts_as_missed():
    out = _out(lenet_xcnn=120.0, loaded_xcnn=0.6)
    text = tp._targets(out, "cpu", contended=False)
    assert "contended" not in text
    out = _out(lenet_xcnn=120.0, loaded_xcnn=0.6)
    del out["training"][0]["torch-cpu"]  # seed batch 1 not measured against torch
    tp._targets(out, "cpu", contended=True)
    assert tp.missed_targets(out) == ["train seed batch 1: xcnn/torch >= 1x"]


def test_contended_table_reports_both_slowdowns():
    out = _out(lenet_xcnn=120.0, loaded_xcnn=0.6)
    text = tp._contended_table(out, ["cpu"])
    assert "xcnn kept" in text and "torch-cpu kept" in text
    assert "0.60x" in text and "0.50x" in text and "1.20x" in text


def test_busy_core_runs_a_process_and_stops_it(monkeypatch):
    started = []
    real = tp.subprocess.Popen

    def spy(*args, **kwargs):
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(tp.subprocess, "Popen", spy)
    with tp.busy_core():
        assert len(started) == 1 and started[0].poll() is None  # spinning
    assert started[0].poll() is not None  # gone after the block


def test_summarize_prints_every_run_and_the_spread(tmp_path):
    paths = []
    for i, lenet in enumerate((110.0, 90.0, 130.0)):
        out = _out(lenet_xcnn=lenet, loaded_xcnn=0.6)
        tp._targets(out, "cpu", contended=True)
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(out))
    text = tp.summarize([str(p) for p in paths])
    line = next(x for x in text.splitlines() if x.startswith("| train lenet batch 32"))
    assert "| 1.10x | 0.90x | 1.30x | 1.10x | 0.90-1.30x | 2/3 |" in line
    assert text.count("test CPU") == 3
    assert tp.main(["--summarize", *map(str, paths)]) == 0


def test_the_environment_names_the_blas_kernels_that_run():
    """The build config says "Haswell" for a DYNAMIC_ARCH OpenBLAS whatever it runs."""
    from benchmarks import common  # noqa: PLC0415  (after the path set-up above)

    core = common._openblas_core()
    if core is None:
        pytest.skip("NumPy's BLAS is not its bundled OpenBLAS")
    assert core.strip() and f"running its {core} kernels" in common._blas()


def test_race_times_blocks_only_after_untimed_steps_following_each_pause():
    """A contestant slow on its first step after an idle pause: ``rewarm_s`` keeps it untimed."""
    import time

    from benchmarks import common

    def contestant() -> tuple[common.Contestant, list[str]]:
        calls: list[str] = []
        last = [time.perf_counter()]

        def run() -> None:
            cold = time.perf_counter() - last[0] > 0.04  # the first step after a pause
            time.sleep(0.03 if cold else 0.001)
            calls.append("cold" if cold else "warm")
            last[0] = time.perf_counter()

        return common.Contestant("c", run, images=1), calls

    how = {"repeats": 2, "block_s": 0.01, "warmup_s": 0.01, "settle_s": 0.05}
    c, calls = contestant()
    paused = common.race([c], **how)["c"].median  # each block begins with a cold step
    c, calls = contestant()
    rewarmed = common.race([c], **how, rewarm_s=0.005)["c"].median
    assert calls.count("cold") == 3  # the warm-up and both blocks, each after its pause
    assert rewarmed > 2 * paused  # the cold steps were not timed
