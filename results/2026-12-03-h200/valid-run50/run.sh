#!/usr/bin/env bash
# Session 2026-12-03 15:31, first GPU call: the whole GPU suite and the stress test on HEAD
# (8306834: strided tensor maps, capture-time may_load, the cubin disk cache, load-failure
# fallback and mixed_columns had CPU tests only), then mixed_columns against the product's
# cluster variant and the Gluon kernel at P = 116 (probe; the 11008-row shapes only run mixed).
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
P="python -m pytest -q -ra -p no:cacheprovider"
timeout -s INT -k 5 240 $P tests/gpu --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/suite.log 2>&1
echo "suite rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 5 50 $P -s tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/stress.log 2>&1
echo "stress rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
S=11008x3072x8192,11008x5120x4096,4096x8192x8192,8192x8192x8192,16384x8192x2048
timeout -s INT -k 10 170 python scripts/cluster_gemm_probe.py --out $R/probe --shapes $S --ctas 116 --variants multicast4-stsm-lean,multicast4-mixed --rounds 2 --seconds 0.6 > $R/probe.txt 2>&1
echo "probe rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
tar czf $OUT/v50.tgz -C $R . && rm -rf $R
cd /tmp && rm -rf v50 && mkdir v50 && cd v50 && tar xzf $OUT/v50.tgz && cat env.txt steps.txt; grep -E "passed|failed" suite.log | tail -1; grep -E "^(FAILED|ERROR)" suite.log | head; grep -E "^stress:|passed|failed" stress.log | tail -2; grep -A40 "efficiency vs" probe.txt | head -50; tail -5 probe.txt
