#!/usr/bin/env bash
# The wave-tile rule with the split's fix-up in the model (kernels.wave_times): the GPU tests
# that run the chosen tiles, then bench_gemm, B = w.t(), 3 repeats, P = 132 / 116, on a grid of
# small / TP shapes with the product's choice ("after"), forced 128x256 s3 and forced 128x128
# s5 -- so every row has both tiles measured and both rules' choices can be read off (~6 min).
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
timeout -s INT -k 10 120 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_engine_gpu.py tests/gpu/test_tuning_gpu.py -k "128x128 or tun or default" > $R/tests.log 2>&1
echo "tests rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
G="timeout -s INT -k 10 150 python scripts/bench_gemm.py --dtype bfloat16 --repeats 3 --cta-offsets 0,16 --out $R --b-layout nk --m 512 1024 2048 6144 11008 --kn 4096x1024,4096x2048,4096x3072,4096x4096,8192x2048,4096x5120"
$G --name gemm-rule-after > $R/gemm-rule-after.txt 2>&1; echo "after rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
$G --block-n 256 --num-stages 3 --name gemm-rule-256 > $R/gemm-rule-256.txt 2>&1; echo "256 rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
$G --block-n 128 --num-stages 5 --name gemm-rule-128 > $R/gemm-rule-128.txt 2>&1; echo "128 rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/steps.txt; grep -E "passed|failed|no tests" $R/tests.log | tail -1; grep -E "^(FAILED|ERROR)" $R/tests.log | head
python - <<'PY'
import json,os
R=os.environ['OUT']+'/r'
def load(n):
    return {(r['M'],r['N'],r['K'],r['num_ctas']):r for r in json.load(open(f'{R}/{n}.json')) if r['engine']=='flashoverlap'}
a,b,c=load('gemm-rule-after'),load('gemm-rule-256'),load('gemm-rule-128')
for k in sorted(a):
    print(k, a[k]['config']['block_n'], 'eff after %.3f  256 %.3f  128 %.3f  t128/t256 %.3f' % (a[k]['efficiency_vs_torch'], b[k]['efficiency_vs_torch'], c[k]['efficiency_vs_torch'], c[k]['median_ms']/b[k]['median_ms']))
PY
