#!/usr/bin/env bash
# Session 2026-12-03 06:49, fourth GPU call: a second out-of-sample set for the split slowdown
# in the wave-tile model -- shapes where "slowdown on every split last wave" and "slowdown only
# when the split wave is the only one" disagree (21 of 80 rows), each tile forced, 3 repeats.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=928aa5a
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
G="timeout -s INT -k 10 130 python scripts/bench_gemm.py --dtype bfloat16 --repeats 3 --cta-offsets 0,16 --out $R --b-layout nk"
A="--m 1024 1536 2048 6144 --kn 8192x1024,4096x5120,8192x3072,8192x4096,8192x6144,4096x1536"
B="--m 3072 4096 --kn 7168x1536,8192x1536,4096x2560,4096x3072,8192x2048,7168x2048,14336x2560,14336x3584"
for bn in 256 128; do
  st=3; [ $bn = 128 ] && st=5
  $G $A --block-n $bn --num-stages $st --name gemm-a-$bn > $R/gemm-a-$bn.txt 2>&1; echo "a $bn rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  $G $B --block-n $bn --num-stages $st --name gemm-b-$bn > $R/gemm-b-$bn.txt 2>&1; echo "b $bn rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
done
tar czf $OUT/r.tgz -C $OUT r
cat $R/steps.txt
