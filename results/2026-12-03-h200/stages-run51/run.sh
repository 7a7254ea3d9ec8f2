#!/usr/bin/env bash
# Session 2026-12-03 15:31, second GPU call: the cluster kernel's half_epilogue (C staged in
# 16 KB halves per consumer warpgroup) and the fourth ring stage it makes room for -- the
# cluster GPU tests (new variants in the reference and spinning-consumer tests), then the probe
# at P = 116 against the product's variant (multicast4-stsm-lean) and the Gluon kernel.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
timeout -s INT -k 10 150 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_cluster_gemm_gpu.py > $R/tests.log 2>&1
rc=$?; echo "tests rc=$rc $(( $(date +%s) - t0 )) s" >> $R/steps.txt
S=4096x8192x8192,8192x8192x7168,4096x8192x2048,16384x8192x2048,8192x8192x8192
timeout -s INT -k 10 200 python scripts/cluster_gemm_probe.py --out $R/probe --shapes $S --ctas 116 --variants multicast4-stsm-lean,multicast4-half,multicast4-s4,single-stsm-lean,single-s4 --rounds 2 --seconds 0.6 > $R/probe.txt 2>&1
echo "probe rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
tar czf $OUT/s51.tgz -C $R . && rm -rf $R
cd /tmp && rm -rf s51 && mkdir s51 && cd s51 && tar xzf $OUT/s51.tgz && cat env.txt steps.txt; tail -3 tests.log; grep -E "^(FAILED|ERROR)" tests.log | head; grep -A14 "efficiency vs" probe.txt | head -16; grep -iE "error|wrong|Traceback" probe.txt | head -5
