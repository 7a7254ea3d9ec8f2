#!/usr/bin/env bash
# Session 2026-12-03 12:14, fifth GPU call (warm machine, ~360 s left): issue 14's bf16
# acceptance set once more on the product default -- hint-run43's pass ran, but its JSON did
# not come back (too many files under $OUT); this one comes back as one tarball.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R/z44; t0=$(date +%s)
G="timeout -s INT -k 10 60 python scripts/bench_gemm.py --dtype bfloat16 --repeats 3 --cta-offsets 0,16 --torch-sm-target --out $R/z44"
for lay in kn nk; do
  $G --b-layout $lay --name gemm-bfloat16-$lay > $R/z44/gemm-$lay.txt 2>&1; echo "z44 $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  $G --b-layout $lay --m 6144 11008 --kn 4096x5120,8192x3072 --name gemm-bfloat16-$lay-extra > $R/z44/gemm-$lay-extra.txt 2>&1; echo "z44 $lay-extra rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
done
{ python scripts/summarize_gemm.py $R/z44 --check 132=1.0/0.95 --check 116=0.95/0.90; python scripts/summarize_gemm.py $R/z44 --key efficiency_vs_torch_sm_target; } > $R/z44/summary-gemm.txt 2>&1
tar czf $OUT/z44.tgz -C $R . && rm -rf $R
cat $OUT/../out/z44.tgz > /dev/null; tar xzf $OUT/z44.tgz -O ./steps.txt ./z44/summary-gemm.txt
