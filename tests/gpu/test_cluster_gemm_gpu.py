"""The CUDA C cluster GEMM (``flashoverlap.kernels.cluster_gemm``) on an sm_90 GPU: every
variant against the signal GEMM's reference (``signal_gemm_ref``: the plan's tiles at their
``dest_row``), NaN-poisoned destinations, counters against the plan's tiles per group; packed
ReduceScatter layouts; steps past the table's end in a cluster; and the signal protocol under
a spinning consumer (the stress test's consumer, fewer calls)."""

from __future__ import annotations

import random

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    pytest.skip("needs an sm_90 GPU", allow_module_level=True)
pytest.importorskip("cuda.bindings")
pytest.importorskip("triton")

from flashoverlap.kernels import signal_gemm as sg  # noqa: E402
from flashoverlap.kernels.cluster_gemm import (  # noqa: E402
    ClusterGemm,
    ClusterGemmConfig,
    runs_table,
)
from flashoverlap.plan import PlanConfig, Problem, make_plan  # noqa: E402

from stress_consumer import wait_and_snapshot  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")
_KERNELS: dict = {}


def _kernel(cluster, multicast, b_kmajor, dtype=torch.bfloat16, **knobs):
    """The loaded variant; ``knobs``: ClusterGemmConfig's base-kernel knobs (stmatrix,
    wait_hint_ns, lean_loop)."""
    cfg = ClusterGemmConfig(cluster=cluster, multicast=multicast, b_kmajor=b_kmajor,
                            dtype="bfloat16" if dtype == torch.bfloat16 else "float16", **knobs)
    if cfg not in _KERNELS:
        _KERNELS[cfg] = ClusterGemm(cfg)
    return _KERNELS[cfg]


def _operands(M, N, K, dtype, b_kmajor, gen=None):
    a = torch.randn(M, K, device=DEV, generator=gen).to(dtype)
    if b_kmajor:
        b = torch.randn(N, K, device=DEV, generator=gen).to(dtype).T
    else:
        b = torch.randn(K, N, device=DEV, generator=gen).to(dtype)
    return a, b


def _run(kernel, M, N, K, P, *, world=1, op="all_reduce", group_m=8, dtype=torch.bfloat16,
         gen=None):
    plan = make_plan(Problem(M, N, K, "bfloat16", world, op),
                     PlanConfig(block_m=128, block_n=256, num_ctas=P, group_m=group_m))
    assert runs_table(kernel.config, plan.step_table, P)
    a, b = _operands(M, N, K, dtype, kernel.config.b_kmajor, gen)
    table = torch.from_numpy(plan.step_table.copy()).to(DEV)
    out = torch.full((M, N), float("nan"), device=DEV, dtype=dtype)
    ref = out.clone()
    cnt = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
    kernel(a, b, out, table, cnt, P)
    sg.signal_gemm_ref(a, b, ref, table, rows_per_block=plan.problem.rows_per_block)
    torch.cuda.synchronize()
    return plan, out, ref, cnt


def _check(plan, out, ref, cnt, what):
    assert torch.equal(out.isnan(), ref.isnan()), f"{what}: written elements differ"
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= 1e-2, f"{what}: relative error {err}"
    want = torch.tensor(plan.group_tile_counts, dtype=torch.int32, device=DEV)
    assert torch.equal(cnt, want), f"{what}: counters {cnt.tolist()} != {want.tolist()}"


STSM, HINT, LEAN = dict(stmatrix=True), dict(wait_hint_ns=10_000_000), dict(lean_loop=True)
MIXED = dict(mixed_columns=True)
HALF4 = dict(half_epilogue=True, stages=4)  # C staged in halves, a fourth ring stage


def _knob_ids(value):
    """Test ids: a knob dict as its names ("base" for none), other values pytest's way."""
    return ("-".join(value) or "base") if isinstance(value, dict) else None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("b_kmajor", [False, True], ids=["b_kn", "b_nk_T"])
@pytest.mark.parametrize("cluster,multicast,knobs", [
    (1, False, {}), (2, False, {}), (2, True, {}), (4, True, {}),
    (1, False, STSM), (4, True, STSM), (1, False, STSM | HINT), (4, True, STSM | HINT),
    (1, False, LEAN), (2, False, LEAN), (2, True, STSM | LEAN), (4, True, STSM | LEAN),
    (1, False, STSM | LEAN | HALF4), (2, True, STSM | LEAN | HALF4),
    (4, True, STSM | LEAN | HALF4), (4, True, STSM | LEAN | dict(half_epilogue=True))],
    ids=_knob_ids)
@pytest.mark.parametrize("M,N,K,P", [(2048, 2048, 1024, 132), (4096, 1536, 3000, 116),
                                     (1024, 256, 64, 8), (1000, 776, 136, 132)])
def test_matches_reference(dtype, b_kmajor, cluster, multicast, knobs, M, N, K, P):
    kernel = _kernel(cluster, multicast, b_kmajor, dtype, **knobs)
    plan, out, ref, cnt = _run(kernel, M, N, K, P, dtype=dtype)
    _check(plan, out, ref, cnt, f"{kernel.config.name} {M}x{N}x{K} P={P}")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("cluster", [2, 4])
