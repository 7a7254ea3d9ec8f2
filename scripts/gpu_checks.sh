#!/usr/bin/env bash
# Everything that needs GPUs, in one call: GPU tests, then the benchmarks that fit the machine.
# Usage (repo root):  OUT=/tmp/out bash scripts/gpu_checks.sh [tests|bench|all]
# Logs and result JSON go under $OUT (default ./gpu-out).  Exits non-zero if a test fails.
set -uo pipefail
usage() {
  cat <<'USAGE'
Usage (repo root):  OUT=/tmp/out bash scripts/gpu_checks.sh [tests|bench|all]

  tests   the GPU test suite (pytest -m "gpu or multigpu" tests/gpu)
  bench   bench_gemm.py, and bench_overlap.py under torchrun when there are 2+ GPUs
  all     both (default)

Logs and result JSON go under $OUT (default ./gpu-out).  Exits non-zero if a test fails.
USAGE
}
what=${1:-all}
case "$what" in
  -h|--help|help) usage; exit 0 ;;
  tests|bench|all) ;;
  *) echo "gpu_checks.sh: unknown argument '$what'" >&2; usage >&2; exit 2 ;;
esac
if [ $# -gt 1 ]; then echo "gpu_checks.sh: one argument at most" >&2; usage >&2; exit 2; fi
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $ngpu"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -q -ra -m "gpu or multigpu" tests/gpu 2>&1 | tee "$OUT/gpu-tests.log"
  status=${PIPESTATUS[0]}
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 scripts/bench_gemm.py --repeats 3 --out "$OUT/results" 2>&1 | tee "$OUT/bench-gemm.log"
  if [ "$ngpu" -ge 2 ]; then
    torchrun --nproc-per-node "$ngpu" scripts/bench_overlap.py --preset design --op both \
      --out "$OUT/results" --timeline "$OUT/timeline.png" 2>&1 | tee "$OUT/bench-overlap.log"
  fi
fi
exit $status
