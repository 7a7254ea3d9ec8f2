#!/usr/bin/env bash
# Session 2026-12-03 09:48, fourth GPU call (about 290 s of device time left): the session's
# final GPU code (SignalGemmLauncher with the cluster-kernel branch) -- the signal-GEMM,
# cluster-GEMM and engine GPU tests, the stress test, then the rest of the GPU suite.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
P="python -m pytest -q -ra -p no:cacheprovider"
timeout -s INT -k 5 160 $P tests/gpu/test_signal_gemm.py tests/gpu/test_cluster_gemm_gpu.py tests/gpu/test_engine_gpu.py \
  --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/suite1.log 2>&1
echo "suite1 rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 5 50 $P -s tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/stress.log 2>&1
echo "stress rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 5 60 $P tests/gpu --ignore tests/gpu/test_signal_gemm.py --ignore tests/gpu/test_cluster_gemm_gpu.py --ignore tests/gpu/test_engine_gpu.py > $R/suite2.log 2>&1
echo "suite2 rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
cat $R/env.txt $R/steps.txt; for f in suite1 suite2; do grep -E "passed|failed" $R/$f.log | tail -1; grep -E "^(FAILED|ERROR)" $R/$f.log | head; done; grep -E "^stress:|passed|failed" $R/stress.log | tail -2
