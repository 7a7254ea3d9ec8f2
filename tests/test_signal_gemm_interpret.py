"""Signal GEMM and restore kernels under the Triton interpreter (CPU, small shapes).

Triton reads ``TRITON_INTERPRET`` when Triton itself and each kernel are imported, so the
interpreter cannot be switched on for one module of a pytest process without affecting the
others (GPU tests compile the same kernels).  Run normally, this module therefore holds a
single test that re-runs the module in a child pytest process with ``TRITON_INTERPRET=1``;
in that child (or in a session started with the variable set) the real tests below run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_REPO = Path(__file__).resolve().parents[1]
_INTERPRET_SESSION = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

if not _INTERPRET_SESSION:

    def test_kernels_under_interpreter():
        """Runs this module's kernel tests in a child process under the interpreter."""
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__],
            env=env, cwd=_REPO, capture_output=True, text=True, timeout=600, check=False,
        )
        lines = proc.stdout.strip().splitlines()
        summary = lines[-1] if lines else "(no output)"
        print("interpreter child:", summary)
        if re.fullmatch(r"\d+ skipped in .*", summary):  # the child skipped its module
            reasons = [line for line in lines if line.startswith("SKIPPED")]
            pytest.skip(reasons[0] if reasons else summary)
        assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
        assert re.search(r"\d+ passed", summary) and "failed" not in summary

    def test_kernels_package_imports_without_triton():
        code = ("import sys; sys.modules['triton'] = None\n"
                "import flashoverlap.kernels as k\n"
                "assert k.default_block_shape('cpu') == (128, 256)\n"
                "try:\n    k.signal_gemm\nexcept ImportError:\n    pass\n"
                "else:\n    raise SystemExit('kernels imported without triton')\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=_REPO, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr

else:
    triton = pytest.importorskip("triton")
    import numpy as np
    import triton.language as tl

    from flashoverlap.kernels import GemmConfig
    from flashoverlap.kernels import restore as rs
    from flashoverlap.kernels import signal_gemm as sg
    from flashoverlap.plan import PlanConfig, Problem, make_plan

    @triton.jit
    def _probe_loop(out_ptr, n):
        for i in range(n):
            tl.store(out_ptr + i, i)

    def _interpreter_problem() -> str | None:
        """Triton 3.6's interpreter cannot bound a loop by a runtime int under NumPy 2.4+."""
        try:
            _probe_loop[(1,)](torch.zeros(2, dtype=torch.int32), 2)
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {exc}"
        return None

    _PROBLEM = _interpreter_problem()
    if _PROBLEM is not None:
        pytest.skip(f"the interpreter of Triton {triton.__version__} cannot run loops with "
                    f"NumPy {np.__version__} ({_PROBLEM})", allow_module_level=True)

BM = BN = BK = 16


def _in_child(test):
    """Kernel tests exist only where the interpreter is on (the child process)."""
    return test if _INTERPRET_SESSION else None


def _table(plan) -> torch.Tensor:
    return torch.tensor(plan.step_table)


def _config(use_tma=False, subtile=False, block_m=BM, block_n=BN):
    return GemmConfig(block_m=block_m, block_n=block_n, block_k=BK, num_warps=4, num_stages=2,
                      use_tma=use_tma, epilogue_subtile=subtile)


def _operands(M, N, K, dtype, b_trans, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g).to(dtype)
    if b_trans:  # transposed view of a row-major [N, K] weight
        b = torch.randn(N, K, generator=g).to(dtype).T
    else:
        b = torch.randn(K, N, generator=g).to(dtype)
    return a, b


def _poison(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _check_close(out, ref, dtype):
    """Same written set (non-NaN) and values; tight for fp32, 1e-2 rel Frobenius for 16-bit."""
    assert torch.equal(out.isnan(), ref.isnan()), "written elements differ from the reference"
    written = ~ref.isnan()
    got, want = out[written].double(), ref[written].double()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert ((got - want).norm() / want.norm()).item() <= 1e-2


def _run_both(plan, a, b, *, slotted, counters=True, config=None):
    """Kernel and reference on poisoned buffers; returns (out, ref, counts, ref_counts)."""
    BMp, BNp = plan.config.block_m, plan.config.block_n
    M, N = a.shape[0], b.shape[1]
    shape = (plan.num_tiles, BMp, BNp) if slotted else (M, N)
    out, ref = _poison(shape, a.dtype), _poison(shape, a.dtype)
    cnt = torch.zeros(plan.num_groups, dtype=torch.int32) if counters else None
    ref_cnt = torch.zeros(plan.num_groups, dtype=torch.int32) if counters else None
    table = _table(plan)
    sg.signal_gemm(a, b, out, step_table=table, block_m=BMp, block_n=BNp,
                   num_ctas=plan.config.num_ctas, counters=cnt, slotted=slotted,
                   config=config or _config(block_m=BMp, block_n=BNp))
    sg.signal_gemm_ref(a, b, ref, table, BMp, BNp, ref_cnt, slotted=slotted)
    return out, ref, cnt, ref_cnt


CASES = [
    # (M, N, K, world_size, op, num_ctas, group_waves)
    pytest.param(37, 45, 29, 1, "all_reduce", 4, None, id="ar-edges"),
    pytest.param(64, 32, 48, 1, "all_reduce", 3, (2, 1), id="ar-even-2groups"),
    pytest.param(40, 33, 24, 2, "reduce_scatter", 4, None, id="rs2-rowblock-edge"),
    pytest.param(54, 20, 17, 3, "reduce_scatter", 3, (1, 2, 1), id="rs3"),
]


@_in_child
@pytest.mark.parametrize("M,N,K,W,op,P,waves", CASES)
@pytest.mark.parametrize("b_trans", [False, True], ids=["b_kn", "b_nk_T"])
@pytest.mark.parametrize("slotted", [True, False], ids=["slotted", "plain"])
def test_matches_reference_fp32(M, N, K, W, op, P, waves, b_trans, slotted):
    plan = make_plan(Problem(M, N, K, "float32", W, op),
                     PlanConfig(block_m=BM, block_n=BN, num_ctas=P, group_m=2, group_waves=waves))
    a, b = _operands(M, N, K, torch.float32, b_trans)
    out, ref, cnt, ref_cnt = _run_both(plan, a, b, slotted=slotted)
    _check_close(out, ref, torch.float32)
    assert cnt.tolist() == plan.group_tile_counts.tolist() == ref_cnt.tolist()
    if not slotted:  # plain mode covers the whole output
        assert not out.isnan().any()
        torch.testing.assert_close(out.double(), a.double() @ b.double(), rtol=1e-5, atol=1e-5)


@_in_child
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("b_trans", [False, True], ids=["b_kn", "b_nk_T"])
def test_16bit_vs_float64(dtype, b_trans):
    M, N, K = 45, 38, 40
    plan = make_plan(Problem(M, N, K, str(dtype).split(".")[1], 1, "all_reduce"),
                     PlanConfig(block_m=BM, block_n=BN, num_ctas=5, group_m=2))
    a, b = _operands(M, N, K, dtype, b_trans, seed=1)
    out, ref, cnt, _ = _run_both(plan, a, b, slotted=True)
    _check_close(out, ref, dtype)
    assert cnt.tolist() == plan.group_tile_counts.tolist()
    plain = _poison((M, N), dtype)
    sg.signal_gemm(a, b, plain, step_table=_table(plan), block_m=BM, block_n=BN, num_ctas=5,
                   slotted=False, config=_config())
    want = a.double() @ b.double()
    assert ((plain.double() - want).norm() / want.norm()).item() <= 1e-2


@_in_child
@pytest.mark.parametrize("b_trans", [False, True], ids=["b_kn", "b_nk_T"])
@pytest.mark.parametrize("subtile", [False, True], ids=["whole", "subtile"])
def test_tma_path_and_subtiled_epilogue(b_trans, subtile):
    # K and N multiples of 4 fp32 elements: 16-byte rows, so the descriptor path is taken.
    M, N, K, W = 36, 40, 32, 2
    plan = make_plan(Problem(M, N, K, "float32", W, "reduce_scatter"),
                     PlanConfig(block_m=BM, block_n=32, num_ctas=4, group_m=1))
    a, b = _operands(M, N, K, torch.float32, b_trans, seed=2)
    config = _config(use_tma=True, subtile=subtile, block_n=32)
    assert sg.uses_tma(a, b, config)
    out, ref, cnt, _ = _run_both(plan, a, b, slotted=True, config=config)
    _check_close(out, ref, torch.float32)
    assert cnt.tolist() == plan.group_tile_counts.tolist()


@_in_child
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 17, 5), (19, 1, 3), (5, 7, 1)])
def test_degenerate_dims(M, N, K):
    plan = make_plan(Problem(M, N, K, "float32", 1, "all_reduce"),
                     PlanConfig(block_m=BM, block_n=BN, num_ctas=2, group_m=4))
    a, b = _operands(M, N, K, torch.float32, False, seed=3)
    out, ref, cnt, _ = _run_both(plan, a, b, slotted=False, counters=False)
    assert cnt is None
    _check_close(out, ref, torch.float32)
    assert not out.isnan().any()


