#!/usr/bin/env bash
# tp-run13's tensor-parallel shapes again, on the tree with the split threshold and the
# wave-tile rule (~3 min).
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
G="timeout -s INT -k 10 150 python scripts/bench_gemm.py --dtype bfloat16 --repeats 3 --cta-offsets 0,16 --torch-sm-target --out $R --b-layout nk --m 2048 4096 16384"
$G --kn 2048x4096,1024x4096,512x4096,7168x4096,3584x4096,1792x4096 --name gemm-tp-8b > $R/gemm-tp-8b.txt 2>&1; echo "8b rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
$G --kn 4096x8192,2048x8192,1024x8192,14336x8192,7168x8192,3584x8192 --name gemm-tp-70b > $R/gemm-tp-70b.txt 2>&1; echo "70b rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
for n in 8b 70b; do python scripts/summarize_gemm.py $R/gemm-tp-$n.json; python scripts/summarize_gemm.py $R/gemm-tp-$n.json --key efficiency_vs_torch_sm_target; done > $R/summary-gemm.txt 2>&1
tar czf $OUT/r.tgz -C $OUT r
cat $R/steps.txt $R/summary-gemm.txt
