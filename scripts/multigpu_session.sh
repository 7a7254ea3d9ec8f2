#!/usr/bin/env bash
# The multi-GPU verification of issue 17 in one command, on one host with W GPUs (W = every
# visible GPU; NVLink multicast stays off).  Every step runs under its own time limit, logs to
# OUT_DIR, and the session goes on after a failing step:
#   1. the multi-GPU test suite           pytest -m multigpu tests/gpu
#   2. overlap benchmark, NVLink          bench_overlap.py --preset design --op both (all engines)
#   2b. NCCL's CTA policy                 the same with --nccl-cta-policy efficiency (flashoverlap's
#                                         communicators: NCCL_CTA_POLICY_EFFICIENCY; issue 14)
#   3. the same, PCIe-class               NCCL_P2P_DISABLE=1, --preset pcie (K_local up to 32768)
#   4. the same, socket transport         NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 (multi-node stand-in)
#   5. tuner                              flashoverlap tune on the benchmark shapes
#   6. scaling over 1..W ranks            bench_scaling.py --presets 8b,70b
#   7. end to end                         examples/tp_llama.py --preset 70b --layers 2
# Usage:  bash scripts/multigpu_session.sh OUT_DIR       (T_STEP: seconds per step, default 300)
# At one GPU it runs too (a dry run of the pipeline: the collectives then move nothing).
set -uo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/multigpu_session.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
W=$(python -c "import torch; print(torch.cuda.device_count())")
T=${T_STEP:-300}
LOG="$OUT/session.log"
failed=0
echo "# multi-GPU session $(date -u +%FT%TZ), $W GPUs" > "$LOG"
nvidia-smi topo -m >> "$LOG" 2>&1 || true

step() {  # step NAME command...
  local name=$1; shift
  local t0=$(date +%s)
  echo "== $name: $*" >> "$LOG"
  timeout -s INT -k 10 "$T" "$@" >> "$LOG" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && failed=1
  echo "== $name: rc=$rc after $(( $(date +%s) - t0 )) s" >> "$LOG"
}

RUN="torchrun --nproc-per-node $W"
step tests    python -m pytest -q -ra -p no:cacheprovider -m multigpu tests/gpu
step nvlink   $RUN scripts/bench_overlap.py --preset design --op both --out "$OUT" \
              --timeline "$OUT/timeline.png" --no-progress
step ctapolicy $RUN scripts/bench_overlap.py --preset design --op both --out "$OUT" \
              --nccl-cta-policy efficiency --engines comm_only,sequential,flashoverlap --no-progress
step pcie     env NCCL_P2P_DISABLE=1 $RUN scripts/bench_overlap.py --no-p2p --preset pcie \
              --op both --out "$OUT" --no-progress
step socket   env NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 $RUN scripts/bench_overlap.py --no-p2p \
              --preset pcie --op all_reduce --out "$OUT" --machine socket --no-progress
for shape in "-M 8192 -N 8192 -K 2048" "-M 16384 -N 8192 -K 7168"; do
  for op in all_reduce reduce_scatter; do
    step "tune" $RUN -m flashoverlap.cli tune $shape --op "$op"
  done
done
step scaling  $RUN scripts/bench_scaling.py --presets 8b,70b --op both --out "$OUT" --no-progress
step e2e      $RUN examples/tp_llama.py --preset 70b --layers 2 --out "$OUT"
echo "session: $( [ $failed -eq 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')" >> "$LOG"
grep -E '^== ' "$LOG" | tail -20
exit $failed
