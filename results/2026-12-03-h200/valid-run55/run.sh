#!/usr/bin/env bash
# Session 2026-12-03 16:48, first GPU call: HEAD (the review commit 1e135e6 had not run on a
# GPU) -- the whole GPU suite and the stress test; then issue 14's bf16 set through the
# product default, both B layouts, 26 rows x P = 132 / 116, 5 repeats (z55), with every
# timing kept in the JSON (samples_ms / efficiency_samples).  One tarball back.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R/z55; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
P="python -m pytest -q -ra -p no:cacheprovider"
timeout -s INT -k 5 270 $P tests/gpu --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/suite.log 2>&1
echo "suite rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 5 45 $P -s tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/stress.log 2>&1
echo "stress rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
G="timeout -s INT -k 10 90 python scripts/bench_gemm.py --repeats 5 --cta-offsets 0,16 --torch-sm-target --out $R/z55"
for lay in kn nk; do
  $G --dtype bfloat16 --b-layout $lay --name gemm-bfloat16-$lay > $R/z55/gemm-bfloat16-$lay.txt 2>&1; echo "z55 $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  $G --dtype bfloat16 --b-layout $lay --m 6144 11008 --kn 4096x5120,8192x3072 --name gemm-bfloat16-$lay-extra > $R/z55/gemm-bfloat16-$lay-extra.txt 2>&1; echo "z55 $lay-extra rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
done
{ python scripts/summarize_gemm.py $R/z55 --check 132=1.0/0.95 --check 116=0.95/0.90; python scripts/summarize_gemm.py $R/z55 --key efficiency_vs_torch_sm_target; } > $R/z55/summary-gemm.txt 2>&1
tar czf $OUT/z55.tgz -C $R . && rm -rf $R
cd /tmp && rm -rf z55 && mkdir -p z55 && cd z55 && tar xzf $OUT/z55.tgz && cat env.txt steps.txt; grep -E "passed|failed" suite.log | tail -1; grep -E "^(FAILED|ERROR)" suite.log | head; grep -E "^stress:|passed|failed" stress.log | tail -2; cat z55/summary-gemm.txt
