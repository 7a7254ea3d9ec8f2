#!/usr/bin/env bash
# Session 2026-12-03 09:48, second GPU call: the CUDA C cluster GEMM (csrc_gen/cluster_gemm.cu)
# -- the slot release without the cluster-scope fence (MEMBAR.ALL.GPU per K step in run36)
# round against torch.matmul / cuBLASLt@P / the signal GEMM.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; python -m pip show cuda-bindings 2>/dev/null | grep -i version; python -c "from cuda.bindings import nvrtc; print('nvrtc', nvrtc.nvrtcVersion())"; } > $R/env.txt 2>&1
S=4096x8192x2048,8192x8192x8192,16384x8192x7168,6144x5120x4096,11008x3072x8192
timeout -s INT -k 10 240 python scripts/cluster_gemm_probe.py --out $R/probe --check-only --shapes 4096x8192x2048,11008x3072x8192,1000x776x136 > $R/check.txt 2>&1
rc=$?; echo "check rc=$rc $(( $(date +%s) - t0 )) s" >> $R/steps.txt
if [ $rc = 0 ]; then
  timeout -s INT -k 10 330 python scripts/cluster_gemm_probe.py --out $R/probe --shapes $S --rounds 1 --seconds 1.0 > $R/probe.txt 2>&1
  echo "probe rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
fi
tar czf $OUT/r.tgz -C $OUT r
cat $R/env.txt $R/steps.txt; tail -40 $R/check.txt; tail -30 $R/probe.txt 2>/dev/null
