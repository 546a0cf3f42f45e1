#!/usr/bin/env bash
# The whole GPU check of issue 9 in one device call of about 6 minutes:
#
#   1. install the project from the tree and the wheels carried in .whl/ (the
#      device machine has numpy, cupy-cuda13x, torch, pytest, tqdm; it cannot
#      download anything);
#   2. the CuPy kernel and CUDA-graph tests (tests/test_cuda_gpu.py and the
#      CPU-side kernel tests), with XCNN_REQUIRE_CUPY=1 XCNN_CUDA_KERNELS=1;
#   3. the whole suite with XCNN_REQUIRE_CUPY=1 XCNN_CUDA_KERNELS=1 (every
#      backend-parametrised test then runs on CuPy with the kernels on), and
#      the parity and layer tests once more on CuPy's generic path
#      (XCNN_CUDA_KERNELS=0, what users get by default);
#   4. the GPU benchmark (python -m benchmarks.throughput --device gpu --quick),
#      writing the results JSON.
#
# Logs and JSON go to $OUT (at most 8 files come back from a device call):
# plan.txt, env.txt, kernels.log, suite.log, bench.log, gpu-YYYY-MM-DD.json (seed
# and lenet: the targets), gpu-YYYY-MM-DD-extra.json (lenet5, resnet where
# xcnn.models has them), summary.txt. Every step has its own time limit
# (75 + 150 + 30 + 100 + 40 s at most), so one that hangs cannot eat the others'
# time. `--dry-run` prints and saves the plan (plan.txt) without running anything. benchmarks/README.md
# gives the exact device-tool call and how to build .whl/.
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
OUT=${OUT:-/tmp/xcnn-gpu-out}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
mkdir -p "$OUT"
SITE=${XCNN_SITE:-/tmp/xcnn-site}
DAY=$(date -u +%Y-%m-%d)
PY=${PYTHON:-python3}
XDIST=${XCNN_GPU_XDIST:-8}  # pytest-xdist workers for the whole suite (0: none)
T0=$(date +%s)
PLAN="$OUT/plan.txt"
: >"$PLAN"
declare -a RESULTS=()

step() {  # step NAME LIMIT_S LOG -- command...: run it (or, dry, print it) under a time limit
  local name=$1 limit=$2 log=$3
  shift 4
  local line="[$name, ${limit}s] $* > $log"
  echo "+ $line" | tee -a "$PLAN"
  if [[ $DRY == 1 ]]; then return 0; fi
  local t=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  RESULTS+=("$name: exit $rc after $(( $(date +%s) - t ))s (log $(basename "$log"))")
  echo "  -> exit $rc" | tee -a "$PLAN"
  return 0
}

# ---------------------------------------------------------------- 1. install
WHEELS=$(ls .whl/*.whl 2>/dev/null | tr '\n' ' ')
for need in array_api_compat array_api_extra array_api_strict; do
  if ! ls .whl/${need}-*.whl >/dev/null 2>&1; then
    echo "warning: .whl/ has no ${need} wheel (see benchmarks/README.md, 'GPU run')" | tee -a "$PLAN"
  fi
done
echo "+ $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade" \
  "--target $SITE ${WHEELS:-.whl/*.whl}" | tee -a "$PLAN"
export PYTHONPATH="$ROOT:$SITE"
export PATH="$SITE/bin:$PATH"
export PYTHONUNBUFFERED=1
# JAX (installed there, with its CUDA plugin) would take 75% of the GPU's memory at
# its first import inside the test process; the suite means it to run on the CPU.
export JAX_PLATFORMS=cpu XLA_PYTHON_CLIENT_PREALLOCATE=false
echo "+ export JAX_PLATFORMS=cpu XLA_PYTHON_CLIENT_PREALLOCATE=false" | tee -a "$PLAN"
if [[ $DRY == 0 ]]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl >"$OUT/env.txt" 2>&1 || echo "pip install failed" >>"$OUT/env.txt"
  # The project runs from the tree (PYTHONPATH); its console script, as pip would make it:
  mkdir -p "$SITE/bin"
  printf '#!/usr/bin/env %s\nimport sys\nfrom xcnn.cli import main\nsys.exit(main())\n' \
    "$PY" >"$SITE/bin/xcnn"
  chmod +x "$SITE/bin/xcnn"
  {
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY - <<'EOF'
import platform, numpy, cupy, torch, xcnn
print("python", platform.python_version(), "numpy", numpy.__version__, "cupy", cupy.__version__,
      "torch", torch.__version__, "cuda runtime", cupy.cuda.runtime.runtimeGetVersion(),
      "devices", cupy.cuda.runtime.getDeviceCount(), "xcnn", xcnn.__version__)
EOF
  } >>"$OUT/env.txt" 2>&1
fi

# ---------------------------------------------------------------- 2.-3. tests
echo "+ export XCNN_REQUIRE_CUPY=1  # a missing CuPy or GPU fails the tests, never skips them" \
  | tee -a "$PLAN"
export XCNN_REQUIRE_CUPY=1
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs)
step kernels 75 "$OUT/kernels.log" -- env XCNN_CUDA_KERNELS=1 "${PYTEST[@]}" \
  tests/test_cuda_gpu.py tests/test_cuda_kernels.py
PAR=()
if [[ $XDIST != 0 ]]; then PAR=(-n "$XDIST"); fi
step suite 150 "$OUT/suite.log" -- env XCNN_CUDA_KERNELS=1 "${PYTEST[@]}" "${PAR[@]}" \
  --ignore=tests/test_cuda_gpu.py --ignore=tests/test_cuda_kernels.py
step generic 30 "$OUT/suite.log" -- env XCNN_CUDA_KERNELS=0 "${PYTEST[@]}" \
  tests/test_parity.py tests/test_layers.py tests/test_cuda_gpu.py -k "cupy or generic"

# ---------------------------------------------------------------- 4. benchmark
# Two invocations, so the nets the targets name are written even if the extra nets
# run out of time (a benchmark killed by its limit writes nothing).
step bench 100 "$OUT/bench.log" -- env XCNN_CUDA_KERNELS=1 \
  "$PY" -m benchmarks.throughput --device gpu --quick --nets seed,lenet \
  --results "$OUT/gpu-$DAY.json"
EXTRA=$($PY -c "from benchmarks.throughput import EXTRA_NETS as E; from xcnn.models import MODELS as M
print(','.join(n for n in E if n in M))" 2>/dev/null)
if [[ -n "$EXTRA" ]]; then
  step bench-extra 40 "$OUT/bench.log" -- env XCNN_CUDA_KERNELS=1 \
    "$PY" -m benchmarks.throughput --device gpu --quick --nets "$EXTRA" \
    --results "$OUT/gpu-$DAY-extra.json"
else
  echo "+ (no extra nets in xcnn.models: lenet5/resnet not benchmarked)" | tee -a "$PLAN"
fi

# ---------------------------------------------------------------- summary
{
  echo "xcnn GPU run, $(date -u +%FT%TZ), $(( $(date +%s) - T0 ))s in all"
  if [[ $DRY == 1 ]]; then echo "dry run: nothing executed; plan in plan.txt"; fi
  for r in "${RESULTS[@]}"; do echo "$r"; done
  if [[ $DRY == 0 ]]; then
    grep -hE "^(FAILED|ERROR)|passed|failed" "$OUT/kernels.log" "$OUT/suite.log" 2>/dev/null \
      | tail -40
  fi
} | tee "$OUT/summary.txt"
if [[ $DRY == 1 ]]; then rm -f "$OUT/summary.txt"; fi
exit 0
