"""Signal GEMM on a CUDA GPU: numerics, restore-free layouts, compiled ordering, signal stress.

The signal GEMM writes every tile at row ``dest_row`` of a row-major ``[M, N]`` destination
(the result itself for AllReduce plans, a send buffer packed by destination block for
ReduceScatter plans) and bumps its group's counter.  The stress test is the proof of the
memory-ordering contract (``flashoverlap/kernels/signal_gemm.py``, "Ordering protocol"): a
single-CTA consumer on another stream spins on each group's counter with acquire atomics and
snapshots the group's rows the moment the count is complete; any difference between a
snapshot and the final buffer is a torn read.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import time

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

triton = pytest.importorskip("triton")

from flashoverlap.kernels import (config_for_tile, default_block_shape,  # noqa: E402
                                  default_config, tail_split)
from flashoverlap.kernels import signal_gemm as sg  # noqa: E402
from flashoverlap.plan import PlanConfig, Problem, make_plan, num_bands_for  # noqa: E402

from stress_consumer import wait_and_snapshot  # noqa: E402

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
SMS = torch.cuda.get_device_properties(DEV).multi_processor_count
BM, BN = default_block_shape(DEV)
STRESS_ENV = "FLASHOVERLAP_STRESS_GROUPS"


def _split_config(dtype=torch.bfloat16, **changes):
    """The default configuration with the split last wave wherever the wave allows it
    (``split_min_saved_k_tiles=0``): the product splits only long K, and these tests reach
    the split path with short K too."""
    return dataclasses.replace(default_config(DEV, dtype), split_min_saved_k_tiles=0, **changes)


# The stress test's kernels: every split the wave allows, as before the saving threshold;
# half of its whole-tile calls take 128 x 128 tiles (kernels.wave_tile's tile, 5 stages)
STRESS_CONFIG = _split_config()
STRESS_CONFIG_128 = config_for_tile(STRESS_CONFIG, 128, 128)


def _plan(M, N, K, *, world=1, op="all_reduce", num_ctas=None, group_m=8, group_bands=None,
          block=(BM, BN), dtype="bfloat16"):
    problem = Problem(M, N, K, dtype, world, op)
    return make_plan(problem, PlanConfig(block_m=block[0], block_n=block[1],
                                         num_ctas=num_ctas or SMS, group_m=group_m,
                                         group_bands=group_bands))


def _table(plan):
    return torch.from_numpy(plan.step_table.copy()).to(DEV)


def _operands(M, N, K, dtype, b_trans, gen=None):
    a = torch.randn(M, K, device=DEV, generator=gen).to(dtype)
    if b_trans:
        b = torch.randn(N, K, device=DEV, generator=gen).to(dtype).T
    else:
        b = torch.randn(K, N, device=DEV, generator=gen).to(dtype)
    return a, b


def _nan(shape, dtype=torch.bfloat16):
    return torch.full(shape, float("nan"), device=DEV, dtype=dtype)


def _rel_fro(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def _run_pair(plan, a, b, *, counters=True, config=None, residual=None, residual_block=0,
              full_tiles=False):
    """Kernel and reference on NaN-poisoned ``[M, N]`` destinations; (out, ref, counts)."""
    M, N = a.shape[0], b.shape[1]
    cfg = plan.config
    table = _table(plan)
    out, ref = _nan((M, N), a.dtype), _nan((M, N), a.dtype)
    cnt = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32) if counters else None
    rows = plan.problem.rows_per_block
    sg.signal_gemm(a, b, out, step_table=table, block_m=cfg.block_m, block_n=cfg.block_n,
                   num_ctas=cfg.num_ctas, counters=cnt, residual=residual,
                   residual_block=residual_block, rows_per_block=rows, config=config,
                   full_tiles=full_tiles)
    sg.signal_gemm_ref(a, b, ref, table, residual=residual, residual_block=residual_block,
                       rows_per_block=rows)
    return out, ref, cnt


def _check(out, ref, what):
    assert torch.equal(out.isnan(), ref.isnan()), f"{what}: written rows differ"
    assert not ref.isnan().any(), f"{what}: the plan leaves rows unwritten"
    assert _rel_fro(out, ref) <= 1e-2, what


SHAPES = [(1, 1, 1), (7, 300, 33), (127, 255, 63), (513, 1031, 777), (1000, 3000, 1536),
          (2048, 2304, 1024), (4096, 4096, 512)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("b_trans", [False, True], ids=["b_kn", "b_nk_T"])
def test_matches_matmul(dtype, b_trans):
    """AllReduce plans (dest_row = row): the destination is the product itself."""
    gen = torch.Generator(device=DEV).manual_seed(0)
    rng = random.Random(1)
    shapes = SHAPES + [(rng.randint(1, 3000), rng.randint(1, 3000), rng.randint(1, 2000))
                       for _ in range(4)]
    for M, N, K in shapes:
        plan = _plan(M, N, K, group_m=rng.choice([1, 2, 8]), dtype=str(dtype)[6:])
        a, b = _operands(M, N, K, dtype, b_trans, gen)
        out, ref, cnt = _run_pair(plan, a, b)
        _check(out, ref, (M, N, K))
        assert cnt.tolist() == plan.group_tile_counts.tolist()
        assert _rel_fro(out, a.float() @ b.float()) <= 1e-2, (M, N, K)


@pytest.mark.parametrize("world,bands", [(2, None), (4, (1, 3, 1)), (3, (4, 1))])
def test_packed_reduce_scatter_layout(world, bands):
    """ReduceScatter plans: group g's rows of every block, packed by block, at send rows
    [W*lo_g, W*hi_g); unpacking them gives the plain product bitwise (same tiles, so the
    same arithmetic -- without the split last wave, which splits different tiles of the two
    plans), for every rank's block."""
    config = dataclasses.replace(default_config(DEV, torch.bfloat16), split_tail=False)
    rows = 4 * BM + 40  # a short edge tile at the end of every block
    M, N, K = rows * world, 1500, 777
    group_m = 1  # 5 bands of one tile row per block
    base = _plan(M, N, K, world=world, op="reduce_scatter", num_ctas=37, group_m=group_m)
    if bands is not None:
        assert sum(bands) == num_bands_for(base.problem, base.config)
    plan = _plan(M, N, K, world=world, op="reduce_scatter", num_ctas=37, group_m=group_m,
                 group_bands=bands)
    a, b = _operands(M, N, K, torch.bfloat16, True)
    send, ref, cnt = _run_pair(plan, a, b, config=config)
    _check(send, ref, "packed")
    assert cnt.tolist() == plan.group_tile_counts.tolist()
    # The same tiles in the identity layout, per block: a W=1 plan of each block's rows.
    for r in range(world):
        block_plan = _plan(rows, N, K, num_ctas=37, group_m=group_m)
        plain = _nan((rows, N))
        sg.signal_gemm(a[r * rows:(r + 1) * rows], b, plain, step_table=_table(block_plan),
                       block_m=BM, block_n=BN, num_ctas=37, config=config)
        parts = [send[s.send_lo + r * s.recv_rows: s.send_lo + (r + 1) * s.recv_rows]
                 for s in plan.spans()]
        assert torch.equal(torch.cat(parts), plain), f"rank {r}"


