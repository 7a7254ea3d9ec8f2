#!/usr/bin/env bash
# Session 2026-12-03 12:14, last GPU call (~250 s of device time left): HBM and L2 bytes of
# the Gluon signal GEMM per band height (group_m) against cuBLASLt on 116 SMs -- counters-run42
# found the signal GEMM reading 19-22 % more from HBM than cuBLAS on the same shapes.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
NCU="ncu --profile-from-start off --clock-control none --csv --page raw --print-units base --section SpeedOfLight --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,sm__inst_executed.sum,gpc__cycles_elapsed.avg.per_second"
for s in 8192x8192x8192 6144x5120x4096; do
  timeout -s INT -k 5 50 $NCU python scripts/gemm_counters.py --shape $s --layout nk --ctas 116 --variants "" --group-m 4,16,32 > $R/c$s.csv 2> $R/c$s.err
  echo "$s rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
  echo "== $s nk P=116" >> $R/tables.txt; python scripts/gemm_counters.py --parse $R/c$s.csv >> $R/tables.txt 2>&1
done
cat $R/steps.txt $R/tables.txt
