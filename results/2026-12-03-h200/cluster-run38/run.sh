#!/usr/bin/env bash
# Session 2026-12-03 09:48, third GPU call: the CUDA C cluster GEMM as a signal GEMM (plan step
# tables, a storer thread, counters, SignalGemmLauncher with GemmConfig.cluster_ctas) -- its
# GPU tests, then issue 14's P = 116 rows, paired: the product's default (Gluon) and
# --cluster-ctas 4, alternated per layout and shape set.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
timeout -s INT -k 10 150 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_cluster_gemm_gpu.py > $R/tests.log 2>&1
rc=$?; echo "tests rc=$rc $(( $(date +%s) - t0 )) s" >> $R/steps.txt
if [ $rc = 0 ]; then
  G="timeout -s INT -k 10 60 python scripts/bench_gemm.py --dtype bfloat16 --repeats 3 --cta-offsets 16 --torch-sm-target"
  for lay in kn nk; do
    for v in default cluster4; do
      X=""; [ $v = cluster4 ] && X="--cluster-ctas 4"
      d=$R/$v; mkdir -p $d
      $G $X --b-layout $lay --out $d --name gemm-bfloat16-$lay > $d/gemm-bfloat16-$lay.txt 2>&1; echo "$v $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
      $G $X --b-layout $lay --m 6144 11008 --kn 4096x5120,8192x3072 --out $d --name gemm-bfloat16-$lay-extra > $d/gemm-bfloat16-$lay-extra.txt 2>&1; echo "$v $lay-extra rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
    done
  done
  for v in default cluster4; do python scripts/summarize_gemm.py $R/$v --check 116=0.95/0.90 > $R/$v/summary.txt 2>&1; done
fi
tar czf $OUT/r.tgz -C $OUT r
cat $R/env.txt $R/steps.txt; tail -6 $R/tests.log; for v in default cluster4; do echo "== $v"; cat $R/$v/summary.txt 2>/dev/null | tail -40; done
