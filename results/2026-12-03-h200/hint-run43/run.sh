#!/usr/bin/env bash
# Session 2026-12-03 12:14, fourth GPU call (~650 s of device time left): the cluster kernel's
# try_wait suspend-time hint -- its GPU tests, a probe round (w.t() layout), its counters on
# 8192^3 P = 132; then issue 14's bf16 acceptance set once on the product default.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
timeout -s INT -k 5 60 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_cluster_gemm_gpu.py -k "hint or ordering" > $R/tests.log 2>&1
rc=$?; echo "tests rc=$rc $(( $(date +%s) - t0 )) s" >> $R/steps.txt
if [ $rc = 0 ]; then
  timeout -s INT -k 10 100 python scripts/cluster_gemm_probe.py --out $R/probe --layouts nk --shapes 4096x8192x2048,8192x8192x8192,16384x8192x7168,11008x3072x8192 --ctas 132,116 --variants single-stsm,single-stsm-hint,multicast4-stsm-hint --rounds 1 --seconds 1.0 > $R/probe.txt 2>&1
  echo "probe rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  timeout -s INT -k 10 60 ncu --profile-from-start off --clock-control none --csv --page raw --print-units base --section SpeedOfLight --section WarpStateStats --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,sm__inst_executed.sum python scripts/gemm_counters.py --shape 8192x8192x8192 --layout nk --ctas 132 --variants single-stsm,single-stsm-hint > $R/c8192.csv 2> $R/c8192.err
  echo "counters rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  python scripts/gemm_counters.py --parse $R/c8192.csv > $R/counters.txt 2>&1
fi
mkdir -p $R/z43
G="timeout -s INT -k 10 60 python scripts/bench_gemm.py --dtype bfloat16 --repeats 3 --cta-offsets 0,16 --torch-sm-target --out $R/z43"
for lay in kn nk; do
  $G --b-layout $lay --name gemm-bfloat16-$lay > $R/z43/gemm-$lay.txt 2>&1; echo "z43 $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  $G --b-layout $lay --m 6144 11008 --kn 4096x5120,8192x3072 --name gemm-bfloat16-$lay-extra > $R/z43/gemm-$lay-extra.txt 2>&1; echo "z43 $lay-extra rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
done
{ python scripts/summarize_gemm.py $R/z43 --check 132=1.0/0.95 --check 116=0.95/0.90; python scripts/summarize_gemm.py $R/z43 --key efficiency_vs_torch_sm_target; } > $R/z43/summary-gemm.txt 2>&1
cat $R/env.txt $R/steps.txt; grep -E "passed|failed" $R/tests.log | tail -1; grep -E "^(FAILED|ERROR)" $R/tests.log | head; grep -A16 "efficiency vs" $R/probe.txt; cat $R/counters.txt; cat $R/z43/summary-gemm.txt | head -60
