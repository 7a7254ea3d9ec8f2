#!/usr/bin/env bash
# Session 2026-12-03 08:16, first GPU call: the filled last wave (GemmConfig.fill_tail, off by
# default) -- GPU suite (includes the gather tests of ce9778d and the new fill tests), stress
# (fill in its config), a paired A/B of fill on/off (fill_min_saved 0) at P = 132 and 116 on
# the shapes it applies to, then issue 14's acceptance set with fill on and with the default.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=f4996f0
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
timeout -s INT -k 10 210 python -m pytest -q -ra -p no:cacheprovider tests/gpu \
  --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/suite.log 2>&1
echo "suite rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 10 70 python -m pytest -q -s -ra -p no:cacheprovider tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/stress.log 2>&1
echo "stress rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
SH=4096x8192x2048,4096x8192x7168,4096x8192x8192,8192x8192x2048,8192x8192x7168,8192x8192x8192,11008x3072x8192,11008x5120x4096
V=""; for P in 132 116; do for i in 1 2 3; do for f in 0 1; do V="$V;fill_tail=$f,fill_min_saved_k_tiles=0,num_ctas=$P"; done; done; done
python -c "
from flashoverlap.kernels import tail_fill
for s in '$SH'.split(','):
    M,N,K=map(int,s.split('x'))
    for P in (132,116):
        T=(M//128)*(N//256); print(s,P,'tiles',T,'r',T%P,'fill (num_main, fill_k)',tail_fill(T,P,-(-K//64),0),'of',-(-K//64))
" > $R/fill-schedule.txt 2>&1
for lay in kn nk; do
  timeout -s INT -k 10 110 python scripts/bench_gemm.py --sweep "${V:1}" --sweep-shapes $SH --sweep-only --b-layout $lay > $R/ab-fill-$lay.txt 2>&1
  echo "ab $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
done
accept() {  # $1 folder, then extra args
  d=$1; shift; mkdir -p $R/$d
  G="timeout -s INT -k 10 60 python scripts/bench_gemm.py --dtype bfloat16 --repeats 3 --cta-offsets 0,16 --torch-sm-target --out $R/$d $*"
  for lay in kn nk; do
    $G --b-layout $lay --name gemm-bfloat16-$lay > $R/$d/gemm-bfloat16-$lay.txt 2>&1; echo "$d $lay rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
    $G --b-layout $lay --m 6144 11008 --kn 4096x5120,8192x3072 --name gemm-bfloat16-$lay-extra > $R/$d/gemm-bfloat16-$lay-extra.txt 2>&1; echo "$d $lay-extra rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  done
  { python scripts/summarize_gemm.py $R/$d --check 132=1.0/0.95 --check 116=0.95/0.90; python scripts/summarize_gemm.py $R/$d --key efficiency_vs_torch_sm_target; } > $R/$d/summary-gemm.txt 2>&1
}
accept zfill --fill-tail 1 --fill-min-saved 0
accept z0
tar czf $OUT/r.tgz -C $OUT r
cat $R/env.txt $R/steps.txt; grep -E "passed|failed" $R/suite.log | tail -1; grep -E "^(FAILED|ERROR)" $R/suite.log | head; grep -E "^stress:|passed|failed" $R/stress.log | tail -2
cat $R/fill-schedule.txt; for lay in kn nk; do grep -E "M=|fill_tail" $R/ab-fill-$lay.txt | cut -c1-150; done; for d in zfill z0; do echo "== $d"; head -12 $R/$d/summary-gemm.txt; done
