"""Overlap engine on real GPUs: correctness vs torch.matmul + NCCL, many calls, CUDA graphs.

Single-GPU tests run a world of one (NCCL with one rank still runs every engine step:
counters, waits, collectives on the watcher stream).  At world size 1 the default call runs
the plain GEMM (nothing to hide), so every test that means the overlap engine passes an
explicit ``config=`` with two groups or more (:func:`_config`).  Outputs are poisoned with
NaN, so an unwritten row fails.  Multi-GPU tests (W = 2, 4) spawn one process per GPU with
an NCCL group.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.distributed as dist

import flashoverlap as fo
from flashoverlap import collectives

pytestmark = pytest.mark.gpu

OPS = ("all_reduce", "reduce_scatter")


def _sms():
    return torch.cuda.get_device_properties(0).multi_processor_count


def _config(M, N, W, op, groups=4, reserve=16, block=None):
    """An explicit plan of ``min(groups, bands)`` groups of whole bands on ``SMs - reserve``
    CTAs (``block``: the tile, default the device's); the band height (``group_m``) shrinks
    so that small ``M`` still has several."""
    from flashoverlap.kernels import default_block_shape
    from flashoverlap.plan import num_bands_for

    bm, bn = block or default_block_shape(torch.device("cuda", 0))
    problem = fo.Problem(M, N, 8, "bfloat16", W, op)
    tiles_m = -(-problem.rows_per_block // bm)
    group_m = max(1, min(8, tiles_m // groups))
    base = fo.PlanConfig(block_m=bm, block_n=bn, num_ctas=_sms() - reserve, group_m=group_m)
    bands = num_bands_for(problem, base)
    g = min(groups, bands)
    sizes = tuple(bands // g + (1 if i < bands % g else 0) for i in range(g))
    return dataclasses.replace(base, group_bands=sizes)


def _rel(x, ref):
    x, ref = x.detach(), ref.detach()
    return float((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _nan(*shape, dtype=torch.bfloat16):
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


def _result_rows(op, M, W=1):
    return collectives.get(op).result_rows(M, W)


def _call(op, a, b, **kw):
    return fo.gemm_collective(a, b, collectives.get(op), **kw)


def _workspace(M, N, K, op, config, dtype=torch.bfloat16):
    """The cached workspace of the plan the ops built for this call signature."""
    from flashoverlap.engine.workspace import cached_workspaces

    problem = fo.Problem(M, N, K, str(dtype).removeprefix("torch."), 1, op)
    found = [w for w in cached_workspaces()
             if w.plan.problem == problem and w.plan.config == config]
    assert found, f"no workspace for {problem} {config}"
    return found[-1]


SHAPES = [(4096, 8192, 2048), (3000, 5000, 1000), (1027, 2049, 515), (8192, 1024, 7168),
          (257, 8192, 64)]


@pytest.mark.parametrize("M,N,K", [(2048, 4096, 1024), (1000, 1024, 520)])
def test_overlap_with_128x128_tiles_w1(world1, M, N, K):
    """Plans of 128 x 128 tiles (what policy.choose_config takes for small problems:
    kernels.wave_tile) through the overlap engine: the launch without a configuration takes
    the tile's measured stages (kernels.config_for_tile) -- on sm_90 with whole tiles the
    warp-specialized kernel --, every element written, within 1e-2 of fp32 matmul."""
    torch.manual_seed(M + K)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16).t()
    for op in OPS:
        config = _config(M, N, 1, op, block=(128, 128))
        for call in range(2):
            out = _nan(_result_rows(op, M), N)
            _call(op, a, b, out=out, engine="overlap", config=config)
            torch.cuda.synchronize()
            assert not out.isnan().any(), f"{op} call {call}: unwritten elements"
            assert _rel(out, a.float() @ b.float()) <= 1e-2, f"{op} call {call}"
        assert _workspace(M, N, K, op, config).plan.config.block_n == 128


@pytest.mark.parametrize("transposed", [False, True])
def test_overlap_runs_the_cluster_kernel_at_reduced_p_w1(world1, transposed):
    """At P = SMs - 16 in [112, 121) on sm_90 the engine's signal GEMM takes the table's
    choice (kernels.plan_gemm_config): the CUDA C cluster kernel in clusters of 4 where the
    plan lets it (bands of 8 tile rows, no split last wave) -- every element written and
    within 1e-2 of fp32 matmul, for both ops, over repeated calls."""
    from flashoverlap.kernels import cluster_gemm

    if torch.cuda.get_device_capability() != (9, 0) or not cluster_gemm.available() \
            or not 112 <= _sms() - 16 <= 120:
        pytest.skip("needs an sm_90 GPU with 128-136 SMs and NVRTC")
    M, N, K = 4096, 8192, 1024
    torch.manual_seed(11)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16).t() if transposed
         else torch.randn(K, N, device="cuda", dtype=torch.bfloat16))
    ref = a.float() @ b.float()
    for op in OPS:
        config = _config(M, N, 1, op)
        for call in range(3):
            out = _nan(_result_rows(op, M), N)
            _call(op, a, b, out=out, engine="overlap", config=config)
            torch.cuda.synchronize()
            assert not out.isnan().any(), f"{op} call {call}: unwritten elements"
            assert _rel(out, ref) <= 1e-2, f"{op} call {call}"
        launcher = _workspace(M, N, K, op, config)._launchers[None]
        assert launcher.config.cluster_ctas == 4
        kernels = [entry[0] for entry in launcher._entries._kernels.values()]
        assert kernels and all(isinstance(k, cluster_gemm.ClusterGemm) for k in kernels), op


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_overlap_matches_matmul_w1(world1, M, N, K, dtype, transposed):
    torch.manual_seed(M + N + K)
    a = torch.empty(M, K, device="cuda", dtype=dtype)
    b = (torch.empty(N, K, device="cuda", dtype=dtype).t() if transposed
         else torch.empty(K, N, device="cuda", dtype=dtype))
    for op in OPS:
        config = _config(M, N, 1, op)
        # Call 1 compiles and launches through the JIT; calls 2-3 take the direct launches.
        for call in range(3):
            a.normal_()
            b.normal_()
            ref = a.float() @ b.float()
            out = _nan(_result_rows(op, M), N, dtype=dtype)
            _call(op, a, b, out=out, engine="overlap", config=config)
            torch.cuda.synchronize()
            assert not out.isnan().any(), f"{op} call {call}: unwritten elements"
            assert _rel(out, ref) <= 1e-2, f"{op} call {call}"
        ws = _workspace(M, N, K, op, config, dtype)
        assert ws.plan.num_groups == len(config.group_bands)


def test_policy_at_world_size_one(world1):
    """Default call at W = 1: the plain GEMM; an explicit config: the overlap engine."""
    from flashoverlap.policy import decide

    device = torch.device("cuda", 0)
    for op in OPS:
        coll = collectives.get(op)
        d = decide(coll, 4096, 8192, 2048, torch.bfloat16, 1, device, dist.group.WORLD, None,
                   None)
        assert d.path == "gemm" and d.engine == "overlap", d
        config = _config(4096, 8192, 1, op)
        d = decide(coll, 4096, 8192, 2048, torch.bfloat16, 1, device, dist.group.WORLD, None,
                   config)
        assert d.path == "overlap" and d.plan.num_groups >= 2, d
    a = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(2048, 8192, device="cuda", dtype=torch.bfloat16)
    out = fo.gemm_all_reduce(a, b)  # engine=None, no config: the plain GEMM at W = 1
    assert torch.equal(out, torch.matmul(a, b))
    for M in (1, 16, 128):  # small M with an explicit plan still overlaps and is right
        a = torch.randn(M, 2048, device="cuda", dtype=torch.bfloat16)
        out = fo.gemm_all_reduce(a, b, config=_config(M, 8192, 1, "all_reduce"))
        assert _rel(out, a.float() @ b.float()) <= 1e-2


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
        assert len(ws.gemm(None)._entries) == 2  # one compiled kernel per alignment


def test_engine_without_cuda_bindings_paths(world1, monkeypatch):
    """What a machine without cuda-bindings runs: NVRTC spin-kernel waits and torch's event
    and counter calls instead of the driver ones.  Several calls, graph capture included."""
    from flashoverlap import settings, stream_ops
    from flashoverlap.engine import clear_workspaces

    monkeypatch.setenv(settings.WAIT_ENV, "kernel")
    monkeypatch.setattr(stream_ops, "stream_ops_for", stream_ops.TorchStreamOps)
    clear_workspaces()
    try:
        M, N, K = 3000, 4096, 1024
        for op in OPS:
            config = _config(M, N, 1, op, groups=5)
            a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
            out = _nan(M, N)
            for _ in range(3):
                a.normal_()
                out.fill_(float("nan"))
                _call(op, a, b, out=out, engine="overlap", config=config)
                torch.cuda.synchronize()
                assert _rel(out, a.float() @ b.float()) <= 1e-2, op
            ws = _workspace(M, N, K, op, config)
            assert isinstance(ws.sync, stream_ops.TorchStreamOps)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # warmed up by the calls above
                _call(op, a, b, out=out, engine="overlap", config=config)
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
    and results stay right through evictions.  ReduceScatter: its workspaces hold the send
    buffers the budget counts (AllReduce writes the result in place and holds none)."""
    from flashoverlap import engine, settings
    from flashoverlap.engine.workspace import cached_workspaces

    engine.clear_workspaces()
    # ReduceScatter at one rank runs in place (no send buffer): a workspace is its step table
    # and counters, a few KiB each (plus the split-last-wave slots where its GEMM splits:
    # MiBs), so a budget of 16 KiB holds two or three of them, or only the newest.
    monkeypatch.setenv(settings.WORKSPACE_MB_ENV, str(16 / 1024))
    N, K = 4096, 1024
    op = "reduce_scatter"
    try:
        # A captured graph on one shape: its workspace must survive every eviction.
        M0 = 2048
        config0 = _config(M0, N, 1, op)
        a0 = torch.randn(M0, K, device="cuda", dtype=torch.bfloat16)
        b0 = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        out0 = torch.empty(M0, N, device="cuda", dtype=torch.bfloat16)
        fo.gemm_reduce_scatter(a0, b0, out=out0, engine="overlap", config=config0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fo.gemm_reduce_scatter(a0, b0, out=out0, engine="overlap", config=config0)
        shapes = (1024, 1536, 2560, 3072, 3584)
        budget = settings.settings().workspace_bytes
        for _ in range(3):
            for M in shapes:
                a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                out = _nan(M, N)
                fo.gemm_reduce_scatter(a, b0, out=out, engine="overlap",
                                       config=_config(M, N, 1, op))
                torch.cuda.synchronize()
                assert _rel(out, a.float() @ b0.float()) <= 1e-2, M
                held = cached_workspaces()
                unpinned = sum(w.nbytes for w in held if not w.pinned)
                newest = held[-1].nbytes
                assert unpinned <= max(budget, newest), [w.nbytes for w in held]
                assert any(w.pinned for w in held), "the graph's workspace was evicted"
            a0.normal_()
            out0.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert _rel(out0, a0.float() @ b0.float()) <= 1e-2
        assert len(cached_workspaces()) < 1 + len(shapes), "nothing was evicted"
    finally:
        engine.clear_workspaces()


@pytest.mark.parametrize("op,replicated", [("all_reduce", True), ("all_reduce", False),
                                           ("reduce_scatter", False)])
def test_residual_error_no_larger_than_torch(world1, op, replicated):
    """residual= (in the GEMM epilogue, or after each group): eager out-of-place, in place
    (``out=residual``) and graph replay, each no less accurate than torch's matmul ->
    collective -> add in the same dtype; also the default (plain GEMM at W = 1) path."""
    coll = collectives.get(op)
    group = dist.group.WORLD
    for M, N, K, config in ((3000, 5000, 1000, _config(3000, 5000, 1, op)),
                            (64, 4096, 1024, None)):
        torch.manual_seed(M)
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16).t()
        rows = coll.result_rows(M, 1)
        residual = torch.randn(rows, N, device="cuda", dtype=torch.bfloat16)
        exact = a.double() @ b.double() + residual.double()
        prod = torch.matmul(a, b)
        recv = prod if coll.in_place else torch.empty(rows, N, device="cuda", dtype=a.dtype)
        coll.torch_group(prod, recv, group)()
        torch_err = _rel(recv + residual, exact)
        limit = 1.05 * torch_err + 1e-6

        def run(out, res):
            return _call(op, a, b, out=out, residual=res, residual_replicated=replicated,
                         engine="overlap", config=config)

        out = _nan(rows, N)
        run(out, residual)
        torch.cuda.synchronize()
        print(f"residual {op} replicated={replicated} M={M}: error {_rel(out, exact):.3e}, "
              f"torch's {torch_err:.3e}, ratio {_rel(out, exact) / torch_err:.3f}")
        assert _rel(out, exact) <= limit, (M, "out-of-place", _rel(out, exact), torch_err)
        inplace = residual.clone()
        run(inplace, inplace)
        torch.cuda.synchronize()
        assert _rel(inplace, exact) <= limit, (M, "in place", _rel(inplace, exact), torch_err)
        if config is None:
            continue
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run(inplace, inplace)
        for _ in range(2):
            inplace.copy_(residual)
            graph.replay()
            torch.cuda.synchronize()
            assert _rel(inplace, exact) <= limit, (M, "graph replay")


def test_watcher_stream_has_the_greatest_priority():
    """The watcher's collectives must go before pending kernels of the caller's streams:
    its priority is the device's greatest (the most negative number), not torch's default."""
    from flashoverlap.engine.workspace import watcher_stream

    least, greatest = torch.cuda.Stream.priority_range()
    assert greatest < least, "this GPU has no stream priorities"
    assert watcher_stream(torch.device("cuda", 0)).priority == greatest


def test_calls_from_two_streams_share_the_workspace_safely(world1):
    """Back-to-back calls of one plan from two streams with no user sync between them: the
    second call's GEMM must not re-arm the counters or overwrite the send buffer that the
    first call's watcher still uses.

    The watcher stream is held up for ~1 ms at the start of each round, so without the
    engine's wait on the previous call every later GEMM runs ahead of the collectives it
    would corrupt (the ReduceScatter copies its packed send buffer into the result)."""
    from flashoverlap.engine.workspace import watcher_stream

    M, N, K = 4096, 4096, 2048
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    watcher = watcher_stream(torch.device("cuda", 0))
    for op in OPS:
        config = _config(M, N, 1, op, groups=6)
        inputs = [(torch.randn(M, K, device="cuda", dtype=torch.bfloat16),
                   torch.randn(K, N, device="cuda", dtype=torch.bfloat16)) for _ in range(6)]
        outs = [_nan(M, N) for _ in inputs]
        _call(op, *inputs[0], out=outs[0], engine="overlap", config=config)  # warm-up
        outs[0].fill_(float("nan"))
        torch.cuda._sleep(1000)  # load the sleep kernel before any wait is pending
        torch.cuda.synchronize()
        for _ in range(3):
            with torch.cuda.stream(watcher):
                torch.cuda._sleep(2_000_000)
            for i, (a, b) in enumerate(inputs):
                with torch.cuda.stream(streams[i % 2]):
                    _call(op, a, b, out=outs[i], engine="overlap", config=config)
            torch.cuda.synchronize()
            for (a, b), out in zip(inputs, outs):
                assert _rel(out, a.float() @ b.float()) <= 1e-2, op
                out.fill_(float("nan"))


@pytest.mark.parametrize("op", OPS)
def test_a_call_that_fails_mid_loop_leaves_the_next_ones_right(world1, op, monkeypatch):
    """Eager calls wait for epoch targets (engine.overlap).  A call whose NCCL enqueue
    raises after the GEMM has still counted a whole epoch, and its `done` was never recorded:
    the next call must wait for what the failed call enqueued and for its own epoch -- not
    pass its waits early (NaN rows from the poisoned result would show) and not hang."""
    M, N, K = 2048, 2048, 1024
    config = _config(M, N, 1, op, groups=4)
    coll = collectives.get(op)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    exact = a.float() @ b.float()
    out = _nan(_result_rows(op, M), N)
    _call(op, a, b, out=out, engine="overlap", config=config)  # warm-up: workspace, JIT
    torch.cuda.synchronize()
    real, calls = type(coll).launch_group, []

    def failing(self, nccl, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected NCCL failure")
        return real(self, nccl, *args)

    monkeypatch.setattr(type(coll), "launch_group", failing)
    with pytest.raises(RuntimeError, match="injected"):
        _call(op, a, b, out=out, engine="overlap", config=config)
    monkeypatch.setattr(type(coll), "launch_group", real)
    for _ in range(3):
        out.fill_(float("nan"))
        _call(op, a, b, out=out, engine="overlap", config=config)
        torch.cuda.synchronize()
        assert _rel(out, exact[: out.shape[0]]) <= 1e-2, op
    ws = _workspace(M, N, K, op, config)
    torch.cuda.synchronize()
    # warm-up, failed call, 3 calls: 5 epochs counted on the eager set, none on the other
    assert ws.epoch == 5 and not ws.dirty
    assert ws.counters.tolist() == [5 * int(t) for t in ws.plan.group_tile_counts]
    assert ws.captured_counters.tolist() == [0] * ws.plan.num_groups


@pytest.mark.parametrize("op", OPS)
def test_epoch_targets_wrap_around_2_to_the_32(world1, op):
    """Call n waits for n x tiles(g) mod 2**32: counters and targets wrap together (the
    wrap-safe GEQ compare).  Start a few epochs before the wrap and check every call."""
    M, N, K = 2048, 2048, 512
    config = _config(M, N, 1, op, groups=4)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    out = _nan(_result_rows(op, M), N)
    _call(op, a, b, out=out, engine="overlap", config=config)  # warm-up
    torch.cuda.synchronize()
    ws = _workspace(M, N, K, op, config)
    tiles = [int(t) for t in ws.plan.group_tile_counts]
    start = 2**32 - 3  # epoch and counters wrap at the 3rd call
    ws.epoch = start
    wrapped = [((start * t) & 0xFFFFFFFF) for t in tiles]
    ws.counters.copy_(torch.tensor([w - 2**32 if w >= 2**31 else w for w in wrapped],
                                   dtype=torch.int32))
    torch.cuda.synchronize()
    for _ in range(6):
        a.normal_()
        out.fill_(float("nan"))
        _call(op, a, b, out=out, engine="overlap", config=config)
        torch.cuda.synchronize()
        assert _rel(out, (a.float() @ b.float())[: out.shape[0]]) <= 1e-2, op
    assert ws.epoch == 3  # wrapped
    assert ws.counters.tolist() == [3 * t for t in tiles]


@pytest.mark.parametrize("op", OPS)
def test_overlap_equals_signal_gemm_then_collective_bitwise(world1, op):
    """Overlap engine vs its sequential twin: the same kernel on the same plan without
    signals, then one NCCL call of the collective over the whole range (exact at W = 1)."""
    from flashoverlap.collectives import NcclStream
    from flashoverlap.comm import get_communicator
    from flashoverlap.kernels.signal_gemm import signal_gemm
    from flashoverlap.nccl_lib import nccl_dtype, nccl_red_op
    from flashoverlap.policy import get_plan

    coll = collectives.get(op)
    M, N, K = 2500, 3000, 1024
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    config = _config(M, N, 1, op)
    got = _call(op, a, b, engine="overlap", config=config)
    plan = get_plan(fo.Problem(M, N, K, "bfloat16", 1, op), config)
    engine_options = _workspace(M, N, K, op, config).gemm(None).config  # same kernel options
    dest = _nan(M, N)
    signal_gemm(a, b, dest, step_table=torch.from_numpy(plan.step_table.copy()).cuda(),
                block_m=config.block_m, block_n=config.block_n, num_ctas=config.num_ctas,
                rows_per_block=plan.problem.rows_per_block, config=engine_options)
    result = dest if coll.in_place else _nan(coll.result_rows(M, 1), N)
    comm = get_communicator(None, device=torch.device("cuda", 0))
    stream = torch.cuda.current_stream()
    coll.launch_group(NcclStream(comm.lib, comm.handle, stream.cuda_stream,
                                 nccl_dtype(torch.bfloat16), nccl_red_op("sum"), 0, 1),
                      dest.data_ptr(), result.data_ptr(), dest.numel(), result.numel())
    torch.cuda.synchronize()
    assert torch.equal(got, result)


@pytest.mark.parametrize("op", OPS)
def test_reference_engine_equals_sequential_bitwise(world1, op):
    """Reference engine vs the sequential path: one group is the same torch.matmul then the
    same collective (bitwise); several groups agree to rounding."""
    from flashoverlap.engine import run_sequential

    M, N, K = 3000, 4096, 1024
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    rows = _result_rows(op, M)
    want = _nan(rows, N)
    run_sequential(collectives.get(op), a, b, dist.group.WORLD, want, world_size=1)
    assert torch.equal(want, _call(op, a, b, engine="sequential"))
    many = _config(M, N, 1, op)
    one = dataclasses.replace(many, group_bands=(sum(many.group_bands),))
    got = _call(op, a, b, out=_nan(rows, N), engine="reference", config=one)
    assert torch.equal(got, want)
    got = _call(op, a, b, out=_nan(rows, N), engine="reference", config=many)
    assert _rel(got, want) <= 1e-2


def test_200_calls_varying_shapes_no_hang(world1):
    rng = random.Random(0)
    for i in range(200):
        M, N, K = rng.choice(SHAPES[1:] + [(640, 768, 256), (1500, 4096, 512)])
        op = rng.choice(OPS)
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        out = _call(op, a, b, engine="overlap",
                    config=_config(M, N, 1, op, groups=rng.randint(2, 6)))
        if i % 20 == 0:
            assert _rel(out, a.float() @ b.float()) <= 1e-2
    torch.cuda.synchronize()


@pytest.mark.parametrize("op", OPS)
def test_cuda_graph_capture_and_replay(world1, op):
    M, N, K = 3072, 4096, 1024
    config = _config(M, N, 1, op)
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _call(op, a, b, out=out, engine="overlap", config=config)  # warm-up: comm, JIT
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _call(op, a, b, out=out, engine="overlap", config=config)
    for _ in range(5):
        a.copy_(torch.randn_like(a))
        b.copy_(torch.randn_like(b))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(out, a.float() @ b.float()) <= 1e-2
    # Eager calls of the captured shape go on working (they count on the other counter set
    # and wait on `done`, which a capture never records), replays too.
    for _ in range(2):
        out.fill_(float("nan"))
        _call(op, a, b, out=out, engine="overlap", config=config)
        torch.cuda.synchronize()
        assert _rel(out, a.float() @ b.float()) <= 1e-2
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(out, a.float() @ b.float()) <= 1e-2


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
        out = _nan(M, N, dtype=dtype)
        fo.gemm_all_reduce(a, b, out=out, engine="overlap", config=_config(M, N, W, "all_reduce"))
        assert _rel(out, ref) <= 1e-2
        out = _nan(M // W, N, dtype=dtype)
        fo.gemm_reduce_scatter(a, b, out=out, engine="overlap",
                               config=_config(M, N, W, "reduce_scatter"))
        rows = M // W
        assert _rel(out, ref[rank * rows : (rank + 1) * rows]) <= 1e-2
        for op in OPS:  # the default policy (tuned or analytic; may run sequentially)
            got = _call(op, a, b)
            want = ref if op == "all_reduce" else ref[rank * rows : (rank + 1) * rows]
            assert _rel(got, want) <= 1e-2
    # a forced plan mismatch raises on every rank instead of hanging
    a = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16)
    cfg = _config(2048, 2048, W, "all_reduce", reserve=16 + 8 * (rank % 2))  # P differs
    with pytest.raises((RuntimeError, ValueError), match="differ|mismatch|disagree"):
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
