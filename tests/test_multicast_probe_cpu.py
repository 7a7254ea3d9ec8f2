"""``scripts/multicast_probe.py`` compiled for sm_90 on the CPU: the three variants build, and
only the multicast one multicasts -- from inside the loader's K loop, with the pair's shared
"empty" barrier reached by remote arrives and no cluster-wide barrier in that loop (a
``barrier.cluster`` there would stall both CTAs every K step, and it is not allowed inside a
warp-specialized partition).  Skipped where Triton's Gluon has no multicast load (3.6)."""

from __future__ import annotations

import re

import pytest
from launch_utils import load_script
from sm90_ptx import sm90_ptx

pytest.importorskip("triton.experimental.gluon")


def _load():
    return load_script("multicast_probe")


def _probe():
    mod = _load()
    if not mod.have_multicast():
        pytest.skip("this Triton's Gluon has no multicast TMA load")
    return mod


def _ptx(mod, variant: str) -> str:
    return sm90_ptx(mod.probe_kernel, mod.PTRS, mod.VARIANT_META[variant],
                    **mod.VARIANT_OPTIONS[variant])


def _innermost_loop_of(ptx: str, needle: str) -> str:
    """The text from the innermost loop header before the first ``needle`` to the last one."""
    first, last = ptx.find(needle), ptx.rfind(needle)
    assert first >= 0, needle
    header = ptx.rfind("Inner Loop Header", 0, first)
    assert header >= 0
    return ptx[header:last]


def test_only_the_multicast_variant_multicasts_and_its_k_loop_has_no_cluster_barrier():
    mod = _probe()
    single, cluster, multicast = (_ptx(mod, v) for v in ("single", "cluster", "multicast"))
    for ptx in (single, cluster, multicast):
        assert "wgmma.mma_async" in ptx and "setmaxnreg" in ptx
    assert mod.ptx_summary(single)["multicast_loads"] == 0
    assert mod.ptx_summary(cluster)["multicast_loads"] == 0
    assert mod.ptx_summary(single)["cluster_barriers"] == 0
    s = mod.ptx_summary(multicast)
    # the 256-column B tile in 64-column (128-byte) boxes, issued by the lead CTA for both
    assert s["multicast_loads"] == mod.BN // 64
    assert re.search(r"@%p\d+ cp\.async\.bulk\.tensor\.2d\.shared::cluster[^;]*multicast", multicast)
    assert s["remote_arrives"] >= 1  # the MMA partition frees the pair's B slot on the lead
    loop = _innermost_loop_of(multicast, "multicast::cluster")
    assert "barrier.cluster" not in loop
    assert "mbarrier.try_wait" in loop  # the loader waits for its slots, not for the cluster


def test_summary_is_each_engine_against_the_unclustered_probe():
    mod = _load()
    rows = [dict(M=4096, N=8192, K=2048, num_ctas=116, engine=e, median_ms=ms, sm_clock_mhz=mhz)
            for e, ms, mhz in (("single", 0.25, 1500.0), ("single", 0.27, 1500.0),
                               ("multicast", 0.234, 1560.0), ("signal", 0.26, 1500.0))]
    rows.append(dict(M=4096, N=8192, K=2048, num_ctas=None, engine="torch", median_ms=0.2,
                     sm_clock_mhz=1400.0))
    (line,) = mod.summarize(rows)
    assert line.startswith("4096x8192x2048 P=116: single 0.2600 ms 1500 MHz")
    assert "multicast 0.900 (clock 1.040)" in line and "signal 1.000 (clock 1.000)" in line
    assert "torch" not in line
