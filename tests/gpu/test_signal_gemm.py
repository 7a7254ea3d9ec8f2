"""Signal GEMM and restore kernels on a CUDA GPU: numerics, compiled ordering, signal stress.

The stress test is the proof of the memory-ordering contract (DESIGN.md "Contracts"): a
single-CTA consumer on another stream spins on each group's counter with acquire atomics
and snapshots the group's slots the moment the count is complete; any difference between a
snapshot and the final buffer is a torn read.
"""

from __future__ import annotations

import random
import re

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

triton = pytest.importorskip("triton")
import triton.language as tl

from flashoverlap.kernels import default_block_shape, default_config
from flashoverlap.kernels import restore as rs
from flashoverlap.kernels import signal_gemm as sg
from flashoverlap.plan import PlanConfig, Problem, make_plan

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda")
SMS = torch.cuda.get_device_properties(DEV).multi_processor_count
BM, BN = default_block_shape(DEV)


def _plan(M, N, K, *, world=1, op="all_reduce", num_ctas=None, group_waves=None, dtype="bf16"):
    P = num_ctas or SMS
    P -= P % world
    problem = Problem(M, N, K, dtype, world, op)
    return make_plan(problem, PlanConfig(block_m=BM, block_n=BN, num_ctas=P, group_m=8,
                                         group_waves=group_waves))


def _table(plan):
    return torch.tensor(plan.step_table, device=DEV)


def _operands(M, N, K, dtype, b_trans, gen=None):
    a = torch.randn(M, K, device=DEV, generator=gen).to(dtype)
    if b_trans:
        b = torch.randn(N, K, device=DEV, generator=gen).to(dtype).T
    else:
        b = torch.randn(K, N, device=DEV, generator=gen).to(dtype)
    return a, b


