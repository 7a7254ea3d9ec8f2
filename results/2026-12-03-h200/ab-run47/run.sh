#!/usr/bin/env bash
# Session 2026-12-03 13:49, second GPU call: the cluster GEMM with lean_loop + stmatrix
# (PRODUCT_KNOBS) through the product path -- its GPU tests, then issue 14's bf16 rows paired:
# the default (Gluon), --cluster-ctas 2 (P = 132 and 116) and --cluster-ctas 4 (P = 116),
# alternated per layout and shape set.  One tarball back.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
timeout -s INT -k 10 120 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_cluster_gemm_gpu.py > $R/tests.log 2>&1
rc=$?; echo "tests rc=$rc $(( $(date +%s) - t0 )) s" >> $R/steps.txt
if [ $rc = 0 ]; then
  G="timeout -s INT -k 10 60 python scripts/bench_gemm.py --dtype bfloat16 --repeats 3 --torch-sm-target"
  for lay in kn nk; do
    for set in main extra; do
      E=""; [ $set = extra ] && E="--m 6144 11008 --kn 4096x5120,8192x3072"
      for v in default cluster2 cluster4; do
        X="--cta-offsets 0,16"; [ $v = cluster2 ] && X="$X --cluster-ctas 2"; [ $v = cluster4 ] && X="--cta-offsets 16 --cluster-ctas 4"
        d=$R/$v; mkdir -p $d
        $G $X $E --b-layout $lay --out $d --name gemm-bfloat16-$lay-$set > $d/gemm-bfloat16-$lay-$set.txt 2>&1; echo "$v $lay $set rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
      done
    done
  done
  for v in default cluster2 cluster4; do python scripts/summarize_gemm.py $R/$v --check 132=1.0/0.95 --check 116=0.95/0.90 > $R/$v/summary.txt 2>&1; done
fi
tar czf $OUT/ab47.tgz -C $R . && rm -rf $R
cd /tmp && mkdir -p y && cd y && tar xzf $OUT/ab47.tgz && cat env.txt steps.txt; tail -3 tests.log; for v in default cluster2 cluster4; do echo "== $v"; cat $v/summary.txt 2>/dev/null | tail -12; done
