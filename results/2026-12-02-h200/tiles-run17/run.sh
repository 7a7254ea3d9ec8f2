#!/usr/bin/env bash
# WS kernel on 128x128 tiles: its GPU tests, then a sweep of 128x128 (WS, 4/5 stages) against
# 128x256 on small / TP shapes at P = 132 and 116, B = w.t() (~6 min).
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
timeout -s INT -k 10 150 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_signal_gemm.py -k "ws_ or split_last_wave" > $R/tests.log 2>&1
echo "tests rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
S=1024x4096x4096,2048x4096x512,2048x4096x1024,2048x4096x2048,2048x4096x3584,4096x4096x512,4096x4096x1024,4096x4096x2048,2048x8192x1024,2048x8192x2048,2048x8192x4096,4096x8192x2048,6144x3072x8192
timeout -s INT -k 10 330 python scripts/gemm_sweep.py --out $R/sweep-tiles.json --budget-s 290 --shapes $S --fp16-shapes '' --layouts nk \
  --candidates default,gm16,128x128_s4,128x128_s5,128x128_s5_gm16 > $R/sweep-tiles.txt 2>&1
echo "sweep rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/steps.txt; grep -E "passed|failed" $R/tests.log | tail -1; grep -E "^(FAILED|ERROR)" $R/tests.log | head; sed -n '/dtype  /,$p' $R/sweep-tiles.txt | head -40
