"""Kernel configuration selection (``gemm_config_for``), the ``warp_specialize`` option and
``scripts/gemm_sweep.py`` on CPU.

Kernel runs need the Triton interpreter, which is read at import time: as in
``test_signal_gemm_interpret.py``, a normal session runs the interpreter tests in a child
pytest process with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from flashoverlap import kernels
from flashoverlap.kernels import (DEFAULT_GROUP_M, GemmChoice, GemmConfig, GemmRule,
                                  config_for_capability, default_block_shape, default_config,
                                  gemm_config_for)
from flashoverlap.plan import PlanConfig, Problem, make_plan

_REPO = Path(__file__).resolve().parents[1]
_SCRIPT = _REPO / "scripts" / "gemm_sweep.py"
_INTERPRET_SESSION = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

SHAPES = [(4096, 8192, 2048), (16384, 8192, 8192), (5000, 5120, 5120), (12000, 3584, 18944),
          (7, 24, 40), (1, 8, 8)]
CAPS = [None, (9, 0), (10, 0), (8, 0), (8, 9)]


def _load_sweep():
    spec = importlib.util.spec_from_file_location("gemm_sweep", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------
# gemm_config_for: pure Python
# --------------------------------------------------------------------------------------

if not _INTERPRET_SESSION:

    @pytest.mark.parametrize("cap", CAPS)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bfloat16", "float16"])
    @pytest.mark.parametrize("shape", SHAPES)
    def test_default_table_reproduces_default_config(cap, dtype, shape):
        M, N, K = shape
        tdtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        # The table's rules on sm_90: bands of 16 below K = 4096; clusters of 4 (the CUDA C
        # cluster kernel where it can run) for P in [112, 121).
        sm90 = cap is None or cap[0] == 9
        band_rule = sm90 and K < 4096
        for P in (132, 120, 116, 112, 111, 1):
            choice = gemm_config_for(M, N, K, dtype, P, cap, wave_tiles=False)
            assert isinstance(choice, GemmChoice)
            want = config_for_capability(cap, tdtype)
            if sm90 and 112 <= P <= 120:
                want = dataclasses.replace(want, cluster_ctas=4)
            assert choice.config == want
            assert choice.group_m == (16 if band_rule else DEFAULT_GROUP_M)
            assert DEFAULT_GROUP_M == PlanConfig().group_m

    def test_sm90_default_is_todays_config():
        choice = gemm_config_for(4096, 8192, 2048, torch.bfloat16, 132, (9, 0))
        assert choice == (GemmConfig(block_m=128, block_n=256, block_k=64, num_warps=8,
                                     num_stages=3, use_tma=True, flatten=True,
                                     epilogue_subtile=False, acc_multibuffer=True), 16)
        assert choice.config.warp_specialize is False
        assert gemm_config_for(4096, 8192, 2048) == choice  # no GPU: the sm_90 shape
        # Bands of 16 tile rows below K = 4096 only (GEMM_RULES), on sm_90 only.
        assert gemm_config_for(4096, 8192, 4096, torch.bfloat16, 132, (9, 0)) \
            == (choice.config, 8)
        assert gemm_config_for(4096, 8192, 2048, torch.bfloat16, 108, (8, 0)).group_m == 8
        # Existing callers keep working.
        assert default_config("cpu") == choice.config
        assert default_block_shape("cpu") == (128, 256)

    def test_fp32_never_takes_a_rule():
        rule = GemmRule(overrides=(("block_m", 256), ("block_n", 128)), group_m=4)
        choice = gemm_config_for(64, 64, 64, torch.float32, 4, None, rules=(rule,))
        assert choice == (config_for_capability(None, torch.float32), DEFAULT_GROUP_M)

    def test_rules_first_match_wins_and_ranges_are_half_open():
        small = GemmRule(overrides={"block_m": 256, "block_n": 128}, group_m=4, m=(1, 4097),
                         num_ctas=(100, 133))
        short_k = GemmRule(overrides={"num_stages": 4}, group_m=16, k=(1, 4096))
        rules = (small, short_k)
        c = gemm_config_for(4096, 8192, 2048, torch.bfloat16, 132, (9, 0), rules=rules)
        assert (c.config.block_m, c.config.block_n, c.group_m) == (256, 128, 4)
        assert c.config.num_stages == 3  # only the first rule applies
        c = gemm_config_for(4097, 8192, 2048, torch.bfloat16, 132, (9, 0), rules=rules)
        assert (c.config.block_m, c.config.num_stages, c.group_m) == (128, 4, 16)
        c = gemm_config_for(4096, 8192, 2048, torch.bfloat16, 133, (9, 0), rules=rules)
        assert c.config.block_m == 128 and c.group_m == 16  # P outside the first rule
        c = gemm_config_for(8192, 8192, 4096, torch.bfloat16, 132, (9, 0), rules=rules)
        assert c == (config_for_capability((9, 0)), DEFAULT_GROUP_M)
        # sm_80 is not in the rules' arch (9,): the Ampere default.
        c = gemm_config_for(4096, 8192, 2048, torch.bfloat16, 108, (8, 0), rules=rules)
        assert c == (config_for_capability((8, 0)), DEFAULT_GROUP_M)
        # fp16-only rule
        fp16 = GemmRule(overrides={"epilogue_subtile": True}, dtypes=("float16",))
        assert gemm_config_for(64, 64, 64, "float16", 4, None, rules=(fp16,)).config \
            .epilogue_subtile
        assert not gemm_config_for(64, 64, 64, "bfloat16", 4, None, rules=(fp16,)).config \
            .epilogue_subtile

    @pytest.mark.parametrize("kwargs", [
        dict(overrides={"block_mm": 64}),
        dict(overrides={"block_m": 96}),
        dict(overrides={"num_warps": 0}),
        dict(group_m=0),
    ])
    def test_bad_rules_are_rejected(kwargs):
        with pytest.raises(ValueError):
            GemmRule(**kwargs)

    @pytest.mark.parametrize("bad", [dict(M=0), dict(N=-1), dict(K=2.0), dict(num_ctas=True)])
    def test_bad_arguments(bad):
        args = dict(M=64, N=64, K=64, num_ctas=4) | bad
        with pytest.raises(ValueError):
            gemm_config_for(args["M"], args["N"], args["K"], torch.bfloat16, args["num_ctas"])
        with pytest.raises(TypeError):
            gemm_config_for(64, 64, 64, torch.int8, 4)

    def test_table_rules_are_valid():
        for rule in kernels.GEMM_RULES:
            assert isinstance(rule, GemmRule)
            cfg = dataclasses.replace(config_for_capability((9, 0)), **dict(rule.overrides))
            assert cfg.block_m * cfg.block_n <= 256 * 256

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("op,W", [("all_reduce", 1), ("reduce_scatter", 2)])
    def test_choice_builds_matching_plans(shape, op, W):
        """Plans built from the choice use the kernel's tile; every tile fits the blocks."""
        M, N, K = shape
        M *= W
        sweep = _load_sweep()
        rules = tuple(GemmRule(overrides=ov, group_m=gm) for _, ov, gm in sweep.CANDIDATES)
        for rule in (None, *[(r,) for r in rules]):
            choice = gemm_config_for(M, N, K, "bfloat16", 132, (9, 0), rules=rule)
            cfg = choice.config
            for value in (cfg.block_m, cfg.block_n, cfg.block_k):
                assert value >= 16 and value & (value - 1) == 0
            plan = make_plan(Problem(M, N, K, "bfloat16", W, op),
                             PlanConfig(block_m=cfg.block_m, block_n=cfg.block_n,
                                        num_ctas=132, group_m=choice.group_m))
            t = plan.step_table
            assert (t[:, 2] % cfg.block_n == 0).all()
            assert ((t[:, 1] - t[:, 0]) <= cfg.block_m).all()
            assert ((t[:, 3] - t[:, 2]) <= cfg.block_n).all()
            assert plan.num_tiles == W * -(-M // W // cfg.block_m) * -(-N // cfg.block_n)

    # ----------------------------------------------------------------------------------
    # The warp-specialization guard (needs Triton, not a GPU)
    # ----------------------------------------------------------------------------------

    def _fake(ptx, warps):
        return types.SimpleNamespace(asm={"ptx": ptx},
                                     metadata=types.SimpleNamespace(num_warps=warps))

    def test_warp_specialize_guard():
        pytest.importorskip("triton")
        from flashoverlap.kernels import signal_gemm as sg

        ok = "bar.sync 0;\n\tatom.global.gpu.release.add.u32 %r1, [%rd1], 1;"
        meta = {"HAS_COUNTERS": True, "num_warps": 4}
        sg._check_warp_specialized(_fake(ok, 4), meta)  # loop left whole: the normal kernel
        sg._check_warp_specialized(_fake("red.release.gpu.global.add.u32 [%rd1], 1;", 4), meta)
        with pytest.raises(NotImplementedError, match="release atomic"):
            sg._check_warp_specialized(_fake("st.global.b16 [%rd1], %rs1;", 4), meta)
        with pytest.raises(NotImplementedError, match="partitioned"):
            sg._check_warp_specialized(_fake(ok, 12), meta)
        # Without counters there is no protocol to break.
        sg._check_warp_specialized(_fake("", 12), {"HAS_COUNTERS": False, "num_warps": 4})

    # ----------------------------------------------------------------------------------
    # The sweep script on CPU
    # ----------------------------------------------------------------------------------

    def test_sweep_script_compiles_and_helps():
        subprocess.run([sys.executable, "-m", "py_compile", str(_SCRIPT)], check=True,
                       timeout=60)
        proc = subprocess.run([sys.executable, str(_SCRIPT), "--help"], capture_output=True,
                              text=True, timeout=60, check=False, cwd=_REPO)
        assert proc.returncode == 0, proc.stderr
        assert "--budget-s" in proc.stdout and "--quick" in proc.stdout

    def test_sweep_candidates_and_args():
        sweep = _load_sweep()
        names = [c[0] for c in sweep.CANDIDATES]
        assert names[0] == "default" and len(names) == len(set(names)) <= 20  # --max-candidates
        base = config_for_capability((9, 0), torch.bfloat16)
        assert dataclasses.replace(base, **sweep.CANDIDATES[0][1]) == base
        assert sweep.CANDIDATES[0][2] == DEFAULT_GROUP_M
        for _, overrides, group_m in sweep.CANDIDATES:
            cfg = dataclasses.replace(base, **overrides)  # valid GemmConfig
            stages = cfg.num_stages
            smem = stages * (cfg.block_m + cfg.block_n) * cfg.block_k * 2
            assert smem <= 200 * 1024  # operand buffers; 227 KB minus epilogue scratch
            assert group_m in (4, 8, 16)
        for M, N, K in sweep.SHAPES:
            assert K % 8 == 0 and N % 8 == 0
        extra = [s for s in sweep.SHAPES if s[1] != 8192]
        assert len(sweep.SHAPES) == 13 and len(extra) == 4
        assert all(M & (M - 1) for M, _, _ in extra)
        args = sweep._parse_args(["--quick"])
        assert args.candidate_list[0][0] == "default" and len(args.candidate_list) == 4
        assert args.shapes == sweep.QUICK_SHAPES
        args = sweep._parse_args(["--candidates", "s4,gm4", "--shapes", "100x64x32",
                                  "--fp16-shapes", ""])
        assert [c[0] for c in args.candidate_list] == ["default", "s4", "gm4"]
        assert args.shapes == ((100, 64, 32),) and args.fp16_shapes == ()
        with pytest.raises(SystemExit):
            sweep._parse_args(["--candidates", "nope"])

    def test_sweep_adds_the_tables_choice_per_p():
        """The sweep times the product's choice for every P it runs: one ``rule`` candidate
        where the choice is the same for all P and not a listed candidate, one per P where
        the wave-tile rule makes it depend on P."""
        sweep = _load_sweep()
        args = types.SimpleNamespace(candidate_list=[c for c in sweep.CANDIDATES
                                                     if c[0] in ("default", "s4")])
        fake = types.SimpleNamespace(args=args, kernels=kernels, capability=(9, 0))
        fake.base_config = lambda dtype: config_for_capability((9, 0), dtype)
        fake.candidate = lambda cand, dtype: sweep.Sweep.candidate(fake, cand, dtype)
        names = lambda M, N, K: [c[0] for c in sweep.Sweep.candidates_for(  # noqa: E731
            fake, M, N, K, torch.bfloat16, [132, 116])]
        # K = 8192: default at 132 (a listed candidate), clusters of 4 at 116
        cands = sweep.Sweep.candidates_for(fake, 8192, 8192, 8192, torch.bfloat16, [132, 116])
        assert [c[0] for c in cands] == ["default", "rule@116", "s4"]
        assert cands[1][1] == {"cluster_ctas": 4} and cands[1][2] == 8
        assert names(8192, 8192, 8192)[:1] == ["default"]
        c132 = sweep.Sweep.candidates_for(fake, 8192, 8192, 8192, torch.bfloat16, [132])
        assert [c[0] for c in c132] == ["default", "s4"]
        # K = 2048: group_m 16 at both P (the band rule) -> one "rule" where only it applies
        c132 = sweep.Sweep.candidates_for(fake, 8192, 8192, 2048, torch.bfloat16, [132])
        assert [c[0] for c in c132] == ["default", "rule", "s4"]
        assert names(8192, 8192, 2048) == ["default", "rule@132", "rule@116", "s4"]
        # 2048 x 4096 x 1024: 128 x 256 (gm 16) at 132, 128 x 128 at 116
        cands = sweep.Sweep.candidates_for(fake, 2048, 4096, 1024, torch.bfloat16, [132, 116])
        assert [c[0] for c in cands] == ["default", "rule@132", "rule@116", "s4"]
        assert cands[2][1] == {"block_n": 128, "num_stages": 5} and cands[2][2] == 16

    def test_sweep_summary_runs():
        sweep = _load_sweep()
        base = dict(M=64, N=64, K=64, dtype="bfloat16", b_layout="kn", torch_ms=1.0,
                    block_k=64, num_warps=8, num_stages=3, use_tma=True, flatten=True,
                    epilogue_subtile=False, acc_multibuffer=True, warp_specialize=False)
        rows = []
        for P in (132, 116):
            rows.append(base | dict(num_ctas=P, candidate="default", median_ms=1.0,
                                    efficiency_vs_torch=1.0, block_m=128, block_n=256,
                                    group_m=8))
            rows.append(base | dict(num_ctas=P, candidate="256x128", median_ms=0.9,
                                    efficiency_vs_torch=1 / 0.9, block_m=256, block_n=128,
                                    group_m=8))
        sweep.summarize(rows, [{"candidate": "ws", "reason": "refused", "b_layout": "kn",
                                "dtype": "bfloat16"}])

    def test_kernels_under_interpreter():
        """Runs this module's kernel tests in a child process under the interpreter."""
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__],
            env=env, cwd=_REPO, capture_output=True, text=True, timeout=900, check=False,
        )
        lines = proc.stdout.strip().splitlines()
        summary = lines[-1] if lines else "(no output)"
        print("interpreter child:", summary)
        if re.fullmatch(r"\d+ skipped in .*", summary):
            reasons = [line for line in lines if line.startswith("SKIPPED")]
            pytest.skip(reasons[0] if reasons else summary)
        assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
        assert re.search(r"\d+ passed", summary) and "failed" not in summary

