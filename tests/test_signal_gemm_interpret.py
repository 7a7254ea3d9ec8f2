"""The signal GEMM under the Triton interpreter (CPU, small shapes).

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
    # split_min_saved_k_tiles=0: the interpreter's K is a few steps, and the split last wave
    # (which the product reserves for long K) must still run here
    return GemmConfig(block_m=block_m, block_n=block_n, block_k=BK, num_warps=4, num_stages=2,
                      use_tma=use_tma, epilogue_subtile=subtile, split_min_saved_k_tiles=0)


def _plan(M, N, K, W, op, P, group_m=2, group_bands=None, block_n=BN, dtype="float32"):
    return make_plan(Problem(M, N, K, dtype, W, op),
                     PlanConfig(block_m=BM, block_n=block_n, num_ctas=P, group_m=group_m,
                                group_bands=group_bands))


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


def _expected_dest(plan, a, b, residual=None, residual_block=0):
    """The destination the plan's layout implies, in float64, built from ``plan.spans()``
    (independent of the step table and of ``signal_gemm_ref``): group g's rows of block k at
    ``send_lo + k * recv_rows``; the residual added to block ``residual_block``."""
    full = a.double() @ b.double()
    B, rows = plan.problem.row_blocks, plan.problem.rows_per_block
    if residual is not None:
        full[residual_block * rows:(residual_block + 1) * rows] += residual.double()
    dest = _poison(full.shape, torch.float64)
    for s in plan.spans():
        h = s.recv_rows
        for k in range(B):
            dest[s.send_lo + k * h:s.send_lo + (k + 1) * h] = \
                full[k * rows + s.recv_lo:k * rows + s.recv_hi]
    assert not dest.isnan().any()
    return dest


def _check_close(out, ref, dtype):
    """Same written set (non-NaN) and values; tight for fp32, 1e-2 rel Frobenius for 16-bit."""
    assert torch.equal(out.isnan(), ref.isnan()), "written elements differ from the reference"
    written = ~ref.isnan()
    got, want = out[written].double(), ref[written].double()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert ((got - want).norm() / want.norm().clamp_min(1e-30)).item() <= 1e-2


def _run_both(plan, a, b, *, counters=True, config=None, residual=None, residual_block=0,
              table=None):
    """Kernel and reference on NaN-poisoned destinations; returns (out, ref, counts, ref_counts)."""
    M, N = a.shape[0], b.shape[1]
    out, ref = _poison((M, N), a.dtype), _poison((M, N), a.dtype)
    cnt = torch.zeros(plan.num_groups, dtype=torch.int32) if counters else None
    ref_cnt = torch.zeros(plan.num_groups, dtype=torch.int32) if counters else None
    table = _table(plan) if table is None else table
    rows = plan.problem.rows_per_block
    sg.signal_gemm(a, b, out, step_table=table, block_m=plan.config.block_m,
                   block_n=plan.config.block_n, num_ctas=plan.config.num_ctas, counters=cnt,
                   residual=residual, residual_block=residual_block, rows_per_block=rows,
                   config=config or _config(block_m=plan.config.block_m,
                                            block_n=plan.config.block_n))
    sg.signal_gemm_ref(a, b, ref, table, ref_cnt, residual=residual,
                       residual_block=residual_block, rows_per_block=rows)
    return out, ref, cnt, ref_cnt


CASES = [
    # (M, N, K, world_size, op, num_ctas, group_m, group_bands)
    pytest.param(37, 45, 29, 1, "all_reduce", 4, 2, None, id="ar-edges"),
    pytest.param(64, 32, 48, 2, "all_reduce", 3, 1, (2, 1, 1), id="ar-3groups"),
    pytest.param(33, 20, 7, 1, "reduce_scatter", 3, 1, None, id="rs1-in-place"),
    pytest.param(40, 33, 24, 2, "reduce_scatter", 4, 1, None, id="rs2-rowblock-edge"),
    pytest.param(54, 20, 17, 3, "reduce_scatter", 3, 1, (1, 1), id="rs3-2groups"),
    pytest.param(102, 18, 9, 3, "reduce_scatter", 5, 1, (1, 2), id="rs3-uneven-groups"),
]


@_in_child
@pytest.mark.parametrize("M,N,K,W,op,P,group_m,bands", CASES)
@pytest.mark.parametrize("b_trans", [False, True], ids=["b_kn", "b_nk_T"])
def test_matches_reference_fp32(M, N, K, W, op, P, group_m, bands, b_trans):
    plan = _plan(M, N, K, W, op, P, group_m, bands)
    a, b = _operands(M, N, K, torch.float32, b_trans)
    out, ref, cnt, ref_cnt = _run_both(plan, a, b)
    _check_close(out, ref, torch.float32)
    assert not out.isnan().any(), "the step table's dest rows cover the destination"
    torch.testing.assert_close(out.double(), _expected_dest(plan, a, b), rtol=1e-5, atol=1e-5)
    assert cnt.tolist() == plan.group_tile_counts.tolist() == ref_cnt.tolist()
    if plan.collective.in_place_for(W):  # the destination is the GEMM output itself
        torch.testing.assert_close(out.double(), a.double() @ b.double(), rtol=1e-5, atol=1e-5)


@_in_child
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("b_trans", [False, True], ids=["b_kn", "b_nk_T"])
@pytest.mark.parametrize("op,W", [("all_reduce", 1), ("reduce_scatter", 3)])
def test_16bit_vs_float64(dtype, b_trans, op, W):
    M, N, K = 45, 38, 40
    plan = _plan(M, N, K, W, op, 5, group_m=1, dtype=str(dtype).split(".")[1])
    a, b = _operands(M, N, K, dtype, b_trans, seed=1)
    out, ref, cnt, _ = _run_both(plan, a, b)
    _check_close(out, ref, dtype)
    assert cnt.tolist() == plan.group_tile_counts.tolist()
    want = _expected_dest(plan, a, b)
    assert not out.isnan().any()
    assert ((out.double() - want).norm() / want.norm()).item() <= 1e-2


@_in_child
@pytest.mark.parametrize("b_trans", [False, True], ids=["b_kn", "b_nk_T"])
@pytest.mark.parametrize("subtile", [False, True], ids=["whole", "subtile"])
def test_tma_path_and_subtiled_epilogue(b_trans, subtile):
    # K and N multiples of 4 fp32 elements: 16-byte rows, so the descriptor path is taken.
    M, N, K, W = 36, 40, 32, 2
    plan = _plan(M, N, K, W, "reduce_scatter", 4, group_m=1, block_n=32)
    a, b = _operands(M, N, K, torch.float32, b_trans, seed=2)
    config = _config(use_tma=True, subtile=subtile, block_n=32)
    assert sg.uses_tma(a, b, config)
    out, ref, cnt, _ = _run_both(plan, a, b, config=config)
    _check_close(out, ref, torch.float32)
    torch.testing.assert_close(out.double(), _expected_dest(plan, a, b), rtol=1e-5, atol=1e-5)
    assert cnt.tolist() == plan.group_tile_counts.tolist()


@_in_child
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 17, 5), (19, 1, 3), (5, 7, 1)])
def test_degenerate_dims(M, N, K):
    plan = _plan(M, N, K, 1, "all_reduce", 2, group_m=4)
    a, b = _operands(M, N, K, torch.float32, False, seed=3)
    out, ref, cnt, _ = _run_both(plan, a, b, counters=False)
    assert cnt is None
    _check_close(out, ref, torch.float32)
    assert not out.isnan().any()


@_in_child
def test_counters_accumulate_and_are_optional():
    plan = _plan(33, 50, 16, 1, "all_reduce", 3, group_m=1)
    a, b = _operands(33, 50, 16, torch.float32, False)
    cnt = torch.full((plan.num_groups,), 7, dtype=torch.int32)  # armed elsewhere: add, not set
    out = _poison((33, 50), torch.float32)
    sg.signal_gemm(a, b, out, step_table=_table(plan), block_m=BM, block_n=BN, num_ctas=3,
                   counters=cnt, config=_config())
    assert (cnt - 7).tolist() == plan.group_tile_counts.tolist()
    # More CTAs than tiles: the grid shrinks, the schedule (stride P) is unchanged.
    plan2 = _plan(10, 10, 16, 1, "all_reduce", 8, group_m=1)
    out2, ref2, cnt2, _ = _run_both(plan2, *_operands(10, 10, 16, torch.float32, True))
    _check_close(out2, ref2, torch.float32)
    assert cnt2.tolist() == [1]


@_in_child
@pytest.mark.parametrize("W,op,block", [(1, "all_reduce", 0), (2, "reduce_scatter", 1),
                                        (3, "reduce_scatter", 0), (3, "reduce_scatter", 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_residual_epilogue_on_one_block(W, op, block, dtype):
    """The residual ([rows_per_block, N], row i meets the block's row i) is added to the
    tiles of one row block before the store; other blocks read nothing.  A strided residual
    (row stride > N) too; the residual stays untouched."""
    M, N, K = 42 if W != 1 else 30, 37, 16
    plan = _plan(M, N, K, W, op, 2 * W, group_m=1)
    rows = plan.problem.rows_per_block
    a, b = _operands(M, N, K, dtype, True, seed=4)
    g = torch.Generator().manual_seed(5)
    big = torch.randn(rows, N + 6, generator=g).to(dtype)
    for residual in (torch.randn(rows, N, generator=g).to(dtype), big[:, 3:3 + N]):
        kept = residual.clone()
        out, ref, cnt, _ = _run_both(plan, a, b, residual=residual, residual_block=block)
        assert torch.equal(residual, kept)
        _check_close(out, ref, dtype)
        assert not out.isnan().any()
        assert cnt.tolist() == plan.group_tile_counts.tolist()
        want = _expected_dest(plan, a, b, residual, block)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
        torch.testing.assert_close(out.double(), want, **tol)
        # and nowhere else: without the residual, the other blocks' rows are the same bits
        plain, _, _, _ = _run_both(plan, a, b, counters=False)
        for s in plan.spans():
            h = s.recv_rows
            for k in range(plan.problem.row_blocks):
                part = slice(s.send_lo + k * h, s.send_lo + (k + 1) * h)
                if k != block:
                    assert torch.equal(out[part], plain[part]), (s.index, k)
                else:
                    assert not torch.equal(out[part], plain[part])


@_in_child
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_residual_in_place_all_reduce(dtype):
    """out is the residual (AllReduce, block 0): each tile reads its residual rows, then
    stores over them (the engine's ``out=residual`` with a replicated residual)."""
    M, N, K = 45, 38, 16
    plan = _plan(M, N, K, 2, "all_reduce", 3, group_m=1)
    a, b = _operands(M, N, K, dtype, False, seed=6)
    residual = torch.randn(M, N, generator=torch.Generator().manual_seed(7)).to(dtype)
    separate, ref, _, _ = _run_both(plan, a, b, residual=residual)
    _check_close(separate, ref, dtype)
    inplace = residual.clone()
    sg.signal_gemm(a, b, inplace, step_table=_table(plan), block_m=BM, block_n=BN, num_ctas=3,
                   residual=inplace, rows_per_block=M, config=_config())
    assert torch.equal(inplace, separate)


@_in_child
@pytest.mark.parametrize("W,op", [(1, "all_reduce"), (3, "reduce_scatter")])
def test_a_partial_table_writes_only_its_groups_rows(W, op):
    """Run only the first group's steps: exactly its send rows are written (the rest stays
    NaN) and only its counter moves."""
    M, N, K = 54, 21, 8
    plan = _plan(M, N, K, W, op, 2, group_m=1)
    assert plan.num_groups >= 2
    first = _table(plan)[: int(plan.group_bounds[1])].contiguous()
    a, b = _operands(M, N, K, torch.float32, False, seed=8)
    out, ref, cnt, ref_cnt = _run_both(plan, a, b, table=first)
    _check_close(out, ref, torch.float32)
    s = plan.spans()[0]
    written = ~out.isnan().any(dim=1)
    assert written.nonzero().flatten().tolist() == list(range(s.send_lo, s.send_hi))
    assert (~out[s.send_lo:s.send_hi].isnan()).all()
    full = _expected_dest(plan, a, b)
    torch.testing.assert_close(out[s.send_lo:s.send_hi].double(), full[s.send_lo:s.send_hi],
                               rtol=1e-5, atol=1e-5)
    assert cnt.tolist() == ref_cnt.tolist() == [int(plan.group_tile_counts[0])] + \
        [0] * (plan.num_groups - 1)


@_in_child
def test_bad_input_raises_before_launch():
    plan = _plan(20, 20, 16, 2, "reduce_scatter", 2)
    a, b = _operands(20, 20, 16, torch.float32, False)
    table = _table(plan)
    out = torch.zeros(20, 20)
    kw = {"step_table": table, "block_m": BM, "block_n": BN, "num_ctas": 2, "config": _config()}
    with pytest.raises(TypeError):
        sg.signal_gemm(a, b.double(), out, **kw)
    with pytest.raises(TypeError):
        sg.signal_gemm(a.int(), b.int(), out.int(), **kw)
    with pytest.raises(TypeError):
        sg.signal_gemm(a, b, out, **{**kw, "residual": [[1.0]], "rows_per_block": 10})
    with pytest.raises(ValueError):
        sg.signal_gemm(a, b[:15], out, **kw)  # K mismatch
    with pytest.raises(ValueError):
        sg.signal_gemm(a.T.contiguous().T, b, out, **kw)  # column-major A
    with pytest.raises(ValueError):
        sg.signal_gemm(a, torch.randn(16, 40)[:, ::2], out, **kw)  # neither layout
    with pytest.raises(ValueError, match="out must be row-major"):
        sg.signal_gemm(a, b, out[:10], **kw)  # destination too small
    with pytest.raises(ValueError, match="out must be row-major"):
        sg.signal_gemm(a, b, torch.zeros(20, 40)[:, ::2], **kw)
    with pytest.raises(ValueError):
        sg.signal_gemm(a, b, out, **{**kw, "step_table": table.long()})
    with pytest.raises(ValueError):
        sg.signal_gemm(a, b, out, **{**kw, "step_table": table[:, :6].contiguous()})
    with pytest.raises(ValueError):
        sg.signal_gemm(a, b, out, **{**kw, "counters": torch.zeros(1, dtype=torch.int64)})
    with pytest.raises(ValueError):
        sg.signal_gemm(a, b, out, **{**kw, "block_n": 32})  # config/plan tile mismatch
    with pytest.raises(ValueError):
        sg.signal_gemm(a[:0], b, out, **kw)
    with pytest.raises(ValueError, match="rows_per_block"):
        sg.signal_gemm(a, b, out, **{**kw, "residual": torch.zeros(10, 20)})  # no rows_per_block
    with pytest.raises(ValueError, match="rows_per_block"):
        sg.signal_gemm(a, b, out, **{**kw, "residual": torch.zeros(20, 20), "rows_per_block": 10})
    with pytest.raises(ValueError, match="residual must be row-major"):
        sg.signal_gemm(a, b, out, **{**kw, "residual": torch.zeros(10, 21), "rows_per_block": 10})
    with pytest.raises(ValueError, match="residual must be row-major"):
        sg.signal_gemm(a, b, out, **{**kw, "residual": torch.zeros(20, 10).T,
                                     "rows_per_block": 10})
    with pytest.raises(ValueError, match="residual must be row-major"):
        sg.signal_gemm(a, b, out, **{**kw, "residual": torch.zeros(10, 20).double(),
                                     "rows_per_block": 10})
    assert (out == 0).all(), "nothing was launched"


@_in_child
@pytest.mark.parametrize("op,W,block", [("all_reduce", 1, None), ("reduce_scatter", 2, 1)])
def test_launchers_match_one_shot_calls(op, W, block):
    """The engine's hot-path launcher (checks once, then direct launches where compiled):
    several calls with new operands and destinations each, with and without the residual,
    every element and counter against the reference."""
    from flashoverlap.kernels import direct_launch

    assert not direct_launch.ENABLED  # the interpreter has no compiled kernels
    M, N, K = 44, 35, 20
    plan = _plan(M, N, K, W, op, 2 * W, group_m=1)
    rows = plan.problem.rows_per_block
    table = _table(plan)
    counters = torch.zeros(plan.num_groups, dtype=torch.int32)
    gemm = sg.SignalGemmLauncher(table, counters, block_m=BM, block_n=BN,
                                 num_ctas=plan.config.num_ctas, residual_block=block or 0,
                                 rows_per_block=rows, config=_config())
    for call in range(3):
        a, b = _operands(M, N, K, torch.float32, call % 2 == 1, seed=10 + call)
        residual = None
        if block is not None and call > 0:
            residual = torch.randn(rows, N, generator=torch.Generator().manual_seed(call))
        out = _poison((M, N), torch.float32)
        counters.zero_()
        gemm(a, b, out, residual=residual)
        ref = _poison((M, N), torch.float32)
        ref_counts = torch.zeros_like(counters)
        sg.signal_gemm_ref(a, b, ref, table, ref_counts, residual=residual,
                           residual_block=block or 0, rows_per_block=rows)
        _check_close(out, ref, torch.float32)
        assert not out.isnan().any()
        assert torch.equal(counters, ref_counts)
        torch.testing.assert_close(out.double(),
                                   _expected_dest(plan, a, b, residual, block or 0),
                                   rtol=1e-5, atol=1e-5)


@_in_child
def test_ordered_args_follow_the_kernel_signature():
    from flashoverlap.kernels import direct_launch

    kernel = sg._signal_gemm_kernel
    positional = kernel.arg_names[:21]
    assert positional[:6] == ["a_ptr", "b_ptr", "c_ptr", "step_ptr", "counter_ptr", "res_ptr"]
    assert positional[17:] == ["part_ptr", "ticket_ptr", "num_main", "tail_parts"]
    # the launcher's argument slots
    assert (sg._A, sg._B, sg._OUT, sg._CNT, sg._RES) == (0, 1, 2, 4, 5)
    args = tuple(f"arg{i}" for i in range(21))
    constexprs = kernel.arg_names[21:]
    meta = {name: i for i, name in enumerate(constexprs)}
    got = direct_launch.ordered_args(kernel, args, {**meta, "num_warps": 4, "num_stages": 2})
    assert got == args + tuple(range(len(constexprs)))
    missing = dict(meta)
    missing.pop("HAS_RESIDUAL")
    with pytest.raises(TypeError, match="HAS_RESIDUAL"):
        direct_launch.ordered_args(kernel, args, missing)


@_in_child
def test_step_columns_match_the_planner():
    """The kernel reads the table by literal column numbers (no planner import)."""
    from flashoverlap import plan as planner

    assert sg._STEP_COLUMNS == len(planner.STEP_TABLE_COLUMNS)
    assert (sg._ROW_START, sg._ROW_STOP, sg._COL_START, sg._COL_STOP, sg._DEST_ROW,
            sg._GROUP, sg._BLOCK) == (planner.ROW_START, planner.ROW_STOP, planner.COL_START,
                                      planner.COL_STOP, planner.DEST_ROW, planner.GROUP,
                                      planner.BLOCK)


# -- the split last wave (kernels.tail_split) ----------------------------------------------
SPLIT_CASES = [
    # (M, N, K, W, op, P, group_bands): K = 256 is 16 K steps of BK = 16
    pytest.param(37, 45, 256, 1, "all_reduce", 4, None, id="ar-one-tail-tile-4-parts"),
    pytest.param(20, 30, 256, 1, "all_reduce", 9, None, id="ar-single-wave-2-parts"),
    pytest.param(64, 33, 200, 2, "reduce_scatter", 5, None, id="rs2-tail-edges"),
    pytest.param(54, 20, 250, 3, "reduce_scatter", 5, (1, 1), id="rs3-2groups-2-parts"),
]


@_in_child
@pytest.mark.parametrize("M,N,K,W,op,P,bands", SPLIT_CASES)
@pytest.mark.parametrize("b_trans", [False, True], ids=["b_kn", "b_nk_T"])
@pytest.mark.parametrize("use_tma", [False, True], ids=["ptr", "tma"])
def test_split_tail_matches_float64_and_rearms(M, N, K, W, op, P, bands, b_trans, use_tma):
    """The last wave's tiles split along K: same destination rows and values as the float64
    product (NaN-poisoned first), same counter counts as the reference, every ticket back to
    zero, and a second launch with the same buffers right again and bitwise equal (the sum
    over parts runs in part order)."""
    from flashoverlap.kernels import tail_split

    plan = _plan(M, N, K, W, op, P, group_m=1, group_bands=bands)
    table = _table(plan)
    T = table.shape[0]
    num_main, parts = tail_split(T, P, -(-K // BK), 0)
    assert parts > 1, "case must split its last wave"
    assert tail_split(T, P, -(-K // BK)) == (T, 1), "the product's default would not split"
    a, b = _operands(M, N, K, torch.float32, b_trans, seed=7)
    meta, args, grid = _launch_tail_twice(plan, a, b, P, _config(use_tma=use_tma), num_main)
    assert meta["SPLIT_TAIL"] and args[19:] == (num_main, parts)
    assert grid[0] == min(P, max(T, (T - num_main) * parts))


def _launch_tail_twice(plan, a, b, P, config, num_main):
    """Launch the kernel twice with the same arguments (slots, tickets) on a NaN-poisoned
    destination: the float64 product in the plan's layout, the reference's counter counts,
    every ticket back to zero, and the second launch bitwise the first.  Returns
    ``(meta, args, grid)`` of the launch."""
    M, N = a.shape[0], b.shape[1]
    table = _table(plan)
    out = _poison((M, N), torch.float32)
    counters = torch.zeros(plan.num_groups, dtype=torch.int32)
    grid, args, meta = sg._launch_args(a, b, out, table, BM, BN, P, counters, None, 0,
                                       plan.problem.rows_per_block, config)
    tickets = args[18]
    sg._jit_launch(grid, args, meta)
    torch.testing.assert_close(out.double(), _expected_dest(plan, a, b), rtol=1e-5, atol=1e-5)
    ref_counts = torch.zeros_like(counters)
    sg.signal_gemm_ref(a, b, _poison((M, N), torch.float32), table, ref_counts)
    assert torch.equal(counters, ref_counts)
    from flashoverlap.kernels import TICKETS_PER_TILE

    assert tickets.numel() == (table.shape[0] - num_main) * TICKETS_PER_TILE
    assert not tickets.any()
    first = out.clone()
    out.fill_(float("nan"))
    sg._jit_launch(grid, args, meta)
    assert torch.equal(out, first)
    assert torch.equal(counters, 2 * ref_counts) and not tickets.any()
    return meta, args, grid


@_in_child
@pytest.mark.parametrize("W,op,block,P", [(1, "all_reduce", 0, 4), (2, "reduce_scatter", 1, 7)])
def test_split_tail_adds_the_residual_once(W, op, block, P):
    """Only the piece that completes a split tile adds the residual (in fp32, once)."""
    M, N, K = 40, 30, 256
    plan = _plan(M, N, K, W, op, P, group_m=1)
    T = plan.step_table.shape[0]
    assert tail_split_parts(T, P, K) > 1
    a, b = _operands(M, N, K, torch.float32, False, seed=3)
    rows = plan.problem.rows_per_block
    residual = torch.randn(rows, N, generator=torch.Generator().manual_seed(5))
    out, ref, cnt, ref_cnt = _run_both(plan, a, b, residual=residual, residual_block=block)
    _check_close(out, ref, torch.float32)
    assert torch.equal(cnt, ref_cnt)
    torch.testing.assert_close(out.double(), _expected_dest(plan, a, b, residual, block),
                               rtol=1e-5, atol=1e-5)


def tail_split_parts(T, P, K):
    from flashoverlap.kernels import tail_split

    return tail_split(T, P, -(-K // BK), 0)[1]


@_in_child
def test_split_tail_can_be_switched_off():
    M, N, K, P = 37, 45, 256, 4
    plan = _plan(M, N, K, 1, "all_reduce", P, group_m=1)
    a, b = _operands(M, N, K, torch.float32, False)
    config = GemmConfig(block_m=BM, block_n=BN, block_k=BK, num_warps=4, num_stages=2,
                        use_tma=False, split_tail=False)
    grid, args, meta = sg._launch_args(a, b, _poison((M, N), torch.float32), _table(plan),
                                       BM, BN, P, None, None, 0, None, config)
    assert not meta["SPLIT_TAIL"] and args[19:] == (plan.step_table.shape[0], 1)
    out, ref, _, _ = _run_both(plan, a, b, config=config)
    _check_close(out, ref, torch.float32)
