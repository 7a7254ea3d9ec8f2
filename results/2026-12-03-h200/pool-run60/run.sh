#!/usr/bin/env bash
# Session 2026-12-03 18:42, third GPU call (HEAD 767084f, the kernels of z48..z58): issue 14's
# bf16 set once more, as gpu_checks.sh bench runs it (3 repeats, 300-ms windows, settled):
# z60.  (Planned with 5 repeats; the first attempt's machine was taken back mid-call, which
# left 433 s of device time: 3 repeats fit.)  Declared before it ran: issue 14's verdict is taken on the settled runs of
# these kernels pooled (z56, z57, z58, z60: every paired ratio of a row, its median), and on
# each run's own table.  One tarball back.
pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R/z60; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
G="python scripts/bench_gemm.py --repeats 3 --cta-offsets 0,16 --torch-sm-target --out $R/z60 --dtype bfloat16"
for lay in kn nk; do
  timeout -s INT -k 10 100 $G --b-layout $lay --name gemm-bfloat16-$lay-main > $R/z60/gemm-bfloat16-$lay.txt 2>&1; echo "z60 $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  timeout -s INT -k 10 50 $G --b-layout $lay --m 6144 11008 --kn 4096x5120,8192x3072 --name gemm-bfloat16-$lay-extra > $R/z60/gemm-bfloat16-$lay-extra.txt 2>&1; echo "z60 $lay-extra rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
done
{ python scripts/summarize_gemm.py $R/z60 --noise --check 132=1.0/0.95 --check 116=0.95/0.90; python scripts/summarize_gemm.py $R/z60 --key efficiency_vs_torch_sm_target; python scripts/summarize_gemm.py $R/z60 --engine torch-sm-target; } > $R/z60/summary-gemm.txt 2>&1
tar czf $OUT/z60.tgz -C $R . && rm -rf $R
cd /tmp && rm -rf z60 && mkdir -p z60 && cd z60 && tar xzf $OUT/z60.tgz && cat env.txt steps.txt; cat z60/summary-gemm.txt
