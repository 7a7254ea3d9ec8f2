#!/usr/bin/env bash
# fp16 acceptance rows on the current tree + a second bf16 sample, interleaved per layout (~4 min).
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
nvidia-smi --query-gpu=timestamp,power.draw,clocks.sm,temperature.gpu --format=csv -lms 500 > $R/smi.csv 2>/dev/null & SMI=$!
for lay in kn nk; do
  for dt in bfloat16 float16; do
    d=${dt/bfloat16/bf16}; d=${d/float16/fp16}
    G="timeout -s INT -k 10 90 python scripts/bench_gemm.py --dtype $dt --repeats 3 --cta-offsets 0,16 --torch-sm-target --out $R --b-layout $lay"
    $G --name gemm-$d-$lay > $R/gemm-$d-$lay.txt 2>&1; echo "$d $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
    $G --m 6144 11008 --kn 4096x5120,8192x3072 --name gemm-$d-$lay-extra > $R/gemm-$d-$lay-extra.txt 2>&1; echo "$d $lay-extra rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  done
done
kill $SMI
B="$R/gemm-bf16-kn.json $R/gemm-bf16-nk.json $R/gemm-bf16-kn-extra.json $R/gemm-bf16-nk-extra.json"
H="$R/gemm-fp16-kn.json $R/gemm-fp16-nk.json $R/gemm-fp16-kn-extra.json $R/gemm-fp16-nk-extra.json"
{ python scripts/summarize_gemm.py $B $H --check 132=1.0/0.95 --check 116=0.95/0.90; python scripts/summarize_gemm.py $B $H --key efficiency_vs_torch_sm_target; } > $R/summary-gemm.txt 2>&1
tar czf $OUT/r.tgz -C $OUT r
cat $R/steps.txt; cat $R/summary-gemm.txt
