#!/usr/bin/env bash
# GPU first light: one command for a lent H100/H200, from a bare copy of the repository, that fits the
# 8 minutes one command may take. It installs the package with _C_cuda built for the visible GPU only,
# then runs benchmarks.gpu_suite under what is left of the budget (correctness of every backend on CUDA,
# the kernel variants with copy bandwidth and the record `auto` reads, Table 13 at ResNet-50 size, the
# roofline), writing JSON as each step ends.
#
#   bash benchmarks/gpu_first_light.sh OUT            # on the GPU machine
#   bash benchmarks/gpu_first_light.sh OUT --dry-run  # anywhere: no install, every step in its small CPU form
#
# The commit comes from TWA_COMMIT (the device's copy of .git may be stale), else git.
set -euo pipefail
OUT=${1:?usage: bash benchmarks/gpu_first_light.sh OUT [--dry-run]}
DRY=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TOTAL_S=${TWA_FIRST_LIGHT_S:-480}
START=$(date +%s)
if [ "$DRY" = "--dry-run" ]; then
  echo "dry run: no install; the steps run in their small CPU form (their timings mean nothing)"
  INSTALL_ARGS=()
else
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  echo "installing for compute capability $ARCH (TORCH_CUDA_ARCH_LIST), log in $OUT/install.log"
  TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install --no-build-isolation --no-deps -e . \
    > "$OUT/install.log" 2>&1
  INSTALL_ARGS=(--install-s "$(( $(date +%s) - START ))")
fi
COMMIT=${TWA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
LEFT=$(( TOTAL_S - ($(date +%s) - START) - 15 ))  # 15 s for the interpreter starts and the last write
if [ "$DRY" = "--dry-run" ]; then
  exec "$PY" -m benchmarks.gpu_suite --out-dir "$OUT" --commit "$COMMIT" --dry-run
fi
exec "$PY" -m benchmarks.gpu_suite --out-dir "$OUT" --commit "$COMMIT" --budget-s "$LEFT" "${INSTALL_ARGS[@]}"
