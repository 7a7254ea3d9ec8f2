#!/usr/bin/env bash
# stage 2 (after run_gpu8a.sh): Triton 3.9 on the signal-GEMM tests (128x128 WS tile included)
# and the stress test (~1.5 min)
set -u
mkdir -p /tmp/site39 && python -c "
import lzma,tarfile
with lzma.open('/tmp/t39/rest.tar.xz') as f: tarfile.open(fileobj=f, mode='r|').extractall('/tmp/site39')
" && cp /tmp/t39/libtriton.so /tmp/site39/triton/_C/libtriton.so && python -c "
import lzma,shutil
with lzma.open('.t39b/pb.xz') as f, open('/tmp/site39/triton/backends/nvidia/bin/ptxas-blackwell','wb') as g: shutil.copyfileobj(f,g)
" && chmod +x /tmp/site39/triton/backends/nvidia/bin/ptxas-blackwell || { echo "STAGING FAILED"; ls -la /tmp/t39 /tmp/site39; exit 3; }
sed -i '/amd/d' /tmp/site39/triton-3.9.0.dist-info/entry_points.txt
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site39:/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R; t0=$(date +%s)
python -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)" | tee $R/versions.txt
timeout -s INT -k 10 100 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_signal_gemm.py --deselect tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/signal_gemm.log 2>&1
echo "signal_gemm rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
timeout -s INT -k 10 80 python -m pytest -q -s -ra -p no:cacheprovider tests/gpu/test_signal_gemm.py::test_signal_ordering_stress > $R/stress.log 2>&1
echo "stress rc=$? $(( $(date +%s) - t0 )) s" >> $R/steps.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/versions.txt $R/steps.txt; grep -E "passed|failed" $R/signal_gemm.log | tail -1; grep -E "^stress:|passed|failed" $R/stress.log | tail -2; grep -E "^(FAILED|ERROR)" $R/*.log | head
