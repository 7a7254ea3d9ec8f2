"""scripts/gemm_counters.py's reading of an ncu CSV (raw page, base units) on a CPU: the GEMM
kernels are picked out of the profiled launches by name, assigned to the engines in the order
the script announced them, and averaged per engine; a count that does not match is reported,
not guessed."""

from __future__ import annotations

from launch_utils import load_script

CSV = '''gemm_counters engine: torch
==PROF== Connected to process 1
gemm_counters engine: signal P=116
"ID","Process ID","Kernel Name","Grid Size","gpu__time_duration.sum","dram__bytes_read.sum","sm__inst_executed.sum"
"","","","","nsecond","byte","inst"
"0","1","nvjet_hsh_256x128_2x1_v_bz_coopA_NNT","(132, 1, 1)","1,000,000","2,000,000,000","5,000,000"
"1","1","nvjet_hsh_256x128_2x1_v_bz_coopA_NNT","(132, 1, 1)","3,000,000","4,000,000,000","7,000,000"
"2","1","void at::native::vectorized_elementwise_kernel<4, FillFunctor>","(64, 1, 1)","1,000","8","10"
"3","1","_ws_signal_gemm_kernel","(116, 1, 1)","2,500,000","1,000,000,000","9,000,000"
"4","1","_ws_signal_gemm_kernel","(116, 1, 1)","2,500,000","3,000,000,000","11,000,000"
'''


def test_parse_assigns_gemm_kernels_to_engines_in_order(tmp_path):
    mod = load_script("gemm_counters")
    engines, kernels = mod.parse(CSV)
    assert engines == ["torch", "signal P=116"]
    assert [k["_name"][:6] for k in kernels] == ["nvjet_", "nvjet_", "_ws_si", "_ws_si"]
    assert kernels[2]["dram__bytes_read.sum"] == 1e9
    lines = mod.table(engines, kernels, reps=2)
    assert lines[1].split()[:4] == ["torch", "2.000", "-", "3.000"]  # ms, MHz (absent), HBM GB
    assert lines[2].split()[:5] == ["signal", "P=116", "2.500", "-", "2.000"]
    assert lines[1].split()[-1] == "6.000" and lines[2].split()[-1] == "10.000"  # Minst


def test_a_count_that_does_not_match_is_reported():
    mod = load_script("gemm_counters")
    engines, kernels = mod.parse(CSV)
    (line,) = mod.table(engines + ["extra"], kernels, reps=2)
    assert line.startswith("expected 2 GEMM kernels for each of 3 engines, ncu profiled 4")
