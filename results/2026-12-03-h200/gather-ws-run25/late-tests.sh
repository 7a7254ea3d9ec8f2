#!/usr/bin/env bash
# The late-chunk tests (watcher work enqueued first) and the engine's delayed-watcher test (~1 min).
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
timeout -s KILL 90 python -m pytest -q -ra -p no:cacheprovider tests/gpu/test_all_gather_gpu.py -k "late_chunks or delayed_watcher" > $R/late-tests.log 2>&1; echo "rc=$?" >> $R/late-tests.log
tail -4 $R/late-tests.log