@pytest.mark.parametrize("world,op", [(1, "all_reduce"), (2, "reduce_scatter"),
                                      (3, "reduce_scatter")])
def test_residual_epilogue(world, op):
    """residual= adds to block ``residual_block`` only, before the one rounding; the other
    blocks are bitwise the no-residual run."""
    rows, N, K = 700, 1000, 512
    M = rows * world
    plan = _plan(M, N, K, world=world, op=op, num_ctas=SMS - 8, group_m=2)
    a, b = _operands(M, N, K, torch.bfloat16, False)
    residual = torch.randn(rows, N, device=DEV, dtype=torch.bfloat16)
    plain, _, _ = _run_pair(plan, a, b)
    for block in range(world):
        out, ref, _ = _run_pair(plan, a, b, residual=residual, residual_block=block)
        _check(out, ref, f"block {block}")
        for s in plan.spans():
            for k in range(world):
                lo = s.send_lo + k * s.recv_rows
                got, want = out[lo:lo + s.recv_rows], plain[lo:lo + s.recv_rows]
                if k != block:
                    assert torch.equal(got, want), (block, k, s.index)
                else:  # fp32 product + residual, one rounding: within bf16 of the reference
                    exact = (a[k * rows + s.recv_lo: k * rows + s.recv_hi].float() @ b.float()
                             + residual[s.recv_lo:s.recv_hi].float())
                    assert _rel_fro(got, exact) <= 1e-2


@pytest.mark.parametrize("which", ["sm90_pointer_loads", "sm80_default"])
def test_fallback_paths_compile_and_match(which):
    """The non-TMA path (unaligned operands, sm_80) compiled here: sm_90's tile with pointer
    loads, and the whole sm_80 configuration (its own tile shape, no TMA, no flattening)."""
    from flashoverlap.kernels import GemmConfig, config_for_capability

    config = (GemmConfig(use_tma=False) if which == "sm90_pointer_loads"
              else config_for_capability((8, 0), torch.bfloat16))
    gen = torch.Generator(device=DEV).manual_seed(3)
    for M, N, K, b_trans, world, op in ((1000, 3000, 1536, False, 1, "all_reduce"),
                                        (513, 1031, 777, True, 1, "all_reduce"),
                                        (4096, 4096, 512, True, 2, "reduce_scatter")):
        plan = _plan(M, N, K, world=world, op=op, num_ctas=SMS - 8, group_m=4,
                     block=(config.block_m, config.block_n))
        a, b = _operands(M, N, K, torch.bfloat16, b_trans, gen)
        assert not sg.uses_tma(a, b, config)
        out, ref, cnt = _run_pair(plan, a, b, config=config)
        _check(out, ref, (M, N, K))
        assert cnt.tolist() == plan.group_tile_counts.tolist()


def _launcher_three_calls(M, N, K, full_tiles=False):
    """A SignalGemmLauncher called three times with the same signature: the first call
    through the JIT, the others direct; same bits, counters 3x, one cached entry."""
    from flashoverlap.kernels import direct_launch

    plan = _plan(M, N, K, num_ctas=SMS - 16, group_m=2)
    counters = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
    launcher = sg.SignalGemmLauncher(_table(plan), counters, block_m=BM, block_n=BN,
                                     num_ctas=plan.config.num_ctas,
                                     rows_per_block=plan.problem.rows_per_block,
                                     full_tiles=full_tiles)
    a, b = _operands(M, N, K, torch.bfloat16, True)
    outs = []
    for _ in range(3):
        out = _nan((M, N))
        launcher(a, b, out, stream=torch.cuda.current_stream())
        outs.append(out)
    torch.cuda.synchronize()
    assert counters.tolist() == (3 * plan.group_tile_counts).tolist()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert _rel_fro(outs[2], a.double() @ b.double()) <= 1e-2
    if direct_launch.ENABLED:
        assert len(launcher._entries) == 1
    return plan, launcher, counters, a, b, outs


