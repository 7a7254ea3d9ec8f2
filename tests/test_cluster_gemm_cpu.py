"""The CUDA C cluster GEMM (``flashoverlap.kernels.cluster_gemm``) on a CPU: its configuration
checks, the rendered source, which plans let a cluster share B tiles, and -- where NVRTC is
installed -- an sm_90a compile whose machine code is checked (no spills; multicast TMA loads
exactly in the multicast variants; no GPU-scope fence in the main loop).  Correctness and speed
on a GPU: ``scripts/cluster_gemm_probe.py``."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess

import pytest

import numpy as np
from launch_utils import load_script

from flashoverlap.kernels.cluster_gemm import ClusterGemmConfig, shares_b_tiles, source
from flashoverlap.plan import PlanConfig, Problem, make_plan

VARIANTS = [ClusterGemmConfig(cluster=1, multicast=False), ClusterGemmConfig(cluster=2, multicast=False),
            ClusterGemmConfig(cluster=2), ClusterGemmConfig(cluster=4),
            ClusterGemmConfig(cluster=2, b_kmajor=False), ClusterGemmConfig(cluster=2, dtype="float16"),
            ClusterGemmConfig(cluster=1, multicast=False, b_one_box=True),
            ClusterGemmConfig(cluster=4, b_one_box=True),
            ClusterGemmConfig(cluster=1, multicast=False, stmatrix=True),
            ClusterGemmConfig(cluster=4, b_kmajor=False, dtype="float16", stmatrix=True),
            ClusterGemmConfig(cluster=4, stmatrix=True, wait_hint_ns=10_000_000),
            ClusterGemmConfig(cluster=1, multicast=False, lean_loop=True),
            ClusterGemmConfig(cluster=4, stmatrix=True, lean_loop=True),
            ClusterGemmConfig(cluster=2, b_kmajor=False, dtype="float16", lean_loop=True),
            ClusterGemmConfig(cluster=4, stmatrix=True, lean_loop=True, mixed_columns=True),
            ClusterGemmConfig(cluster=2, b_kmajor=False, stmatrix=True, lean_loop=True,
                              mixed_columns=True),
            ClusterGemmConfig(cluster=4, stmatrix=True, lean_loop=True, half_epilogue=True,
                              stages=4),
            ClusterGemmConfig(cluster=1, multicast=False, b_kmajor=False, dtype="float16",
                              stmatrix=True, lean_loop=True, half_epilogue=True, stages=4),
            ClusterGemmConfig(cluster=4, b_kmajor=False, stmatrix=True, lean_loop=True,
                              mixed_columns=True, half_epilogue=True)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(cluster=3), "cluster must be"),
    (dict(cluster=1, multicast=True), "multicast needs"),
    (dict(dtype="float32"), "dtype must be"),
    (dict(stages=4), "shared memory"),
    (dict(stages=5, stmatrix=True, half_epilogue=True), "shared memory"),
    (dict(half_epilogue=True), "half_epilogue needs stmatrix"),
    (dict(b_kmajor=False, b_one_box=True), "K-major"),
    (dict(l2_promotion=32), "l2_promotion"),
    (dict(wait_hint_ns=-1), "wait_hint_ns"),
    (dict(cluster=2, multicast=False, mixed_columns=True), "mixed_columns needs"),
    (dict(cluster=4, b_one_box=True, mixed_columns=True), "mixed_columns needs"),
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


def _table(M, N, P, group_m, op="all_reduce", world=1):
    plan = make_plan(Problem(M, N, 1024, "bfloat16", world, op),
                     PlanConfig(block_m=128, block_n=256, num_ctas=P, group_m=group_m))
    return plan.step_table


def _shares_by_brute_force(table, P, cl):
    """Program p runs steps p, p+P, ...; the cluster of programs [c*cl, c*cl+cl) runs its
    i-th steps together, past-the-end steps taking their cluster's first step's column."""
    T = len(table)
    for first in range(0, P, cl):
        for s0 in range(first, T, P):
            cols = {int(table[s, 2]) for s in range(s0, min(s0 + cl, T))}
            if len(cols) != 1:
                return False
    return P % cl == 0


@pytest.mark.parametrize("M, N, P, group_m, op, world", [
    (4096, 8192, 132, 8, "all_reduce", 1), (11008, 3072, 116, 8, "all_reduce", 1),
    (16384, 8192, 116, 16, "all_reduce", 1), (1000, 776, 132, 8, "all_reduce", 1),
    (8192, 8192, 116, 8, "reduce_scatter", 4), (6144, 5120, 132, 6, "all_reduce", 1),
    (6144, 5120, 132, 5, "all_reduce", 1), (2304, 4096, 130, 8, "all_reduce", 1),
])
@pytest.mark.parametrize("cl", [2, 4])
def test_shares_b_tiles_matches_the_schedule(M, N, P, group_m, op, world, cl):
    table = _table(M, N, P, group_m, op, world)
    assert shares_b_tiles(table, P, cl) == _shares_by_brute_force(table, P, cl)


def test_shares_b_tiles_examples():
    assert shares_b_tiles(_table(8192, 8192, 132, 8), 132, 2)
    assert shares_b_tiles(_table(8192, 8192, 116, 8), 116, 4)
    # 86 tile rows in bands of 8: the last band has 6 rows -- pairs yes, fours no
    assert shares_b_tiles(_table(11008, 3072, 116, 8), 116, 2)
    assert not shares_b_tiles(_table(11008, 3072, 116, 8), 116, 4)
    assert not shares_b_tiles(_table(6144, 5120, 132, 5), 132, 2)  # bands of 5 rows
    assert not shares_b_tiles(_table(8192, 8192, 130, 8), 130, 4)  # P not a multiple
    assert not shares_b_tiles(np.array([[0, 128, 0, 256, 0, 0, 0], [128, 256, 256, 512, 128, 0, 0]]), 2, 2)


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


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: f"{c.name}-{c.b_kmajor}-{c.dtype}-{c.b_one_box}-{c.stmatrix}-{c.lean_loop}-"
                         f"{c.mixed_columns}-{c.half_epilogue}-{c.stages}")
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
    # the epilogue: 16 stmatrix x4 a consumer thread, or 64 4-byte shared stores
    assert sass.count("STSM.16.M88.4") == (16 if cfg.stmatrix else 0)
    # a release at cluster scope compiles to MEMBAR.ALL.GPU: only the two cluster barriers
    # (start, end) and the signal may carry one, never the per-K-step slot release (run36:
    # 25 % slower)
    # + the storer's one red.release.gpu per tile
    assert sass.count("MEMBAR.ALL.GPU") == (2 if cfg.cluster > 1 else 0) + 1
    # lean_loop: the wgmma descriptors are built in uniform registers -- no R2UR (a vector
    # register moved to a uniform one) among the instructions that feed an HGMMA; the
    # original loop rebuilds the A descriptor from the thread's warpgroup index every K step
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    fed = [i for i, ln in enumerate(lines) if "HGMMA" in ln]
    r2ur = sum("R2UR" in lines[j] for i in fed for j in range(max(i - 8, 0), i))
    assert (r2ur == 0) == cfg.lean_loop, r2ur


def _probe():
    return load_script("cluster_gemm_probe")


def test_probe_summary_is_efficiency_and_clock_against_the_signal_gemm():
    mod = _probe()
    row = dict(b_layout="nk", M=8192, N=8192, K=8192, round=0)
    rows = [dict(row, engine=e, num_ctas=116, efficiency_vs_torch=eff, sm_clock_mhz=clk)
            for e, eff, clk in (("signal", 0.95, 1500.0), ("multicast4", 0.96, 1530.0))]
    rows += [dict(r, round=1, efficiency_vs_torch=r["efficiency_vs_torch"] + 0.01) for r in rows]
    rows.append(dict(row, engine="torch", num_ctas=None, efficiency_vs_torch=1.0,
                     sm_clock_mhz=1450.0))
    (line,) = mod.summarize(rows)
    assert line.startswith("nk 8192x8192x8192 P=116:")
    assert "multicast4 0.965 (clock 1.020)" in line and "signal 0.955 (clock 1.000)" in line


def test_probe_variants_are_the_configs_they_name():
    mod = _probe()
    for name in mod.VARIANTS:
        if not mod.runs_on(name, "kn"):
            assert name.endswith("-1box")
            continue
        cfg = mod.variant_config(name, "kn")
        assert name.startswith(cfg.name) and not cfg.b_kmajor
    assert mod.variant_config("multicast4", "nk") == ClusterGemmConfig(cluster=4, b_kmajor=True)


def test_readme_quotes_the_committed_cluster_runs():
    """The README's numbers for the cluster GEMM's product-path A/B (cluster-run38): medians
    and minima of both passes, and the per-row ratio on the rows the cluster kernel took."""
    import json
    import statistics
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = root / "results" / "2026-12-03-h200" / "cluster-run38"
    eff = {}
    for v in ("default", "cluster4"):
        for f in sorted((run / v).glob("*.json")):
            for r in json.loads(f.read_text()):
                if r.get("engine") == "flashoverlap" and r.get("num_ctas") == 116:
                    eff[v, r["b_layout"], r["M"], r["N"], r["K"]] = (r["efficiency_vs_torch"],
                                                                       r["kernel"])
    for v, med, low in (("default", 0.951, 0.911), ("cluster4", 0.946, 0.892)):
        xs = [e for (w, *_), (e, _) in eff.items() if w == v]
        assert len(xs) == 26
        assert round(statistics.median(xs), 3) == med and round(min(xs), 3) == low
    took, other = [], []
    for (v, *shape), (e, kernel) in eff.items():
        if v == "cluster4":
            (took if kernel == "cluster4" else other).append(e / eff[("default", *shape)][0])
    assert len(took) == 16 and len(other) == 10
    assert round(statistics.median(took), 3) == 0.989
    assert (round(min(took), 3), round(max(took), 3)) == (0.979, 1.018)
    assert (round(min(other), 3), round(max(other), 3)) == (0.952, 1.047)
    readme = (root / "README.md").read_text()
    for quoted in ("**0.946 / 0.892**", "0.951 / 0.911", "0.979–1.018", "median 0.989",
                   "0.952–1.047"):
        assert quoted in readme, quoted


def test_eligible_takes_only_what_the_kernel_can_run(monkeypatch):
    """cluster_gemm.eligible's rules, on CPU tensors with the device checks stubbed: the
    config must ask for clusters, the plan must be whole tiles that pair by column, and no
    split last wave may be wanted."""
    import dataclasses

    import torch

    from flashoverlap.kernels import cluster_gemm, default_config

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cluster_gemm, "available", lambda: True)
    base = dataclasses.replace(default_config(None, torch.bfloat16), cluster_ctas=4)

    def check(M=8192, N=8192, K=1024, P=116, group_m=8, config=base, b_t=False,
              full_tiles=True, residual=None, table=True):
        plan = make_plan(Problem(M, N, K, "bfloat16", 1, "all_reduce"),
                         PlanConfig(block_m=128, block_n=256, num_ctas=P, group_m=group_m))
        a = torch.empty(M, K, dtype=torch.bfloat16)
        b = torch.empty(N, K, dtype=torch.bfloat16).T if b_t else torch.empty(K, N, dtype=torch.bfloat16)
        out = torch.empty(M, N, dtype=torch.bfloat16)
        return cluster_gemm.eligible(a, b, out, config, residual, full_tiles and plan.full_tiles,
                                     plan.step_table if table else None, P)

    assert check() and check(b_t=True)
    assert not check(config=dataclasses.replace(base, cluster_ctas=0))
    assert not check(group_m=5)                # bands of 5 rows: no column pairs
    # ... which the product's variant would take once mixed_columns is in its knobs
    monkeypatch.setattr(cluster_gemm, "PRODUCT_KNOBS",
                        dict(cluster_gemm.PRODUCT_KNOBS, mixed_columns=True))
    assert check(group_m=5) and not check(P=118)
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cluster_gemm, "available", lambda: True)
    assert not check(P=118)                    # not a whole number of clusters of 4
    assert not check(full_tiles=False)
    assert not check(table=False)              # no host copy of the table (capturing)
    assert not check(residual=torch.empty(8192, 8192, dtype=torch.bfloat16))
    assert not check(config=dataclasses.replace(base, block_n=128))
    # row-strided views (TMA-addressable, e.g. a column slice of a wider activation) take
    # the cluster kernel too: its tensor maps carry each operand's row stride (valid-run50)
    plan = make_plan(Problem(8192, 8192, 1024, "bfloat16", 1, "all_reduce"),
                     PlanConfig(block_m=128, block_n=256, num_ctas=116, group_m=8))
    wide = torch.empty(8192, 1024 + 64, dtype=torch.bfloat16)
    b = torch.empty(1024, 8192, dtype=torch.bfloat16)
    out = torch.empty(8192, 8192, dtype=torch.bfloat16)
    args = (base, None, plan.full_tiles, plan.step_table, 116)
    assert cluster_gemm.eligible(wide[:, :1024], b, out, *args)
    assert cluster_gemm.eligible(wide[:, :1024].contiguous(), b, out, *args)
    # ... but not a view TMA cannot address (a row stride that is not 16-byte aligned)
    odd = torch.empty(8192, 1024 + 3, dtype=torch.bfloat16)
    assert cluster_gemm.eligible(odd[:, :1024], b, out, *args) is False
    # 16384 x 8192 at P = 116 has a last wave the Gluon kernel splits in 3 (K = 8192)
    assert not check(M=16384, K=8192)
    assert check(M=16384, K=8192, config=dataclasses.replace(base, split_tail=False))


def test_readme_quotes_the_knob_rounds():
    """The README's ratios for the base-kernel knobs (verify-run40, stsm-run41): per row, a
    variant's efficiency over the same kernel's without the knob; median (min-max)."""
    import json
    import statistics
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = " ".join((root / "README.md").read_text().replace("**", "").split())
    for run, a, b, n, quoted in (
            ("verify-run40", "single-l2none", "single", 16, "1.000 (0.989–1.015, 16 rows)"),
            ("verify-run40", "single-1box", "single", 8, "1.003 (0.997–1.007, 8 rows)"),
            ("stsm-run41", "single-stsm", "single", 20, "1.003 (0.996–1.009, 20 rows)"),
            ("stsm-run41", "multicast4-stsm", "single-stsm", 8, "1.008 of the kernel\n  without "
             "clusters (0.994–1.017, 8 rows)"),
            ("stsm-run41", "multicast2-stsm", "single-stsm", 20, "0.986 (0.976–0.997, 20 rows)"),
            # lean-run46: the lean main loop, and the lean kernel against the Gluon one
            ("lean-run46", "single-stsm-lean", "single-stsm", 20, "1.017× the same kernel "
             "without it (1.006–1.030, 20 rows)"),
            ("lean-run46", "multicast4-stsm-lean", "multicast4-stsm", 8, "1.014× (1.009–1.022, 8 rows)"),
            ("lean-run46", "single-stsm-lean", "signal", 20, "0.995 of the Gluon kernel**\n"
             "(0.974–1.018, 20 rows)")):
        rows = json.loads((root / "results" / "2026-12-03-h200" / run / "probe" /
                           "cluster-gemm-probe.json").read_text())
        eff = {(r["engine"], r["b_layout"], r["M"], r["N"], r["K"], r["num_ctas"]):
               r["efficiency_vs_torch"] for r in rows}
        ratios = [e / eff[(b, *k[1:])] for k, e in eff.items() if k[0] == a]
        assert len(ratios) == n
        med, lo, hi = (f"{x:.3f}" for x in (statistics.median(ratios), min(ratios), max(ratios)))
        assert quoted.startswith(med) and f"({lo}–{hi}, {n} rows)" in quoted, (a, med, lo, hi)
        assert " ".join(quoted.replace("**", "").split()) in readme, quoted


def test_kernel_for_loads_nothing_when_told_not_to(monkeypatch):
    """Under a stream capture the launcher asks kernel_for with may_load off: a variant not
    loaded yet is None (the Gluon kernel runs; loading would compile, load a module and
    synchronize the capturing stream), a loaded one is returned."""
    import dataclasses

    import torch

    from flashoverlap.kernels import cluster_gemm, default_config

    config = dataclasses.replace(default_config(None, torch.bfloat16), cluster_ctas=4)
    a = torch.empty(1024, 512, dtype=torch.bfloat16)
    b = torch.empty(512, 1024, dtype=torch.bfloat16)
    monkeypatch.setattr(cluster_gemm, "_LOADED", {})
    built = []
    monkeypatch.setattr(cluster_gemm, "ClusterGemm", lambda cfg: built.append(cfg))
    assert cluster_gemm.kernel_for(a, b, config, 116, may_load=False) is None
    assert built == []

    class Loaded:
        def fits(self, num_ctas):
            return num_ctas <= 120

    cfg = cluster_gemm.ClusterGemmConfig(cluster=4, multicast=True, b_kmajor=False,
                                         dtype="bfloat16", **cluster_gemm.PRODUCT_KNOBS)
    loaded = Loaded()
    cluster_gemm._LOADED[(cfg, a.device.index)] = loaded
    assert cluster_gemm.kernel_for(a, b, config, 116, may_load=False) is loaded
    assert cluster_gemm.kernel_for(a, b, config, 124, may_load=False) is None  # cannot fit
    assert built == []


def test_cubins_are_kept_on_disk(tmp_path, monkeypatch):
    """compile_cubin keeps each cubin under $FLASHOVERLAP_CACHE/cubin, named by a hash of the
    source, options and NVRTC version: a second process (here: the in-memory cache cleared)
    reads it instead of compiling; another variant is another file; an unwritable cache is
    skipped."""
    _nvrtc()
    from cuda.bindings import nvrtc

    from flashoverlap.kernels import cluster_gemm

    monkeypatch.setenv("FLASHOVERLAP_CACHE", str(tmp_path))
    cfg = ClusterGemmConfig(cluster=1, multicast=False, lean_loop=True)
    cluster_gemm.compile_cubin.cache_clear()
    first = cluster_gemm.compile_cubin(cfg)
    (path,) = (tmp_path / "cubin").glob("*.cubin")
    assert path.read_bytes() == first and len(first) > 10_000
    assert not list((tmp_path / "cubin").glob(".*.tmp"))

    def no_compile(*args):
        raise AssertionError("compiled although the cubin is on disk")

    cluster_gemm.compile_cubin.cache_clear()
    monkeypatch.setattr(nvrtc, "nvrtcCompileProgram", no_compile)
    assert cluster_gemm.compile_cubin(cfg) == first
    monkeypatch.undo()
    monkeypatch.setenv("FLASHOVERLAP_CACHE", str(tmp_path))
    path.write_bytes(b"not a cubin")  # a stray file is compiled over
    cluster_gemm.compile_cubin.cache_clear()
    assert cluster_gemm.compile_cubin(cfg) == first and path.read_bytes() == first
    cluster_gemm.compile_cubin(ClusterGemmConfig(cluster=4, lean_loop=True))
    assert len(list((tmp_path / "cubin").glob("*.cubin"))) == 2
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("FLASHOVERLAP_CACHE", str(blocked))
    cluster_gemm.compile_cubin.cache_clear()
    assert cluster_gemm.compile_cubin(cfg) == first  # compiled, not kept
    cluster_gemm.compile_cubin.cache_clear()


def test_a_variant_that_cannot_load_falls_back_once_with_a_warning(monkeypatch):
    """kernel_for: where compiling or loading raises (an old NVRTC, a driver error), the
    launch gets None -- the Gluon kernel runs --, with one RuntimeWarning, not an error in the
    user's GEMM call; the variant is not tried again."""
    import dataclasses
    import warnings

    import torch

    from flashoverlap.kernels import cluster_gemm, default_config

    config = dataclasses.replace(default_config(None, torch.bfloat16), cluster_ctas=4)
    a = torch.empty(1024, 512, dtype=torch.bfloat16)
    b = torch.empty(512, 1024, dtype=torch.bfloat16)
    monkeypatch.setattr(cluster_gemm, "_LOADED", {})
    tries = []

    def broken(cfg):
        tries.append(cfg)
        raise RuntimeError("NVRTC could not compile")

    monkeypatch.setattr(cluster_gemm, "ClusterGemm", broken)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    with pytest.warns(RuntimeWarning, match="could not be loaded"):
        assert cluster_gemm.kernel_for(a, b, config, 116) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cluster_gemm.kernel_for(a, b, config, 116) is None
    assert len(tries) == 1


