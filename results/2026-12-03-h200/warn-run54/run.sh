#!/usr/bin/env bash
# Session 2026-12-03 15:31, fifth GPU call: bench_sm_sharing after its CuPy streams moved to
# stream_wait._cupy_stream (no deprecation warning), a short run beside both kernels at P = 116.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
timeout -s INT -k 10 90 python -W error::DeprecationWarning:__main__ scripts/bench_sm_sharing.py --out $R --name sm-sharing-short --m 8192 --n 8192 --k 8192 --cta-offsets 16 --max-registers "" --cluster-ctas 4 --probes nccl-like-c1,tiny --reps 3 > $R/sm-sharing.txt 2>&1
echo "sm-sharing rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
tar czf $OUT/w54.tgz -C $R . && rm -rf $R
cd /tmp && rm -rf w54 && mkdir w54 && cd w54 && tar xzf $OUT/w54.tgz && cat steps.txt; grep -c -i "deprecat" sm-sharing.txt; grep -v "^\s*$" sm-sharing.txt | tail -12
