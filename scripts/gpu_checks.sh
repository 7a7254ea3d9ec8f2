#!/usr/bin/env bash
# Everything that needs GPUs, in one call: GPU tests, then the benchmarks that fit the machine.
# Usage (repo root):  OUT=/tmp/out bash scripts/gpu_checks.sh [tests|bench|all]
# Logs and result JSON go under $OUT (default ./gpu-out).  Exits non-zero if a test fails.
set -uo pipefail
usage() {
  cat <<'USAGE'
Usage (repo root):  OUT=/tmp/out bash scripts/gpu_checks.sh [tests|bench|all]

  tests   the GPU test suite (pytest -m "gpu or multigpu" tests/gpu)
  bench   the signal GEMM's acceptance set (bench_gemm.py: 13 shapes x both B layouts x
          P = all SMs and SMs-16, cuBLASLt on P SMs beside it, dtypes $GEMM_DTYPES, default
          bfloat16) summarized in $OUT/gemm-summary.txt; bench_overlap.py under torchrun
          when there are 2+ GPUs
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
  # the README's table: nine shapes with N = 8192 and four with N != 8192, M not a power of 2
  for dtype in ${GEMM_DTYPES:-bfloat16}; do
    for layout in kn nk; do
      for set in main extra; do
        shapes=()
        [ "$set" = extra ] && shapes=(--m 6144 11008 --kn 4096x5120,8192x3072)
        python3 scripts/bench_gemm.py --repeats 3 --cta-offsets 0,16 --torch-sm-target \
          --dtype "$dtype" --b-layout "$layout" "${shapes[@]}" --out "$OUT/gemm" \
          --name "gemm-$dtype-$layout-$set" 2>&1 | tee -a "$OUT/bench-gemm.log"
      done
    done
  done
  # speed is reported, never asserted: the targets' verdict goes to the summary only
  { python3 scripts/summarize_gemm.py "$OUT/gemm" --noise --check 132=1.0/0.95 --check 116=0.95/0.90
    python3 scripts/summarize_gemm.py "$OUT/gemm" --key efficiency_vs_torch_sm_target
    python3 scripts/summarize_gemm.py "$OUT/gemm" --engine torch-sm-target; } \
    > "$OUT/gemm-summary.txt" 2>&1
  cat "$OUT/gemm-summary.txt"
  if [ "$ngpu" -ge 2 ]; then
    torchrun --nproc-per-node "$ngpu" scripts/bench_overlap.py --preset design --op both \
      --out "$OUT/results" --timeline "$OUT/timeline.png" 2>&1 | tee "$OUT/bench-overlap.log"
  fi
fi
exit $status
