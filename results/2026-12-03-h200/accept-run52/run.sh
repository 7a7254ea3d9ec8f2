#!/usr/bin/env bash
# Session 2026-12-03 15:31, third GPU call: HEAD, where row-strided views take the cluster
# kernel too (test_row_strided_operands passed in valid-run50) -- the whole GPU suite and the
# stress test, then issue 14's set through the product default: bf16 and fp16, both B
# layouts, 26 rows x P = 132 / 116, 3 repeats (z52).  One tarball back.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R/z52; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
P="python -m pytest -q -ra -p no:cacheprovider"
timeout -s INT -k 5 270 $P tests/gpu --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/suite.log 2>&1
echo "suite rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 5 45 $P -s tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/stress.log 2>&1
echo "stress rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
G="timeout -s INT -k 10 60 python scripts/bench_gemm.py --repeats 3 --cta-offsets 0,16 --torch-sm-target --out $R/z52"
for dt in bfloat16 float16; do
  for lay in kn nk; do
    $G --dtype $dt --b-layout $lay --name gemm-$dt-$lay > $R/z52/gemm-$dt-$lay.txt 2>&1; echo "z52 $dt $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
    $G --dtype $dt --b-layout $lay --m 6144 11008 --kn 4096x5120,8192x3072 --name gemm-$dt-$lay-extra > $R/z52/gemm-$dt-$lay-extra.txt 2>&1; echo "z52 $dt $lay-extra rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  done
done
{ python scripts/summarize_gemm.py $R/z52 --check 132=1.0/0.95 --check 116=0.95/0.90; python scripts/summarize_gemm.py $R/z52 --key efficiency_vs_torch_sm_target; } > $R/z52/summary-gemm.txt 2>&1
tar czf $OUT/z52.tgz -C $R . && rm -rf $R
cd /tmp && rm -rf z52 && mkdir -p z52 && cd z52 && tar xzf $OUT/z52.tgz && cat env.txt steps.txt; grep -E "passed|failed" suite.log | tail -1; grep -E "^(FAILED|ERROR)" suite.log | head; grep -E "^stress:|passed|failed" stress.log | tail -2; cat z52/summary-gemm.txt
