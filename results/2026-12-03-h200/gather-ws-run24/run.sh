#!/usr/bin/env bash
# The AllGather GEMM on the warp-specialized kernel (its loader waits on the chunk flags):
# the whole GPU suite (the WS kernel's signature changed), the stress test, then
# bench_all_gather.py (WS nowait / wait, the pipelined kernel, torch.matmul, the op) (~6 min).
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
timeout -s INT -k 10 90 python -m pytest -q -ra -x -p no:cacheprovider tests/gpu/test_all_gather_gpu.py > $R/gather-tests.log 2>&1
echo "gather tests rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 10 150 python scripts/bench_all_gather.py --iters 40 --sets 4 \
  --shapes 8192:8192:8192,16384:8192:4096,4096:7168:8192,2048:8192:8192,4096:4096:4096,2048:4096:2048,1024:8192:4096 \
  --out $R/all-gather.json > $R/all-gather.txt 2>&1
echo "bench rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 10 220 python -m pytest -q -ra -p no:cacheprovider tests/gpu \
  --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress --ignore tests/gpu/test_all_gather_gpu.py > $R/suite.log 2>&1
echo "suite rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 10 70 python -m pytest -q -s -ra -p no:cacheprovider tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/stress.log 2>&1
echo "stress rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/steps.txt; tail -3 $R/gather-tests.log; grep -E "^(FAILED|ERROR)" $R/gather-tests.log | head; grep -v "^ *$" $R/all-gather.txt | tail -9
grep -E "passed|failed" $R/suite.log | tail -1; grep -E "^(FAILED|ERROR)" $R/suite.log | head; grep -E "^stress:|passed|failed" $R/stress.log | tail -2
