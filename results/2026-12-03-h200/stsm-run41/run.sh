#!/usr/bin/env bash
# Session 2026-12-03 12:14, second GPU call: the cluster kernel's stmatrix epilogue -- its GPU
# tests, then a probe round of single / single-stsm / multicast2-stsm / multicast4-stsm
# against the Gluon signal GEMM and cuBLASLt at P = 132 / 116.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
timeout -s INT -k 5 120 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_cluster_gemm_gpu.py > $R/tests.log 2>&1
rc=$?; echo "tests rc=$rc $(( $(date +%s) - t0 )) s" >> $R/steps.txt
S=4096x8192x2048,8192x8192x8192,16384x8192x7168,6144x5120x4096,11008x3072x8192
if [ $rc = 0 ]; then
  timeout -s INT -k 10 220 python scripts/cluster_gemm_probe.py --out $R/probe --shapes $S --ctas 132,116 --variants single,single-stsm,multicast2-stsm,multicast4-stsm --rounds 1 --seconds 1.0 > $R/probe.txt 2>&1
  echo "probe rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
fi
cat $R/env.txt $R/steps.txt; grep -E "passed|failed" $R/tests.log | tail -1; grep -E "^(FAILED|ERROR)" $R/tests.log | head; grep -A40 "efficiency vs" $R/probe.txt
