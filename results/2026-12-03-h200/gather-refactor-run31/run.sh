#!/usr/bin/env bash
# Session 2026-12-03 06:49, sixth GPU call: the gather launcher's one-config refactor (0a5fe41) --
# the AllGather GPU tests.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=0a5fe41
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
timeout -s INT -k 10 100 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_all_gather_gpu.py > $R/gather-tests.log 2>&1
echo "gather tests rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
cat $R/steps.txt; tail -3 $R/gather-tests.log
