#!/usr/bin/env bash
# Session 2026-12-03 12:14, first GPU call: the GPU suite and the stress test on f0728bc (the
# tree the last session could not run), then the cluster kernel's two untried knobs
# (L2 promotion none as in the Gluon descriptors; B in one box) against the same kernel.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
P="python -m pytest -q -ra -p no:cacheprovider"
timeout -s INT -k 5 270 $P tests/gpu --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/suite.log 2>&1
echo "suite rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 5 50 $P -s tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/stress.log 2>&1
echo "stress rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
S=4096x8192x2048,6144x5120x4096,8192x8192x8192,11008x3072x8192
timeout -s INT -k 10 150 python scripts/cluster_gemm_probe.py --out $R/probe --shapes $S --ctas 132,116 --variants single,single-l2none,single-1box --rounds 1 --seconds 1.0 > $R/probe.txt 2>&1
echo "probe rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
cat $R/env.txt $R/steps.txt; grep -E "passed|failed" $R/suite.log | tail -1; grep -E "^(FAILED|ERROR)" $R/suite.log | head; grep -E "^stress:|passed|failed" $R/stress.log | tail -2; grep -A40 "efficiency vs" $R/probe.txt
