#!/usr/bin/env bash
# The wave-tile rule (128x128 WS tiles, 5 stages, where 128x256 leaves a poor last wave):
# the GPU suite (minus the stress test), then small TP shapes with the product's choice
# ("after") and forced 128x256/3 stages ("before"), B = w.t(), 3 repeats (~6 min).
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
timeout -s INT -k 10 200 python -m pytest -q -ra -p no:cacheprovider tests/gpu \
  --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/suite.log 2>&1
echo "suite rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
G="timeout -s INT -k 10 120 python scripts/bench_gemm.py --dtype bfloat16 --repeats 3 --cta-offsets 0,16 --torch-sm-target --out $R --b-layout nk --m 512 1024 2048 --kn 512x4096,1024x4096,2048x4096,4096x4096,1024x8192,2048x8192"
$G --name gemm-wave-after > $R/gemm-wave-after.txt 2>&1; echo "after rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
$G --block-n 256 --num-stages 3 --name gemm-wave-before > $R/gemm-wave-before.txt 2>&1; echo "before rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/steps.txt; grep -E "passed|failed" $R/suite.log | tail -1; grep -E "^(FAILED|ERROR)" $R/suite.log | head
python - <<'PY'
import json,os
R=os.environ['OUT']+'/r'
def load(n):
    return {(r['M'],r['N'],r['K'],r['num_ctas']):r for r in json.load(open(f'{R}/{n}.json')) if r['engine']=='flashoverlap'}
a,b=load('gemm-wave-after'),load('gemm-wave-before')
for k in sorted(a):
    ra,rb=a[k],b.get(k)
    print(k, ra['config']['block_n'], ra['config']['num_stages'], 'after %.3f before %.3f  time before/after %.3f' % (ra['efficiency_vs_torch'], rb['efficiency_vs_torch'], rb['median_ms']/ra['median_ms']), 'vs cublas@P %.3f' % ra.get('efficiency_vs_torch_sm_target', 0))
PY
