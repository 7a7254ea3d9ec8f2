#!/usr/bin/env bash
# Session 2026-12-03 16:48, second GPU call: how noisy is a row's efficiency, and does the
# window length or a settling timing help?  valid-run55 (rep 100 ms, 5 repeats) found two
# torch.matmul timings of one shape ~0.3 s apart differing by 1.4 % (robust sd; 2.0 % sd), and
# each shape's first timing 0.4 % faster (median; mean 1 %).  Here issue 14's bf16 set with
# 300-ms windows and a discarded 200-ms torch timing after each shape's setup (z56), then the
# fp16 set as z52's (100 ms, 3 repeats) but settled (z56f).  One tarball back.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R/z56 $R/z56f; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
B="python scripts/bench_gemm.py --repeats 3 --cta-offsets 0,16 --torch-sm-target --settle-ms 200"
for lay in kn nk; do
  timeout -s INT -k 10 150 $B --rep 300 --out $R/z56 --dtype bfloat16 --b-layout $lay --name gemm-bfloat16-$lay > $R/z56/gemm-bfloat16-$lay.txt 2>&1; echo "z56 $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  timeout -s INT -k 10 90 $B --rep 300 --out $R/z56 --dtype bfloat16 --b-layout $lay --m 6144 11008 --kn 4096x5120,8192x3072 --name gemm-bfloat16-$lay-extra > $R/z56/gemm-bfloat16-$lay-extra.txt 2>&1; echo "z56 $lay-extra rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
done
for lay in kn nk; do
  timeout -s INT -k 10 70 $B --out $R/z56f --dtype float16 --b-layout $lay --name gemm-float16-$lay > $R/z56f/gemm-float16-$lay.txt 2>&1; echo "z56f $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  timeout -s INT -k 10 50 $B --out $R/z56f --dtype float16 --b-layout $lay --m 6144 11008 --kn 4096x5120,8192x3072 --name gemm-float16-$lay-extra > $R/z56f/gemm-float16-$lay-extra.txt 2>&1; echo "z56f $lay-extra rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
done
for d in z56 z56f; do { python scripts/summarize_gemm.py $R/$d --check 132=1.0/0.95 --check 116=0.95/0.90; python scripts/summarize_gemm.py $R/$d --key efficiency_vs_torch_sm_target; } > $R/$d/summary-gemm.txt 2>&1; done
tar czf $OUT/z56.tgz -C $R . && rm -rf $R
cd /tmp && rm -rf z56 && mkdir -p z56 && cd z56 && tar xzf $OUT/z56.tgz && cat env.txt steps.txt z56/summary-gemm.txt z56f/summary-gemm.txt
