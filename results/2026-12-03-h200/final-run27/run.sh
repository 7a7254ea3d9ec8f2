#!/usr/bin/env bash
# Session 2026-12-03 06:49, second GPU call: the session's final tree ffeaa0a -- GPU suite,
# stress, issue 14's acceptance set (bf16, 3 repeats, cuBLAS on P SMs) twice (z23, z24) and
# the fp16 set once between them.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=ffeaa0a
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
timeout -s INT -k 10 200 python -m pytest -q -ra -p no:cacheprovider tests/gpu \
  --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/suite.log 2>&1
echo "suite rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 10 70 python -m pytest -q -s -ra -p no:cacheprovider tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/stress.log 2>&1
echo "stress rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
accept() {  # $1 dtype, $2 folder
  mkdir -p $R/$2
  G="timeout -s INT -k 10 60 python scripts/bench_gemm.py --dtype $1 --repeats 3 --cta-offsets 0,16 --torch-sm-target --out $R/$2"
  for lay in kn nk; do
    $G --b-layout $lay --name gemm-$1-$lay > $R/$2/gemm-$1-$lay.txt 2>&1; echo "$2 $1 $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
    $G --b-layout $lay --m 6144 11008 --kn 4096x5120,8192x3072 --name gemm-$1-$lay-extra > $R/$2/gemm-$1-$lay-extra.txt 2>&1; echo "$2 $1 $lay-extra rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  done
  { python scripts/summarize_gemm.py $R/$2 --check 132=1.0/0.95 --check 116=0.95/0.90; python scripts/summarize_gemm.py $R/$2 --key efficiency_vs_torch_sm_target; } > $R/$2/summary-gemm.txt 2>&1
}
accept bfloat16 z23
accept float16 f16
accept bfloat16 z24
tar czf $OUT/r.tgz -C $OUT r
cat $R/env.txt $R/steps.txt; grep -E "passed|failed" $R/suite.log | tail -1; grep -E "^(FAILED|ERROR)" $R/suite.log | head; grep -E "^stress:|passed|failed" $R/stress.log | tail -2; for d in z23 f16 z24; do echo "== $d"; cat $R/$d/summary-gemm.txt; done
