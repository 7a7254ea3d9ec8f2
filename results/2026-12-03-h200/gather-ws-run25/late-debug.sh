#!/usr/bin/env bash
# Debug: does the gather GEMM hang when its chunks arrive late? WS vs pipelined, copy late vs
# only the flags late; then the engine's delayed-watcher test (~3 min).
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
for mode in ws-precopy ws pipe pipe-precopy; do timeout -s KILL 40 python .dbg/late.py $mode >> $R/late.txt 2>&1; echo "$mode rc=$?" >> $R/late.txt; done
timeout -s KILL 100 python -m pytest -q -x -ra -p no:cacheprovider tests/gpu/test_all_gather_gpu.py -k "delayed_watcher or engine_one_rank or cuda_graph" > $R/engine.log 2>&1; echo "engine rc=$?" >> $R/engine.log
tar czf $OUT/r.tgz -C $OUT r
cat $R/late.txt; tail -5 $R/engine.log