else:
    # ----------------------------------------------------------------------------------
    # Interpreter session: every kernel option a sweep candidate uses, incl. the new
    # warp_specialize, against signal_gemm_ref (NaN-poisoned outputs, counters equal).
    # ----------------------------------------------------------------------------------
    triton = pytest.importorskip("triton")
    from flashoverlap.kernels import signal_gemm as sg

    _OPTIONS = [
        dict(),
        dict(warp_specialize=True),
        dict(warp_specialize=True, flatten=False),
        dict(warp_specialize=True, flatten=False, num_warps=4, num_stages=3),
        dict(epilogue_subtile=True),
        dict(acc_multibuffer=False),
        dict(num_stages=4),
        dict(flatten=False),
    ]
    _TILES = [(16, 32), (32, 16)]  # 128x256 and 256x128, scaled down

    def _operands(M, N, K, b_trans, seed=0):
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(M, K, generator=g).to(torch.bfloat16)
        if b_trans:
            b = torch.randn(N, K, generator=g).to(torch.bfloat16).T
        else:
            b = torch.randn(K, N, generator=g).to(torch.bfloat16)
        return a, b

    @pytest.mark.parametrize("tile", _TILES)
    @pytest.mark.parametrize("options", _OPTIONS, ids=lambda o: ",".join(
        f"{k}={v}" for k, v in o.items()) or "default")
    @pytest.mark.parametrize("b_trans", [False, True])
    @pytest.mark.parametrize("use_tma", [False, True])
    def test_option_matches_reference(tile, options, b_trans, use_tma):
        BM, BN = tile
        M, N, K, P = 70, 88, 48, 3  # edge tiles in both directions
        cfg = GemmConfig(block_m=BM, block_n=BN, block_k=16, use_tma=use_tma,
                         **({"num_warps": 4, "num_stages": 2} | options))
        plan = make_plan(Problem(M, N, K, "bfloat16", 1, "all_reduce"),
                         PlanConfig(block_m=BM, block_n=BN, num_ctas=P, group_m=2))
        table = torch.from_numpy(plan.step_table.copy())
        a, b = _operands(M, N, K, b_trans)
        out = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
        ref = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
        counters = torch.zeros(plan.num_groups, dtype=torch.int32)
        ref_counters = torch.zeros(plan.num_groups, dtype=torch.int32)
        sg.signal_gemm(a, b, out, step_table=table, block_m=BM, block_n=BN, num_ctas=P,
                       counters=counters, config=cfg)
        sg.signal_gemm_ref(a, b, ref, table, ref_counters)
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
        assert torch.equal(counters, ref_counters)
        assert torch.equal(counters, torch.from_numpy(plan.group_tile_counts).to(torch.int32))

    @pytest.mark.parametrize("options", [dict(warp_specialize=True), dict(num_stages=4)])
    def test_option_reduce_scatter_with_residual(options):
        BM, BN, W = 16, 32, 2
        M, N, K, P = 2 * 40, 72, 32, 4
        cfg = GemmConfig(block_m=BM, block_n=BN, block_k=16, use_tma=False,
                         **({"num_warps": 4, "num_stages": 2} | options))
        plan = make_plan(Problem(M, N, K, "bfloat16", W, "reduce_scatter"),
                         PlanConfig(block_m=BM, block_n=BN, num_ctas=P, group_m=1))
        table = torch.from_numpy(plan.step_table.copy())
        a, b = _operands(M, N, K, True, seed=3)
        residual = torch.randn(M // W, N).to(torch.bfloat16)
        out = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
        ref = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
        counters = torch.zeros(plan.num_groups, dtype=torch.int32)
        ref_counters = torch.zeros(plan.num_groups, dtype=torch.int32)
        sg.signal_gemm(a, b, out, step_table=table, block_m=BM, block_n=BN, num_ctas=P,
                       counters=counters, residual=residual, residual_block=1,
                       rows_per_block=M // W, config=cfg)
        sg.signal_gemm_ref(a, b, ref, table, ref_counters, residual=residual,
                           residual_block=1, rows_per_block=M // W)
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
        assert torch.equal(counters, ref_counters)


# --------------------------------------------------------------------------------------
# grouped_gemm_config_for: the grouped (MoE) GEMM's own table, matched on rows per expert
# --------------------------------------------------------------------------------------
class TestGroupedConfig:
    def test_measured_rule_applies_on_sm90_half_precision(self):
        for dtype in (torch.bfloat16, torch.float16):
            c = kernels.grouped_gemm_config_for(16384, 2048, 2048, 64, dtype, 132, (9, 0))
            assert (c.block_m, c.block_n, c.num_warps, c.num_stages) == (128, 128, 8, 5)
            assert c == kernels.grouped_gemm_config_for(16384, 2048, 2048, 64, dtype)

    def test_no_rule_off_hopper_or_for_fp32(self):
        assert kernels.grouped_gemm_config_for(16384, 2048, 2048, 8, torch.bfloat16, 108,
                                               (8, 0)) == config_for_capability((8, 0))
        assert kernels.grouped_gemm_config_for(64, 64, 64, 2, torch.float32) == \
            config_for_capability(None, torch.float32)

    def test_rows_per_expert_decide_the_match(self):
        rule = GemmRule(overrides=(("block_m", 64),), m=(1, 512))
        few = kernels.grouped_gemm_config_for(4096, 1024, 1024, 16, "bfloat16", 132, (9, 0),
                                              rules=(rule,))  # 256 rows per expert
        many = kernels.grouped_gemm_config_for(4096, 1024, 1024, 2, "bfloat16", 132, (9, 0),
                                               rules=(rule,))  # 2048 rows per expert
        assert few.block_m == 64 and many.block_m == config_for_capability((9, 0)).block_m

    @pytest.mark.parametrize("E", [0, -1, 1.5, True])
    def test_bad_expert_count(self, E):
        with pytest.raises(ValueError, match="E must be a positive int"):
            kernels.grouped_gemm_config_for(64, 64, 64, E)


def test_config_for_tile_takes_the_tiles_measured_stages():
    """A plan's tile without a configuration: the device default with that tile; 128 x 128 on
    the warp-specialized path (TMA, block_k 64) takes 5 stages (kernels.TILE_STAGES)."""
    from flashoverlap.kernels import TILE_STAGES, config_for_tile

    base = config_for_capability((9, 0), torch.bfloat16)
    assert config_for_tile(base, 128, 256) is base
    small = config_for_tile(base, 128, 128)
    assert (small.block_m, small.block_n, small.num_stages) == (128, 128, 5) == (
        128, 128, TILE_STAGES[(128, 128)])
    assert dataclasses.replace(small, block_n=256, num_stages=3) == base
    # Tiles without a measured depth keep the default's; so does the pointer path.
    assert config_for_tile(base, 64, 64).num_stages == base.num_stages
    no_tma = dataclasses.replace(base, use_tma=False)
    assert config_for_tile(no_tma, 128, 128).num_stages == base.num_stages
    sm80 = config_for_capability((8, 0), torch.bfloat16)
    assert config_for_tile(sm80, 128, 256).num_stages == sm80.num_stages


# The issue-14 acceptance shapes (nine + four) and the tiles-run17 sweep's rows, with the
# tile the measurements say: P = 116 took 128 x 128 4.5-12 % faster on 2048 x 4096 x K <= 2048
# only among the rows the model leaves alone by 3 % or more.
_ACCEPTANCE = [(m, 8192, k) for m in (4096, 8192, 16384) for k in (2048, 7168, 8192)] + [
    (m, n, k) for m in (6144, 11008) for k, n in ((4096, 5120), (8192, 3072))]
_SWEEP_SMALL = [(2048, 4096, 512), (2048, 4096, 1024), (2048, 4096, 2048)]
_SWEEP_KEEP = [(2048, 4096, 3584), (2048, 8192, 1024), (2048, 8192, 2048), (2048, 8192, 4096),
               (4096, 4096, 512), (4096, 4096, 1024), (4096, 4096, 2048), (4096, 8192, 2048),
               (6144, 3072, 8192)]


def test_wave_lengths_is_the_shared_wave_model():
    """kernels.wave_lengths: whole waves of one tile time, a split last wave its longest
    part; what wave_times (and so wave_tile and the tuner's AnalyticModel) builds on."""
    from flashoverlap.kernels import wave_lengths

    assert wave_lengths(256, 116, 16) == ([1.0, 1.0, 1.0], 1)  # 24 left, 12 K steps saved
    assert wave_lengths(256, 116, 56) == ([1.0, 1.0, 14 / 56], 4)  # 42 saved
    assert wave_lengths(4096, 132, 128) == ([1.0] * 31 + [0.25], 4)
    assert wave_lengths(4096, 132, 128, split_tail=False) == ([1.0] * 32, 1)
    assert wave_lengths(30, 132, 64, True, 0) == ([0.25], 4)  # one partial wave, all split
    assert wave_lengths(264, 132, 64) == ([1.0, 1.0], 1)  # whole waves


def test_wave_times_is_the_one_gemm_model():
    """kernels.wave_times: whole waves of one tile time at the per-SM rate (power-capped
    clocks, the tile's rate), a split last wave its longest part slowed by SPLIT_SLOWDOWN plus
    the fix-up (its per-part term scaled by the tile's area), the launch on the first wave;
    signal_gemm_time
    sums it, the tuner's AnalyticModel calls it with its own fields."""
    from flashoverlap.kernels import (GEMM_FLOPS, GEMM_LAUNCH_S, SPLIT_FIXUP_S,
                                      SPLIT_PER_PART_S, SPLIT_SLOWDOWN, signal_gemm_time,
                                      wave_times)
    from flashoverlap.plan import PlanConfig, Problem
    from flashoverlap.tuning.search import AnalyticModel

    def tile_s(bm, bn, K, P, rate=1.0, flops=GEMM_FLOPS["bfloat16"]):
        return 2 * bm * bn * K / (flops / 132 * (132 / P) ** 0.345 * rate)

    # 2048 x 4096 x 1024 on 116 CTAs: 256 tiles -> 3 waves (24 left, 16 K steps: no split);
    # 512 half-size tiles -> 5 waves at 0.92 of the rate
    t = tile_s(128, 256, 1024, 116)
    assert wave_times(256, 116, 1024, 128, 256) == pytest.approx([t + GEMM_LAUNCH_S, t, t])
    small = wave_times(512, 116, 1024, 128, 128)
    assert sum(small) == pytest.approx(5 * tile_s(128, 128, 1024, 116, 0.92) + GEMM_LAUNCH_S)
    # ... x 3584: 128 x 256 splits its 24-tile last wave in 4 parts of 14 of 56 K steps
    t = tile_s(128, 256, 3584, 116)
    assert wave_times(256, 116, 3584, 128, 256)[-1] == pytest.approx(
        t * 14 / 56 * (1 + SPLIT_SLOWDOWN) + SPLIT_FIXUP_S + 4 * SPLIT_PER_PART_S)
    # 128 x 128 tiles: half the fp32 bytes per part -> half the per-part term
    t = tile_s(128, 128, 4096, 116, 0.92)
    assert wave_times(128, 116, 4096, 128, 128) == pytest.approx(
        [t + GEMM_LAUNCH_S,
         t / 4 * (1 + SPLIT_SLOWDOWN) + SPLIT_FIXUP_S + 4 * SPLIT_PER_PART_S / 2])
    base = config_for_capability((9, 0), torch.bfloat16)
    assert signal_gemm_time(2048, 4096, 3584, 116, base) == pytest.approx(
        sum(wave_times(256, 116, 3584, 128, 256)))
    assert signal_gemm_time(2048, 4096, 3584, 116, base, torch.float16) == pytest.approx(
        sum(wave_times(256, 116, 3584, 128, 256, flops=GEMM_FLOPS["float16"])))
    model = AnalyticModel()
    for bn in (256, 128):
        problem = Problem(512, 4096, 4096, "bfloat16", 1, "all_reduce")
        cfg = PlanConfig(block_m=128, block_n=bn, num_ctas=116)
        assert model.wave_times(problem, cfg) == pytest.approx(
            wave_times(4096 * 512 // (128 * bn), 116, 4096, 128, bn))


def test_wave_tile_switches_only_where_the_last_wave_is_poor():
    from flashoverlap.kernels import wave_tile

    base = config_for_capability((9, 0), torch.bfloat16)
    small = kernels.config_for_tile(base, 128, 128)
    for P in (132, 116):
        for M, N, K in _ACCEPTANCE + _SWEEP_KEEP:
            assert wave_tile(M, N, K, P, base) is base, (M, N, K, P)
            assert gemm_config_for(M, N, K, "bfloat16", P, (9, 0)).config.block_n == 256
        for M, N, K in _SWEEP_SMALL:
            want = small if P == 116 else base
            assert wave_tile(M, N, K, P, base) == want, (M, N, K, P)
            choice = gemm_config_for(M, N, K, "bfloat16", P, (9, 0))
            assert choice.config == want and choice.group_m == 16  # the band rule still
    # Only from the 128 x 256 TMA configuration, only on sm_90, only where asked
    assert wave_tile(2048, 4096, 1024, 116, small) is small
    no_tma = dataclasses.replace(base, use_tma=False)
    assert wave_tile(2048, 4096, 1024, 116, no_tma) is no_tma
    assert gemm_config_for(2048, 4096, 1024, "bfloat16", 116, (8, 0)).config \
        == config_for_capability((8, 0), torch.bfloat16)
    # without the wave-tile rule: the table's choice at P = 116 (clusters of 4)
    assert gemm_config_for(2048, 4096, 1024, "bfloat16", 116, (9, 0),
                           wave_tiles=False).config == dataclasses.replace(base, cluster_ctas=4)
    assert gemm_config_for(2048, 4096, 1024, torch.float32, 116, (9, 0)).config \
        == config_for_capability((9, 0), torch.float32)
    # The grouped GEMM keeps its own table (rows per expert are not the wave's rows)
    assert kernels.grouped_gemm_config_for(2048 * 8, 4096, 1024, 8, "bfloat16", 116, (9, 0)) \
        == kernels.grouped_gemm_config_for(2048 * 8, 4096, 1024, 8, "bfloat16", 132, (9, 0))


def test_analytic_model_charges_the_tiles_rate():
    """The tuner's model runs 128 x 128 tiles at TILE_RATES' 0.92 of 128 x 256's rate, so
    where both fill whole waves the smaller tile is predicted slower, not equal."""
    from flashoverlap.tuning.search import AnalyticModel

    model = AnalyticModel()
    problem = Problem(4096, 8192, 2048, "bfloat16", 1, "all_reduce")
    big = model.wave_times(problem, PlanConfig(block_m=128, block_n=256, num_ctas=128))
    small = model.wave_times(problem, PlanConfig(block_m=128, block_n=128, num_ctas=128))
    assert len(big) == 8 and len(small) == 16
    assert sum(small) - model.launch_s == pytest.approx((sum(big) - model.launch_s) / 0.92)
    flat = AnalyticModel(tile_rates={})
    assert sum(flat.wave_times(problem, PlanConfig(block_m=128, block_n=128, num_ctas=128))) \
        == pytest.approx(sum(big))


def test_engine_default_plan_takes_the_wave_tile(monkeypatch):
    """policy.choose_config without a tuned entry: the tile is the kernel table's for the
    problem on the CTAs the default leaves the GEMM (132 - 16 on an H200)."""
    from flashoverlap import policy

    monkeypatch.setattr(policy, "_num_sms", lambda device: 132)
    monkeypatch.setattr(policy, "_tuned_entry", lambda problem, device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    dev = torch.device("cuda", 0)
    for (M, N, K), tile in (((2048, 4096, 1024), (128, 128)), ((8192, 8192, 2048), (128, 256)),
                            ((2048, 4096, 3584), (128, 256))):
        for W, op in ((2, "all_reduce"), (4, "reduce_scatter")):
            cfg = policy.choose_config.__wrapped__(Problem(M, N, K, "bfloat16", W, op), dev)
            assert (cfg.block_m, cfg.block_n, cfg.num_ctas) == (*tile, 116), (M, N, K, op)
            make_plan(Problem(M, N, K, "bfloat16", W, op), cfg)  # a valid plan
    # The pure form the policy calls (and `flashoverlap tune --analytic` prints)
    from flashoverlap.tuning.search import engine_default

    problem = Problem(2048, 4096, 1024, "bfloat16", 2, "all_reduce")
    assert engine_default(problem, 132) == policy.choose_config.__wrapped__(problem, dev)
    assert (engine_default(problem, 132, (8, 0)).block_n,
            engine_default(problem, 132, reserved_sms=0).block_n) == (128, 256)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    cfg = policy.choose_config.__wrapped__(Problem(8192, 8192, 2048, "bfloat16", 2,
                                                   "all_reduce"), dev)
    sm80 = config_for_capability((8, 0), torch.bfloat16)
    assert (cfg.block_m, cfg.block_n) == (sm80.block_m, sm80.block_n) == (128, 128)


def test_tail_split_rule():
    """Which last waves are split, into how many K parts (kernels.tail_split)."""
    from flashoverlap.kernels import TAIL_MIN_SAVED_K_TILES, TAIL_SPLIT_MAX, tail_split

    assert TAIL_SPLIT_MAX == 4
    # N = 8192 with 128x256 tiles on 132 CTAs: 4096 tiles leave 4 -> 4 parts of 8 K steps,
    # which saves 24 K steps: below TAIL_MIN_SAVED_K_TILES (32), so not split by default
    assert TAIL_MIN_SAVED_K_TILES == 32
    assert tail_split(4096, 132, 32) == (4096, 1)
    assert tail_split(4096, 132, 32, 0) == (4092, 4)
    assert tail_split(4096, 132, 32, 24) == (4092, 4)
    assert tail_split(4096, 132, 32, 25) == (4096, 1)
    # ... with K = 4096 (64 steps) it saves 48
    assert tail_split(4096, 132, 64) == (4092, 4)
    # 2048 x 4096 x 3584 on 116: 256 tiles leave 24 -> 4 parts of 14 steps save 42
    assert tail_split(256, 116, 56) == (232, 4)
    # ... x 1792 (28 steps): 4 parts save 21, not split; K = 512 (8 steps) neither
    assert tail_split(256, 116, 28) == (256, 1) and tail_split(256, 116, 8) == (256, 1)
    # 2048 tiles leave 68 (more than half a wave): not split
    assert tail_split(2048, 132, 32) == (2048, 1)
    # 6144 x 3072: 576 tiles leave 48 -> 2 parts
    assert tail_split(576, 132, 128) == (528, 2)
    # a single partial wave: every tile split
    assert tail_split(30, 132, 64) == (0, 4)
    assert tail_split(50, 132, 64) == (0, 2)
    # short K: parts of at least 4 K steps (with the saving threshold off)
    assert tail_split(4096, 132, 7, 0) == (4096, 1)
    assert tail_split(4096, 132, 8, 0) == (4092, 2)
    # whole waves, or one CTA: nothing to split
    assert tail_split(264, 132, 64) == (264, 1)
    assert tail_split(5, 1, 64) == (5, 1)


def test_launch_schedule_follows_the_configs_saving_threshold():
    """The kernels' schedule (signal_gemm._tail_schedule, what both GEMM kernels launch with)
    takes GemmConfig.split_min_saved_k_tiles: 2048 x 4096 tiles of 128 x 256 on 116 CTAs leave
    24 tiles, split by default only where K is long enough for the split to pay."""
    from flashoverlap.kernels import signal_gemm as sg

    T, P = (2048 // 128) * (4096 // 256), 116
    default = GemmConfig()
    assert sg._tail_schedule(T, P, 512 // 64, default) == (T, 1)
    assert sg._tail_schedule(T, P, 1024 // 64, default) == (T, 1)
    assert sg._tail_schedule(T, P, 3584 // 64, default) == (T - 24, 4)
    every = dataclasses.replace(default, split_min_saved_k_tiles=0)
    assert sg._tail_schedule(T, P, 512 // 64, every) == (T - 24, 2)
    assert sg._tail_schedule(T, P, 1024 // 64, every) == (T - 24, 4)
    off = dataclasses.replace(every, split_tail=False)
    assert sg._tail_schedule(T, P, 3584 // 64, off) == (T, 1)


def test_tail_programs_cover_every_step_and_piece():
    """Programs of a launch: all CTAs when there are enough steps, one per piece of a
    single split wave, never more than the CTAs."""
    from flashoverlap.kernels import tail_programs, tail_split

    for T, P, k in ((4096, 132, 32), (576, 132, 128), (30, 132, 64), (50, 132, 64), (5, 1, 64),
                    (100, 132, 1)):
        main, parts = tail_split(T, P, k)
        n = tail_programs(T, P, main, parts)
        assert n <= P and n >= min(P, T) and n >= (T - main) * parts * (parts > 1)
    assert tail_programs(30, 132, 0, 4) == 120 and tail_programs(100, 132, 100, 1) == 100


@pytest.mark.parametrize("bad", [-1, True, 32.0, "32", None])
def test_split_min_saved_k_tiles_is_checked(bad):
    with pytest.raises(ValueError, match="split_min_saved_k_tiles"):
        GemmConfig(split_min_saved_k_tiles=bad)
    assert GemmConfig(split_min_saved_k_tiles=0).split_min_saved_k_tiles == 0


@pytest.mark.parametrize("bad", [23, 256, 0, True, 128.0, "128"])
def test_max_registers_is_checked(bad):
    with pytest.raises(ValueError, match="max_registers"):
        GemmConfig(max_registers=bad)


def test_max_registers_reaches_the_compiler(monkeypatch):
    """``GemmConfig.max_registers`` becomes Triton's ``maxnreg`` launch option (compiled
    kernels only: the interpreter has no registers); unset, no cap is passed."""
    from flashoverlap.kernels import signal_gemm as sg

    monkeypatch.setattr(sg, "_INTERPRET", False)
    plan = make_plan(Problem(64, 64, 64, "float32", 1, "all_reduce"),
                     PlanConfig(block_m=32, block_n=32, num_ctas=2, group_m=1))
    table = torch.from_numpy(plan.step_table.copy())
    a, b, out = torch.randn(64, 64), torch.randn(64, 64), torch.empty(64, 64)
    base = GemmConfig(block_m=32, block_n=32, block_k=16, num_warps=4, num_stages=2,
                      use_tma=False)
    for regs, expected in ((None, None), (168, 168), (255, 255)):
        config = dataclasses.replace(base, max_registers=regs)
        _, _, meta = sg._launch_args(a, b, out, table, 32, 32, 2, None, None, 0, None, config)
        assert meta.get("maxnreg") == expected
    monkeypatch.setattr(sg, "_INTERPRET", True)
    config = dataclasses.replace(base, max_registers=168)
    _, _, meta = sg._launch_args(a, b, out, table, 32, 32, 2, None, None, 0, None, config)
    assert "maxnreg" not in meta


def test_every_gemm_launch_names_fp_fusion():
    """Each GEMM's launch options carry ``kernels.LAUNCH_OPTIONS`` (FP contraction named, not
    left to a Triton default that 3.10 flips): the pipelined, warp-specialized, grouped,
    warp-specialized grouped and gather kernels."""
    from flashoverlap.kernels import gather_gemm as gg
    from flashoverlap.kernels import grouped_signal_gemm as gsg
    from flashoverlap.kernels import signal_gemm as sg
    from flashoverlap.kernels import ws_grouped_signal_gemm as wsg
    from flashoverlap.kernels import ws_signal_gemm as ws

    assert kernels.LAUNCH_OPTIONS == {"enable_fp_fusion": True}
    table = torch.zeros(4, 7, dtype=torch.int32)
    a, b, out = torch.randn(64, 64), torch.randn(64, 64), torch.empty(64, 64)
    w = torch.randn(2, 64, 64)
    config = GemmConfig(block_m=32, block_n=32, block_k=16, num_warps=4, num_stages=2,
                        use_tma=False)
    metas = {
        "pipelined": sg._launch_args(a, b, out, table, 32, 32, 2, None, None, 0, None,
                                     config)[2],
        "warp-specialized": ws.launch_args(a, b, out, table, 32, 32, 2, None, config,
                                           (4, 1, table, table))[2],
        "grouped": gsg._launch_args(a, w, out, out, table, 32, 32, 2, None, config)[2],
        "warp-specialized grouped": wsg.launch_args(a, w, (False, 64 * 64, 64), out, out, table,
                                                    32, 32, 2, None, config)[2],
        "gather": gg._launch_args(a, b, out, table, None, 32, 32, 2, False, config)[2],
    }
    for name, meta in metas.items():
        assert meta.get("enable_fp_fusion") is True, name


@pytest.mark.skipif(_INTERPRET_SESSION, reason="pure Python; runs in the normal session")
def test_wave_tile_properties():
    """For any shape and CTA count: the choice is 128 x 256 or its 128 x 128 form (5 stages,
    nothing else changed), it switches exactly when the model saves WAVE_TILE_MIN_GAIN, a
    plan built from it covers the output with tiles of its shape, and the model's time is
    never below the (padded) work spread evenly over the CTAs."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from flashoverlap.kernels import (GEMM_FLOPS, GEMM_POWER_EXPONENT, TILE_RATES,
                                      WAVE_TILE_MIN_GAIN, config_for_tile, signal_gemm_time)

    base = config_for_capability((9, 0), torch.bfloat16)
    small = config_for_tile(base, 128, 128)

    @settings(max_examples=300, deadline=None)
    @given(st.integers(1, 20000), st.integers(1, 16384), st.integers(1, 16384),
           st.integers(1, 132))
    def check(M, N, K, P):
        cfg = gemm_config_for(M, N, K, "bfloat16", P, (9, 0)).config
        # P in [112, 121): the table asks for clusters of 4, which only 128 x 256 tiles run
        clustered = dataclasses.replace(base, cluster_ctas=4) if 112 <= P <= 120 else base
        assert cfg in (clustered, small)
        assert (cfg == small) == (signal_gemm_time(M, N, K, P, small) <= (
            1 - WAVE_TILE_MIN_GAIN) * signal_gemm_time(M, N, K, P, base))
        for c in (base, small):  # waves only add to the work spread evenly over P CTAs
            rate = GEMM_FLOPS["bfloat16"] / 132 * (132 / P) ** GEMM_POWER_EXPONENT \
                * TILE_RATES[(c.block_m, c.block_n)]
            padded = -(-M // c.block_m) * c.block_m * -(-N // c.block_n) * c.block_n
            assert signal_gemm_time(M, N, K, P, c) >= 2 * padded * K / (rate * P) * (1 - 1e-9)
        if M * N <= 4 << 20:  # keep the planner cheap
            plan = make_plan(Problem(M, N, K, "bfloat16", 1, "all_reduce"),
                             PlanConfig(block_m=cfg.block_m, block_n=cfg.block_n,
                                        num_ctas=P, group_m=1))
            assert plan.num_tiles == -(-M // cfg.block_m) * -(-N // cfg.block_n)

    check()


def test_plan_gemm_config_is_the_tables_choice_with_the_plans_tile():
    """What an engine's signal-GEMM launcher runs (kernels.plan_gemm_config): the table's
    choice for the shape and P with the plan's tile -- clusters of 4 at P in [112, 121) on
    sm_90 for 128 x 256 tiles, none for another tile, on another GPU or at another P."""
    from flashoverlap.kernels import plan_gemm_config

    base = config_for_capability((9, 0), torch.bfloat16)
    clustered = dataclasses.replace(base, cluster_ctas=4)
    small = kernels.config_for_tile(base, 128, 128)
    for P, want in ((116, clustered), (112, clustered), (120, clustered), (132, base),
                    (111, base), (121, base)):
        assert plan_gemm_config(8192, 8192, 8192, "bfloat16", P, 128, 256, (9, 0)) == want, P
        half = config_for_capability((9, 0), torch.float16)
        assert plan_gemm_config(8192, 8192, 2048, torch.float16, P, 128, 256, (9, 0)) \
            == dataclasses.replace(half, cluster_ctas=want.cluster_ctas), P
        # the plan's own 128 x 128 tile: its stages, no clusters
        assert plan_gemm_config(8192, 8192, 8192, "bfloat16", P, 128, 128, (9, 0)) == small
    # no GPU is sm_90 (plans made on a CPU match the GPU's); sm_80 takes no rule
    assert plan_gemm_config(4096, 8192, 4096, "bfloat16", 116, 128, 256) == clustered
    ampere = config_for_capability((8, 0), torch.bfloat16)
    assert plan_gemm_config(4096, 8192, 4096, "bfloat16", 100, ampere.block_m, ampere.block_n,
                            (8, 0)) == ampere
    # fp32 (tests only) never takes a rule
    assert plan_gemm_config(256, 256, 256, "float32", 116, 128, 256, (9, 0)).cluster_ctas == 0
