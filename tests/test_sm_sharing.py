"""``scripts/bench_sm_sharing.py`` on the CPU: the occupancy model, the cuobjdump parser, the
sample analysis, the probe sources and the command line.

The GPU measurement itself runs only on a GPU (by hand, see the script's docstring); what
decides its answers without a GPU is tested here with hand-computed values.  The module is
imported by path, as ``test_gemm_config.py`` imports ``scripts/gemm_sweep.py``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]
_SCRIPT = _REPO / "scripts" / "bench_sm_sharing.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_sm_sharing", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


bss = _load()
CtaShape, SmLimits = bss.CtaShape, bss.SmLimits


# --------------------------------------------------------------------------------------
# occupancy model
# --------------------------------------------------------------------------------------


def test_registers_are_allocated_per_warp_in_256_register_units():
    assert bss.regs_per_cta(CtaShape(256, 255)) == 8 * 8192  # 255 * 32 = 8160 -> 8192
    assert bss.regs_per_cta(CtaShape(256, 208)) == 8 * 6656
    assert bss.regs_per_cta(CtaShape(640, 96)) == 20 * 3072
    assert bss.regs_per_cta(CtaShape(640, 95)) == 20 * 3072  # 3040 -> 3072
    assert bss.regs_per_cta(CtaShape(33, 32)) == 2 * 1024  # a partial warp is a warp
    # setmaxnreg (the warp-specialized GEMM): the whole file, so nothing fits beside it
    ws = CtaShape(384, 168, 213276, reallocates_registers=True)
    assert bss.regs_per_cta(ws) == 65536
    assert bss.fits_beside(ws, CtaShape(32, 31)) == 0
    assert bss.fits_beside(CtaShape(384, 168, 213276), CtaShape(32, 31)) == 1


def test_shared_memory_is_rounded_and_reserved_per_cta():
    assert bss.smem_per_cta(CtaShape(32, 32, 0)) == 1024
    assert bss.smem_per_cta(CtaShape(32, 32, 180248)) == 180352 + 1024  # 128 B units
    assert bss.smem_per_cta(CtaShape(32, 32, 40960)) == 40960 + 1024


def test_a_full_register_file_leaves_no_room():
    # 8 warps x ceil(255 * 32 / 256) * 256 = 65536: nothing left for even one warp.
    assert bss.fits_beside(CtaShape(256, 255), CtaShape(32, 32)) == 0


def test_a_208_register_gemm_leaves_room_for_small_ctas():
    gemm = CtaShape(256, 208)  # 53248 registers, 12288 left
    assert bss.fits_beside(gemm, CtaShape(256, 40)) == 1  # 8 x 1280 = 10240
    assert bss.fits_beside(gemm, CtaShape(128, 40)) == 2  # 4 x 1280 = 5120 each


def test_exactly_the_rest_of_the_register_file_fits():
    gemm = CtaShape(256, 208)
    assert bss.regs_per_cta(CtaShape(256, 48)) == 65536 - bss.regs_per_cta(gemm)
    assert bss.fits_beside(gemm, CtaShape(256, 48)) == 1
    assert bss.fits_beside(gemm, CtaShape(256, 49)) == 0  # 49 * 32 = 1568 -> 1792 per warp


def test_nccl_cta_does_not_fit_beside_a_208_register_gemm():
    assert bss.fits_beside(CtaShape(256, 208), CtaShape(640, 96)) == 0  # 61440 > 12288


def test_shared_memory_limit():
    gemm = CtaShape(256, 128, 180248)  # 180352 + 1024 = 181376 B; 52096 B left
    assert bss.fits_beside(gemm, CtaShape(32, 32, 60 * 1024)) == 0  # 62464 B
    assert bss.fits_beside(gemm, CtaShape(32, 32, 40 * 1024)) == 1  # 41984 B
    assert bss.fits_beside(gemm, CtaShape(32, 32, 4096)) == 10  # 52096 // 5120; slots: 31


def test_nccl_dynamic_shared_memory_does_not_fit_beside_the_gemm():
    gemm = CtaShape(256, 128, 180248)
    assert bss.fits_beside(gemm, CtaShape(640, 32, bss.NCCL_DYNAMIC_SMEM_SM90)) == 0
    assert bss.NCCL_DYNAMIC_SMEM_SM90 == 82240  # 20 warps x (8 * 32 + 1) * 16 B


def test_thread_limit():
    gemm = CtaShape(1024, 32)  # 32768 registers, 1024 threads
    # registers would allow 4 (16 warps x 512 = 8192 each); threads allow (2048-1024)/512 = 2
    assert bss.fits_beside(gemm, CtaShape(512, 16)) == 2


def test_cta_slot_limit():
    gemm = CtaShape(128, 32)
    # registers allow 120, threads 60, shared memory (reserve) 227: the 31 free slots decide
    assert bss.fits_beside(gemm, CtaShape(32, 16)) == 31


def test_an_empty_sm_takes_one_nccl_cta():
    assert bss.fits_on_sm((), CtaShape(640, 96)) == 1  # 61440 registers; two need 122880
    assert bss.fits_on_sm((), CtaShape(640, 96, 82240)) == 1


def test_limits_are_parameters():
    small = SmLimits(regs=32768, smem=100 * 1024)
    assert bss.fits_on_sm((), CtaShape(640, 96), small) == 0
    assert bss.fits_beside(CtaShape(128, 32), CtaShape(128, 32), small) == 7  # 32768 / 4096 - 1


@pytest.mark.parametrize("bad", [CtaShape(0, 32), CtaShape(1025, 32), CtaShape(32, 256),
                                 CtaShape(32, -1), CtaShape(32, 32, -1)])
def test_impossible_ctas_are_rejected(bad):
    with pytest.raises(ValueError):
        bss.fits_beside(CtaShape(256, 128), bad)


def test_predicted_immediate_ctas():
    gemm, nccl = CtaShape(256, 255, 180248), CtaShape(640, 96, 82240)
    assert bss.predicted_immediate_ctas(gemm, nccl, 132, 132, 16) == 0
    assert bss.predicted_immediate_ctas(gemm, nccl, 132, 124, 16) == 8  # one per free SM
    assert bss.predicted_immediate_ctas(gemm, nccl, 132, 116, 16) == 16
    small, light_gemm = CtaShape(32, 32), CtaShape(256, 128, 180248)
    # registers 32768 / 1024 = 32, threads 1792 / 32 = 56, shared memory 52096 / 1024 = 50,
    # CTA slots 31: the slots decide
    assert bss.fits_beside(light_gemm, small) == 31
    assert bss.predicted_immediate_ctas(light_gemm, small, 132, 132, 16) == 16
    assert bss.predicted_immediate_ctas(light_gemm, small, 2, 2, 100) == 62


def test_sm_limits_from_device_properties():
    props = type("Props", (), {"regs_per_multiprocessor": 65536,
                               "max_threads_per_multi_processor": 1536,
                               "shared_memory_per_multiprocessor": 102400})()
    sm = bss.sm_limits_for(props)
    assert (sm.regs, sm.max_threads, sm.smem, sm.max_ctas) == (65536, 1536, 102400, 32)
    assert bss.sm_limits_for(object()) == bss.H100_SM


# --------------------------------------------------------------------------------------
# cuobjdump -res-usage
# --------------------------------------------------------------------------------------

# The layout of `cuobjdump -res-usage` (one "Fatbin elf code" block per architecture, a
# "Function NAME:" line followed by its resources), with NCCL-like mangled names.
RES_USAGE_SAMPLE = """
Fatbin elf code:
================
arch = sm_80
code version = [1,7]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function _Z21ncclDevKernel_Generic19ncclDevKernelArgs4K:
  REG:90 STACK:16 SHARED:1600 LOCAL:0 CONSTANT[0]:4456 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0 CONSTANT[3]:16
 Function _Z40ncclDevKernel_AllReduce_Sum_bf16_RING_LL19ncclDevKernelArgs4K:
  REG:80 STACK:0 SHARED:1664 LOCAL:0 CONSTANT[0]:4456 CONSTANT[2]:24 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z21ncclDevKernel_Generic19ncclDevKernelArgs4K:
  REG:96 STACK:8 SHARED:1728 LOCAL:0 CONSTANT[0]:4456 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z23ncclDevKernel_Generic_419ncclDevKernelArgs4K:
  REG:94 STACK:0 SHARED:1664 LOCAL:0 CONSTANT[0]:4456 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z12helperKernelPv:
  REG:255 STACK:0 SHARED:40000 LOCAL:0 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function void ncclDevKernel_Demangled<ns::T>(ncclDevKernelArgs4K): REG:40 STACK:0 SHARED:0 LOCAL:8