def test_runs_table_takes_any_band_height_with_mixed_columns():
    """runs_table: whole clusters always; one column per cluster (shares_b_tiles) unless the
    variant takes mixed_columns."""
    from flashoverlap.kernels.cluster_gemm import runs_table

    plain = ClusterGemmConfig(cluster=4, lean_loop=True)
    mixed = ClusterGemmConfig(cluster=4, lean_loop=True, mixed_columns=True)
    odd = _table(11008, 3072, 116, 8)  # 86 tile rows: a band of 6
    even = _table(8192, 8192, 116, 8)
    assert runs_table(plain, even, 116) and runs_table(mixed, even, 116)
    assert not runs_table(plain, odd, 116) and runs_table(mixed, odd, 116)
    assert not runs_table(mixed, odd, 118)  # not whole clusters of 4


def test_launch_refuses_operands_tma_cannot_address():
    """ClusterGemm's launch checks (before any driver call, so a bare instance on the CPU):
    B must have the variant's layout, and every operand unit inner stride with 16-byte
    aligned bases and row strides; row-strided views pass the check."""
    import torch

    from flashoverlap.kernels.cluster_gemm import ClusterGemm

    kernel = ClusterGemm.__new__(ClusterGemm)
    kernel.config = ClusterGemmConfig(cluster=4, b_kmajor=True)
    a = torch.empty(256, 128, dtype=torch.bfloat16)
    out = torch.empty(256, 512, dtype=torch.bfloat16)
    w = torch.empty(512, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="weight.t"):
        kernel(a, w.t().contiguous(), out, None, None, 4)  # row-major B for a K-major variant
    with pytest.raises(ValueError, match="16-byte aligned"):
        kernel(torch.empty(256, 131, dtype=torch.bfloat16)[:, :128], w.t(), out, None, None, 4)
    with pytest.raises(ValueError, match="multiple of the cluster"):  # the operands passed
        kernel(torch.empty(256, 136, dtype=torch.bfloat16)[:, :128], w.t(), out, None, None, 6)
