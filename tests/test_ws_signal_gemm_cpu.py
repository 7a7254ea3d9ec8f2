"""The warp-specialized signal GEMM without a GPU: when it is chosen, and its compiled signal.

``flashoverlap/kernels/ws_signal_gemm.py`` runs only on sm_90; here the choice
(``eligible``, ``Plan.full_tiles``, the shared-memory stage budget) is checked on CPU tensors,
and the kernel is compiled for sm_90 (Triton's bundled ptxas, no GPU needed) to check the
ordering of its signal in the PTX: the bulk tensor stores, ``cp.async.bulk.wait_group 0``
(writes performed, not just shared memory read), ``fence.proxy.async.global``,
``bar.warp.sync``, then exactly one ``red.release.gpu`` -- and none without counters; with a
split last wave, each warp's part stores before its ticket, the sum after it, and the tile's
release after the warp's stores and the count of finished warps.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from flashoverlap.kernels import GemmConfig, default_config
from flashoverlap.kernels import ws_signal_gemm as ws
from flashoverlap.plan import PlanConfig, Problem, make_plan
from sm90_ptx import sm90_ptx


def _plan(M, N, K, world=1, op="all_reduce", block=(128, 256), num_ctas=132):
    return make_plan(Problem(M, N, K, "bfloat16", world, op),
                     PlanConfig(block_m=block[0], block_n=block[1], num_ctas=num_ctas))


@pytest.mark.parametrize("M,N,world,op,whole", [
    (4096, 8192, 1, "all_reduce", True),
    (4000, 8192, 1, "all_reduce", False),      # last tile row cut short
    (4096, 8000, 1, "all_reduce", False),      # last tile column cut short
    (2 * 384, 512, 2, "reduce_scatter", True),  # blocks of 3 tile rows
    (2 * 400, 512, 2, "reduce_scatter", False),  # each block ends inside a tile
    (128, 256, 1, "all_reduce", True),
])
def test_full_tiles_means_every_step_is_a_whole_tile(M, N, world, op, whole):
    plan = _plan(M, N, 512, world, op)
    assert plan.full_tiles is whole
    t = plan.step_table
    sizes = set(zip((t[:, 1] - t[:, 0]).tolist(), (t[:, 3] - t[:, 2]).tolist()))
    assert (sizes == {(128, 256)}) is whole


def test_stage_budget_leaves_room_for_the_c_buffer():
    cfg = default_config(None, torch.bfloat16)  # sm_90: 128 x 256 x 64, 3 stages
    assert ws.stages_for(cfg, 2) == 3  # 3 x 48 KB + 64 KB C <= 227 KB
    assert ws.stages_for(dataclasses.replace(cfg, num_stages=6), 2) == 3  # capped
    assert ws.stages_for(dataclasses.replace(cfg, block_k=128, num_stages=4), 2) == 1
    assert ws.stages_for(dataclasses.replace(cfg, block_n=128, num_stages=8), 2) == 6
    half = dataclasses.replace(cfg, epilogue_subtile=True, num_stages=4)  # 4 x 48 + 32 KB
    assert ws.c_parts(half) == 2 and ws.stages_for(half, 2) == 4


def test_not_eligible_without_an_sm90_gpu():
    """CPU tensors (or the interpreter, or the option off) never take the Gluon kernel."""
    a = torch.randn(256, 64).to(torch.bfloat16)
    b = torch.randn(64, 256).to(torch.bfloat16)
    out = torch.empty(256, 256, dtype=torch.bfloat16)
    cfg = default_config(None, torch.bfloat16)
    assert cfg.warp_specialized_kernel is True
    assert not ws.eligible(a, b, out, cfg, None, True)
    assert not ws.eligible(a, b, out, dataclasses.replace(cfg, warp_specialized_kernel=False),
                           None, True)
    assert GemmConfig().warp_specialized_kernel


def _compile_sm90(b_trans: bool, counters: bool, parts: int = 1, split: bool = False,
                  wait_flags: bool = False) -> str:
    pytest.importorskip("triton")
    if not ws.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    const = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, STAGES=3 if parts == 1 else 4,
                 B_TRANS=b_trans, HAS_COUNTERS=counters, PART_N=256 // parts,
                 SPLIT_TAIL=split, WAIT_FLAGS=wait_flags)
    ptrs = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "step_ptr": "*i32",
            "counter_ptr": "*i32", "part_ptr": "*fp32", "ticket_ptr": "*i32",
            "flag_ptr": "*i32"}
    return sm90_ptx(ws.kernel(), ptrs, const, num_warps=ws.NUM_MMA_WARPS)


@pytest.mark.parametrize("parts", [1, 2], ids=["whole_c", "half_c"])
@pytest.mark.parametrize("b_trans", [False, True], ids=["b_kn", "b_nk_T"])
def test_compiled_signal_follows_the_completed_bulk_store(b_trans, parts):
    ptx = _compile_sm90(b_trans, counters=True, parts=parts)
    order = [ptx.find(x) for x in ("cp.async.bulk.tensor.2d.global.shared",
                                   "cp.async.bulk.wait_group 0;", "fence.proxy.async.global",
                                   "bar.warp.sync -1", "red.release.gpu.global.add")]
    assert all(i >= 0 for i in order) and order == sorted(order), order
    assert len(re.findall(r"red\.release\.gpu", ptx)) == 1
    assert len(re.findall(r"\batom\.", ptx)) == 0  # no other atomics (no split tail)
    # No CTA-wide barrier inside the partitions: a bar.sync 0 without a thread count would
    # wait for warps of other partitions that never reach it.
    assert not re.search(r"\bbar\.sync\s+0;", ptx)
    assert "wgmma.mma_async" in ptx and "setmaxnreg" in ptx


@pytest.mark.parametrize("parts", [1, 2], ids=["whole_c", "half_c"])
def test_every_mbarrier_arrive_follows_its_partitions_barrier(parts):
    """One thread arrives for a whole partition, so the partition's warps must have met
    first: after the two MMA warpgroups' wgmma waits or shared-memory stores a ``bar.sync 0,
    256`` (a named barrier of the 8 MMA warps), in a one-warp worker a ``bar.warp.sync``.
    Without it a stage could go back to the loader while the other warpgroup still reads it."""
    ptx = _compile_sm90(True, counters=True, parts=parts)
    lines = [ln.strip() for ln in ptx.splitlines() if ln.strip()]
    arrives = [i for i, ln in enumerate(lines)
               if re.search(r"mbarrier\.arrive\.(shared::cta\.|shared\.)?b64 _,", ln)]
    assert len(arrives) >= 3  # stage release (twice: in-loop, end of tile) and c_ready, ...
    for i in arrives:
        window = " ".join(lines[max(0, i - 4):i])
        assert re.search(r"bar\.sync\s+\d+,\s*256;|bar\.warp\.sync", window), lines[i - 4:i + 1]


def test_compiled_plain_gemm_has_no_signal():
    ptx = _compile_sm90(False, counters=False)
    assert "red.release" not in ptx and "cp.async.bulk.tensor.2d.global.shared" in ptx


def _lines(ptx: str) -> list[str]:
    return [ln.strip() for ln in ptx.splitlines() if ln.strip()]


@pytest.mark.parametrize("b_trans", [False, True], ids=["b_kn", "b_nk_T"])
def test_compiled_split_tail_orders_each_warps_part_and_signal(b_trans):
    """The split last wave (MMA partition, no CTA barrier): a warp's fp32 part stores, then
    ``bar.warp.sync`` and lane 0's ``atom.acq_rel`` ticket, broadcast, ``bar.warp.sync``;
    only then the ``.cg`` loads of the parts, the tile's stores, ``bar.warp.sync``, the ticket
    re-armed, the finished-warp count (``atom.acq_rel``) and one ``red.release``.  The whole
    tiles keep their own signal (one more release)."""
    ptx = _compile_sm90(b_trans, counters=True, split=True)
    lines = _lines(ptx)

    def where(pattern):
        return [i for i, ln in enumerate(lines) if re.search(pattern, ln)]

    part_stores = where(r"^st\.global\.v2\.b32")
    tickets = where(r"atom\.acq_rel\.gpu\.global\.add")
    loads = where(r"ld\.global\.cg")
    tile_stores = where(r"^st\.global\.b32")
    releases = where(r"red\.release\.gpu")
    assert len(part_stores) == 64 and len(tile_stores) == 64  # 128 x 256 over 256 threads
    assert len(tickets) == 2 and len(releases) == 2 and loads
    ticket, count = tickets
    assert max(part_stores) < ticket < min(loads) and max(loads) < min(tile_stores)
    assert max(tile_stores) < count < releases[-1]
    # bar.warp.sync before each ticket, and after the first (lane 0's acquire -> the warp)
    assert any("bar.warp.sync" in ln for ln in lines[max(part_stores):ticket])
    assert any("bar.warp.sync" in ln for ln in lines[ticket:min(loads)])
    assert any("bar.warp.sync" in ln for ln in lines[max(tile_stores):count])
    assert any(re.search(r"st\.relaxed\.gpu\.global\.u32", ln)
               for ln in lines[max(tile_stores):count])  # the warp's ticket re-armed
    assert not re.search(r"\bbar\.sync\s+0;", ptx)


def test_compiled_split_tail_without_counters_rearms_and_never_releases():
    ptx = _compile_sm90(False, counters=False, split=True)
    assert "red.release" not in ptx
    assert len(re.findall(r"atom\.acq_rel", ptx)) == 1  # the part ticket only
    assert re.search(r"st\.relaxed\.gpu\.global\.u32", ptx)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split_tail"])
def test_compiled_gather_loader_acquires_its_chunk_before_the_tma_loads(split):
    """The gather form (``WAIT_FLAGS``, no counters): the loader polls the chunk's flag with
    ``ld.global.acquire.gpu`` until it is set, then ``bar.warp.sync`` and
    ``fence.proxy.async.global``, and only then issues TMA loads (async proxy); with a split
    last wave the tail piece waits the same way.  No release, no wait without the option."""
    ptx = _compile_sm90(True, counters=False, split=split, wait_flags=True)
    lines = _lines(ptx)
    polls = [i for i, ln in enumerate(lines) if "ld.global.acquire.gpu.b32" in ln]
    tma_load = r"cp\.async\.bulk\.tensor\.2d\.shared::(?:cta|cluster)\.global"  # 3.9 | 3.6
    loads = [i for i, ln in enumerate(lines) if re.search(tma_load, ln)]
    assert len(polls) == (2 if split else 1) and loads
    for poll in polls:
        after = lines[poll:]
        sync = next(i for i, ln in enumerate(after) if "bar.warp.sync" in ln)
        fence = next(i for i, ln in enumerate(after) if "fence.proxy.async.global" in ln)
        load = next(i for i, ln in enumerate(after) if re.search(tma_load, ln))
        assert sync < fence < load, (sync, fence, load)
        assert "nanosleep" in " ".join(after[:sync])
    assert "red.release" not in ptx
    assert "ld.global.acquire" not in _compile_sm90(True, counters=False, split=split)


@pytest.mark.parametrize("m,N,W,whole", [
    (1024, 1024, 3, True),
    (1000, 1024, 3, False),   # each chunk ends inside a tile
    (1024, 1000, 2, False),   # the last tile column is cut short
    (128, 256, 1, True),
    (256, 512, 4, True),
])
def test_gather_plan_full_tiles_means_every_step_is_a_whole_tile(m, N, W, whole):
    """GatherPlan.full_tiles (what lets sm_90 run the warp-specialized gather GEMM) agrees with
    every rank's step table; and CPU tensors never take the Gluon kernel."""
    from flashoverlap.gather_plan import GatherProblem, make_gather_plan
    from flashoverlap.kernels.gather_gemm import uses_warp_specialized

    plan = make_gather_plan(GatherProblem(m, N, 512, "bfloat16", W),
                            PlanConfig(block_m=128, block_n=256, num_ctas=116))
    assert plan.full_tiles is whole
    for rank in range(W):
        t = plan.step_table(rank)
        sizes = set(zip((t[:, 1] - t[:, 0]).tolist(), (t[:, 3] - t[:, 2]).tolist()))
        assert (sizes == {(128, 256)}) is whole
    a = torch.randn(m * W, 512).to(torch.bfloat16)
    b = torch.randn(512, N).to(torch.bfloat16)
    out = torch.empty(m * W, N, dtype=torch.bfloat16)
    assert not uses_warp_specialized(a, b, out, block_m=128, block_n=256, full_tiles=whole)
