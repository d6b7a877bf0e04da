#!/usr/bin/env bash
# GPU check for an offline CUDA machine (H100/H200) whose Python already has torch >= 2.11 and triton 3.6:
# installs fusedlab without dependencies or build isolation, builds _C_cuda, runs the GPU tests and the
# benchmark target points of the named families (default: all) with fixed kernel configs, and writes
# json + markdown + PNG under bench/results/gpu/. Each family gets at most 5 minutes.
#
#   bash bench/gpu_check.sh [FAMILY ...]        e.g. bash bench/gpu_check.sh resample
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
families=("$@")
[ ${#families[@]} -eq 0 ] && families=(resample newton_schulz)

{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$LOG"

echo "== build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a})" | tee -a "$LOG"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
t0=$(date +%s)
if ! $PY -m pip install --no-deps --no-build-isolation -e . >> "$LOG" 2>&1; then
  echo "BUILD FAILED (see $LOG)"; tail -40 "$LOG"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
$PY -m fusedlab info 2>&1 | tee -a "$LOG"

status=0
for fam in "${families[@]}"; do
  echo "== $fam: GPU tests" | tee -a "$LOG"
  timeout 200 $PY -m pytest -q -m gpu "tests/test_${fam}_gpu.py" -p no:cacheprovider \
    --junitxml="$OUT/${fam}_tests.xml" 2>&1 | tail -25 | tee -a "$LOG" || status=1
  echo "== $fam: benchmark target points" | tee -a "$LOG"
  timeout 90 $PY -m fusedlab bench --family "$fam" --out "$OUT" 2>&1 | tail -30 | tee -a "$LOG" || status=1
done
echo "== done (status $status); results in $OUT" | tee -a "$LOG"
exit $status