@_in_child
def test_counters_accumulate_and_are_optional():
    plan = make_plan(Problem(33, 50, 16, "float32", 1, "all_reduce"),
                     PlanConfig(block_m=BM, block_n=BN, num_ctas=3, group_m=2))
    a, b = _operands(33, 50, 16, torch.float32, False)
    cnt = torch.full((plan.num_groups,), 7, dtype=torch.int32)  # armed elsewhere: add, not set
    out = _poison((plan.num_tiles, BM, BN), torch.float32)
    sg.signal_gemm(a, b, out, step_table=_table(plan), block_m=BM, block_n=BN, num_ctas=3,
                   counters=cnt, config=_config())
    assert (cnt - 7).tolist() == plan.group_tile_counts.tolist()
    # More CTAs than tiles: the grid shrinks, the schedule (stride P) is unchanged.
    plan2 = make_plan(Problem(10, 10, 16, "float32", 1, "all_reduce"),
                      PlanConfig(block_m=BM, block_n=BN, num_ctas=8, group_m=1))
    out2, ref2, cnt2, _ = _run_both(plan2, *_operands(10, 10, 16, torch.float32, True),
                                    slotted=True)
    _check_close(out2, ref2, torch.float32)
    assert cnt2.tolist() == [1]


def _simulated_receive(plan, comm: torch.Tensor, rank: int) -> torch.Tensor:
    """What ``rank`` holds after one ReduceScatter per group (single process: no sum)."""
    W = plan.problem.row_blocks
    parts = []
    for g in range(plan.num_groups):
        lo, hi = int(plan.group_bounds[g]), int(plan.group_bounds[g + 1])
        share = (hi - lo) // W
        parts.append(comm[lo + rank * share: lo + (rank + 1) * share])
    return torch.cat(parts)


