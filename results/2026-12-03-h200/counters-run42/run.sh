#!/usr/bin/env bash
# Session 2026-12-03 12:14, third GPU call: where the energy goes -- Nsight Compute counters
# (HBM and L2 bytes, instructions, clock, SOL and warp-state sections) of torch.matmul,
# cuBLASLt on P SMs, the Gluon signal GEMM and the cluster kernel's variants, on the row with
# the largest cuBLAS clock lead (6144x5120x4096, w.t(), P = 116) and on 8192^3 (P = 132, 116).
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; ncu --version | tail -1; } > $R/env.txt 2>&1
NCU="ncu --profile-from-start off --clock-control none --csv --page raw --print-units base --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,sm__inst_executed.sum"
run() {  # name, script args
  local n=$1; shift
  timeout -s INT -k 10 170 $NCU python scripts/gemm_counters.py "$@" > $R/$n.csv 2> $R/$n.err
  echo "$n rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  echo "== $n $*" >> $R/tables.txt; python scripts/gemm_counters.py --parse $R/$n.csv >> $R/tables.txt 2>&1
}
run s6144 --shape 6144x5120x4096 --layout nk --ctas 116 --variants single,single-stsm,multicast2-stsm,multicast4-stsm
run s8192 --shape 8192x8192x8192 --layout nk --ctas 132,116 --variants single,single-stsm,multicast4-stsm
cat $R/env.txt $R/steps.txt $R/tables.txt; tail -5 $R/s6144.err
