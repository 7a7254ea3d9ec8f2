#!/usr/bin/env bash
# Debug 3: is the host blocked in the GEMM launch (timestamps), and does enqueueing the side
# work before the GEMM (the engine's order) finish?  (~40 s)
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
for mode in ws-hi ws-hi-first pipe-first; do timeout -s KILL 25 python .dbg/late.py $mode >> $R/late.txt 2>&1; echo "$mode rc=$?" >> $R/late.txt; done
cat $R/late.txt | grep -v Warn
