#!/usr/bin/env bash
# One GPU session in one command (one H200 is enough; ~9 minutes at most):
#   1. the GPU test suite          python -m pytest -q tests/gpu -ra (the dense stress test apart;
#                                  the grouped one, FLASHOVERLAP_GROUPED_STRESS_CALLS, inside)
#   2. the signal-ordering stress  FLASHOVERLAP_STRESS_GROUPS group checks (default 100000)
#   3. bench_overhead.py           mechanism overhead at world size 1 (eager + CUDA graphs)
#   4. soak.py                     SOAK_CALLS mixed eager calls (default 5000)
#   5. bench_gemm.py               signal GEMM vs torch.matmul, reduced shapes and repeats
# Every step runs under its own time limit (SIGINT first, so pytest still prints its summary)
# and the session goes on after a failing step.  Everything lands in OUT_DIR, six files:
#   gpu-tests.log  test suite + stress test output
#   overhead.json  overhead.txt   bench_overhead rows and printed table
#   soak.json      gemm.json      soak summary, GEMM rows
#   summary.txt    per-step status and time, GPU and versions, the soak and GEMM logs
# Usage (repo root or anywhere):  bash scripts/gpu_session.sh OUT_DIR
# Environment: STRESS_GROUPS, SOAK_CALLS, per-step limits in seconds T_TESTS, T_STRESS,
# T_OVERHEAD, T_SOAK, T_GEMM, and SKIP (space-separated step names to leave out, e.g.
# SKIP="overhead gemm").  Exit status: 0 if every step that ran passed, else 1.
set -uo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."
OUT=${1:-gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FLASHOVERLAP_STRESS_GROUPS=${STRESS_GROUPS:-${FLASHOVERLAP_STRESS_GROUPS:-100000}}
SOAK_CALLS=${SOAK_CALLS:-5000}
TMP=$(mktemp -d)
SUMMARY="$OUT/summary.txt"
SESSION_START=$(date +%s)
failed=0

{
  echo "# flashoverlap GPU session $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  python - <<'EOF' 2>&1 || true
import importlib.metadata as md
import torch
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"
nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), NCCL {nccl}, triton {v('triton')}, "
      f"cuda-bindings {v('cuda-bindings')}, cupy {v('cupy-cuda13x')}/{v('cupy-cuda12x')}")
EOF
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
       "$(git status --porcelain --untracked-files=no 2>/dev/null | head -c1 | sed 's/./(dirty)/')"
  echo
} > "$SUMMARY"

# step NAME LIMIT_S LOG command...
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local t0 rc
  case " ${SKIP:-} " in
    *" $name "*) printf '%-10s %-17s\n' "$name" "skipped (SKIP)" >> "$SUMMARY"; return 0 ;;
  esac
  t0=$(date +%s)
  echo "== $name: $* (limit ${limit} s)" >> "$log"
  timeout -s INT -k 10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  local verdict=ok
  if [ "$rc" -ne 0 ]; then
    verdict=FAILED
    failed=1
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || [ "$rc" -eq 130 ]; then verdict="TIMED OUT/FAILED"; fi
  fi
  printf '%-10s %-17s rc=%-4s %4d s\n' "$name" "$verdict" "$rc" "$took" >> "$SUMMARY"
  echo "== $name: rc=$rc after ${took} s" >> "$log"
}

step tests "${T_TESTS:-270}" "$OUT/gpu-tests.log" \
  python -m pytest -q tests/gpu -ra -p no:cacheprovider \
  --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress
step stress "${T_STRESS:-60}" "$OUT/gpu-tests.log" \
  python -m pytest -q -s -ra -p no:cacheprovider \
  tests/gpu/test_signal_gemm.py::test_signal_ordering_stress
step overhead "${T_OVERHEAD:-100}" "$OUT/overhead.txt" \
  python scripts/bench_overhead.py --out "$OUT/overhead.json" ${OVERHEAD_ARGS:-}
step soak "${T_SOAK:-60}" "$TMP/soak.log" \
  python scripts/soak.py --calls "$SOAK_CALLS" --watchdog 45 --out "$OUT/soak.json"
step gemm "${T_GEMM:-45}" "$TMP/gemm.log" \
  python scripts/bench_gemm.py --repeats 1 --m 8192 16384 --kn 2048x8192,7168x8192 \
  --cta-offsets 0,16 --warmup 10 --rep 40 --out "$OUT" --name gemm

{
  echo
  echo "session: $(( $(date +%s) - SESSION_START )) s; $( [ $failed -eq 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')"
  echo
  echo "## test summary (tail of gpu-tests.log)"
  grep -E '^(FAILED|ERROR|SKIPPED|XFAIL)|passed|failed|stress:' "$OUT/gpu-tests.log" | tail -40
  echo
  echo "## overhead (tail)"
  tail -25 "$OUT/overhead.txt" 2>/dev/null
  echo
  echo "## soak log"
  cat "$TMP/soak.log" 2>/dev/null
  echo
  echo "## gemm log"
  cat "$TMP/gemm.log" 2>/dev/null
} >> "$SUMMARY"
rm -rf "$TMP"
cat "$SUMMARY" | head -20
exit $failed
