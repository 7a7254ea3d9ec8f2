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


def _tables():
    """The committed ncu runs, per (run, shape): engine -> the table's columns."""
    from pathlib import Path

    mod = load_script("gemm_counters")
    root = Path(__file__).resolve().parents[1] / "results" / "2026-12-03-h200"
    out = {}
    for run, name in (("counters-run42", "s6144.csv"), ("counters-run42", "s8192.csv"),
                      ("gm-counters-run45", "c8192x8192x8192.csv"),
                      ("gm-counters-run45", "c6144x5120x4096.csv"),
                      ("hint-run43", "c8192.csv"), ("lean-run46", "c8192.csv")):
        engines, kernels = mod.parse((root / run / name).read_text())
        assert len(kernels) == 2 * len(engines), (run, name)
        rows = {}
        for i, e in enumerate(engines):
            ks = kernels[2 * i:2 * i + 2]
            rows[e] = {m: sum(k[m] for k in ks) / 2 for m in ks[0] if not m.startswith("_")}
        out[run, name] = rows
    return out


def test_readme_quotes_the_committed_counters():
    """The README's HBM / L2 bytes, instruction counts and per-clock comparison come from the
    committed ncu CSVs (GB = 1e9 bytes, rounded as quoted)."""
    from pathlib import Path

    t = _tables()
    gb = lambda rows, e, m: round(rows[e][m] / 1e9, 3)  # noqa: E731
    rd, l2, inst = "dram__bytes_read.sum", "lts__t_bytes.sum", "sm__inst_executed.sum"
    r42, r45 = t["counters-run42", "s8192.csv"], t["gm-counters-run45", "c8192x8192x8192.csv"]
    s42, s45 = t["counters-run42", "s6144.csv"], t["gm-counters-run45", "c6144x5120x4096.csv"]
    assert gb(r42, "cublaslt P=116", rd) == gb(r45, "cublaslt P=116", rd) == 1.317
    assert round(r42["cublaslt P=116"][l2] / 1e9, 1) == 6.7
    assert round(r45["cublaslt P=116"][l2] / 1e9, 1) == 6.9
    assert gb(r42, "signal P=116", rd) == gb(r45, "signal P=116", rd) == 1.523
    assert [round(r["signal P=116"][l2] / 1e9, 1) for r in (r45, r42)] == [7.9, 8.0]
    assert (gb(s42, "cublaslt P=116", rd), round(s42["cublaslt P=116"][l2] / 1e9, 2)) == (0.301, 1.26)
    assert (gb(s42, "signal P=116", rd), round(s42["signal P=116"][l2] / 1e9, 2)) == (0.367, 1.97)
    assert [gb(r45, f"signal gm{g} P=116", rd) for g in (16, 4, 32)] == [1.296, 2.425, 1.581]
    assert [gb(s45, f"signal gm{g} P=116", rd) for g in (16, 4, 32)] == [0.299, 0.425, 0.353]
    assert round(r45["signal gm16 P=116"][l2] / 1e9, 1) == 8.4
    assert round(s45["signal gm16 P=116"][l2] / 1e9, 1) == 2.1
    ms = lambda rows, e: round(rows[e]["gpu__time_duration.sum"] / 1e6, 3)  # noqa: E731
    assert (ms(r45, "signal gm16 P=116"), ms(r45, "signal P=116")) == (1.464, 1.467)
    assert (ms(s45, "signal gm16 P=116"), ms(s45, "signal P=116")) == (0.368, 0.369)
    # cycles per call, cuBLAS against the signal GEMM at P = 116 on 8192^3: 1.4-1.8 % fewer
    clk = "gpc__cycles_elapsed.avg.per_second"
    fewer = [1 - rows["cublaslt P=116"]["gpu__time_duration.sum"] * rows["cublaslt P=116"][clk]
             / (rows["signal P=116"]["gpu__time_duration.sum"] * rows["signal P=116"][clk])
             for rows in (r42, r45)]
    assert [round(100 * f, 1) for f in sorted(fewer)] == [1.4, 1.8]
    # L2 bytes: cuBLAS's 13-36 % fewer than the signal GEMM at P = 116 (both shapes, both runs)
    less = [1 - rows["cublaslt P=116"][l2] / rows["signal P=116"][l2] for rows in (r42, r45, s42, s45)]
    assert (round(100 * min(less)), round(100 * max(less))) == (13, 36)
    # the cluster kernel at P = 132: 1.67x the Gluon kernel's instructions, 24 % more L2 bytes
    assert round(r42["single-stsm P=132"][inst] / r42["signal P=132"][inst], 2) == 1.66
    assert round(r42["single P=132"][inst] / r42["signal P=132"][inst], 2) == 1.67
    assert round(r42["single P=132"][l2] / r42["signal P=132"][l2] - 1, 2) == 0.25
    h = t["hint-run43", "c8192.csv"]
    assert round(1 - h["single-stsm-hint P=132"][inst] / h["single-stsm P=132"][inst], 2) == 0.03
    assert round(1 - h["single-stsm-hint P=132"][l2] / h["single-stsm P=132"][l2], 2) == 0.06
    assert round(h["single-stsm-hint P=132"][l2] / 1e9, 1) == 8.8
    # lean-run46 (8192^3 w.t(), P = 116): the lean loop's instructions and time, and the L2
    # bytes without the 256-B promotion
    n = t["lean-run46", "c8192.csv"]
    assert [round(n[e][inst] / 1e6, 1) for e in ("single-stsm-lean P=116", "single-stsm P=116",
                                                 "signal P=116")] == [128.5, 209.1, 126.0]
    assert [round(n[e][l2] / 1e9, 1) for e in ("single-l2none P=116", "single-stsm P=116",
                                               "signal P=116")] == [8.2, 9.6, 7.9]
    assert [ms(n, e) for e in ("single-stsm-lean P=116", "single-stsm P=116",
                               "signal P=116")] == [1.499, 1.532, 1.497]
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    for quoted in ("128.5 M instructions on 8192³ against 209 M (Gluon 126 M)",
                   "(off: 8.2 GB instead of 9.6, the Gluon kernel 7.9)",
                   "**1.317 GB**", "**6.7–6.9 GB**", "**1.523 GB** and\n**7.9–8.0 GB**", "0.301 / 1.26 GB against "
                   "0.367 / 1.97 GB", "1.296 GB and 0.299 GB", "2.425 and 0.425 GB",
                   "1.581 and 0.353 GB", "(1.464 vs 1.467 ms, 0.368 vs 0.369 ms)",
                   "13–36 % fewer L2 bytes", "1.4–1.8 % fewer cycles", "**1.67×**", "**25 % more L2 bytes** (9.4 against 7.5 GB)",
                   "(209 against 126 million", "3 % off the instructions and 6 % off the L2 bytes (8.8 GB)"):
        assert " ".join(quoted.split()) in readme, quoted
