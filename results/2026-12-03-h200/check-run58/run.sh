#!/usr/bin/env bash
# Session 2026-12-03 18:42, first GPU call: HEAD 767084f had not run on a GPU (the shared
# TMA-descriptor prologue and tile release of the Triton signal/grouped/gather kernels --
# PTX-identical --, offline_compile's launch options, gpu_checks.sh bench's loop, bench_gemm's
# new defaults).  The whole GPU suite, the stress test, then `gpu_checks.sh bench` (bf16) as a
# user would run it.  One tarball back.
pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
P="python -m pytest -q -ra -p no:cacheprovider"
timeout -s INT -k 5 260 $P tests/gpu --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/suite.log 2>&1
echo "suite rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 5 45 $P -s tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/stress.log 2>&1
echo "stress rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
OUT=$R/g GEMM_DTYPES=bfloat16 timeout -s INT -k 10 270 bash scripts/gpu_checks.sh bench > $R/bench.log 2>&1
echo "bench rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
tar czf $OUT/run58.tgz -C $R . && rm -rf $R
cd /tmp && rm -rf r58 && mkdir -p r58 && cd r58 && tar xzf $OUT/run58.tgz && cat env.txt steps.txt; grep -E "passed|failed" suite.log | tail -1; grep -E "^(FAILED|ERROR)" suite.log | head; grep -E "^stress:|passed|failed" stress.log | tail -2; cat g/gemm-summary.txt
