#!/usr/bin/env bash
# Session 2026-12-03 06:49, fifth GPU call: the tree with the split slowdown in the GEMM model
# (d1b81cd; host-side tile choice only) -- the engine, tuning and AllGather GPU tests.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=d1b81cd
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
timeout -s INT -k 10 200 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_engine_gpu.py tests/gpu/test_tuning_gpu.py tests/gpu/test_all_gather_gpu.py > $R/tests.log 2>&1
echo "tests rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
cat $R/steps.txt; tail -4 $R/tests.log
