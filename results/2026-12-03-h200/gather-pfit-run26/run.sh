#!/usr/bin/env bash
# Session 2026-12-03 06:49, first GPU call: gather GPU tests on fef5f63 (gather plans take
# gemm_config_for's tile), bench_all_gather (queued timing, dense pairing, tile variants,
# emulated W), then a P-fit sweep with bench_gemm (fewer programs than the SM budget).
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 FLASHOVERLAP_COMMIT=fef5f63
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import torch,triton;print(torch.__version__,triton.__version__,torch.version.cuda)"; } > $R/env.txt 2>&1
timeout -s INT -k 10 150 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_all_gather_gpu.py > $R/gather-tests.log 2>&1
echo "gather tests rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
A="timeout -s INT -k 10 100 python scripts/bench_all_gather.py --iters 40 --sets 4"
$A --out $R/ag-w1.json > $R/ag-w1.txt 2>&1; echo "ag w1 rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
$A --plan-world-size 8 --shapes 2048:2048:8192,2048:1024:8192,4096:1536:8192,3072:2048:8192,8192:8192:8192,16384:8192:2048,8192:8192:4096 --out $R/ag-w8.json > $R/ag-w8.txt 2>&1; echo "ag w8 rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
$A --plan-world-size 4 --shapes 1024:4096:4096,1024:2048:8192,4096:1024:4096,8192:8192:2048 --out $R/ag-w4.json > $R/ag-w4.txt 2>&1; echo "ag w4 rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
G="timeout -s INT -k 10 150 python scripts/bench_gemm.py --dtype bfloat16 --repeats 3 --out $R"
$G --b-layout nk --cta-offsets 0,4,16,18 --name pfit-nk > $R/pfit-nk.txt 2>&1; echo "pfit nk rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
$G --b-layout nk --m 6144 11008 --kn 4096x5120,8192x3072 --cta-offsets 0,3,4,8,12,16 --name pfit-nk-extra > $R/pfit-nk-extra.txt 2>&1; echo "pfit nk extra rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
$G --b-layout kn --cta-offsets 0,4,16,18 --name pfit-kn > $R/pfit-kn.txt 2>&1; echo "pfit kn rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/env.txt $R/steps.txt; tail -3 $R/gather-tests.log; grep -h "^M=\|worst" $R/ag-*.txt; grep -h "flashoverlap\|torch  \|SMs-" $R/pfit-*.txt | grep -v "^\[W"