"""


def test_res_usage_parser_reads_nccl_kernels_per_arch():
    usages = bss.parse_res_usage(RES_USAGE_SAMPLE)
    assert [(u.arch, u.regs, u.shared) for u in usages] == [
        ("sm_80", 90, 1600), ("sm_90", 80, 1664), ("sm_90", 96, 1728), ("sm_90", 94, 1664),
        ("sm_90", 40, 0)]
    assert usages[2] == bss.KernelUsage("_Z21ncclDevKernel_Generic19ncclDevKernelArgs4K",
                                        "sm_90", 96, 8, 1728, 0)
    assert usages[-1].name == "void ncclDevKernel_Demangled<ns::T>(ncclDevKernelArgs4K)"
    assert usages[-1].local == 8
    assert all("helperKernel" not in u.name for u in usages)


def test_res_usage_summary_for_the_devices_arch():
    summary = bss.summarize_nccl_usage(bss.parse_res_usage(RES_USAGE_SAMPLE), "sm_90")
    assert summary["count"] == 4 and summary["arch"] == "sm_90"
    assert (summary["reg_min"], summary["reg_median"], summary["reg_max"]) == (40, 87, 96)
    assert (summary["shared_min"], summary["shared_median"], summary["shared_max"]) == (
        0, 1664, 1728)
    assert "note" not in summary


def test_res_usage_summary_falls_back_to_every_arch():
    summary = bss.summarize_nccl_usage(bss.parse_res_usage(RES_USAGE_SAMPLE), "sm_100")
    assert summary["count"] == 5 and summary["arch"] is None
    assert summary["reg_max"] == 96 and "sm_100" in summary["note"]
    assert bss.summarize_nccl_usage([], "sm_90") == {"count": 0, "arch": "sm_90"}


def test_nccl_measured_probe_uses_the_largest_counts_plus_the_dynamic_size():
    summary = bss.summarize_nccl_usage(bss.parse_res_usage(RES_USAGE_SAMPLE), "sm_90")
    probe = bss.nccl_measured_probe(summary, 82240, 4)
    assert probe == bss.ProbeShape("nccl-measured", 640, 96, 1728 + 82240, 4)
    assert bss.nccl_measured_probe({"count": 0}, 82240, 4) is None


def test_nccl_kernel_usage_says_what_is_missing(tmp_path):
    assert "no libnccl" in bss.nccl_kernel_usage(None, "/bin/true", "sm_90")["note"]
    lib = tmp_path / "libnccl.so.2"
    lib.write_bytes(b"")
    assert "no cuobjdump" in bss.nccl_kernel_usage(str(lib), None, "sm_90")["note"]
    fake = tmp_path / "cuobjdump"
    fake.write_text("#!/bin/sh\ncat <<'EOF'\n" + RES_USAGE_SAMPLE + "EOF\n")
    fake.chmod(0o755)
    result = bss.nccl_kernel_usage(str(lib), str(fake), "sm_90")
    assert result["count"] == 4 and result["reg_max"] == 96
    assert result["nccl_lib"] == str(lib) and result["cuobjdump"] == str(fake)
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho 'cuobjdump fatal : no fatbin' >&2\nexit 1\n")
    broken.chmod(0o755)
    result = bss.nccl_kernel_usage(str(lib), str(broken), "sm_90")
    assert result["count"] == 0 and "no fatbin" in result["note"]


# --------------------------------------------------------------------------------------
# sample analysis
# --------------------------------------------------------------------------------------

US = 1000  # ns


def _sample(starts, launch=1_300 * US, ends=None, smids=None):
    # GEMM from 1050 us to 4050 us (3000 us); markers' other edges 50 us / 5 us outside.
    return bss.Sample(1_000 * US, 1_050 * US, 4_050 * US, 4_055 * US, launch, tuple(starts),
                      tuple(ends if ends is not None else [s + 200 * US for s in starts]),
                      tuple(smids if smids is not None else range(len(starts))))


def test_probe_that_starts_at_once():
    starts = [1_310 * US] * 8 + [1_320 * US] * 8
    t = bss.time_probe(_sample(starts), margin_us=50, at_once_us=50)
    assert t.valid and t.reason == ""
    assert t.gemm_us == 3000.0 and t.launch_us == 250.0
    assert (t.started_during_gemm, t.started_at_once, t.probe_sms) == (16, 16, 16)
    assert (t.first_start_us, t.median_start_us, t.last_start_us) == (260.0, 265.0, 270.0)
    assert t.start_vs_gemm_end_us == -2735.0
    assert (t.first_latency_us, t.median_latency_us) == (10.0, 15.0)
    assert t.probe_us == 200.0


def test_probe_that_waits_for_the_gemm():
    starts = [1_320 * US] * 4 + [4_060 * US] * 12  # 4 on free SMs, 12 after the GEMM
    t = bss.time_probe(_sample(starts, smids=[0, 1, 2, 3] * 4), 50, 50)
    assert t.valid
    assert (t.started_during_gemm, t.started_at_once, t.probe_sms) == (4, 4, 4)
    assert t.start_vs_gemm_end_us == 10.0 and t.median_latency_us == 2760.0


@pytest.mark.parametrize("sample, reason", [
    (_sample([1_040 * US] * 16), "probe started before the GEMM"),
    (_sample([4_100 * US] * 16, launch=4_010 * US), "GEMM ended before the probe"),
    (_sample([1_310 * US] * 15 + [0]), "probe output missing"),
    (_sample([1_310 * US] * 16, launch=None), "probe launch time unknown"),
])
def test_unusable_samples_are_flagged(sample, reason):
    t = bss.time_probe(sample, 50, 50)
    assert not t.valid and t.reason.startswith(reason)


def test_scenario_summary_uses_valid_samples_only():
    good = bss.time_probe(_sample([1_310 * US] * 16), 50, 50)
    slow = bss.time_probe(bss.Sample(1_000 * US, 1_050 * US, 4_350 * US, 4_355 * US,
                                     1_300 * US, (1_310 * US,) * 16, (1_510 * US,) * 16,
                                     tuple(range(16))), 50, 50)
    bad = bss.time_probe(_sample([1_040 * US] * 16), 50, 50)
    out = bss.summarize_scenario([good, slow, bad], alone_us=[3000.0, 3000.0, 3100.0])
    assert (out["samples"], out["samples_valid"]) == (3, 2)
    assert out["invalid_reasons"] == ["probe started before the GEMM"]
    assert out["median_ms"] == 3.0
    assert out["gemm_with_probe_ms"] == pytest.approx(3.15)  # median of 3000 and 3300 us
    assert out["gemm_cost"] == pytest.approx(1.05)
    assert out["started_during_gemm"] == 16 and out["started_during_gemm_min"] == 16
    assert out["first_start_us"] == 260.0


def test_scenario_summary_without_valid_samples():
    bad = bss.time_probe(_sample([1_040 * US] * 16), 50, 50)
    out = bss.summarize_scenario([bad], alone_us=[3000.0])
    assert out == {"samples": 1, "samples_valid": 0, "median_ms": 3.0,
                   "invalid_reasons": ["probe started before the GEMM"]}


# --------------------------------------------------------------------------------------
# probe shapes and sources
# --------------------------------------------------------------------------------------


def test_default_probes_include_nccl_shape():
    shapes = {s.name: s for s in bss.default_probe_shapes()}
    assert shapes["nccl-like"] == bss.ProbeShape("nccl-like", 640, 96, 82240, 4)
    assert shapes["nccl-like-c1"].cluster == 1 and shapes["nccl-regs"].smem == 0
    assert shapes["tiny"] == bss.ProbeShape("tiny", 32, 32, 0, 1)
    assert set(bss.QUICK_PROBES) <= set(shapes)


def test_probe_source_holds_the_register_target_and_cluster():
    src = bss.probe_source(bss.ProbeShape("x", 640, 96, 82240, 4))
    assert "float acc[84];" in src and "__cluster_dims__(4, 1, 1)" in src
    assert "%%globaltimer" in src and "%%smid" in src and "__launch_bounds__" not in src
    assert "__cluster_dims__" not in bss.probe_source(bss.ProbeShape("y", 32, 32))
    assert "float acc[20];" in bss.probe_source(bss.ProbeShape("y", 32, 32))
    assert "gemm_marker" in bss.marker_source()


@pytest.mark.parametrize("kwargs", [dict(threads=0), dict(threads=1025), dict(regs=23),
                                    dict(regs=256), dict(smem=-1), dict(cluster=9),
                                    dict(name="a b")])
def test_bad_probe_shapes_are_rejected(kwargs):
    with pytest.raises(ValueError):
        bss.ProbeShape(**{"name": "p", "threads": 32, "regs": 32, **kwargs})


def test_probe_spec():
    assert bss.parse_probe_spec("w:256:64") == bss.ProbeShape("w", 256, 64)
    assert bss.parse_probe_spec("w:640:96:1000:2") == bss.ProbeShape("w", 640, 96, 1000, 2)
    for bad in ("w:256", "w:a:64", "w:1:2:3:4:5"):
        with pytest.raises(ValueError):
            bss.parse_probe_spec(bad)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (compiles for sm_90)")
@pytest.mark.parametrize("threads, regs, cluster", [(640, 96, 4), (32, 32, 1)])
def test_probe_compiles_close_to_its_register_target(tmp_path, threads, regs, cluster):
    shape = bss.ProbeShape("p", threads, regs, 82240 if cluster > 1 else 0, cluster)
    src = tmp_path / "probe.cu"
    src.write_text(bss.probe_source(shape))
    proc = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", str(tmp_path / "p.cubin"),
                           str(src), f"-maxrregcount={regs}", "-Xptxas", "-v"],
                          capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    used = int(re.search(r"Used (\d+) registers", log).group(1))
    assert regs - 8 < used <= regs, log  # same allocation (8-register granularity)
    assert re.search(r"\b0 bytes spill stores", log), log


# --------------------------------------------------------------------------------------
# command line, configurations, output
# --------------------------------------------------------------------------------------


def test_defaults_and_quick():
    args = bss.parse_args([])
    assert (args.offsets, args.caps, args.reps, args.probe_ctas) == ([0, 8, 16], [168, 128],
                                                                      7, 16)
    assert (args.m, args.n, args.k, args.delay_us) == (16384, 8192, 8192, 300.0)
    quick = bss.parse_args(["--quick"])
    assert (quick.offsets, quick.caps, quick.reps) == ([0], [], 3)
    shapes, missing = bss.select_probes(quick, None)
    assert [s.name for s in shapes] == list(bss.QUICK_PROBES) and missing == []


def test_probe_selection_and_extra_probes():
    args = bss.parse_args(["--probes", "tiny,nccl-measured", "--probe-add", "w:256:64:0:2"])
    shapes, missing = bss.select_probes(args, None)
    assert [s.name for s in shapes] == ["tiny", "w"] and missing == ["nccl-measured"]
    measured = bss.ProbeShape("nccl-measured", 640, 96, 83904, 4)
    shapes, missing = bss.select_probes(args, measured)
    assert [s.name for s in shapes] == ["tiny", "nccl-measured", "w"] and missing == []
    assert len(bss.select_probes(bss.parse_args([]), measured)[0]) == 8


@pytest.mark.parametrize("argv", [["--reps", "0"], ["--probe-ctas", "6"],
                                  ["--probe-add", "w:64:32:0:3"], ["--cta-offsets", "x"],
                                  ["--probe-add", "w:1"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        bss.parse_args(argv)
    assert exc.value.code == 2


def test_gemm_configs_with_and_without_max_registers():
    @dataclasses.dataclass(frozen=True)
    class Old:
        block_m: int = 128

    configs, notes = bss.gemm_configs(Old(), [168])
    assert [label for label, _ in configs] == ["default"]
    assert notes == ["GemmConfig has no max_registers field: skipping [168]"]

    @dataclasses.dataclass(frozen=True)
    class New:
        max_registers: int | None = None

        def __post_init__(self):
            if self.max_registers is not None and self.max_registers < 24:
                raise ValueError("too few")

    configs, notes = bss.gemm_configs(New(), [168, 8, 128])
    assert [label for label, _ in configs] == ["default", "maxreg168", "maxreg128"]
    assert configs[1][1].max_registers == 168 and notes == ["max_registers=8: too few"]
    assert bss.gemm_configs(New(), [])[0] == [("default", New())]
    assert bss.gemm_configs(New(), [], [4])[1] == ["GemmConfig has no cluster_ctas field: "
                                                   "skipping [4]"]


def test_gemm_configs_with_the_cluster_kernel():
    """--cluster-ctas adds the product's GemmConfig with cluster_ctas set (the CUDA C cluster
    kernel), labelled by its cluster size; values GemmConfig refuses become notes."""
    from flashoverlap.kernels import GemmConfig

    base = GemmConfig()
    configs, notes = bss.gemm_configs(base, [168], [4, 3])
    assert [label for label, _ in configs] == ["default", "maxreg168", "cluster4"]
    assert configs[2][1] == dataclasses.replace(base, cluster_ctas=4) and len(notes) == 1
    assert notes[0].startswith("cluster_ctas=3: ")
    assert bss.parse_args(["--cluster-ctas", "4,2"]).clusters == [4, 2]
    assert bss.parse_args([]).clusters == []


def _row(**extra):
    gemm = bss.GemmUnderTest("default", type("Cfg", (), {})(), 132, None,
                             CtaShape(256, 255, 180248), 0)
    gemm.config = dataclasses.make_dataclass("Cfg", [("block_m", int, 128)])()
    shape = bss.ProbeShape("nccl-like", 640, 96, 82240, 4)
    common = {"bench": "sm_sharing", "op": "matmul", "M": 1, "N": 1, "K": 1,
              "dtype": "bfloat16", "world_size": 1, "probe_ctas": 16, "p2p": None,
              "gpu": "g", "torch": "t", "nccl": None, "triton": "tr", "date": "d",
              "commit": "c"}
    return bss.scenario_row(common, gemm, shape, None, dict(extra), 132, bss.H100_SM)


ROW_KEYS = {"bench", "op", "M", "N", "K", "dtype", "world_size", "engine", "num_ctas",
            "median_ms", "gemm_regs", "gemm_smem", "max_registers", "probe_threads",
            "probe_regs_target", "probe_regs", "probe_smem", "probe_ctas",
            "started_during_gemm", "first_start_us", "median_start_us", "start_vs_gemm_end_us",
            "probe_sms", "gemm_cost", "predicted_fit", "p2p", "gpu", "torch", "nccl", "triton",
            "date", "commit"}


def test_scenario_row_and_table_line():
    row = _row(median_ms=3.0, started_during_gemm=0, gemm_cost=1.0, samples_valid=7)
    assert ROW_KEYS <= row.keys(), ROW_KEYS - row.keys()
    assert row["engine"] == "flashoverlap" and row["variant"] == "default/nccl-like"
    assert (row["gemm_regs"], row["gemm_smem"], row["probe_regs"]) == (255, 180248, None)
    assert (row["predicted_fit"], row["predicted_start_now"]) == (0, 0)
    assert row["first_start_us"] is None and row["max_registers"] is None
    line = bss.table_line(row)
    assert len(line.split()) == len(bss.TABLE_COLUMNS) and " 3.000 " in line
    assert len(bss.table_header().split()) == len(bss.TABLE_COLUMNS)
    assert bss.prediction_text(row) == ("predicted: 0 probe CTAs fit beside a GEMM CTA; "
                                        "0/16 start at once")
    noted = bss.table_line(_row(note="probe failed"))
    assert noted.endswith("[probe failed]")


# --------------------------------------------------------------------------------------
# the script as a program
# --------------------------------------------------------------------------------------


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=120, cwd=_REPO, env={**os.environ, **env})


def test_module_imports_without_cupy_torch_or_triton():
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('m', {str(_SCRIPT)!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['m'] = m\n"
            "spec.loader.exec_module(m)\n"
            "print(sorted(k for k in ('cupy', 'torch', 'triton') if k in sys.modules))\n")
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_help_runs_anywhere():
    proc = _run(str(_SCRIPT), "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--probe-smem" in proc.stdout and "--quick" in proc.stdout


def test_without_cuda_it_exits_2_with_a_message(tmp_path):
    proc = _run(str(_SCRIPT), "--out", str(tmp_path), CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr
    assert not any(tmp_path.iterdir())
