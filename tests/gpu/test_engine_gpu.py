"""Overlap engine on real GPUs: correctness vs torch.matmul + NCCL, many calls, CUDA graphs.

Single-GPU tests run a world of one (NCCL with one rank still runs every engine step: counters,
waits, collectives on the watcher stream, restores).  Multi-GPU tests (W = 2, 4) spawn one
process per GPU with an NCCL group.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

import flashoverlap as fo

pytestmark = pytest.mark.gpu


def _sms():
    return torch.cuda.get_device_properties(0).multi_processor_count


def _config(M, N, W, op, groups=4, reserve=16):
    from flashoverlap.kernels import default_block_shape

    bm, bn = default_block_shape(torch.device("cuda", 0))
    P = _sms() - reserve
    if op == "reduce_scatter":
        P = P // W * W
    problem = fo.Problem(M, N, 8, "bfloat16", W, op)
    waves = fo.make_plan(problem, fo.PlanConfig(block_m=bm, block_n=bn, num_ctas=P)).num_waves
    g = min(groups, waves)
    sizes = [waves // g + (1 if i < waves % g else 0) for i in range(g)]
    return fo.PlanConfig(block_m=bm, block_n=bn, num_ctas=P, group_waves=tuple(sizes))


def _rel(x, ref):
    x, ref = x.detach(), ref.detach()
    return float((x.float() - ref).norm() / ref.norm().clamp_min(1e-30))


SHAPES = [(4096, 8192, 2048), (3000, 5000, 1000), (1027, 2049, 515), (8192, 1024, 7168), (257, 8192, 64)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_overlap_matches_matmul_w1(world1, M, N, K, dtype, transposed):
    torch.manual_seed(M + N + K)
    a = torch.empty(M, K, device="cuda", dtype=dtype)
    b = (torch.empty(N, K, device="cuda", dtype=dtype).t() if transposed
         else torch.empty(K, N, device="cuda", dtype=dtype))
    for op, fn in (("all_reduce", fo.gemm_all_reduce), ("reduce_scatter", fo.gemm_reduce_scatter)):
        # Call 1 compiles and launches through the JIT; calls 2-3 take the direct launches.
        for call in range(3):
            a.normal_()
            b.normal_()
            ref = a.float() @ b.float()
            out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
            fn(a, b, out=out, engine="overlap", config=_config(M, N, 1, op))
            torch.cuda.synchronize()
            assert not out.isnan().any(), f"{op} call {call}: unwritten elements"
            assert _rel(out, ref) <= 1e-2, f"{op} call {call}"


def _workspace(M, N, K, op, config):
    from flashoverlap.engine import get_workspace
    from flashoverlap.ops import get_plan

    plan = get_plan(fo.Problem(M, N, K, "bfloat16", 1, op), config)
    return get_workspace(plan, torch.device("cuda", 0), dist.group.WORLD)


def test_direct_launches_are_used_and_rekeyed_on_alignment(world1):
    """Steady-state calls skip the Triton JIT; a 2-byte-misaligned operand or output is a new
    specialization (no TMA, unaligned stores), never the aligned kernel run on it."""
    from flashoverlap.kernels import direct_launch

    M, N, K = 2048, 3072, 1024
    config = _config(M, N, 1, "all_reduce")
    a_store = torch.empty(M, K + 8, device="cuda", dtype=torch.bfloat16)
    out_store = torch.empty(M * N + 8, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    for call in range(8):
        shift = call % 2  # alternate aligned / misaligned views of the same storage
        a = a_store[:, shift : shift + K]
        a.normal_()
        out = out_store[shift : shift + M * N].view(M, N)
        out.fill_(float("nan"))
        fo.gemm_all_reduce(a, b, out=out, engine="overlap", config=config)
        torch.cuda.synchronize()
        assert not out.isnan().any(), f"call {call}: unwritten elements"
        assert _rel(out, a.float() @ b.float()) <= 1e-2, f"call {call} (shift {shift})"
    ws = _workspace(M, N, K, "all_reduce", config)
    if direct_launch.ENABLED:
        assert len(ws.gemm._entries) == 2  # one compiled kernel per operand alignment
        assert len(ws.restore._kernels) == 2  # one per output alignment


def test_engine_without_cuda_bindings_paths(world1, monkeypatch):
    """What a machine without cuda-bindings runs: NVRTC spin-kernel waits and torch's event
    and counter calls instead of the driver ones.  Several calls, graph capture included."""
    from flashoverlap import stream_ops
    from flashoverlap.engine import clear_workspaces

    monkeypatch.setenv("FLASHOVERLAP_WAIT", "kernel")
    monkeypatch.setattr(stream_ops, "stream_ops_for", stream_ops.TorchStreamOps)
    clear_workspaces()
    try:
        M, N, K = 3000, 4096, 1024
        for op, fn in (("all_reduce", fo.gemm_all_reduce),
                       ("reduce_scatter", fo.gemm_reduce_scatter)):
            config = _config(M, N, 1, op, groups=5)
            a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
            out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
            for _ in range(3):
                a.normal_()
                out.fill_(float("nan"))
                fn(a, b, out=out, engine="overlap", config=config)
                torch.cuda.synchronize()
                assert _rel(out, a.float() @ b.float()) <= 1e-2, op
            ws = _workspace(M, N, K, op, config)
            assert isinstance(ws.sync, stream_ops.TorchStreamOps)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # warmed up by the calls above
                fn(a, b, out=out, engine="overlap", config=config)
            a.normal_()
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert _rel(out, a.float() @ b.float()) <= 1e-2, f"{op} graph"
    finally:
        clear_workspaces()  # later tests build their workspaces with the driver paths


def test_workspace_cache_is_bounded_and_keeps_graph_workspaces(world1, monkeypatch):
    """Variable M (serving prompts of many lengths) builds a workspace per shape: the cache
    evicts least recently used ones beyond its byte budget, never one a CUDA graph captured,
    and results stay right through evictions.  (That a rebuild needs no new cross-rank plan
    check is tested on gloo: tests/test_engine_agreement_gloo.py.)"""
    from flashoverlap import engine

    engine.clear_workspaces()
    monkeypatch.setenv(engine.WORKSPACE_BUDGET_ENV, "40")  # MiB: two or three of the shapes
    N, K = 4096, 1024
    try:
        # A captured graph on one shape: its workspace must survive every eviction.
        M0 = 2048
        config0 = _config(M0, N, 1, "all_reduce")
        a0 = torch.randn(M0, K, device="cuda", dtype=torch.bfloat16)
        b0 = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        out0 = torch.empty(M0, N, device="cuda", dtype=torch.bfloat16)
        fo.gemm_all_reduce(a0, b0, out=out0, engine="overlap", config=config0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fo.gemm_all_reduce(a0, b0, out=out0, engine="overlap", config=config0)
        shapes = (1024, 1536, 2560, 3072, 3584)
        for _ in range(3):
            for M in shapes:
                a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
                fo.gemm_all_reduce(a, b0, out=out, engine="overlap", config=_config(M, N, 1, "all_reduce"))
                torch.cuda.synchronize()
                assert _rel(out, a.float() @ b0.float()) <= 1e-2, M
                held = [w for k, w in engine._WORKSPACES.items() if k[1] == 0]
                unpinned = sum(w.nbytes for w in held if not w.pinned)
                newest = held[-1].nbytes
                assert unpinned <= max(engine.workspace_budget_bytes(), newest), [w.nbytes for w in held]
                assert any(w.pinned for w in held), "the graph's workspace was evicted"
            a0.normal_()
            out0.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert _rel(out0, a0.float() @ b0.float()) <= 1e-2
        assert len(engine._WORKSPACES) < 1 + len(shapes), "nothing was evicted"
    finally:
        engine.clear_workspaces()


@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter"])
def test_fused_residual_matches_separate_add_bitwise(world1, op):
    """residual= is fused into the restores: the same bits as the op followed by torch.add
    (one fp32 add, one rounding), out-of-place and in place, eager and graph-captured; and
    on the small-M fallback path."""
    fn = fo.gemm_all_reduce if op == "all_reduce" else fo.gemm_reduce_scatter
    for M, N, K, config in ((3000, 5000, 1000, _config(3000, 5000, 1, op)),
                            (64, 4096, 1024, None)):  # None: the default, a fallback at M=64
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16).t()
        residual = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        plain = fn(a, b, engine="overlap", config=config)
        want = torch.add(plain, residual)
        out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        fn(a, b, out=out, residual=residual, engine="overlap", config=config)
        torch.cuda.synchronize()
        assert torch.equal(out, want), (M, "out-of-place")
        inplace = residual.clone()
        fn(a, b, out=inplace, residual=inplace, engine="overlap", config=config)
        torch.cuda.synchronize()
        assert torch.equal(inplace, want), (M, "in place")
        if config is None:
            continue
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(a, b, out=inplace, residual=inplace, engine="overlap", config=config)
        inplace.copy_(residual)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(inplace, want), (M, "graph replay")


def test_calls_from_two_streams_share_the_workspace_safely(world1):
    """Back-to-back calls of one plan from two streams with no user sync between them: the
    second call's GEMM must not overwrite the comm buffer the first call's watcher uses.

    The watcher stream is held up for ~1 ms at the start of each round, so without the
    engine's wait on the previous call every later GEMM runs ahead of the restores it would
    corrupt (H100, with that wait removed: 3 of 3 runs failed, relative error 1.41)."""
    from flashoverlap.engine import _watcher_stream

    M, N, K = 4096, 4096, 2048
    config = _config(M, N, 1, "all_reduce", groups=6)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    inputs = [(torch.randn(M, K, device="cuda", dtype=torch.bfloat16),
               torch.randn(K, N, device="cuda", dtype=torch.bfloat16)) for _ in range(6)]
    outs = [torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
            for _ in inputs]
    fo.gemm_all_reduce(*inputs[0], out=outs[0], engine="overlap", config=config)  # warm-up
    outs[0].fill_(float("nan"))
    torch.cuda._sleep(1000)  # load the sleep kernel before any wait is pending (stream_wait)
    torch.cuda.synchronize()
    watcher = _watcher_stream(torch.device("cuda", 0))
    for _ in range(3):
        with torch.cuda.stream(watcher):
            torch.cuda._sleep(2_000_000)
        for i, (a, b) in enumerate(inputs):
            with torch.cuda.stream(streams[i % 2]):
                fo.gemm_all_reduce(a, b, out=outs[i], engine="overlap", config=config)
        torch.cuda.synchronize()
        for (a, b), out in zip(inputs, outs):
            assert _rel(out, a.float() @ b.float()) <= 1e-2
            out.fill_(float("nan"))


def test_default_engine_is_overlap_and_correct(world1):
    a = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(2048, 8192, device="cuda", dtype=torch.bfloat16)
    out = fo.gemm_all_reduce(a, b)  # engine=None: overlap (or its never-slower fallback)
    assert _rel(out, a.float() @ b.float()) <= 1e-2


def test_overlap_equals_own_sequential_path_bitwise(world1):
    """Same kernel in plain mode + one NCCL AllReduce: identical bits (W=1 reduction order)."""
    from flashoverlap.comm import get_communicator
    from flashoverlap.kernels.signal_gemm import signal_gemm
    from flashoverlap.ops import get_plan

    M, N, K = 2500, 3000, 1024
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    config = _config(M, N, 1, "all_reduce")
    got = fo.gemm_all_reduce(a, b, engine="overlap", config=config)
    plan = get_plan(fo.Problem(M, N, K, "bfloat16", 1, "all_reduce"), config)
    plain = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    table = torch.from_numpy(plan.step_table.copy()).cuda()
    signal_gemm(a, b, plain, step_table=table, block_m=config.block_m, block_n=config.block_n,
                num_ctas=config.num_ctas, counters=None, slotted=False)
    get_communicator(None, device=torch.device("cuda", 0)).all_reduce(plain, torch.cuda.current_stream())
    torch.cuda.synchronize()
    assert torch.equal(got, plain)


def test_200_calls_varying_shapes_no_hang(world1):
    rng = random.Random(0)
    for i in range(200):
        M, N, K = rng.choice(SHAPES[1:] + [(640, 768, 256), (1500, 4096, 512)])
        op = rng.choice(["all_reduce", "reduce_scatter"])
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        fn = fo.gemm_all_reduce if op == "all_reduce" else fo.gemm_reduce_scatter
        out = fn(a, b, engine="overlap", config=_config(M, N, 1, op, groups=rng.randint(1, 6)))
        if i % 20 == 0:
            assert _rel(out, a.float() @ b.float()) <= 1e-2
    torch.cuda.synchronize()


@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter"])
def test_cuda_graph_capture_and_replay(world1, op):
    M, N, K = 3072, 4096, 1024
    fn = fo.gemm_all_reduce if op == "all_reduce" else fo.gemm_reduce_scatter
    config = _config(M, N, 1, op)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(a, b, out=out, engine="overlap", config=config)  # warm-up: comm, JIT, hash check
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(a, b, out=out, engine="overlap", config=config)
    for _ in range(5):
        a.copy_(torch.randn_like(a))
        b.copy_(torch.randn_like(b))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(out, a.float() @ b.float()) <= 1e-2
    # Eager calls of the captured shape go on working (the workspace's last `done` was
    # recorded inside the capture, which an eager stream may not wait on), replays too.
    for _ in range(2):
        out.fill_(float("nan"))
        fn(a, b, out=out, engine="overlap", config=config)
        torch.cuda.synchronize()
        assert _rel(out, a.float() @ b.float()) <= 1e-2
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(out, a.float() @ b.float()) <= 1e-2


def test_small_m_falls_back_to_sequential(world1):
    from flashoverlap.engine import predicts_gain
    from flashoverlap.ops import plan_for

    for M in (16, 128):
        problem = fo.Problem(M, 8192, 2048, "bfloat16", 1, "all_reduce")
        plan = plan_for(problem, torch.device("cuda", 0))
        assert not predicts_gain(plan, torch.device("cuda", 0))
        a = torch.randn(M, 2048, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(2048, 8192, device="cuda", dtype=torch.bfloat16)
        assert _rel(fo.gemm_all_reduce(a, b), a.float() @ b.float()) <= 1e-2


# ---------------------------------------------------------------- multi-GPU (W = 2, 4)
def _multi(rank, W):
    from flashoverlap.comm import destroy_communicators

    rng = random.Random(1)
    for case in range(24):
        M = rng.choice([1024, 2048, 4000, 4096]) // W * W
        N = rng.choice([1000, 2048, 8192, 3001])
        K = rng.choice([512, 1024, 2047])
        dtype = rng.choice([torch.bfloat16, torch.float16])
        torch.manual_seed(100 * case + rank)
        a = torch.randn(M, K, device="cuda", dtype=dtype)
        b = torch.randn(K, N, device="cuda", dtype=dtype)
        ref = a.float() @ b.float()
        dist.all_reduce(ref)
        out = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
        fo.gemm_all_reduce(a, b, out=out, engine="overlap", config=_config(M, N, W, "all_reduce"))
        assert _rel(out, ref) <= 1e-2
        out = torch.full((M // W, N), float("nan"), device="cuda", dtype=dtype)
        fo.gemm_reduce_scatter(a, b, out=out, engine="overlap", config=_config(M, N, W, "reduce_scatter"))
        rows = M // W
        assert _rel(out, ref[rank * rows : (rank + 1) * rows]) <= 1e-2
    # a forced plan mismatch raises on every rank instead of hanging
    a = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16)
    cfg = _config(2048, 2048, W, "all_reduce", reserve=16 + 8 * (rank % 2))  # P differs per rank
    with pytest.raises(RuntimeError, match="differ|mismatch"):
        fo.gemm_all_reduce(a, b, engine="overlap", config=cfg)
    torch.cuda.synchronize()
    destroy_communicators()


@pytest.mark.multigpu
@pytest.mark.parametrize("W", [2, 4])
def test_overlap_multi_gpu(W):
    if torch.cuda.device_count() < W:
        pytest.skip(f"needs {W} GPUs")
    from dist_harness import run_distributed

    run_distributed(_multi, W, backend="nccl")