def _rel_fro(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


SHAPES = [(1, 1, 1), (7, 300, 33), (127, 255, 63), (513, 1031, 777), (1000, 3000, 1536),
          (2048, 2304, 1024), (4096, 4096, 512)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("b_trans", [False, True], ids=["b_kn", "b_nk_T"])
def test_matches_matmul(dtype, b_trans):
    gen = torch.Generator(device=DEV).manual_seed(0)
    rng = random.Random(1)
    shapes = SHAPES + [(rng.randint(1, 3000), rng.randint(1, 3000), rng.randint(1, 2000))
                       for _ in range(4)]
    for M, N, K in shapes:
        plan = _plan(M, N, K, group_waves=None)
        a, b = _operands(M, N, K, dtype, b_trans, gen)
        table = _table(plan)
        comm = torch.full((plan.num_tiles, BM, BN), float("nan"), device=DEV, dtype=dtype)
        counters = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
        sg.signal_gemm(a, b, comm, step_table=table, block_m=BM, block_n=BN,
                       num_ctas=plan.config.num_ctas, counters=counters)
        ref = torch.full_like(comm, float("nan"))
        sg.signal_gemm_ref(a, b, ref, table, BM, BN)
        assert torch.equal(comm.isnan(), ref.isnan()), (M, N, K)
        written = ~ref.isnan()
        assert _rel_fro(comm[written], ref[written]) <= 1e-2, (M, N, K)
        assert counters.tolist() == plan.group_tile_counts.tolist()
        if dtype != torch.bfloat16:  # plain mode: one dtype is enough (compile time)
            continue
        # Plain mode over the whole output, against torch.matmul in float32.
        plain = torch.full((M, N), float("nan"), device=DEV, dtype=dtype)
        sg.signal_gemm(a, b, plain, step_table=table, block_m=BM, block_n=BN,
                       num_ctas=plan.config.num_ctas, slotted=False)
        assert not plain.isnan().any()
        assert _rel_fro(plain, a.float() @ b.float()) <= 1e-2, (M, N, K)


@pytest.mark.parametrize("which", ["sm90_pointer_loads", "sm80_default"])
def test_fallback_paths_compile_and_match(which):
    """The non-TMA path (unaligned operands, sm_80) compiled here: sm_90's tile with pointer
    loads, and the whole sm_80 configuration (its own tile shape, no TMA, no flattening)."""
    from flashoverlap.kernels import GemmConfig, config_for_capability

    config = (GemmConfig(use_tma=False) if which == "sm90_pointer_loads"
              else config_for_capability((8, 0), torch.bfloat16))
    gen = torch.Generator(device=DEV).manual_seed(3)
    for M, N, K, b_trans in ((1000, 3000, 1536, False), (513, 1031, 777, True),
                             (4096, 4096, 512, True)):
        plan = make_plan(Problem(M, N, K, "bf16", 1, "all_reduce"),
                         PlanConfig(block_m=config.block_m, block_n=config.block_n,
                                    num_ctas=SMS - 8, group_m=8))
        a, b = _operands(M, N, K, torch.bfloat16, b_trans, gen)
        assert not sg.uses_tma(a, b, config)
        table = _table(plan)
        comm = torch.full((plan.num_tiles, config.block_m, config.block_n), float("nan"),
                          device=DEV, dtype=torch.bfloat16)
        counters = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
        sg.signal_gemm(a, b, comm, step_table=table, block_m=config.block_m,
                       block_n=config.block_n, num_ctas=plan.config.num_ctas,
                       counters=counters, config=config)
        ref = torch.full_like(comm, float("nan"))
        sg.signal_gemm_ref(a, b, ref, table, config.block_m, config.block_n)
        assert torch.equal(comm.isnan(), ref.isnan()), (M, N, K)
        written = ~ref.isnan()
        assert _rel_fro(comm[written], ref[written]) <= 1e-2, (M, N, K)
        assert counters.tolist() == plan.group_tile_counts.tolist()


@pytest.mark.parametrize("world,op,waves", [(1, "all_reduce", (2, 1, 1)),
                                            (4, "reduce_scatter", None),
                                            (2, "reduce_scatter", (3, 5))])
def test_plans_and_restore(world, op, waves):
    """Slotted GEMM + per-group restore reproduces the plain GEMM (bitwise) on every shard."""
    M, N, K = 1536 * world, 2500, 1000
    plan = _plan(M, N, K, world=world, op=op, num_ctas=32, group_waves=waves)
    a, b = _operands(M, N, K, torch.bfloat16, True)
    table = _table(plan)
    comm = torch.zeros(plan.num_tiles, BM, BN, device=DEV, dtype=torch.bfloat16)
    counters = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
    sg.signal_gemm(a, b, comm, step_table=table, block_m=BM, block_n=BN,
                   num_ctas=plan.config.num_ctas, counters=counters)
    assert counters.tolist() == plan.group_tile_counts.tolist()
    full = torch.empty(M, N, device=DEV, dtype=torch.bfloat16)
    sg.signal_gemm(a, b, full, step_table=table, block_m=BM, block_n=BN,
                   num_ctas=plan.config.num_ctas, slotted=False)
    tile_m = torch.tensor(plan.restore_tile_m, device=DEV)
    tile_n = torch.tensor(plan.restore_tile_n, device=DEV)
    rows = plan.out_rows
    side = torch.cuda.Stream()
    for rank in range(world):
        parts = []
        for g in range(plan.num_groups):
            lo, hi = int(plan.group_bounds[g]), int(plan.group_bounds[g + 1])
            share = (hi - lo) // world
            parts.append(comm[lo + rank * share: lo + (rank + 1) * share])
        recv = torch.cat(parts)
        shard = torch.full((rows, N), float("nan"), device=DEV, dtype=torch.bfloat16)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the engine restores on its watcher stream
            for g in range(plan.num_groups):
                rs.restore_tiles(recv, shard, tile_m, tile_n, int(plan.restore_bounds[g]),
                                 int(plan.restore_bounds[g + 1]), BM, BN)
        torch.cuda.current_stream().wait_stream(side)
        assert torch.equal(shard, full[rank * rows:(rank + 1) * rows])


def test_compiled_epilogue_orders_stores_before_release():
    """PTX: every tile's global stores, then a CTA barrier, then one release atomic."""
    M, N, K = 1024, 1024, 512
    plan = _plan(M, N, K)
    a, b = _operands(M, N, K, torch.bfloat16, False)
    comm = torch.empty(plan.num_tiles, BM, BN, device=DEV, dtype=torch.bfloat16)
    counters = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
    config = default_config(DEV, torch.bfloat16)
    kernel = sg._launch(a, b, comm, _table(plan), BM, BN, plan.config.num_ctas, counters,
                        True, config)
    ptx = kernel.asm["ptx"].splitlines()
    atoms = [i for i, line in enumerate(ptx) if re.search(r"\b(atom|red)\.", line)]
    barriers = [i for i, line in enumerate(ptx) if re.search(r"\b(bar|barrier)\.sync", line)]
    assert atoms, "no counter update"
    for i in atoms:  # the epilogue may be emitted more than once (loop peeling)
        assert "release" in ptx[i] and ".gpu" in ptx[i], ptx[i]
        stores = [j for j, line in enumerate(ptx[:i]) if "st.global" in line]
        assert stores, "epilogue must use pointer stores"
        assert any(stores[-1] < j < i for j in barriers), "no CTA barrier before the release"
    assert not any("cp.async.bulk.global.shared" in line for line in ptx), "TMA store"
    if torch.cuda.get_device_capability(DEV)[0] >= 9 and config.use_tma:
        assert sg.uses_tma(a, b, config)
        assert any("cp.async.bulk.tensor" in line for line in ptx), "TMA loads expected"


def test_cuda_graph_capture():
    M, N, K = 1000, 1500, 512
    plan = _plan(M, N, K, group_waves=None)
    a, b = _operands(M, N, K, torch.bfloat16, False)
    table = _table(plan)
    comm = torch.zeros(plan.num_tiles, BM, BN, device=DEV, dtype=torch.bfloat16)
    out = torch.empty(M, N, device=DEV, dtype=torch.bfloat16)
    counters = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
    tile_m = torch.tensor(plan.restore_tile_m, device=DEV)
    tile_n = torch.tensor(plan.restore_tile_n, device=DEV)

    def step():
        counters.zero_()
        sg.signal_gemm(a, b, comm, step_table=table, block_m=BM, block_n=BN,
                       num_ctas=plan.config.num_ctas, counters=counters)
        rs.restore_tiles(comm, out, tile_m, tile_n, 0, plan.num_tiles, BM, BN)

    side = torch.cuda.Stream()  # warm up (compile) outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    a.copy_(torch.randn_like(a))
    graph.replay()
    torch.cuda.synchronize()
    assert counters.tolist() == plan.group_tile_counts.tolist()
    assert _rel_fro(out, a.float() @ b.float()) <= 1e-2


# --------------------------------------------------------------------------------------
# Signal-ordering stress test
# --------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_groups"])
def _wait_and_snapshot(counter_ptr, target_ptr, bound_ptr, src_ptr, dst_ptr, spins_ptr,
                       num_groups, tile_elems, max_spins, BLOCK: tl.constexpr):
    """One CTA: for each group, spin (acquire) until its count is complete, then copy it."""
    offs = tl.arange(0, BLOCK)
    for g in range(num_groups):
        target = tl.load(target_ptr + g)
        seen = tl.atomic_add(counter_ptr + g, 0, sem="acquire", scope="gpu")
        spins = 0
        while (seen < target) & (spins < max_spins):
            seen = tl.atomic_add(counter_ptr + g, 0, sem="acquire", scope="gpu")
            spins += 1
        tl.store(spins_ptr + g, tl.where(seen < target, -1, spins))  # -1: timed out
        tl.debug_barrier()  # the acquiring thread's view -> every thread of the CTA
        start = tl.load(bound_ptr + g).to(tl.int64) * tile_elems
        stop = tl.load(bound_ptr + g + 1).to(tl.int64) * tile_elems
        for off in range(start, stop, BLOCK):
            idx = off + offs
            mask = idx < stop
            tl.store(dst_ptr + idx, tl.load(src_ptr + idx, mask=mask), mask=mask)


def _random_case(rng: random.Random):
    world = rng.choice([1, 1, 2, 4])
    op = "all_reduce" if world == 1 else "reduce_scatter"
    M = rng.randint(1, 4096 // world) * world
    N = rng.randint(1, 4096)
    # Half the calls TMA-aligned K (multiple of 8), half odd K (pointer path).
    K = rng.randrange(8, 513, 8) if rng.random() < 0.5 else rng.randrange(1, 513, 2)
    P = rng.choice([SMS - 2, (SMS - 2) // 2, 24])
    return M, N, K, world, op, P - P % world


def test_signal_ordering_stress():
    calls = 1000
    rng = random.Random(1234)
    gen = torch.Generator(device=DEV).manual_seed(1234)
    compute = torch.cuda.current_stream()
    consumer = torch.cuda.Stream(priority=-1)
    groups_checked = spun = 0
    for call in range(calls):
        M, N, K, world, op, P = _random_case(rng)
        problem = Problem(M, N, K, "bf16", world, op)
        base = make_plan(problem, PlanConfig(block_m=BM, block_n=BN, num_ctas=P, group_m=8))
        waves = base.num_waves
        cuts = sorted(rng.sample(range(1, waves), k=min(waves - 1, rng.randint(0, 3))))
        group_waves = tuple(b - a for a, b in zip([0] + cuts, cuts + [waves]))
        plan = make_plan(problem, PlanConfig(block_m=BM, block_n=BN, num_ctas=P, group_m=8,
                                             group_waves=group_waves))
        b_trans = call % 2 == 1
        a, b = _operands(M, N, K, torch.bfloat16, b_trans, gen)
        table = _table(plan)
        targets = torch.tensor(plan.group_tile_counts, device=DEV, dtype=torch.int32)
        bounds = torch.tensor(plan.group_bounds, device=DEV, dtype=torch.int64)
        comm = torch.full((plan.num_tiles, BM, BN), float("nan"), device=DEV,
                          dtype=torch.bfloat16)
        snap = torch.full_like(comm, 1.0)
        counters = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
        spins = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
        ready = torch.cuda.Event()
        ready.record(compute)

        delay = call % 3  # 0: nothing delayed, 1: consumer delayed, 2: GEMM delayed
        with torch.cuda.stream(consumer):  # launched first, so it really waits
            consumer.wait_event(ready)
            if delay == 1:
                torch.cuda._sleep(rng.randint(1_000, 200_000))
            _wait_and_snapshot[(1,)](counters, targets, bounds, comm, snap, spins,
                                     plan.num_groups, BM * BN, 1 << 22, BLOCK=4096,
                                     num_warps=8)
        if delay == 2:
            torch.cuda._sleep(rng.randint(1_000, 200_000))
        sg.signal_gemm(a, b, comm, step_table=table, block_m=BM, block_n=BN,
                       num_ctas=P, counters=counters)
        compute.wait_stream(consumer)

        spins_host = spins.tolist()
        assert min(spins_host) >= 0, f"call {call}: consumer timed out {spins_host}"
        assert counters.tolist() == plan.group_tile_counts.tolist()
        torn = snap.view(torch.int16) != comm.view(torch.int16)
        assert not torn.any(), (
            f"call {call} (M={M} N={N} K={K} W={world} P={P} waves={group_waves}): "
            f"{int(torn.sum())} elements read before they were final")
        groups_checked += plan.num_groups
        spun += sum(s > 0 for s in spins_host)
        if call % 100 == 0:  # and the buffer itself is right
            ref = torch.full_like(comm, float("nan"))
            sg.signal_gemm_ref(a, b, ref, table, BM, BN)
            written = ~ref.isnan()
            assert torch.equal(comm.isnan(), ref.isnan())
            assert _rel_fro(comm[written], ref[written]) <= 1e-2
    print(f"stress: {calls} calls, {groups_checked} groups snapshotted, "
          f"{spun} waits spun before the count completed")
    assert spun >= calls // 10, "the consumer almost never waited: test too weak"
