#!/usr/bin/env bash
# The stress test with 128x128 warp-specialized calls, plus the edited test file (~2 min).
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
timeout -s INT -k 10 90 python -m pytest -q -s -ra -p no:cacheprovider tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/stress.log 2>&1
echo "stress rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 10 120 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_signal_gemm.py --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/signal_gemm.log 2>&1
echo "signal_gemm tests rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/steps.txt; grep -E "^stress:|passed|failed|Error" $R/stress.log | tail -3; grep -E "passed|failed" $R/signal_gemm.log | tail -1; grep -E "^(FAILED|ERROR)" $R/*.log | head
