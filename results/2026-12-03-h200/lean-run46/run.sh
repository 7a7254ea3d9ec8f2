#!/usr/bin/env bash
# Session 2026-12-03 13:49, first GPU call: the GPU suite and the stress test on HEAD (the last
# session's final tree had not run on a GPU after its review commit), then the cluster kernel's
# lean_loop knob: probe round (lean vs not, single and multicast4, against the Gluon signal
# GEMM) and ncu counters on 8192^3 at P = 116.  Everything comes back as one tarball.
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=$(cat .commit)
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
P="python -m pytest -q -ra -p no:cacheprovider"
timeout -s INT -k 5 240 $P tests/gpu --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/suite.log 2>&1
echo "suite rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 5 50 $P -s tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/stress.log 2>&1
echo "stress rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
S=4096x8192x2048,8192x8192x8192,16384x8192x7168,6144x5120x4096,11008x3072x8192
timeout -s INT -k 10 200 python scripts/cluster_gemm_probe.py --out $R/probe --shapes $S --ctas 132,116 --variants single-stsm,single-stsm-lean,multicast4-stsm,multicast4-stsm-lean --rounds 1 --seconds 0.8 > $R/probe.txt 2>&1
echo "probe rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
NCU="ncu --profile-from-start off --clock-control none --csv --page raw --print-units base --section SpeedOfLight --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,sm__inst_executed.sum,gpc__cycles_elapsed.avg.per_second"
timeout -s INT -k 5 60 $NCU python scripts/gemm_counters.py --shape 8192x8192x8192 --layout nk --ctas 116 --variants single-stsm,single-stsm-lean,single-l2none,multicast4-stsm,multicast4-stsm-lean > $R/c8192.csv 2> $R/c8192.err
echo "counters rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
python scripts/gemm_counters.py --parse $R/c8192.csv > $R/counters.txt 2>&1
tar czf $OUT/lean46.tgz -C $R . && rm -rf $R
cd /tmp && mkdir x && cd x && tar xzf $OUT/lean46.tgz && cat env.txt steps.txt; grep -E "passed|failed" suite.log | tail -1; grep -E "^(FAILED|ERROR)" suite.log | head; grep -E "^stress:|passed|failed" stress.log | tail -2; grep -A60 "efficiency vs" probe.txt | head -70; cat counters.txt
