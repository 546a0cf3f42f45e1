"""The GPU benchmark's code path and its results file, on the CPU (``--dry-run``).

The device run (benchmarks/gpu_run.sh) has minutes, not a second try: what can
break in the script itself is checked here, with NumPy and PyTorch on the CPU
standing in for CuPy and CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import throughput

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"net", "batch", "xcnn_img_s", "torch_fp32_img_s", "torch_tf32_img_s"}


def _timing(v: float) -> dict:
    return {"median": v, "spread": 0.0, "rates": [v, v]}


def test_gpu_results_shape() -> None:
    out = {
        "env": {"gpu": "NVIDIA H200", "python": "3.12", "numpy": "2", "cupy": "14", "xcnn": "0"},
        "dry_run": False,
        "training": [
            {
                "net": "seed",
                "batch": 128,
                "xcnn": _timing(200.0),
                "xcnn-graph": _timing(300.0),
                "torch-fp32": _timing(100.0),
                "torch-default": _timing(120.0),
                "mem_xcnn": 10.0,
                "mem_torch": 20.0,
            },
            {"net": "resnet", "batch": 128, "xcnn": _timing(50.0)},  # no PyTorch twin
        ],
        "inference": [
            {"net": "seed", "batch": 1024, "xcnn": _timing(9.0), "torch-fp32": _timing(3.0)}
        ],
        "targets": [{"target": "t", "value": 2.0, "met": True}],
    }
    res = throughput.gpu_results(out)
    assert res["card"] == "NVIDIA H200" and len(res["date"]) == 10
    assert res["versions"]["cupy"] == "14"
    assert all(ROW_KEYS <= set(r) for r in res["training"] + res["inference"])
    seed, resnet = res["training"]
    assert seed["xcnn_img_s"] == 200.0 and seed["torch_fp32_img_s"] == 100.0
    assert seed["xcnn_vs_torch_fp32"] == 2.0 and seed["xcnn_graph_vs_torch_fp32"] == 3.0
    assert seed["peak_mib_xcnn"] == 10.0 and seed["peak_mib_torch"] == 20.0
    assert resnet["torch_fp32_img_s"] is None and resnet["xcnn_vs_torch_fp32"] is None
    assert res["inference"][0]["torch_tf32_img_s"] is None
    json.dumps(res)  # plain JSON


def test_json_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "gpu.json"
    throughput.write_json_atomic(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["gpu.json"]  # no temporary left


@pytest.mark.slow
def test_gpu_dry_run_writes_the_results_file(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    path = tmp_path / "gpu.json"
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--device", "gpu", "--dry-run"]
    cmd += ["--nets", "seed", "--results", str(path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "DRY RUN" in res.stdout and "xcnn-graph img/s" in res.stdout
    assert "Targets (issue 9" in res.stdout
    data = json.loads(path.read_text())
    assert data["dry_run"] is True
    assert [(r["net"], r["batch"]) for r in data["training"]] == [("seed", 2), ("seed", 4)]
    assert [(r["net"], r["batch"]) for r in data["inference"]] == [("seed", 2), ("seed", 4)]
    for row in data["training"] + data["inference"]:
        assert ROW_KEYS <= set(row)
        assert row["xcnn_img_s"] > 0 and row["torch_fp32_img_s"] > 0 and row["torch_tf32_img_s"] > 0
    assert data["training"][0]["xcnn_graph_img_s"] > 0


def test_gpu_run_script_dry_run(tmp_path: Path) -> None:
    """benchmarks/gpu_run.sh --dry-run: the plan of the device call, checked here."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out)}
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    text = res.stdout
    assert "XCNN_REQUIRE_CUPY=1" in text and "XCNN_CUDA_KERNELS=1" in text
    assert "pip install" in text and "--no-index" in text
    assert "-m benchmarks.throughput --device gpu --quick --nets seed,lenet" in text
    assert (out / "plan.txt").exists()
