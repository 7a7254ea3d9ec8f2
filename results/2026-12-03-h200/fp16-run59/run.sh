#!/usr/bin/env bash
# Session 2026-12-03 18:42, second GPU call (same warm machine as check-run58, HEAD 767084f):
# `GEMM_DTYPES=float16 gpu_checks.sh bench` -- issue 14's fp16 rows with the defaults
# (300-ms windows, settled).  One tarball back.
pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
OUT=$R/g GEMM_DTYPES=float16 timeout -s INT -k 10 290 bash scripts/gpu_checks.sh bench > $R/bench.log 2>&1
echo "bench rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
tar czf $OUT/run59.tgz -C $R . && rm -rf $R
cd /tmp && rm -rf r59 && mkdir -p r59 && cd r59 && tar xzf $OUT/run59.tgz && cat env.txt steps.txt; cat g/gemm-summary.txt
