#!/usr/bin/env bash
# Session 2026-12-03 15:31, fourth GPU call (the last of the budget): do NCCL-shaped CTAs start
# at once beside the CUDA C cluster kernel -- the product's GEMM at P = 116 since z48 -- as
# they did beside the Gluon kernel (wssplit-run3)?  bench_sm_sharing --cluster-ctas 4 on
# 8192^3 (a plan the cluster kernel runs), then the nn GPU tests (ShardedLinear refactor).
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
timeout -s INT -k 10 150 python scripts/bench_sm_sharing.py --out $R --name sm-sharing-cluster --m 8192 --n 8192 --k 8192 --cta-offsets 16 --max-registers "" --cluster-ctas 4 --probes nccl-like,nccl-like-c1,nccl-regs,t256-r96,tiny > $R/sm-sharing.txt 2>&1
echo "sm-sharing rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 5 80 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_nn_gpu.py > $R/nn.log 2>&1
echo "nn rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
tar czf $OUT/s53.tgz -C $R . && rm -rf $R
cd /tmp && rm -rf s53 && mkdir s53 && cd s53 && tar xzf $OUT/s53.tgz && cat env.txt steps.txt; grep -v "^\s*$" sm-sharing.txt | tail -30; tail -3 nn.log
