"""GEMM + AllToAll on one GPU: the grouped signal GEMM against its torch definition, the ops
on a one-rank NCCL world (overlap, sequential and reference engines agree; gradients), and
CUDA-graph capture with fixed counts.

At world size 1 every row is this rank's own block, which the GEMM stores straight into
``out``: the watcher/NCCL part of the overlap engine runs only at W >= 2 (multi-GPU: run the
example ``examples/moe_expert_parallel.py`` under torchrun on several GPUs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _counts(seed, W, E, scale=40):
    rng = np.random.default_rng(seed)
    c = rng.integers(0, scale, size=(W, E, W))
    c[rng.random(c.shape) < 0.25] = 0
    return c


_KERNELS = {  # name -> GemmConfig options
    "pointer": dict(use_tma=False, warp_specialized_kernel=False),
    "tma": dict(use_tma=True, warp_specialized_kernel=False),
    "warp_specialized": dict(use_tma=True, warp_specialized_kernel=True),
}


def _grouped_case(W, E, rank, K, N, block_n, seed, dtype=torch.bfloat16, transposed=False,
                  scale=300):
    """A rank's AllToAll plan over uneven (some empty) segments and NaN-poisoned send and
    out buffers: ``(plan, a, w, send, out, table)``."""
    from flashoverlap.all_to_all_plan import AllToAllProblem, make_all_to_all_plan
    from flashoverlap.plan import PlanConfig

    c = _counts(seed, W, E, scale=scale)
    p = AllToAllProblem(c[rank].tolist(), c[:, :, rank].sum(1).tolist(), N, K,
                        str(dtype).split(".")[1], rank, W)
    plan = make_all_to_all_plan(p, PlanConfig(block_m=128, block_n=block_n, num_ctas=100,
                                              group_m=8))
    dev = torch.device("cuda")
    a = torch.randn(p.M, K, device=dev).to(dtype)
    w = (torch.randn(E, N, K, device=dev).to(dtype).transpose(1, 2) if transposed
         else torch.randn(E, K, N, device=dev).to(dtype))
    table = torch.from_numpy(plan.step_table.copy()).to(dev)
    send = torch.full((p.M, N), float("nan"), device=dev, dtype=dtype)
    out = torch.full((p.recv_rows, N), float("nan"), device=dev, dtype=dtype)
    return plan, a, w, send, out, table


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("kernel", list(_KERNELS))
@pytest.mark.parametrize("block_n", [128, 256])
@pytest.mark.parametrize("W,E,rank", [(1, 8, 0), (2, 4, 1), (3, 3, 0)])
def test_grouped_kernel_matches_reference(W, E, rank, block_n, kernel, transposed):
    """Every kernel against the torch definition (float32 products on the GPU), on
    NaN-poisoned buffers: short tiles (segments end inside a tile), N = 384 cuts the last column tile, some
    segments and destinations are empty."""
    from flashoverlap.kernels import GemmConfig
    from flashoverlap.kernels import grouped_signal_gemm as gk

    plan, a, w, send, out, table = _grouped_case(W, E, rank, 256, 384, block_n, W * 100 + E,
                                                 transposed=transposed)
    config = GemmConfig(block_m=128, block_n=block_n, **_KERNELS[kernel])
    assert gk.uses_warp_specialized(a, w, send, out, 128, block_n, config) is (
        kernel == "warp_specialized" and _SM90)
    counters = torch.zeros(plan.num_groups, dtype=torch.int32, device=a.device)
    gk.grouped_signal_gemm(a, w, send, out, step_table=table, block_m=128, block_n=block_n,
                           num_ctas=100, counters=counters, config=config)
    send_ref, out_ref = torch.full_like(send, float("nan")), torch.full_like(out, float("nan"))
    gk.grouped_signal_gemm_ref(a, w, send_ref, out_ref, table)
    torch.testing.assert_close(send, send_ref, equal_nan=True, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, out_ref, equal_nan=True, rtol=2e-2, atol=2e-2)
    assert counters.tolist() == plan.group_tile_counts.tolist()


@pytest.mark.skipif(not _SM90, reason="the warp-specialized kernel runs on sm_90")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("block_n", [128, 256])
def test_ws_grouped_kernel_long_k_and_many_experts(dtype, transposed, block_n):
    """The warp-specialized grouped kernel over many pipeline rounds per tile (K = 1024), 16
    experts with uneven segments at W = 4, N = 1000 (a cut last column tile): against the
    float64 definition, every element written once, counters complete, and the same bits as
    the pipelined TMA kernel wherever both computed the element."""
    from flashoverlap.kernels import GemmConfig
    from flashoverlap.kernels import grouped_signal_gemm as gk

    plan, a, w, send, out, table = _grouped_case(4, 16, 2, 1024, 1000, block_n, 7,
                                                 dtype=dtype, transposed=transposed, scale=260)
    config = GemmConfig(block_m=128, block_n=block_n, num_stages=5)
    assert gk.uses_warp_specialized(a, w, send, out, 128, block_n, config)
    counters = torch.zeros(plan.num_groups, dtype=torch.int32, device=a.device)
    gk.grouped_signal_gemm(a, w, send, out, step_table=table, block_m=128, block_n=block_n,
                           num_ctas=132, counters=counters, config=config)
    torch.cuda.synchronize()
    send_ref, out_ref = torch.full_like(send, float("nan")), torch.full_like(out, float("nan"))
    gk.grouped_signal_gemm_ref(a, w, send_ref, out_ref, table)
    for got, want in ((send, send_ref), (out, out_ref)):
        assert torch.equal(got.isnan(), want.isnan())
        rel = ((got.double() - want.double()).nan_to_num().norm()
               / want.double().nan_to_num().norm().clamp_min(1e-30)).item()
        assert rel <= 1e-2, rel
    assert counters.tolist() == plan.group_tile_counts.tolist()
    send2, out2 = torch.full_like(send, float("nan")), torch.full_like(out, float("nan"))
    gk.grouped_signal_gemm(a, w, send2, out2, step_table=table, block_m=128, block_n=block_n,
                           num_ctas=132, config=GemmConfig(block_m=128, block_n=block_n,
                                                           warp_specialized_kernel=False))
    torch.testing.assert_close(send2, send, equal_nan=True, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out2, out, equal_nan=True, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not _SM90, reason="the warp-specialized kernel runs on sm_90")
@pytest.mark.parametrize("K,N,transposed,why", [
    (200, 384, False, "row-major [E, K, N] with K % 64 != 0: a K step would cross experts"),
    (256, 380, True, "N % 8 != 0: rows not 16-byte aligned for TMA"),
])
def test_ws_grouped_kernel_not_taken_where_it_cannot_run(K, N, transposed, why):
    from flashoverlap.kernels import GemmConfig
    from flashoverlap.kernels import grouped_signal_gemm as gk

    plan, a, w, send, out, table = _grouped_case(2, 4, 0, K, N, 256, 11, transposed=transposed)
    config = GemmConfig()
    assert not gk.uses_warp_specialized(a, w, send, out, 128, 256, config), why
    gk.grouped_signal_gemm(a, w, send, out, step_table=table, block_m=128, block_n=256,
                           num_ctas=100, config=config)
    send_ref, out_ref = torch.full_like(send, float("nan")), torch.full_like(out, float("nan"))
    gk.grouped_signal_gemm_ref(a, w, send_ref, out_ref, table)
    torch.testing.assert_close(send, send_ref, equal_nan=True, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, out_ref, equal_nan=True, rtol=2e-2, atol=2e-2)


def _expected(a, w, counts):
    rows, off = [], 0
    for e in range(w.shape[0]):
        n = int(counts[e][0])
        rows.append(a[off:off + n].float() @ w[e].float())
        off += n
    return torch.cat(rows)


@pytest.mark.parametrize("transposed", [False, True])
def test_ops_world1_engines_and_grads(world1, transposed):
    import flashoverlap as fo

    E, K, N = 8, 512, 1024
    counts = _counts(3, 1, E, scale=400)[0]  # [E][1]
    M = int(counts.sum())
    dev = torch.device("cuda")
    a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(E, N, K, device=dev, dtype=torch.bfloat16).transpose(1, 2) / K**0.5
         if transposed else torch.randn(E, K, N, device=dev, dtype=torch.bfloat16) / K**0.5)
    want = _expected(a, w, counts)
    for engine in ("overlap", "sequential", "reference"):
        got = fo.grouped_gemm_all_to_all(a, w, counts, [M], engine=engine)
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2, msg=engine)
    got = fo.gemm_all_to_all(a, w[0], engine="overlap")
    torch.testing.assert_close(got.float(), a.float() @ w[0].float(), rtol=2e-2, atol=2e-2)
    # gradients: against torch autograd of the per-expert loop
    ag, wg = a.clone().requires_grad_(), w.detach().clone().requires_grad_()
    g = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    (fo.grouped_gemm_all_to_all(ag, wg, counts, [M]) * g).sum().backward()
    ar, wr = a.float().requires_grad_(), w.detach().float().requires_grad_()
    (_expected(ar, wr, counts) * g.float()).sum().backward()
    torch.testing.assert_close(ag.grad.float(), ar.grad, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(wg.grad.float(), wr.grad, rtol=3e-2, atol=3e-1)


def test_cuda_graph_capture_fixed_counts(world1):
    import flashoverlap as fo

    E, K, N = 16, 1024, 2048
    counts = _counts(4, 1, E, scale=500)[0]
    M = int(counts.sum())
    dev = torch.device("cuda")
    a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16).transpose(1, 2) / K**0.5
    out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
    fo.grouped_gemm_all_to_all(a, w, counts, [M], out=out, engine="overlap")  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        fo.grouped_gemm_all_to_all(a, w, counts, [M], out=out, engine="overlap")
    for _ in range(3):
        a.copy_(torch.randn_like(a))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), _expected(a, w, counts), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not _SM90, reason="the warp-specialized kernel runs on sm_90")
def test_ws_grouped_signal_ordering_stress():
    """The grouped warp-specialized kernel's signal under a spinning consumer: random W, rank,
    experts, uneven counts (short tiles: generic stores before the release), both weight
    layouts, both tiles, P from all SMs to a few CTAs.  ``send`` and ``out`` are views of one
    buffer, so one consumer (``stress_consumer.wait_and_snapshot``) snapshots each group's
    rows -- a destination block of ``send``, or the self block in ``out`` -- the moment its
    count is complete; a snapshot that differs from the final buffer is a torn read.
    ``FLASHOVERLAP_GROUPED_STRESS_CALLS`` calls (default 3000)."""
    import os
    import random

    from stress_consumer import wait_and_snapshot

    from flashoverlap.kernels import GemmConfig
    from flashoverlap.kernels import grouped_signal_gemm as gk
    from flashoverlap.kernels import ws_grouped_signal_gemm as wg

    calls_wanted = int(os.environ.get("FLASHOVERLAP_GROUPED_STRESS_CALLS", "3000"))
    rng = random.Random(99)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    compute = torch.cuda.current_stream()
    consumer = torch.cuda.Stream(priority=min(torch.cuda.Stream.priority_range()))
    torn = torch.zeros(calls_wanted, device=dev, dtype=torch.int64)
    timeouts = torch.zeros(calls_wanted, device=dev, dtype=torch.int64)
    bad_counts = torch.zeros(calls_wanted, device=dev, dtype=torch.int64)
    spun = torch.zeros(calls_wanted, device=dev, dtype=torch.int64)
    loaded, cases = set(), []
    groups = short_tiles = growths = 0  # growths: launches that made the allocator cudaMalloc
    for call in range(calls_wanted):
        W = rng.choice([1, 2, 4])
        E = rng.randint(1, 8)
        transposed = call % 2 == 1
        block_n = rng.choice([128, 256])
        K = rng.randrange(64, 1025, 8 if transposed else 64)
        N = rng.randrange(8, 1025, 8)
        P = rng.choice([sms, sms - 16, 24, 4])
        while True:  # (all counts zero: no tiles, nothing to launch -- draw again)
            plan, a, w, _, _, table = _grouped_case(W, E, rng.randrange(W), K, N, block_n,
                                                    rng.randrange(1 << 30),
                                                    transposed=transposed,
                                                    scale=rng.choice([60, 300]))
            if plan.num_tiles:
                break
        send_rows = a.shape[0]
        dest = torch.full((send_rows + int(plan.problem.recv_rows), N), float("nan"),
                          device=dev, dtype=torch.bfloat16)
        send, out = dest[:send_rows], dest[send_rows:]
        config = GemmConfig(block_m=128, block_n=block_n, num_stages=5)
        assert gk.uses_warp_specialized(a, w, send, out, 128, block_n, config)
        t = plan.step_table
        lo_hi = []
        for g in range(plan.num_groups):
            rows = t[t[:, 5] == g]
            start = rows[:, 4] + rows[:, 8] * send_rows
            lo_hi.append((int(start.min()), int((start + rows[:, 1] - rows[:, 0]).max()))
                         if len(rows) else (0, 0))
        short_tiles += int(((t[:, 1] - t[:, 0]) < 128).sum())
        lo = torch.tensor([x for x, _ in lo_hi], dtype=torch.int64).to(dev)
        hi = torch.tensor([y for _, y in lo_hi], dtype=torch.int64).to(dev)
        targets = torch.tensor(plan.group_tile_counts, dtype=torch.int32).to(dev)
        counters = torch.zeros(plan.num_groups, device=dev, dtype=torch.int32)
        spins = torch.zeros(plan.num_groups, device=dev, dtype=torch.int32)
        snap = torch.ones_like(dest)
        # A kernel variant's first launch loads its module, which may wait for the running
        # consumer (test_signal_gemm._load_variant_first): launch each one alone first.
        meta = wg.launch_args(a, w, gk._weight_layout(w), send, out, table, 128, block_n, P,
                              counters, config)[2]
        if (key := tuple(sorted(meta.items()))) not in loaded:
            loaded.add(key)
            gk.grouped_signal_gemm(a, w, send, out, step_table=table, block_m=128,
                                   block_n=block_n, num_ctas=P,
                                   counters=torch.zeros_like(counters), config=config)
            torch.cuda.synchronize()
            dest.fill_(float("nan"))
        # The GEMM is enqueued first, behind a sleep, then the consumer: the engine's order.
        # Enqueued the other way round, a host-side step of the GEMM's launch that
        # synchronizes the device (a cudaMalloc when the caching allocator grows for the
        # device-side TMA descriptors' scratch; a module's first load) waits for the
        # spinning consumer, which waits for the GEMM: grouped-run2 timed out so once in
        # 383 calls.
        ready = torch.cuda.Event()
        ready.record(compute)  # buffers and counters set; the consumer waits for this only
        delay = call % 3  # 0: GEMM a little behind, 1: consumer delayed, 2: GEMM delayed
        # (the sleep must outlast the host's work between the two launches -- the GEMM's
        # launch path, the allocator query, the consumer's launch -- so the consumer spins
        # before the GEMM starts: 30,000 cycles gave 5 waits in 3,000 calls (grouped-run3),
        # 300,000-1,500,000 gave 403 in 4,000 and 205 in 3,000 (grouped-run4/5))
        torch.cuda._sleep({0: 2_000_000, 1: 1_000,
                           2: rng.randint(2_000_000, 4_000_000)}[delay])
        segments = torch.cuda.memory_stats(dev).get("segment.all.allocated", 0)
        gk.grouped_signal_gemm(a, w, send, out, step_table=table, block_m=128, block_n=block_n,
                               num_ctas=P, counters=counters, config=config)
        growths += torch.cuda.memory_stats(dev).get("segment.all.allocated", 0) > segments
        with torch.cuda.stream(consumer):
            consumer.wait_event(ready)
            if delay == 1:
                torch.cuda._sleep(rng.randint(1_000, 100_000))
            wait_and_snapshot[(1,)](counters, targets, lo, hi, dest, snap, spins,
                                    plan.num_groups, N, 1 << 22, BLOCK=4096, num_warps=8)
        compute.wait_stream(consumer)
        covered = torch.zeros(dest.shape[0], dtype=torch.bool, device=dev)
        for x, y in lo_hi:
            covered[x:y] = True
        torn[call] = (snap[covered].view(torch.int16) != dest[covered].view(torch.int16)).sum()
        timeouts[call] = (spins < 0).sum()
        bad_counts[call] = (counters != targets).sum()
        spun[call] = (spins > 0).sum()
        cases.append(dict(W=W, E=E, K=K, N=N, P=P, block_n=block_n, transposed=transposed))
        if call % 100 == 0:  # the buffer itself is right
            send_ref, out_ref = torch.full_like(send, float("nan")), torch.full_like(
                out, float("nan"))
            gk.grouped_signal_gemm_ref(a, w, send_ref, out_ref, table)
            torch.testing.assert_close(send, send_ref, equal_nan=True, rtol=3e-2, atol=3e-2)
            torch.testing.assert_close(out, out_ref, equal_nan=True, rtol=3e-2, atol=3e-2)
        groups += plan.num_groups
    torch.cuda.synchronize()
    bad = (torn > 0) | (timeouts > 0) | (bad_counts > 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        pytest.fail(f"call {i} {cases[i]}: {int(torn[i])} elements read before they were "
                    f"final, {int(timeouts[i])} waits timed out, {int(bad_counts[i])} "
                    f"counters off target")
    waited = int(spun.sum())
    print(f"\ngrouped stress: {calls_wanted} calls, {groups} group checks, 0 torn reads, "
          f"{waited} groups waited for their count, {short_tiles} short tiles, "
          f"{len(loaded)} kernel variants, {growths} launches that grew the allocator")
    assert waited >= calls_wanted // 10, "the consumer almost never waited: test too weak"
    assert short_tiles >= calls_wanted, "too few short tiles: test too weak"
