#!/usr/bin/env bash
# GPU check for an offline CUDA machine (H100/H200) whose Python already has torch >= 2.11 and triton 3.6:
# installs fusedlab without dependencies or build isolation, builds _C_cuda, runs the GPU tests
# (tests/*_gpu.py, and the cat Triton and layer tests and the symile Triton tests, which run on the GPU when there
# is one) in one pass, then
# the benchmark target points of the named families (default: all) on the GPU with fixed kernel configs,
# writing the json results and the log (which holds the printed markdown tables) under bench/results/gpu/ (or
# $OUT); KEEP_ALL=1 keeps the markdown and PNG files too.
#
#   bash bench/gpu_check.sh [FAMILY ...]        e.g. bash bench/gpu_check.sh resample
#
# BUDGET_S (default 540) bounds the whole run, build and tests included: benchmark families that would start
# with under 60 s left are skipped by name. TEST_TIMEOUT (default 240) bounds the tests. SWEEP=1 then spends
# what is left on the Triton kernel-config sweeps (python -m fusedlab.perf.sweep, sweep_gpu.json; SWEEP_FAMILY=cat or
# newton_schulz sweeps one family).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
families=("$@")
[ ${#families[@]} -eq 0 ] && families=(cat newton_schulz resample symile)
export PYTHONUNBUFFERED=1
start=$(date +%s)

{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
  $PY -c "import torch, triton, setuptools; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'setuptools', setuptools.__version__)"
} 2>&1 | tee "$LOG"

# wheels carried to an offline machine (WHEELS, default .whl/: e.g. the symile package the benchmarks compare
# against, a newer setuptools), made here with: python -m pip download --no-deps -d .whl symile==0.1.0
if ls "${WHEELS:-.whl}"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --upgrade "${WHEELS:-.whl}"/*.whl >> "$LOG" 2>&1 \
    && echo "installed carried wheels: $(cd "${WHEELS:-.whl}" && ls *.whl | tr '\n' ' ')" | tee -a "$LOG"
fi
echo "== build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a})" | tee -a "$LOG"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
t0=$(date +%s)
if ! $PY -m pip install --no-deps --no-build-isolation -e . >> "$LOG" 2>&1; then
  # a CUDA build error must not cost the Triton tests and benchmarks of a GPU run: show it, build without _C_cuda
  echo "CUDA BUILD FAILED; retrying with FUSEDLAB_NO_CUDA=1" | tee -a "$LOG"
  grep -E "error|Error" "$LOG" | head -40
  if ! FUSEDLAB_NO_CUDA=1 $PY -m pip install --no-deps --no-build-isolation -e . >> "$LOG" 2>&1; then
    echo "BUILD FAILED (see $LOG)"; tail -40 "$LOG"; exit 1
  fi
fi
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
$PY -m fusedlab info 2>&1 | tee -a "$LOG"

status=0
echo "== GPU tests" | tee -a "$LOG"
# the GPU tests, plus the cat Triton and layer tests (decode kernel, row splits, layer on the GPU) and the symile
# Triton tests (its only GPU tests); the other families' Triton tests repeat their GPU tests at interpreter sizes
# (TESTS="..." picks other files)
TESTS=${TESTS:-"tests/*_gpu.py tests/test_symile_gemm.py tests/test_symile_triton.py tests/test_cat_triton.py tests/test_cat_layer.py"}
# Triton compilation is CPU-bound: with pytest-xdist present, a few workers share the one GPU
XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n ${TEST_WORKERS:-4}"
# -v: the log names every test as it ends; at the limit pytest gets SIGINT and still prints its summary, so a run
# cut short says which tests it reached (the log) and how many passed (the summary)
timeout -s INT -k 20 ${TEST_TIMEOUT:-240} $PY -m pytest -v $XDIST $TESTS -p no:cacheprovider -p no:warnings -rfEs \
  --durations=8 2>&1 | tee -a "$LOG" | tail -40 || status=1
for fam in "${families[@]}"; do
  # one run of the whole script: each family gets what is left of BUDGET_S (at most 200 s), and the
  # families that no longer fit are skipped by name, so the results of the others still come back
  left=$(( ${BUDGET_S:-540} - ($(date +%s) - start) ))
  if [ "$left" -lt 60 ]; then
    echo "== $fam: skipped, ${left} s of the ${BUDGET_S:-540} s budget left" | tee -a "$LOG"; status=1; continue
  fi
  echo "== $fam: benchmark target points (limit $(( left < 200 ? left - 10 : 200 )) s, at $(( $(date +%s) - start )) s)" | tee -a "$LOG"
  timeout $(( left < 200 ? left - 10 : 200 )) $PY -m fusedlab bench --family "$fam" --device cuda --out "$OUT" 2>&1 \
    | tee -a "$LOG" | tail -30 || status=1
  # the json files hold every number and the log holds the printed tables: drop the rest, so that a
  # machine returning only a few files returns all of these
  [ -n "${KEEP_ALL:-}" ] || rm -f "$OUT"/*.md "$OUT"/*.png
done
# SWEEP=1: the kernel-config sweeps of the unmet GPU targets (python/fusedlab/perf/sweep.py) in what is left
if [ -n "${SWEEP:-}" ]; then
  left=$(( ${BUDGET_S:-540} - ($(date +%s) - start) ))
  if [ "$left" -lt 60 ]; then
    echo "== sweep: skipped, ${left} s left" | tee -a "$LOG"
  else
    echo "== sweep: Triton kernel configs (limit $(( left - 10 )) s)" | tee -a "$LOG"
    timeout $(( left - 10 )) $PY -m fusedlab.perf.sweep --family "${SWEEP_FAMILY:-all}" --out "$OUT" 2>&1 | tee -a "$LOG" | tail -40 || status=1
  fi
fi
echo "== done (status $status) after $(( $(date +%s) - start )) s; results in $OUT" | tee -a "$LOG"
exit $status
