#!/usr/bin/env bash
# Session 2026-12-03 08:16, fourth GPU call: the review commit (the WS loader's gather wait in
# one helper) -- the AllGather and signal-GEMM GPU tests minus stress (the AllGather tests run
# the changed loader; other launches compile it without the wait), then
# issue 14's bf16 acceptance set once on this tree.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=84b6c21
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
timeout -s INT -k 10 200 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_all_gather_gpu.py tests/gpu/test_signal_gemm.py \
  --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/suite.log 2>&1
echo "suite rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
d=z35; mkdir -p $R/$d
G="timeout -s INT -k 10 60 python scripts/bench_gemm.py --dtype bfloat16 --repeats 3 --cta-offsets 0,16 --torch-sm-target --out $R/$d"
for lay in kn nk; do
  $G --b-layout $lay --name gemm-bfloat16-$lay > $R/$d/gemm-bfloat16-$lay.txt 2>&1; echo "$d $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  $G --b-layout $lay --m 6144 11008 --kn 4096x5120,8192x3072 --name gemm-bfloat16-$lay-extra > $R/$d/gemm-bfloat16-$lay-extra.txt 2>&1; echo "$d $lay-extra rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
done
{ python scripts/summarize_gemm.py $R/$d --check 132=1.0/0.95 --check 116=0.95/0.90; python scripts/summarize_gemm.py $R/$d --key efficiency_vs_torch_sm_target; python scripts/summarize_gemm.py $R/$d --engine torch-sm-target; } > $R/$d/summary-gemm.txt 2>&1
tar czf $OUT/r.tgz -C $OUT r
cat $R/env.txt $R/steps.txt; grep -E "passed|failed" $R/suite.log | tail -1; grep -E "^(FAILED|ERROR)" $R/suite.log | head; cat $R/$d/summary-gemm.txt
