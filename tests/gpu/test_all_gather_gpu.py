"""AllGather + GEMM on one GPU (a world of one NCCL rank): kernel, overlap engine, graphs, and
1,000 calls with the watcher delayed on purpose (deadlock freedom).

At world size 1 the gather moves nothing over NCCL, but with an explicit ``config=`` the
overlap engine still runs every step: flags armed on the caller stream, the own chunk copied
and its flag written (``cuStreamWriteValue32``) on the watcher stream, the GEMM's tiles
spinning on the flag.  Outputs and the gathered buffer are poisoned with NaN, so a tile that
read its chunk before the flag shows up.
"""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.gpu


def _sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def _config(m: int, reserve: int = 16):
    import flashoverlap as fo
    from flashoverlap.kernels import default_block_shape

    bm, bn = default_block_shape(torch.device("cuda", 0))
    return fo.PlanConfig(block_m=bm, block_n=bn, num_ctas=_sms() - reserve,
                         group_m=max(1, min(8, -(-m // bm))))


def _rel(x, ref) -> float:
    return float((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _nan(*shape, dtype=torch.bfloat16):
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


@pytest.mark.parametrize("use_tma", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("W", [1, 3])
def test_gather_kernel_matches_matmul(use_tma, transposed, W):
    """The kernel alone, every rank's table, flags set, with and without waits."""
    import dataclasses

    from flashoverlap.gather_plan import GatherProblem, make_gather_plan
    from flashoverlap.kernels import default_config
    from flashoverlap.kernels.gather_gemm import gather_gemm

    torch.manual_seed(0)
    m, N, K = 1000, 1536, 1024  # chunks end inside a tile
    cfg = dataclasses.replace(default_config(torch.device("cuda", 0)), use_tma=use_tma)
    plan = make_gather_plan(GatherProblem(m, N, K, "bfloat16", W), _config(m))
    a = torch.randn(m * W, K, device="cuda", dtype=torch.bfloat16)
    b = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16).t() if transposed
         else torch.randn(K, N, device="cuda", dtype=torch.bfloat16))
    want = a.float() @ b.float()
    flags = torch.ones(W, device="cuda", dtype=torch.int32)
    for rank in range(W):
        table = torch.from_numpy(plan.step_table(rank).copy()).cuda()
        for wait in (True, False):
            out = _nan(m * W, N)
            gather_gemm(a, b, out, step_table=table, block_m=cfg.block_m, block_n=cfg.block_n,
                        num_ctas=plan.config.num_ctas, flags=flags if wait else None,
                        config=cfg)
            assert _rel(out, want) < 1e-2, (rank, wait)


def _ws_configs():
    """The warp-specialized kernel's tiles, each with its launch configuration."""
    from flashoverlap.kernels import WARP_SPECIALIZED_TILES, config_for_tile, default_config

    base = default_config(torch.device("cuda", 0))
    return [config_for_tile(base, bm, bn) for bm, bn, _ in WARP_SPECIALIZED_TILES]


@pytest.mark.parametrize("tile", [0, 1], ids=["128x256", "128x128"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("m,N,K,W", [(1024, 1024, 1024, 1), (1024, 1024, 1024, 3),
                                     (256, 512, 8192, 3)])  # the last: a split last wave
def test_gather_kernel_warp_specialized(tile, transposed, m, N, K, W):
    """Plans of whole tiles on sm_90 run the warp-specialized kernel (its loader waits on the
    flags): every rank's table, with and without waits, NaN-poisoned output, against fp32
    matmul; 256 x 512 x 8192 over 3 ranks is 12 tiles on 116 CTAs, split 4 ways along K."""
    from flashoverlap.gather_plan import GatherProblem, make_gather_plan
    from flashoverlap.kernels import tail_split
    from flashoverlap.kernels.gather_gemm import gather_gemm, uses_warp_specialized

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the warp-specialized kernel is sm_90 only")
    cfg = _ws_configs()[tile]
    torch.manual_seed(tile + W)
    pc = _config(m)
    pc = type(pc)(block_m=cfg.block_m, block_n=cfg.block_n, num_ctas=pc.num_ctas,
                  group_m=pc.group_m)
    plan = make_gather_plan(GatherProblem(m, N, K, "bfloat16", W), pc)
    assert plan.full_tiles
    a = torch.randn(m * W, K, device="cuda", dtype=torch.bfloat16)
    b = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16).t() if transposed
         else torch.randn(K, N, device="cuda", dtype=torch.bfloat16))
    want = a.float() @ b.float()
    flags = torch.ones(W, device="cuda", dtype=torch.int32)
    probe = _nan(m * W, N)
    assert uses_warp_specialized(a, b, probe, block_m=cfg.block_m, block_n=cfg.block_n,
                                 config=cfg, full_tiles=True)
    if K == 8192:
        assert tail_split(plan.num_tiles, pc.num_ctas, K // cfg.block_k)[1] == 4
    for rank in range(W):
        table = torch.from_numpy(plan.step_table(rank).copy()).cuda()
        for wait in (True, False):
            out = _nan(m * W, N)
            gather_gemm(a, b, out, step_table=table, block_m=cfg.block_m, block_n=cfg.block_n,
                        num_ctas=pc.num_ctas, flags=flags if wait else None, config=cfg,
                        full_tiles=True)
            torch.cuda.synchronize()
            assert not out.isnan().any(), (rank, wait)
            assert _rel(out, want) < 1e-2, (rank, wait)


@pytest.mark.parametrize("tile", [0, 1], ids=["128x256", "128x128"])
def test_gather_kernel_warp_specialized_waits_for_late_chunks(tile):
    """The warp-specialized gather GEMM launched while every flag is 0 and every chunk NaN;
    on the engine's watcher stream, after a ~1 ms sleep, each chunk is copied in and then its
    flag set, in slot order.  A tile whose loads ran before its chunk's flag would read NaN.
    20 rounds, each must finish (a watchdog fails a hang).  As in the engine, the watcher's
    work is enqueued before the GEMM: enqueued after it, behind the spinning CTAs, it never
    ran on one H200 -- with the pipelined kernel too, at the greatest stream priority, every
    kernel loaded beforehand (``results/2026-12-03-h200/gather-ws-run25``)."""
    from flashoverlap.gather_plan import GatherProblem, make_gather_plan
    from flashoverlap.kernels.gather_gemm import GatherGemmLauncher

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the warp-specialized kernel is sm_90 only")
    cfg = _ws_configs()[tile]
    W, rank, m, N, K = 4, 1, 512, 1024, 2048
    pc = _config(m)
    pc = type(pc)(block_m=cfg.block_m, block_n=cfg.block_n, num_ctas=pc.num_ctas,
                  group_m=pc.group_m)
    plan = make_gather_plan(GatherProblem(m, N, K, "bfloat16", W), pc)
    table = torch.from_numpy(plan.step_table(rank).copy()).cuda()
    flags = torch.zeros(W, device="cuda", dtype=torch.int32)
    launch = GatherGemmLauncher(table, flags, block_m=cfg.block_m, block_n=cfg.block_n,
                                num_ctas=pc.num_ctas, config=cfg, full_tiles=True)
    src = torch.randn(m * W, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16).t()
    want = src.float() @ b.float()
    a, out = _nan(m * W, K), _nan(m * W, N)
    from flashoverlap.engine.workspace import watcher_stream

    side = watcher_stream(torch.device("cuda", 0))
    torch.cuda._sleep(1000)  # load the sleep kernel before a GEMM can spin (lazy loading)
    flags.fill_(1)
    flags[0:1].fill_(1)
    a.copy_(src)
    a[:m].copy_(src[:m])
    launch(src, b, out)  # compile and load every kernel before a GEMM can spin
    torch.cuda.synchronize()
    for round_ in range(20):
        a.fill_(float("nan"))
        out.fill_(float("nan"))
        flags.zero_()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # enqueued first (the engine's order), runs later
            torch.cuda._sleep(2_000_000)
            for j in range(W):  # slot j holds source rank (rank - j) mod W
                rows = slice(((rank - j) % W) * m, ((rank - j) % W + 1) * m)
                a[rows].copy_(src[rows])
                flags[j:j + 1].fill_(1)
        launch(a, b, out)
        torch.cuda.current_stream().wait_stream(side)
        _finish_or_fail(60.0)
        assert not out.isnan().any(), round_
        assert _rel(out, want) < 1e-2, round_


def test_all_gather_gemm_overlap_engine_one_rank(world1):
    import flashoverlap as fo

    torch.manual_seed(1)
    for m, N, K, transposed in ((4096, 4096, 2048, True), (777, 1000, 512, False)):
        a = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        b = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16).t() if transposed
             else torch.randn(K, N, device="cuda", dtype=torch.bfloat16))
        want = a @ b
        for _ in range(3):
            out, gathered = _nan(m, N), _nan(m, K)
            got = fo.all_gather_gemm(a, b, out=out, gathered=gathered, engine="overlap",
                                     config=_config(m))
            assert got is out and torch.equal(gathered, a)
            assert _rel(out, want) < 1e-2
        plain = fo.all_gather_gemm(a, b)  # default at W = 1: the plain GEMM
        assert _rel(plain, want) < 1e-2
        seq = fo.all_gather_gemm(a, b, engine="sequential")
        assert _rel(seq, want) < 1e-2


def test_all_gather_gemm_cuda_graph(world1):
    import flashoverlap as fo

    m, N, K = 2048, 2048, 1024
    cfg = _config(m)
    a = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    out, gathered = _nan(m, N), _nan(m, K)
    fo.all_gather_gemm(a, b, out=out, gathered=gathered, engine="overlap", config=cfg)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fo.all_gather_gemm(a, b, out=out, gathered=gathered, engine="overlap", config=cfg)
    for seed in range(3):
        torch.manual_seed(seed)
        a.copy_(torch.randn_like(a))
        out.fill_(float("nan"))
        gathered.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(gathered, a) and _rel(out, a @ b) < 1e-2


def _finish_or_fail(deadline_s: float) -> None:
    event = torch.cuda.Event()
    event.record()
    start = time.monotonic()
    while not event.query():
        if time.monotonic() - start > deadline_s:
            pytest.fail(f"GPU work not finished after {deadline_s} s: the GEMM waits on a flag "
                        "that never comes (deadlock)")
        time.sleep(0.01)


def test_delayed_watcher_thousand_calls_no_hang(world1):
    """The watcher sleeps ~0.5 ms before the first chunk of every call, so the GEMM's CTAs
    are resident and spinning on the flag when it arrives; 1,000 calls must finish, and every
    checked result must be right (no tile read its chunk before the flag)."""
    import flashoverlap as fo
    from flashoverlap.engine import gather as engine

    m, N, K = 1024, 1024, 1024
    cfg = _config(m)
    a = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    want = a.float() @ b.float()
    out, gathered = _nan(m, N), _nan(m, K)
    fo.all_gather_gemm(a, b, out=out, gathered=gathered, engine="overlap", config=cfg)
    torch.cuda._sleep(1000)  # load the sleep kernel before a GEMM can spin (lazy loading)
    torch.cuda.synchronize()
    engine.WATCHER_DELAY_CYCLES = 1_000_000
    try:
        for i in range(1000):
            gathered.fill_(float("nan"))  # caller stream, before the call: the chunk must
            out.fill_(float("nan"))       # arrive (copy + flag) before any tile reads it
            fo.all_gather_gemm(a, b, out=out, gathered=gathered, engine="overlap", config=cfg)
            if i % 100 == 99:
                _finish_or_fail(60.0)
                assert torch.equal(gathered, a), i
                assert _rel(out, want) < 1e-2, i
        _finish_or_fail(60.0)
    finally:
        engine.WATCHER_DELAY_CYCLES = 0


def test_column_parallel_layer_on_cuda(world1):
    """ColumnParallelLinear (both forms) forward and backward on CUDA at W = 1."""
    import flashoverlap as fo

    torch.manual_seed(2)
    full = torch.nn.Linear(512, 768, device="cuda", dtype=torch.bfloat16)
    for sp in (False, True):
        layer = fo.ColumnParallelLinear.shard_from_full(full, sequence_parallel=sp)
        x = torch.randn(64, 2, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = layer(x), full(x_ref)
        assert _rel(y, y_ref) < 1e-2
        gy = torch.randn_like(y)
        (y * gy).sum().backward()
        (y_ref * gy).sum().backward()
        assert _rel(x.grad, x_ref.grad) < 2e-2
        assert _rel(layer.weight.grad, full.weight.grad) < 2e-2
        full.zero_grad()