def test_launcher_reuses_compiled_kernels():
    """SignalGemmLauncher: first call through the JIT, later calls direct; same bits."""
    _launcher_three_calls(2000, 3000, 1024)


@pytest.mark.parametrize("full_tiles", [False, True], ids=["pipelined", "warp_specialized"])
def test_launcher_without_counters_keeps_calls_with_and_without_apart(full_tiles):
    """A launcher without counters of its own, called with counters= and then without: the
    second call must not reuse the first's counting kernel (whose counter argument would be
    the step table)."""
    M, N, K = 1024, 1024, 512
    plan = _plan(M, N, K, num_ctas=SMS - 16, group_m=2)
    table = _table(plan)
    before = table.clone()
    launcher = sg.SignalGemmLauncher(table, None, block_m=BM, block_n=BN,
                                     num_ctas=plan.config.num_ctas, full_tiles=full_tiles)
    a, b = _operands(M, N, K, torch.bfloat16, False)
    counters = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
    for bump in (True, False, False, True):
        out = _nan((M, N))
        launcher(a, b, out, counters=counters if bump else None)
        torch.cuda.synchronize()
        assert _rel_fro(out, a.double() @ b.double()) <= 1e-2
    assert torch.equal(table, before)
    assert counters.tolist() == (2 * plan.group_tile_counts).tolist()


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split_tail"])
def test_compiled_epilogue_orders_stores_before_release(split):
    """PTX: every tile's global stores, then a CTA barrier, then one release atomic; with a
    split last wave also each part's stores, a barrier, then the acq_rel ticket (the ticket's
    re-arm is the one relaxed exchange)."""
    M, N, K = 1024, 1024, 512  # 32 tiles on 132 CTAs: a single wave, split in 2
    plan = _plan(M, N, K)
    a, b = _operands(M, N, K, torch.bfloat16, False)
    out = torch.empty(M, N, device=DEV, dtype=torch.bfloat16)
    counters = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
    config = _split_config(split_tail=split)
    grid, args, meta = sg._launch_args(a, b, out, _table(plan), BM, BN, plan.config.num_ctas,
                                       counters, None, 0, None, config)
    assert meta["SPLIT_TAIL"] is split
    kernel = sg._jit_launch(grid, args, meta)
    torch.cuda.synchronize()
    assert torch.equal(counters.cpu(), torch.tensor(plan.group_tile_counts, dtype=torch.int32))
    ptx = kernel.asm["ptx"].splitlines()
    atoms = [i for i, line in enumerate(ptx) if re.search(r"\b(atom|red)\.", line)]
    barriers = [i for i, line in enumerate(ptx) if re.search(r"\b(bar|barrier)\.sync", line)]
    assert atoms, "no counter update"
    exchanges = [i for i in atoms if ".exch" in ptx[i]]
    assert len(exchanges) == (1 if split else 0)
    assert any("acq_rel" in ptx[i] for i in atoms) is split
    for i in atoms:  # the epilogue may be emitted more than once (loop peeling)
        if i in exchanges:
            continue
        assert ("release" in ptx[i] or "acq_rel" in ptx[i]) and ".gpu" in ptx[i], ptx[i]
        stores = [j for j, line in enumerate(ptx[:i]) if "st.global" in line]
        assert stores, "epilogue must use pointer stores"
        assert any(stores[-1] < j < i for j in barriers), "no CTA barrier before the release"
    assert not any("cp.async.bulk.global.shared" in line for line in ptx), "TMA store"
    if torch.cuda.get_device_capability(DEV)[0] >= 9 and config.use_tma:
        assert sg.uses_tma(a, b, config)
        assert any("cp.async.bulk.tensor" in line for line in ptx), "TMA loads expected"


@pytest.mark.parametrize("M,N,K", [(16384, 8192, 2048), (6144, 3072, 8192), (1024, 1024, 4104),
                                   (1000, 1024, 4096)],
                         ids=["4-parts", "2-parts", "single-wave", "partial-tiles"])
