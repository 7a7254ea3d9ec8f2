#!/usr/bin/env bash
# Session 2026-12-03, first GPU call (~7.5 min): the final tree b235e25 -- whole GPU suite,
# stress, the bf16 acceptance set (3 repeats, cuBLAS on P SMs), then a sweep of the shapes
# where charging the split fix-up in kernels.tile_time would flip the wave-tile rule.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; git log --oneline -1; } > $R/env.txt 2>&1
timeout -s INT -k 10 220 python -m pytest -q -ra -p no:cacheprovider tests/gpu \
  --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/suite.log 2>&1
echo "suite rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 10 70 python -m pytest -q -s -ra -p no:cacheprovider tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/stress.log 2>&1
echo "stress rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
G="timeout -s INT -k 10 60 python scripts/bench_gemm.py --dtype bfloat16 --repeats 3 --cta-offsets 0,16 --torch-sm-target --out $R"
for lay in kn nk; do
  $G --b-layout $lay --name gemm-bf16-$lay > $R/gemm-bf16-$lay.txt 2>&1; echo "bf16 $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  $G --b-layout $lay --m 6144 11008 --kn 4096x5120,8192x3072 --name gemm-bf16-$lay-extra > $R/gemm-bf16-$lay-extra.txt 2>&1; echo "bf16 $lay-extra rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
done
F="$R/gemm-bf16-kn.json $R/gemm-bf16-nk.json $R/gemm-bf16-kn-extra.json $R/gemm-bf16-nk-extra.json"
{ python scripts/summarize_gemm.py $F --check 132=1.0/0.95 --check 116=0.95/0.90; python scripts/summarize_gemm.py $F --key efficiency_vs_torch_sm_target; } > $R/summary-gemm.txt 2>&1
S=512x2048x4096,512x4096x8192,1024x1024x4096,1024x2048x4096,1024x2048x8192,1536x4096x4096,2048x3072x4096,6144x1024x4096,2048x1024x8192,512x5120x4096,512x14336x4096,1024x3072x4096,11008x1024x4096,11008x1024x8192,512x3072x4096,1024x5120x4096,1536x1024x8192,512x4096x4096,2048x3072x7168,3072x2048x4096
timeout -s INT -k 10 170 python scripts/gemm_sweep.py --out $R/sweep-fixup.json --budget-s 150 --shapes $S --fp16-shapes '' --layouts nk \
  --iters 40 --candidates default,128x128_s5 > $R/sweep-fixup.txt 2>&1
echo "sweep rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/env.txt $R/steps.txt; grep -E "passed|failed" $R/suite.log | tail -1; grep -E "^(FAILED|ERROR)" $R/suite.log | head; grep -E "^stress:|passed|failed" $R/stress.log | tail -2; cat $R/summary-gemm.txt; sed -n '/dtype  /,$p' $R/sweep-fixup.txt | head -60
