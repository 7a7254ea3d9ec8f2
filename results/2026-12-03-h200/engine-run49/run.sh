#!/usr/bin/env bash
# Session 2026-12-03 13:49, last GPU call (~380 s of device time left): the engines now take
# the table's kernel options (kernels.plan_gemm_config) -- the overlap engine's signal GEMM at
# P = 116 is the cluster kernel.  The engine, nn and cluster GPU tests on it.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
timeout -s INT -k 5 200 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_engine_gpu.py tests/gpu/test_nn_gpu.py tests/gpu/test_cluster_gemm_gpu.py -k "not test_matches_reference" > $R/tests.log 2>&1
echo "tests rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
tar czf $OUT/e49.tgz -C $R . && cat $R/steps.txt && tail -4 $R/tests.log && grep -E "^(FAILED|ERROR)" $R/tests.log | head