@pytest.mark.parametrize("b_trans", [False, True], ids=["b_kn", "b_nk_T"])
@pytest.mark.parametrize("kernel", ["pipelined", "warp_specialized"])
def test_split_last_wave_matches_matmul_and_is_deterministic(M, N, K, b_trans, kernel):
    """Shapes whose last wave is split along K (kernels.tail_split) on all SMs: right against
    fp32 matmul, counters at the tile counts, bitwise the same over launches (the parts are
    summed in order), and close to the same kernel without the split -- in the pipelined
    kernel and, for whole tiles on sm_90, the warp-specialized one (K = 4104: the last K step
    is partial, TMA fills it with zeros)."""
    plan = _plan(M, N, K)
    config = _split_config()
    assert tail_split(plan.step_table.shape[0], SMS, -(-K // config.block_k), 0)[1] > 1
    full_tiles = kernel == "warp_specialized"
    if full_tiles:
        if not plan.full_tiles:
            pytest.skip("partial tiles run the pipelined kernel")
        if not ws.HAVE_GLUON or torch.cuda.get_device_capability(DEV) != (9, 0):
            pytest.skip("the warp-specialized kernel is sm_90 + Gluon only")
    got, ref, exact = _three_launches_against_plain(
        plan, b_trans, config, dataclasses.replace(config, split_tail=False), full_tiles)
    assert _rel_fro(got, ref) <= 1e-2 and _rel_fro(ref, exact) <= 1e-2


def _three_launches_against_plain(plan, b_trans, config, plain_config, full_tiles=False):
    """Three launches of a ``config`` launcher on the plan's CTAs (NaN-poisoned outputs) and one
    of a ``plain_config`` launcher: counters at 3x the tile counts, the three results bitwise
    equal, fully written and within 1e-2 of fp32 matmul, the split tickets left zero.
    Returns (result, plain, exact)."""
    M, N, K = plan.problem.M, plan.problem.N, plan.problem.K
    counters = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
    kwargs = dict(block_m=plan.config.block_m, block_n=plan.config.block_n,
                  num_ctas=plan.config.num_ctas, rows_per_block=plan.problem.rows_per_block,
                  full_tiles=full_tiles)
    launcher = sg.SignalGemmLauncher(_table(plan), counters, config=config, **kwargs)
    plain = sg.SignalGemmLauncher(_table(plan), None, config=plain_config, **kwargs)
    a, b = _operands(M, N, K, torch.bfloat16, b_trans)
    outs = []
    for _ in range(3):
        out = _nan((M, N))
        launcher(a, b, out, stream=torch.cuda.current_stream())
        outs.append(out)
    ref = _nan((M, N))
    plain(a, b, ref, stream=torch.cuda.current_stream())
    torch.cuda.synchronize()
    assert (ws.eligible(a, b, outs[0], config, None, full_tiles)
            == (full_tiles and plan.full_tiles))
    assert counters.tolist() == (3 * plan.group_tile_counts).tolist()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert not outs[2].isnan().any()
    if launcher.tail_scratch is not None:
        assert not launcher.tail_scratch[1].any(), "split tickets not re-armed"
    exact = a.float() @ b.float()
    assert _rel_fro(outs[2], exact) <= 1e-2
    return outs[2], ref, exact


@pytest.mark.parametrize("regs", [168, 200])
def test_max_registers_caps_the_kernel_and_keeps_it_right(regs):
    """GemmConfig.max_registers (Triton's maxnreg): the compiled kernel uses at most that many
    registers, and three launches are right, deterministic and counted like the default."""
    M, N, K = 4096, 2048, 1024
    plan = _plan(M, N, K)
    base = default_config(DEV, torch.bfloat16)
    config = dataclasses.replace(base, max_registers=regs)
    a, b = _operands(M, N, K, torch.bfloat16, False)
    out = _nan((M, N))
    grid, args, meta = sg._launch_args(a, b, out, _table(plan), BM, BN, SMS, None, None, 0,
                                       None, config)
    assert meta["maxnreg"] == regs
    kernel = sg._jit_launch(grid, args, meta)
    assert 0 < kernel.n_regs <= regs
    _three_launches_against_plain(plan, False, config, base)


def test_cuda_graph_capture():
    M, N, K = 1000, 1500, 512
    plan = _plan(M, N, K, world=2, op="reduce_scatter", group_m=1)
    a, b = _operands(M, N, K, torch.bfloat16, False)
    table = _table(plan)
    residual = torch.randn(M // 2, N, device=DEV, dtype=torch.bfloat16)
    out = torch.empty(M, N, device=DEV, dtype=torch.bfloat16)
    counters = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)

    def step():
        counters.zero_()
        sg.signal_gemm(a, b, out, step_table=table, block_m=BM, block_n=BN,
                       num_ctas=plan.config.num_ctas, counters=counters, residual=residual,
                       residual_block=1, rows_per_block=M // 2)

    side = torch.cuda.Stream()  # warm up (compile) outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(2):
        a.copy_(torch.randn_like(a))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert counters.tolist() == plan.group_tile_counts.tolist()
        ref = _nan((M, N))
        sg.signal_gemm_ref(a, b, ref, table, residual=residual, residual_block=1,
                           rows_per_block=M // 2)
        _check(out, ref, "graph replay")


# --------------------------------------------------------------------------------------
# The warp-specialized kernel (sm_90, whole tiles): flashoverlap/kernels/ws_signal_gemm.py
# --------------------------------------------------------------------------------------

ws = sg.ws_signal_gemm
needs_ws = pytest.mark.skipif(
    not ws.HAVE_GLUON or torch.cuda.get_device_capability(DEV) != (9, 0),
    reason="the warp-specialized kernel is sm_90 + Gluon only")


def _ws_runs(plan, a, b, out, config=None, residual=None):
    cfg = config or default_config(DEV, a.dtype)
    return ws.eligible(a, b, out, cfg, residual, plan.full_tiles)


@needs_ws
@pytest.mark.parametrize("half_c", [False, True], ids=["whole_c", "half_c_4stages"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("b_trans", [False, True], ids=["b_kn", "b_nk_T"])
def test_ws_kernel_matches_matmul(dtype, b_trans, half_c):
    """Whole-tile AllReduce plans run the WS kernel: product (fp64 reference), every element
    written, counters at their targets; K not a multiple of BLOCK_K (TMA zero fill).
    ``half_c``: the half-width C buffer (two stores a tile) and a fourth stage."""
    config = dataclasses.replace(default_config(DEV, dtype), epilogue_subtile=half_c,
                                 num_stages=4 if half_c else 3)
    assert ws.stages_for(config, 2) == config.num_stages
    gen = torch.Generator(device=DEV).manual_seed(5)
    for M, N, K, P, group_m in ((128, 256, 64, SMS, 1), (1024, 768, 1000, 7, 2),
                                (2048, 2304, 520, SMS - 16, 8), (4096, 1024, 2056, SMS, 4)):
        plan = _plan(M, N, K, num_ctas=P, group_m=group_m, dtype=str(dtype)[6:])
        assert plan.full_tiles
        a, b = _operands(M, N, K, dtype, b_trans, gen)
        out, ref, cnt = _run_pair(plan, a, b, full_tiles=True, config=config)
        assert _ws_runs(plan, a, b, out, config), (M, N, K)
        _check(out, ref, (M, N, K))
        assert cnt.tolist() == plan.group_tile_counts.tolist()
        assert _rel_fro(out, a.double() @ b.double()) <= 1e-2, (M, N, K)


@needs_ws
@pytest.mark.parametrize("M,N,K,P", [(2048, 4096, 512, SMS - 16), (1024, 1024, 4104, SMS),
                                     (4096, 1024, 1000, 7)],
                         ids=["p116-2-parts", "single-wave", "7-ctas"])
@pytest.mark.parametrize("b_trans", [False, True], ids=["b_kn", "b_nk_T"])
def test_ws_kernel_128x128_tiles_match_matmul(M, N, K, P, b_trans):
    """The 128 x 128 tile on the warp-specialized kernel (what ``wave_tile_rule`` picks for
    small problems, 5 stages): taken by ``eligible``, every element written, counters at 3x
    their targets, bitwise the same over launches, within 1e-2 of fp32 matmul -- with the
    split last wave where the wave leaves room for one (all splits allowed here) and against
    the same tile without it."""
    plan = _plan(M, N, K, num_ctas=P, group_m=4, block=(128, 128))
    assert plan.full_tiles
    config = _split_config(block_n=128, num_stages=5)
    assert ws.stages_for(config, 2) == 5
    _three_launches_against_plain(plan, b_trans, config,
                                  dataclasses.replace(config, split_tail=False), True)


@needs_ws
def test_plan_tile_without_config_runs_its_measured_stages():
    """What the engine launches for a 128 x 128 plan (``config=None``: the device default with
    the plan's tile, kernels.config_for_tile): the warp-specialized kernel with 5 stages,
    right against matmul."""
    M, N, K = 2048, 4096, 1024
    plan = _plan(M, N, K, num_ctas=SMS - 16, group_m=16, block=(128, 128))
    a, b = _operands(M, N, K, torch.bfloat16, True)
    out = _nan((M, N))
    counters = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
    fn, jit, *launch = sg._choose_launch(a, b, out, _table(plan), 128, 128, SMS - 16, counters,
                                         None, 0, None, None, plan.full_tiles)
    assert fn is ws.kernel() and launch[2]["STAGES"] == 5 and launch[2]["BLOCK_N"] == 128
    out2, ref, cnt = _run_pair(plan, a, b, full_tiles=True)
    _check(out2, ref, "128x128 default")
    assert cnt.tolist() == plan.group_tile_counts.tolist()
    assert _rel_fro(out2, a.double() @ b.double()) <= 1e-2


@needs_ws
@pytest.mark.parametrize("world", [2, 4])
def test_ws_kernel_packed_reduce_scatter_layout(world):
    """ReduceScatter plans whose blocks are whole tiles: the packed send buffer unpacks to the
    pipelined kernel's product (same tiles, different kernels: within bf16 rounding)."""
    rows = 3 * BM
    M, N, K = rows * world, 2 * BN, 776
    plan = _plan(M, N, K, world=world, op="reduce_scatter", num_ctas=37, group_m=1)
    assert plan.full_tiles
    a, b = _operands(M, N, K, torch.bfloat16, True)
    send, ref, cnt = _run_pair(plan, a, b, full_tiles=True)
    assert _ws_runs(plan, a, b, send)
    _check(send, ref, "packed")
    assert cnt.tolist() == plan.group_tile_counts.tolist()
    for r in range(world):
        parts = [send[s.send_lo + r * s.recv_rows: s.send_lo + (r + 1) * s.recv_rows]
                 for s in plan.spans()]
        want = a[r * rows:(r + 1) * rows].double() @ b.double()
        assert _rel_fro(torch.cat(parts), want) <= 1e-2, f"rank {r}"


@needs_ws
def test_ws_kernel_not_taken_where_it_cannot_run():
    """Partial tiles, a residual, full_tiles not claimed, or the option off: the pipelined
    kernel runs (and is right)."""
    cfg = default_config(DEV, torch.bfloat16)
    partial = _plan(1000, 768, 512)
    whole = _plan(1024, 768, 512)
    assert not partial.full_tiles and whole.full_tiles
    a, b = _operands(1024, 768, 512, torch.bfloat16, False)
    out = _nan((1024, 768))
    res = torch.randn(1024, 768, device=DEV, dtype=torch.bfloat16)
    assert ws.eligible(a, b, out, cfg, None, True)
    assert not ws.eligible(a, b, out, cfg, None, False)
    assert not ws.eligible(a, b, out, cfg, res, True)
    assert not ws.eligible(a, b, out, dataclasses.replace(cfg, warp_specialized_kernel=False),
                           None, True)
    assert not ws.eligible(a[:, 1:], b[1:], out, cfg, None, True)  # 2-byte offset base
    assert not ws.eligible(a.float(), b.float(), out.float(), cfg, None, True)
    assert ws.eligible(a, b, out, dataclasses.replace(cfg, block_n=128), None, True)
    assert not ws.eligible(a, b, out, dataclasses.replace(cfg, block_n=64), None, True)
    assert not ws.eligible(a, b, out, dataclasses.replace(cfg, block_m=64), None, True)
    assert not ws.eligible(a, b, out, dataclasses.replace(cfg, use_tma=False), None, True)
    assert not ws.eligible(a, b, out, dataclasses.replace(cfg, max_registers=200), None, True)
    a2, b2 = _operands(1000, 768, 512, torch.bfloat16, False)
    out2, ref2, cnt2 = _run_pair(partial, a2, b2, full_tiles=False)
    _check(out2, ref2, "partial tiles")
    assert cnt2.tolist() == partial.group_tile_counts.tolist()


@needs_ws
def test_ws_launcher_direct_launch_and_graph():
    """SignalGemmLauncher with full_tiles: the WS kernel through the JIT, then directly, then
    captured in a CUDA graph and replayed; same bits, counters 3 + 2 launches."""
    from flashoverlap.kernels import direct_launch

    M, N, K = 2048, 1536, 1024
    plan, launcher, counters, a, b, outs = _launcher_three_calls(M, N, K, full_tiles=True)
    assert plan.full_tiles and _ws_runs(plan, a, b, outs[0])
    if direct_launch.ENABLED:
        entry = next(iter(launcher._entries._kernels.values()))
        assert entry[0].metadata.num_warps == 12  # 8 MMA warps + a warpgroup for 2 workers
    graph_out = _nan((M, N))
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph, stream=side):
            launcher(a, b, graph_out)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        graph_out.fill_(float("nan"))
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_out, outs[0])
    assert counters.tolist() == (5 * plan.group_tile_counts).tolist()


@needs_ws
@pytest.mark.parametrize("b_trans", [False, True], ids=["b_kn", "b_nk_T"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split_tail"])
@pytest.mark.parametrize("block", [(BM, BN), (128, 128)], ids=["default_tile", "128x128"])
def test_ws_compiled_signal_follows_the_bulk_store(b_trans, split, block):
    """PTX of the launched kernel: the storer's bulk tensor stores, then (in one block)
    cp.async.bulk.wait_group 0, fence.proxy.async.global, bar.warp.sync and the release;
    with a split last wave (32 tiles on 132 CTAs: 2 parts each) a second release, the split
    tiles' (after their warp's stores and the acq_rel count of finished warps); 128 x 128
    tiles: 64 on 132 CTAs, 2 parts each."""
    M, N, K = 1024, 1024, 512
    plan = _plan(M, N, K, block=block)
    a, b = _operands(M, N, K, torch.bfloat16, b_trans)
    out = _nan((M, N))
    counters = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
    cfg = _split_config(split_tail=split, block_m=block[0], block_n=block[1])
    fn, jit, *launch = sg._choose_launch(a, b, out, _table(plan), *block, SMS, counters, None,
                                         0, None, cfg, plan.full_tiles)
    assert fn is ws.kernel() and launch[2]["SPLIT_TAIL"] is split
    ptx = jit(*launch).asm["ptx"]
    torch.cuda.synchronize()
    assert counters.tolist() == plan.group_tile_counts.tolist()
    assert _rel_fro(out, a.double() @ b.double()) <= 1e-2
    order = [ptx.find(x) for x in ("cp.async.bulk.tensor.2d.global.shared",
                                   "cp.async.bulk.wait_group 0;", "fence.proxy.async.global",
                                   "bar.warp.sync -1", "red.release.gpu.global.add")]
    assert all(i >= 0 for i in order) and order == sorted(order), order
    assert len(re.findall(r"red\.release\.gpu", ptx)) == (2 if split else 1)
    assert len(re.findall(r"atom\.acq_rel\.gpu", ptx)) == (2 if split else 0)


# --------------------------------------------------------------------------------------
# Signal-ordering stress test
# --------------------------------------------------------------------------------------


def _random_case(rng: random.Random, whole_tiles: bool, block_n: int = BN):
    """Many small bands: group_m 1-2, mostly one group per band; small N (cheap copies),
    K up to 1024 (a band takes a while), P from all-but-two SMs down to a few CTAs.
    ``whole_tiles``: every row block and N whole ``BM x block_n`` tiles, K TMA-aligned (on
    sm_90 the warp-specialized kernel runs these)."""
    world = rng.choice([1, 1, 2, 4])
    op = "all_reduce" if world == 1 else "reduce_scatter"
    if whole_tiles:
        M = rng.randint(1, 16384 // (world * BM)) * BM * world
        N = rng.randint(1, 1024 // block_n) * block_n
        K = rng.randrange(8, 1025, 8)
    else:
        M = rng.randint(1, 16384 // world) * world
        N = rng.choice([rng.randint(1, 1024), rng.randrange(8, 1025, 8)])
        # Half the calls TMA-aligned K (multiple of 8), half odd K (pointer path).
        K = rng.randrange(8, 1025, 8) if rng.random() < 0.5 else rng.randrange(1, 1025, 2)
    P = rng.choice([SMS - 2, (SMS - 2) // 2, 24, 8])
    group_m = rng.choice([1, 1, 2])
    return M, N, K, world, op, P, group_m


def _group_bands(rng: random.Random, bands: int):
    if rng.random() < 0.6:
        return None  # one group per band: the most groups
    cuts = sorted(rng.sample(range(1, bands), k=min(bands - 1, rng.randint(0, 12))))
    return tuple(b - a for a, b in zip([0, *cuts], [*cuts, bands]))


def _warm_up_kernels(consumer: torch.cuda.Stream) -> None:
    """Launch every kernel the loop uses once, with nothing pending.

    CUDA lazy loading may synchronize the context at a kernel's first launch; a first
    launch of the GEMM while the consumer spins on its counters would wait for the consumer,
    which waits for the GEMM (stream_wait's module docstring).  K = 512/511 compile the
    variants with a split last wave (one tile on 4 CTAs: 2 parts of 4 K steps); the last four
    cases are whole tiles (the warp-specialized kernel on sm_90), without and with a split, in
    both tiles."""
    torch.cuda._sleep(100)
    cases = [(40, N, K, BN) for K in (64, 63, 512, 511) for N in (64, 63)]
    cases += [(BM, bn, K, bn) for bn in (BN, 128) for K in (64, 512)]
    for b_trans in (False, True):
        for M, N, K, bn in cases:
            plan = _plan(M, N, K, num_ctas=4, group_m=1, block=(BM, bn))
            a, b = _operands(M, N, K, torch.bfloat16, b_trans)
            out = _nan((M, N))
            cnt = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
            sg.signal_gemm(a, b, out, step_table=_table(plan), block_m=BM, block_n=bn,
                           num_ctas=4, counters=cnt, config=_stress_config(bn),
                           full_tiles=plan.full_tiles)
            targets = torch.tensor(plan.group_tile_counts, device=DEV, dtype=torch.int32)
            bounds = torch.tensor([s.send_lo for s in plan.spans()] + [M], device=DEV,
                                  dtype=torch.int64)
            snap = torch.ones_like(out)
            spins = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
            main = torch.cuda.current_stream()
            consumer.wait_stream(main)
            with torch.cuda.stream(consumer):
                wait_and_snapshot[(1,)](cnt, targets, bounds[:-1], bounds[1:], out, snap,
                                        spins, plan.num_groups, N, 1 << 22, BLOCK=4096,
                                        num_warps=8)
            main.wait_stream(consumer)
            _ = (snap.view(torch.int16) != out.view(torch.int16)).sum()
    torch.cuda.synchronize()


def _stress_config(block_n):
    return STRESS_CONFIG if block_n == BN else STRESS_CONFIG_128


def _load_variant_first(a, b, dest, table, P, counters, full_tiles, loaded: set,
                        block_n=BN) -> None:
    """Launch a call's kernel variant once, with nothing else running, the first time the
    loop meets it; then re-poison ``dest``.

    Triton loads a variant's module at its first launch, and loading may wait for the running
    kernels -- the consumer, which spins on counters of the GEMM that cannot start: its waits
    time out (the stress test failed so in ``sk-run1`` and ``wssplit-run5``, both times on a
    variant the fixed warm-up list had not loaded; which calls meet a variant first changes
    with every change to which kernel a plan runs).  The variant is what the compiled kernel
    is specialized on: the kernel, its constexprs and the operands' 16-byte alignment."""
    config = _stress_config(block_n)
    fn, _, _, _, meta = sg._choose_launch(a, b, dest, table, BM, block_n, P, counters, None, 0,
                                          None, config, full_tiles)
    key = (fn, tuple(sorted(meta.items())),
           tuple(t.data_ptr() % 16 == 0 for t in (a, b, dest)))
    if key in loaded:
        return
    loaded.add(key)
    sg.signal_gemm(a, b, dest, step_table=table, block_m=BM, block_n=block_n, num_ctas=P,
                   counters=torch.zeros_like(counters), config=config, full_tiles=full_tiles)
    torch.cuda.synchronize()
    dest.fill_(float("nan"))


def test_signal_ordering_stress():
    target_groups = int(os.environ.get(STRESS_ENV, "100000"))
    rng = random.Random(1234)
    gen = torch.Generator(device=DEV).manual_seed(1234)
    compute = torch.cuda.current_stream()
    high = min(torch.cuda.Stream.priority_range())  # (least, greatest); lower = higher
    consumer = torch.cuda.Stream(priority=high)
    _warm_up_kernels(consumer)
    max_calls = 200_000
    # Per-call results stay on the device (no host sync per call): torn elements, groups
    # whose wait timed out, counters off target, groups that spun before their count.
    torn = torch.zeros(max_calls, device=DEV, dtype=torch.int64)
    timeouts = torch.zeros(max_calls, device=DEV, dtype=torch.int64)
    bad_counts = torch.zeros(max_calls, device=DEV, dtype=torch.int64)
    spun = torch.zeros(max_calls, device=DEV, dtype=torch.int64)
    cases = []
    groups_checked = calls = split_calls = ws_calls = ws_split_calls = ws_128_calls = 0
    loaded: set = set()  # kernel variants launched once already (_load_variant_first)
    block_k = STRESS_CONFIG.block_k
    start = time.perf_counter()

    def verify(upto: int) -> None:
        bad = (torn[:upto] > 0) | (timeouts[:upto] > 0) | (bad_counts[:upto] > 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            pytest.fail(f"call {i} {cases[i]}: {int(torn[i])} elements read before they were "
                        f"final, {int(timeouts[i])} waits timed out, {int(bad_counts[i])} "
                        f"counters off target")

    while groups_checked < target_groups and calls < max_calls:
        whole = calls % 3 == 2
        # half the whole-tile calls take 128 x 128 tiles, in both B layouts (calls % 2)
        bn = 128 if whole and (calls // 3) % 4 in (1, 2) else BN
        config = _stress_config(bn)
        M, N, K, world, op, P, group_m = _random_case(rng, whole_tiles=whole, block_n=bn)
        problem = Problem(M, N, K, "bfloat16", world, op)
        base = PlanConfig(block_m=BM, block_n=bn, num_ctas=P, group_m=group_m)
        bands = _group_bands(rng, num_bands_for(problem, base))
        plan = make_plan(problem, PlanConfig(block_m=BM, block_n=bn, num_ctas=P,
                                             group_m=group_m, group_bands=bands))
        b_trans = calls % 2 == 1
        a, b = _operands(M, N, K, torch.bfloat16, b_trans, gen)
        table = _table(plan)
        k_tiles = -(-K // block_k)
        targets = torch.tensor(plan.group_tile_counts, dtype=torch.int32).to(DEV)
        spans = plan.spans()
        bounds = torch.tensor([s.send_lo for s in spans] + [spans[-1].send_hi],
                              dtype=torch.int64).to(DEV)
        dest = _nan((M, N))
        on_ws = sg.ws_signal_gemm.eligible(a, b, dest, config, None, plan.full_tiles)
        split = tail_split(table.shape[0], P, k_tiles, 0)[1] > 1  # both kernels split alike
        ws_calls += on_ws
        ws_128_calls += on_ws and bn == 128
        split_calls += split
        ws_split_calls += on_ws and split
        snap = torch.ones_like(dest)
        counters = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
        spins = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
        _load_variant_first(a, b, dest, table, P, counters, plan.full_tiles, loaded, bn)
        ready = torch.cuda.Event()
        ready.record(compute)

        delay = calls % 3  # 0: nothing delayed, 1: consumer delayed, 2: GEMM delayed
        with torch.cuda.stream(consumer):  # launched first, so it really waits
            consumer.wait_event(ready)
            if delay == 1:
                torch.cuda._sleep(rng.randint(1_000, 100_000))
            wait_and_snapshot[(1,)](counters, targets, bounds[:-1], bounds[1:], dest, snap,
                                    spins, plan.num_groups, N, 1 << 22, BLOCK=4096,
                                    num_warps=8)
        if delay == 2:
            torch.cuda._sleep(rng.randint(1_000, 100_000))
        sg.signal_gemm(a, b, dest, step_table=table, block_m=BM, block_n=bn, num_ctas=P,
                       counters=counters, config=config, full_tiles=plan.full_tiles)
        compute.wait_stream(consumer)
        torn[calls] = (snap.view(torch.int16) != dest.view(torch.int16)).sum()
        timeouts[calls] = (spins < 0).sum()
        bad_counts[calls] = (counters != targets).sum()
        spun[calls] = (spins > 0).sum()
        cases.append(dict(M=M, N=N, K=K, W=world, P=P, group_m=group_m, bands=bands,
                          b_trans=b_trans, delay=delay, block_n=bn))
        if calls % 200 == 0:  # and the buffer itself is right
            ref = _nan((M, N))
            sg.signal_gemm_ref(a, b, ref, table)  # (the table carries the tile's bounds)
            if plan.full_tiles:  # (the reference writes exactly the plan's tiles)
                assert not ref.isnan().any()
            _check(dest, ref, f"call {calls}")
            verify(calls + 1)
        groups_checked += plan.num_groups
        calls += 1
    torch.cuda.synchronize()
    verify(calls)
    waited = int(spun[:calls].sum())
    elapsed = time.perf_counter() - start
    print(f"\nstress: {calls} calls, {groups_checked} group checks, 0 torn reads, "
          f"{waited} groups waited for their count, {split_calls} calls with a split last "
          f"wave, {ws_calls} on the warp-specialized kernel ({ws_split_calls} of them split, "
          f"{ws_128_calls} with 128 x 128 tiles) ({elapsed:.1f} s)")
    assert groups_checked >= target_groups
    assert waited >= calls // 10, "the consumer almost never waited: test too weak"
    assert split_calls >= calls // 10, "too few split last waves: test too weak"
    assert ws_split_calls >= ws_calls // 10, "too few split warp-specialized calls"
    if ws_calls:
        assert ws_128_calls >= ws_calls // 3, "too few 128 x 128 warp-specialized calls"
