#!/usr/bin/env bash
# Session 2026-12-03 16:48, third GPU call.  (1) 6144x5120x4096 at P = 116 -- the row furthest
# behind cuBLASLt on 116 SMs in window-run56 (0.948 / 0.953) -- runs the Gluon kernel because
# its last wave splits along K (8.3 waves); would clusters of 4 without the split beat it?
# The default and --cluster-ctas 4 --split-tail 0 alternated twice, both B layouts, 300-ms
# windows, settled.  (2) issue 14's bf16 set again as z56 (300-ms windows, settled,
# 3 repeats): z57.  One tarball back.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R/ab $R/z57; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
B="python scripts/bench_gemm.py --cta-offsets 16 --torch-sm-target --settle-ms 200 --rep 300 --m 6144 --kn 4096x5120 --repeats 2 --out $R/ab"
for round in 1 2; do
  for lay in kn nk; do
    timeout -s INT -k 10 60 $B --b-layout $lay --name default-$lay-$round > $R/ab/default-$lay-$round.txt 2>&1; echo "ab default $lay $round rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
    timeout -s INT -k 10 60 $B --b-layout $lay --cluster-ctas 4 --split-tail 0 --name c4nosplit-$lay-$round > $R/ab/c4nosplit-$lay-$round.txt 2>&1; echo "ab c4nosplit $lay $round rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  done
done
G="python scripts/bench_gemm.py --repeats 3 --cta-offsets 0,16 --torch-sm-target --settle-ms 200 --rep 300 --out $R/z57 --dtype bfloat16"
for lay in kn nk; do
  timeout -s INT -k 10 150 $G --b-layout $lay --name gemm-bfloat16-$lay > $R/z57/gemm-bfloat16-$lay.txt 2>&1; echo "z57 $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  timeout -s INT -k 10 90 $G --b-layout $lay --m 6144 11008 --kn 4096x5120,8192x3072 --name gemm-bfloat16-$lay-extra > $R/z57/gemm-bfloat16-$lay-extra.txt 2>&1; echo "z57 $lay-extra rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
done
{ python scripts/summarize_gemm.py $R/z57 --noise --check 132=1.0/0.95 --check 116=0.95/0.90; python scripts/summarize_gemm.py $R/z57 --key efficiency_vs_torch_sm_target; python scripts/summarize_gemm.py $R/z57 --engine torch-sm-target; } > $R/z57/summary-gemm.txt 2>&1
tar czf $OUT/z57.tgz -C $R . && rm -rf $R
cd /tmp && rm -rf z57 && mkdir -p z57 && cd z57 && tar xzf $OUT/z57.tgz && cat env.txt steps.txt; grep -h "flashoverlap  116" ab/*.txt; cat z57/summary-gemm.txt
