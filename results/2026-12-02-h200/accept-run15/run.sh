#!/usr/bin/env bash
# NEXT SESSION, first GPU call (~7 min): the tree with the split-saving threshold (ed99d3e..):
# whole GPU suite, stress, the bf16 acceptance set (3 repeats, cuBLAS on P SMs) and the
# short-K TP shapes.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
timeout -s INT -k 10 200 python -m pytest -q -ra -p no:cacheprovider tests/gpu \
  --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/t36.log 2>&1
echo "suite rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 10 60 python -m pytest -q -s -ra -p no:cacheprovider tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/stress.log 2>&1
echo "stress rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
G="timeout -s INT -k 10 60 python scripts/bench_gemm.py --dtype bfloat16 --repeats 3 --cta-offsets 0,16 --torch-sm-target --out $R"
for lay in kn nk; do
  $G --b-layout $lay --name gemm-bf16-$lay > $R/gemm-bf16-$lay.txt 2>&1; echo "bf16 $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  $G --b-layout $lay --m 6144 11008 --kn 4096x5120,8192x3072 --name gemm-bf16-$lay-extra > $R/gemm-bf16-$lay-extra.txt 2>&1; echo "bf16 $lay-extra rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
done
$G --b-layout nk --m 2048 4096 --kn 512x4096,1024x4096,1792x4096,2048x4096,3584x4096 --name gemm-tp-8b-short > $R/gemm-tp-8b-short.txt 2>&1; echo "tp rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
F="$R/gemm-bf16-kn.json $R/gemm-bf16-nk.json $R/gemm-bf16-kn-extra.json $R/gemm-bf16-nk-extra.json"
{ python scripts/summarize_gemm.py $F --check 132=1.0/0.95 --check 116=0.95/0.90; python scripts/summarize_gemm.py $F --key efficiency_vs_torch_sm_target; python scripts/summarize_gemm.py $R/gemm-tp-8b-short.json; } > $R/summary-gemm.txt 2>&1
tar czf $OUT/r.tgz -C $OUT r
cat $R/steps.txt; grep -E "passed|failed" $R/t36.log | tail -1; grep -E "^(FAILED|ERROR)" $R/t36.log | head; grep -E "^stress:|passed|failed" $R/stress.log | tail -2; cat $R/summary-gemm.txt
