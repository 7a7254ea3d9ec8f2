#!/usr/bin/env bash
# Session 2026-12-03 06:49, third GPU call: out-of-sample check of a split-tail slowdown term in
# the wave-tile model -- 24 shapes x P = 132 / 116 (18 of the 48 rows where the candidate model
# and kernels.wave_tile disagree), each tile forced, 3 repeats (tree 928aa5a + docs).
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=928aa5a
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
G="timeout -s INT -k 10 200 python scripts/bench_gemm.py --dtype bfloat16 --repeats 3 --cta-offsets 0,16 --out $R --b-layout nk --m 512 768 1024 2048 --kn 7168x1536,7168x2560,8192x1536,8192x2560,8192x3072,8192x6144"
$G --block-n 256 --num-stages 3 --name gemm-split-256 > $R/gemm-split-256.txt 2>&1; echo "256 rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
$G --block-n 128 --num-stages 5 --name gemm-split-128 > $R/gemm-split-128.txt 2>&1; echo "128 rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/steps.txt
python - <<'PY'
import json,os
R=os.environ['OUT']+'/r'
def load(n):
    return {(r['M'],r['N'],r['K'],r['num_ctas']):r for r in json.load(open(f'{R}/{n}.json')) if r['engine']=='flashoverlap'}
b,c=load('gemm-split-256'),load('gemm-split-128')
for k in sorted(b):
    print(k, 'eff 256 %.3f  128 %.3f  t128/t256 %.3f' % (b[k]['efficiency_vs_torch'], c[k]['efficiency_vs_torch'], c[k]['median_ms']/b[k]['median_ms']))
PY
