"""The CUDA C cluster GEMM (``flashoverlap.kernels.cluster_gemm``) on a CPU: its configuration
checks, the rendered source, its tile schedule, and -- where NVRTC is installed -- an sm_90a
compile whose machine code is checked (no spills; multicast TMA loads exactly in the
multicast variants).  Correctness and speed on a GPU: ``scripts/cluster_gemm_probe.py``."""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter

import pytest

from flashoverlap.kernels.cluster_gemm import (
    BM,
    BN,
    ClusterGemmConfig,
    source,
    tile_order_ref,
)

VARIANTS = [ClusterGemmConfig(cluster=1, multicast=False), ClusterGemmConfig(cluster=2, multicast=False),
            ClusterGemmConfig(cluster=2), ClusterGemmConfig(cluster=4),
            ClusterGemmConfig(cluster=2, b_kmajor=False), ClusterGemmConfig(cluster=2, dtype="float16")]


@pytest.mark.parametrize("kwargs, match", [
    (dict(cluster=3), "cluster must be"),
    (dict(cluster=1, multicast=True), "multicast needs"),
    (dict(dtype="float32"), "dtype must be"),
    (dict(stages=4), "shared memory"),
    (dict(group=0), "group must be"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClusterGemmConfig(**kwargs)


def test_source_is_specialized():
    src = source(ClusterGemmConfig(cluster=4, b_kmajor=False, dtype="float16"))
    assert "${" not in src
    assert "#define CL 4" in src and "#define MULTICAST 1" in src and "#define B_KMAJOR 0" in src
    assert "__cluster_dims__(4, 1, 1)" in src and "cvt.rn.f16x2.f32" in src
    # 128 accumulators in, the B transpose immediate set for a row-major B
    assert "m64n256k16.f32.f16.f16" in src and "%127}, %128, %129, p, 1, 1, 0, 1;" in src
    single = source(ClusterGemmConfig(cluster=1, multicast=False))
    assert "__cluster_dims__" not in single and "p, 1, 1, 0, 0;" in single


@pytest.mark.parametrize("cfg", VARIANTS[:4], ids=lambda c: c.name)
@pytest.mark.parametrize("M, N, P", [(4096, 8192, 132), (11008, 3072, 116), (1000, 776, 132),
                                     (16384, 8192, 116), (384, 256, 8)])
def test_schedule_covers_every_tile_once(cfg, M, N, P):
    order = tile_order_ref(M, N, P, cfg)
    tiles_m, tiles_n = -(-M // BM), -(-N // BN)
    real = Counter(t for cta in order for t in cta if t[0] < tiles_m)
    assert set(real) == {(m, n) for m in range(tiles_m) for n in range(tiles_n)}
    assert set(real.values()) == {1}
    # the CTAs of a cluster walk the same tile columns in step (they share each B tile)
    for c0 in range(0, len(order), cfg.cluster):
        cols = {tuple(n for _, n in order[c0 + r]) for r in range(cfg.cluster)}
        assert len(cols) == 1


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
        nvrtc.nvrtcVersion()
    except Exception as exc:  # no cuda-bindings, or no NVRTC library to load
        pytest.skip(f"NVRTC not available: {exc}")


def _cuobjdump():
    try:
        import triton
    except ImportError:
        pytest.skip("no Triton (its cuobjdump reads the cubin)")
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        pytest.skip("Triton carries no cuobjdump")
    return path


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: f"{c.name}-{c.b_kmajor}-{c.dtype}")
def test_compiles_for_sm90a_without_spills(cfg, tmp_path):
    _nvrtc()
    tool = _cuobjdump()
    from flashoverlap.kernels.cluster_gemm import compile_cubin

    cubin = tmp_path / "k.cubin"
    cubin.write_bytes(compile_cubin(cfg))
    usage = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    assert regs <= 168 and "LOCAL:0" in usage and "STACK:0" in usage, usage
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    assert "HGMMA.64x256x16.F32" in sass
    assert ("UTMALDG.2D.MULTICAST" in sass) == cfg.multicast
    assert "UTMASTG.2D" in sass
    assert "USETMAXREG" in sass
    # a release at cluster scope compiles to MEMBAR.ALL.GPU: only the two cluster barriers
    # (start, end) may carry one, never the per-K-step slot release (run36: 25 % slower)
    assert sass.count("MEMBAR.ALL.GPU") == (2 if cfg.cluster > 1 else 0)