def test_packed_reduce_scatter_layout(world, cluster):
    kernel = _kernel(cluster, True, True)
    plan, out, ref, cnt = _run(kernel, 2048 * world, 1024, 512, 116, world=world,
                               op="reduce_scatter")
    _check(plan, out, ref, cnt, f"reduce_scatter W={world} cluster {cluster}")


@pytest.mark.parametrize("b_kmajor", [False, True], ids=["b_kn", "b_nk_T"])
def test_row_strided_operands(b_kmajor):
    """Views whose rows are strided (16-byte aligned, as TMA allows and tma_addressable
    accepts): the tensor maps take each operand's own row stride."""
    kernel = _kernel(4, True, b_kmajor)
    M, N, K, P = 2048, 1024, 512, 116
    plan = make_plan(Problem(M, N, K, "bfloat16", 1, "all_reduce"),
                     PlanConfig(block_m=128, block_n=256, num_ctas=P, group_m=8))
    a = torch.randn(M, K + 24, device=DEV).to(torch.bfloat16)[:, 8:8 + K]
    if b_kmajor:  # weight [N, K] rows strided, B = its transpose
        b = torch.randn(N + 8, K + 40, device=DEV).to(torch.bfloat16)[:N, 16:16 + K].T
    else:
        b = torch.randn(K + 8, N + 40, device=DEV).to(torch.bfloat16)[:K, 16:16 + N]
    assert not (b.T if b_kmajor else b).is_contiguous() and not a.is_contiguous()
    store = torch.full((M, N + 64), float("nan"), device=DEV, dtype=torch.bfloat16)
    out = store[:, :N]
    table = torch.from_numpy(plan.step_table.copy()).to(DEV)
    cnt = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
    kernel(a, b, out, table, cnt, P)
    ref = torch.full((M, N), float("nan"), device=DEV, dtype=torch.bfloat16)
    sg.signal_gemm_ref(a, b, ref, table)
    torch.cuda.synchronize()
    _check(plan, out, ref, cnt, f"strided rows, K-major B {b_kmajor}")
    assert store[:, N:].isnan().all()  # nothing written past the view's columns


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("b_kmajor", [False, True], ids=["b_kn", "b_nk_T"])
@pytest.mark.parametrize("cluster", [2, 4])
@pytest.mark.parametrize("M,N,K,P,group_m", [
    (11008, 3072, 1024, 116, 8),   # 86 tile rows: the last band has 6
    (2304, 2048, 512, 116, 3),     # bands of 3: every cluster of 4 spans two columns
    (1920, 1280, 320, 8, 5),       # bands of 5, few programs: many steps per program
    (640, 768, 192, 12, 5)])       # 15 tiles: a cluster past the table's end
def test_mixed_columns_match_the_reference(dtype, b_kmajor, cluster, M, N, K, P, group_m):
    """mixed_columns: a cluster's CTAs in different tile columns (band heights that are not a
    multiple of the cluster) -- each column's CTAs multicast its B tile among themselves."""
    kernel = _kernel(cluster, True, b_kmajor, dtype, **(STSM | LEAN | MIXED))
    plan, out, ref, cnt = _run(kernel, M, N, K, P, group_m=group_m, dtype=dtype)
    from flashoverlap.kernels.cluster_gemm import shares_b_tiles

    if group_m in (3, 5) or (M == 11008 and cluster == 4):
        assert not shares_b_tiles(plan.step_table, P, cluster)  # really mixed
    _check(plan, out, ref, cnt, f"mixed {kernel.config.name} {M}x{N}x{K} P={P} gm{group_m}")


@pytest.mark.parametrize("knobs", [{}, STSM | LEAN | HALF4], ids=_knob_ids)
def test_steps_past_the_end_of_the_table(knobs):
    # 3 tiles on one cluster of 4: the fourth CTA loads zeros and multicasts its share of B
    kernel = _kernel(4, True, False, **knobs)
    plan, out, ref, cnt = _run(kernel, 384, 256, 640, 4, group_m=3)
    assert len(plan.step_table) == 3
    _check(plan, out, ref, cnt, "3 steps, cluster of 4")


@pytest.mark.parametrize("cluster,multicast,knobs", [
    (1, False, {}), (4, True, {}), (4, True, STSM), (4, True, STSM | HINT), (1, False, LEAN),
    (4, True, STSM | LEAN), (4, True, STSM | LEAN | MIXED), (1, False, STSM | LEAN | HALF4),
    (4, True, STSM | LEAN | HALF4), (4, True, STSM | LEAN | MIXED | HALF4)],
    ids=_knob_ids)