@_in_child
@pytest.mark.parametrize("W,op", [(1, "all_reduce"), (2, "reduce_scatter"),
                                  (3, "reduce_scatter")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_restore_round_trip(W, op, dtype):
    M, N, K = 42, 37, 16
    plan = make_plan(Problem(M, N, K, "float32", W, op),
                     PlanConfig(block_m=BM, block_n=BN, num_ctas=3 * W, group_m=2))
    a, b = _operands(M, N, K, dtype, True, seed=4)
    comm = torch.zeros(plan.num_tiles, BM, BN, dtype=dtype)
    sg.signal_gemm(a, b, comm, step_table=_table(plan), block_m=BM, block_n=BN,
                   num_ctas=plan.config.num_ctas, config=_config())
    full = torch.full((M, N), float("nan"), dtype=dtype)
    sg.signal_gemm(a, b, full, step_table=_table(plan), block_m=BM, block_n=BN,
                   num_ctas=plan.config.num_ctas, slotted=False, config=_config())
    tile_m = torch.tensor(plan.restore_tile_m)
    tile_n = torch.tensor(plan.restore_tile_n, dtype=torch.int32)  # either index type
    rows = plan.out_rows
    for rank in range(W):
        recv = _simulated_receive(plan, comm, rank).contiguous()
        assert recv.shape[0] == plan.recv_tiles
        shard = _poison((rows, N), dtype)
        shard_ref = _poison((rows, N), dtype)
        for g in range(plan.num_groups):  # one restore per group, as the engine does
            lo, hi = int(plan.restore_bounds[g]), int(plan.restore_bounds[g + 1])
            rs.restore_tiles(recv, shard, tile_m, tile_n, lo, hi, BM, BN)
            rs.restore_tiles_ref(recv, shard_ref, tile_m, tile_n, lo, hi, BM, BN)
        assert torch.equal(shard, shard_ref)
        assert torch.equal(shard, full[rank * rows:(rank + 1) * rows])


@_in_child
def test_restore_partial_range_and_strided_out():
    plan = make_plan(Problem(40, 40, 16, "float32", 1, "all_reduce"),
                     PlanConfig(block_m=BM, block_n=BN, num_ctas=2, group_m=2))
    src = torch.randn(plan.num_tiles, BM, BN)
    big = torch.zeros(40, 64)
    out = big[:, 8:48]  # row stride 64, columns offset: a view, not a copy
    ref = torch.zeros(40, 40)
    tm, tn = torch.tensor(plan.restore_tile_m), torch.tensor(plan.restore_tile_n)
    rs.restore_tiles(src, out, tm, tn, 2, 5, BM, BN)
    rs.restore_tiles_ref(src, ref, tm, tn, 2, 5, BM, BN)
    assert torch.equal(out, ref)
    assert (big[:, :8] == 0).all() and (big[:, 48:] == 0).all()
    rs.restore_tiles(src, out, tm, tn, 3, 3, BM, BN)  # empty range: no launch
    assert torch.equal(out, ref)


@_in_child
def test_bad_input_raises_before_launch():
    plan = make_plan(Problem(20, 20, 16, "float32", 1, "all_reduce"),
                     PlanConfig(block_m=BM, block_n=BN, num_ctas=2, group_m=2))
    a, b = _operands(20, 20, 16, torch.float32, False)
    table = _table(plan)
    out = torch.zeros(plan.num_tiles, BM, BN)
    kw = {"step_table": table, "block_m": BM, "block_n": BN, "num_ctas": 2, "config": _config()}
    with pytest.raises(TypeError):
        sg.signal_gemm(a, b.double(), out, **kw)
    with pytest.raises(TypeError):
        sg.signal_gemm(a.int(), b.int(), out.int(), **kw)
    with pytest.raises(ValueError):
        sg.signal_gemm(a, b[:15], out, **kw)  # K mismatch
    with pytest.raises(ValueError):
        sg.signal_gemm(a.T.contiguous().T, b, out, **kw)  # column-major A
    with pytest.raises(ValueError):
        sg.signal_gemm(a, torch.randn(16, 40)[:, ::2], out, **kw)  # neither layout
    with pytest.raises(ValueError):
        sg.signal_gemm(a, b, out[:1], **kw)  # comm buffer too small
    with pytest.raises(ValueError):
        sg.signal_gemm(a, b, torch.zeros(20, 19), **{**kw, "slotted": False})
    with pytest.raises(ValueError):
        sg.signal_gemm(a, b, out, **{**kw, "step_table": table.long()})
    with pytest.raises(ValueError):
        sg.signal_gemm(a, b, out, **{**kw, "counters": torch.zeros(1, dtype=torch.int64)})
    with pytest.raises(ValueError):
        sg.signal_gemm(a, b, out, **{**kw, "block_n": 32})  # config/plan tile mismatch
    with pytest.raises(ValueError):
        sg.signal_gemm(a[:0], b, out, **kw)
    tm = torch.tensor(plan.restore_tile_m)
    with pytest.raises(ValueError):
        rs.restore_tiles(out, torch.zeros(20, 20), tm, tm, 0, plan.num_tiles + 1, BM, BN)
    with pytest.raises(TypeError):
        rs.restore_tiles(out, torch.zeros(20, 20).double(), tm, tm, 0, 1, BM, BN)
    with pytest.raises(ValueError):
        rs.restore_tiles(out, torch.zeros(20, 20), tm.float(), tm, 0, 1, BM, BN)
    with pytest.raises(ValueError):
        rs.restore_tiles(out, torch.zeros(20, 20), tm, tm, 3, 2, BM, BN)


@_in_child
@pytest.mark.parametrize("op,W", [("all_reduce", 1), ("reduce_scatter", 2)])
def test_launchers_match_one_shot_calls(op, W):
    """The engine's hot-path launchers (checks once, then direct launches where compiled):
    several calls with new operands each, every output element against the references."""
    from flashoverlap.kernels import direct_launch

    assert not direct_launch.ENABLED  # the interpreter has no compiled kernels
    M, N, K = 44, 35, 20
    plan = make_plan(Problem(M, N, K, "float32", W, op),
                     PlanConfig(block_m=BM, block_n=BN, num_ctas=2 * W, group_m=2))
    table = _table(plan)
    comm = _poison((plan.num_tiles, BM, BN), torch.float32)
    counters = torch.zeros(plan.num_groups, dtype=torch.int32)
    gemm = sg.SignalGemmLauncher(comm, table, counters, block_m=BM, block_n=BN,
                                 num_ctas=plan.config.num_ctas, config=_config())
    tm, tn = torch.tensor(plan.restore_tile_m), torch.tensor(plan.restore_tile_n)
    for call in range(3):
        a, b = _operands(M, N, K, torch.float32, call % 2 == 1, seed=10 + call)
        comm.fill_(float("nan"))
        counters.zero_()
        gemm(a, b)
        ref = _poison((plan.num_tiles, BM, BN), torch.float32)
        ref_counts = torch.zeros_like(counters)
        sg.signal_gemm_ref(a, b, ref, table, BM, BN, ref_counts)
        _check_close(comm, ref, torch.float32)
        assert torch.equal(counters, ref_counts)
        recv = _simulated_receive(plan, comm, W - 1).contiguous()
        restore = rs.RestoreLauncher(recv, tm, tn, BM, BN)
        shard = _poison((plan.out_rows, N), torch.float32)
        shard_ref = _poison((plan.out_rows, N), torch.float32)
        for g in range(plan.num_groups):
            lo, hi = int(plan.restore_bounds[g]), int(plan.restore_bounds[g + 1])
            restore(shard, lo, hi - lo)
            rs.restore_tiles_ref(recv, shard_ref, tm, tn, lo, hi, BM, BN)
        assert not shard.isnan().any()
        assert torch.equal(shard, shard_ref)
        rows = plan.out_rows
        want = (a.double() @ b.double())[(W - 1) * rows:W * rows]
        torch.testing.assert_close(shard.double(), want, rtol=1e-5, atol=1e-5)


@_in_child
def test_ordered_args_follow_the_kernel_signature():
    from flashoverlap.kernels import direct_launch

    src, out = torch.zeros(4), torch.zeros(2, 2)
    args = (src, out, "tm", "tn", out, 0, 2, 2, 2, 0)
    meta = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_R": 8, "HAS_RESIDUAL": False, "num_warps": 4}
    got = direct_launch.ordered_args(rs._restore_kernel, args, meta)
    assert got == args + (16, 32, 8, False)
    with pytest.raises(TypeError, match="BLOCK_R"):
        direct_launch.ordered_args(rs._restore_kernel, args, {"BLOCK_M": 16, "BLOCK_N": 32})


def _same_rounded(got, want):
    """Equal, except that the interpreter converts fp32 to bf16 by truncation (compiled
    kernels round to nearest, as torch does; the GPU tests compare those bitwise): within one
    bf16 ulp there."""
    assert not got.isnan().any()
    if got.dtype == torch.bfloat16:
        torch.testing.assert_close(got.float(), want.float(), rtol=2.0**-7, atol=0)
    else:
        assert torch.equal(got, want)


@_in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_restore_with_fused_residual(dtype):
    """out[tile] = slot + residual[tile] (fp32 add, one rounding): separate residual, the
    in-place form (residual is out), a strided residual, and the hot-path launcher."""
    M, N = 45, 38
    plan = make_plan(Problem(M, N, 16, "float32", 1, "all_reduce"),
                     PlanConfig(block_m=BM, block_n=BN, num_ctas=3, group_m=2))
    g = torch.Generator().manual_seed(9)
    src = torch.randn(plan.num_tiles, BM, BN, generator=g).to(dtype)
    tm, tn = torch.tensor(plan.restore_tile_m), torch.tensor(plan.restore_tile_n)
    big = torch.randn(M, N + 10, generator=g).to(dtype)
    for residual in (torch.randn(M, N, generator=g).to(dtype), big[:, 3:3 + N]):
        want = _poison((M, N), dtype)
        rs.restore_tiles_ref(src, want, tm, tn, 0, plan.num_tiles, BM, BN, residual=residual)
        expected = (rs.restore_tiles_ref(src, _poison((M, N), dtype), tm, tn, 0, plan.num_tiles,
                                         BM, BN).float() + residual.float()).to(dtype)
        assert torch.equal(want, expected)
        out = _poison((M, N), dtype)
        kept = residual.clone()
        rs.restore_tiles(src, out, tm, tn, 0, plan.num_tiles, BM, BN, residual=residual)
        _same_rounded(out, want)
        assert torch.equal(residual, kept)
        inplace = residual.clone()
        launcher = rs.RestoreLauncher(src, tm, tn, BM, BN)
        for grp in range(plan.num_groups):
            lo, hi = int(plan.restore_bounds[grp]), int(plan.restore_bounds[grp + 1])
            launcher(inplace, lo, hi - lo, residual=inplace)
        _same_rounded(inplace, want)
    with pytest.raises(ValueError, match="residual must match"):
        rs.restore_tiles(src, out, tm, tn, 0, 1, BM, BN, residual=torch.zeros(M, N + 1, dtype=dtype))
