#!/usr/bin/env bash
# Session 2026-12-03 08:16, second GPU call: the AllGather GPU tests on the reverted tree (the
# kernels of ce9778d), then band height (group_m 8 / 16) paired on issue 14's weak rows.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=6ef9082
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
timeout -s INT -k 10 100 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_all_gather_gpu.py > $R/gather-tests.log 2>&1
echo "gather tests rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
SH=4096x8192x2048,4096x8192x7168,4096x8192x8192,6144x5120x4096,6144x3072x8192,11008x5120x4096,11008x3072x8192,8192x8192x8192
V=""; for P in 132 116; do for i in 1 2 3; do for g in 8 16; do V="$V;group_m=$g,num_ctas=$P"; done; done; done
for lay in kn nk; do
  timeout -s INT -k 10 110 python scripts/bench_gemm.py --sweep "${V:1}" --sweep-shapes $SH --sweep-only --b-layout $lay > $R/ab-gm-$lay.txt 2>&1
  echo "ab $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
done
tar czf $OUT/r.tgz -C $OUT r
cat $R/env.txt $R/steps.txt; tail -2 $R/gather-tests.log