def test_signal_ordering_under_a_spinning_consumer(cluster, multicast, knobs):
    """A consumer on a high-priority stream spins on each group's counter (acquire) and
    snapshots the group's rows when the count is complete; a snapshot that differs from the
    final buffer is a torn read."""
    rng = random.Random(7)
    gen = torch.Generator(device=DEV).manual_seed(7)
    consumer = torch.cuda.Stream(priority=min(torch.cuda.Stream.priority_range()))
    compute = torch.cuda.current_stream()
    checked = torn_total = waited = 0
    for call in range(120):
        b_kmajor = call % 2 == 1
        kernel = _kernel(cluster, multicast, b_kmajor, **knobs)
        M = rng.randint(1, 24) * 128 * 4
        N, K = rng.choice([256, 512, 1024]), rng.randrange(64, 1025, 64)
        # the consumer holds one SM, which no GEMM CTA can share (64 K registers each): a
        # persistent grid must leave it free (and clusters of 4 fit 30 at once on an H200)
        P = rng.choice([128 if cluster == 4 else 130, 116, 64, 8])
        # bands of 3 tile rows put a cluster of 4 across two columns (mixed_columns)
        group_m = 3 if knobs.get("mixed_columns") else 4
        plan = make_plan(Problem(M, N, K, "bfloat16", 1, "all_reduce"),
                         PlanConfig(block_m=128, block_n=256, num_ctas=P, group_m=group_m))
        a, b = _operands(M, N, K, torch.bfloat16, b_kmajor, gen)
        table = torch.from_numpy(plan.step_table.copy()).to(DEV)
        targets = torch.tensor(plan.group_tile_counts, dtype=torch.int32, device=DEV)
        spans = plan.spans()
        bounds = torch.tensor([s.send_lo for s in spans] + [spans[-1].send_hi],
                              dtype=torch.int64, device=DEV)
        dest = torch.full((M, N), float("nan"), device=DEV, dtype=torch.bfloat16)
        snap = torch.ones_like(dest)
        counters = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
        spins = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
        if call == 0:  # both kernels loaded before anything spins
            kernel(a, b, dest, table, torch.zeros_like(counters), P)
            wait_and_snapshot[(1,)](targets, targets, bounds[:-1], bounds[1:], dest, snap,
                                    spins, plan.num_groups, N, 1, BLOCK=4096, num_warps=8)
            torch.cuda.synchronize()
            dest.fill_(float("nan"))
        ready = torch.cuda.Event()
        ready.record(compute)
        with torch.cuda.stream(consumer):  # launched first, so it really waits
            consumer.wait_event(ready)
            wait_and_snapshot[(1,)](counters, targets, bounds[:-1], bounds[1:], dest, snap,
                                    spins, plan.num_groups, N, 1 << 22, BLOCK=4096,
                                    num_warps=8)
        kernel(a, b, dest, table, counters, P)
        compute.wait_stream(consumer)
        torch.cuda.synchronize()
        assert not bool((spins < 0).any()), f"call {call}: a wait timed out"
        assert torch.equal(counters, targets), f"call {call}: counters off target"
        torn_total += int((snap.view(torch.int16) != dest.view(torch.int16)).sum())
        waited += int((spins > 0).sum())
        checked += plan.num_groups
    assert torn_total == 0, f"{torn_total} elements read before they were final"
    assert waited >= checked // 20, "the consumer almost never waited: test too weak"


@pytest.mark.parametrize("b_kmajor", [False, True], ids=["b_kn", "b_nk_T"])
def test_launcher_runs_the_cluster_kernel_where_configured(b_kmajor):
    """GemmConfig.cluster_ctas through SignalGemmLauncher: the first call picks the cluster
    kernel, later calls reuse it; a CUDA graph replays it; a plan whose bands do not pair
    tiles (bands of 5 rows) falls back to the Gluon kernel and is right too."""
    import dataclasses

    from flashoverlap.kernels import default_config

    config = dataclasses.replace(default_config(DEV), cluster_ctas=4)
    for group_m, cluster in ((8, True), (5, False)):
        M, N, K, P = 5120, 2048, 1024, 116
        plan = make_plan(Problem(M, N, K, "bfloat16", 1, "all_reduce"),
                         PlanConfig(block_m=128, block_n=256, num_ctas=P, group_m=group_m))
        table = torch.from_numpy(plan.step_table.copy()).to(DEV)
        cnt = torch.zeros(plan.num_groups, device=DEV, dtype=torch.int32)
        launcher = sg.SignalGemmLauncher(table, cnt, block_m=128, block_n=256, num_ctas=P,
                                         config=config, full_tiles=plan.full_tiles)
        a, b = _operands(M, N, K, torch.bfloat16, b_kmajor)
        ref = torch.full((M, N), float("nan"), device=DEV, dtype=torch.bfloat16)
        sg.signal_gemm_ref(a, b, ref, table)
        for call in range(3):
            out = torch.full_like(ref, float("nan"))
            cnt.zero_()
            launcher(a, b, out)
            torch.cuda.synchronize()
            _check(plan, out, ref, cnt, f"group_m {group_m} call {call}")
        (entry,) = launcher._entries._kernels.values()
        assert isinstance(entry[0], ClusterGemm) == cluster
        out = torch.full_like(ref, float("nan"))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launcher(a, b, out)
        cnt.zero_()
        graph.replay()
        torch.cuda.synchronize()
        _check(plan, out, ref, cnt, f"group_m {group_m} graph replay")
