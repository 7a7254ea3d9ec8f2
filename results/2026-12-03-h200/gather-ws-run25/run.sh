#!/usr/bin/env bash
# Debug 2: the late-chunk test with the side stream at the greatest priority (the engine's
# watcher), both kernels; then the whole gather GPU test file (~3 min).
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
for mode in ws-hi pipe-hi; do timeout -s KILL 40 python .dbg/late.py $mode >> $R/late.txt 2>&1; echo "$mode rc=$?" >> $R/late.txt; done
timeout -s KILL 200 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_all_gather_gpu.py > $R/gather-tests.log 2>&1; echo "gather tests rc=$?" >> $R/gather-tests.log
tar czf $OUT/r.tgz -C $OUT r
cat $R/late.txt; tail -4 $R/gather-tests.log; grep -E "^(FAILED|ERROR)" $R/gather-tests.log | head
