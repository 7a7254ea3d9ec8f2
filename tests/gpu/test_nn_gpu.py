"""RowParallelLinear and model patching on a GPU: overlap engine, torch.compile, CUDA graphs.

A world of one NCCL rank (the ``world1`` fixture of ``tests/gpu/conftest.py``) still runs every
engine step.  At world size 1 the policy runs the plain GEMM for a call without a config, and
the layers pass none, so the ``forced_overlap`` fixture hands the policy an explicit plan of
up to 4 groups for every call (and records the decisions, which the tests check took the
overlap path): these tests exercise the signal GEMM and watcher stream through the custom op.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flashoverlap as fo
from test_engine_gpu import _config, _rel

pytestmark = pytest.mark.gpu

SHAPES = [((2, 2048), 2048, 4096), ((3000,), 1000, 2500)]  # (leading dims, K, N)


@pytest.fixture
def forced_overlap(world1, monkeypatch):
    """Every call without a config gets an explicit multi-group plan; yields the decisions."""
    from flashoverlap import ops, policy

    decisions = []
    original = policy.decide

    def decide(collective, M, N, K, dtype, world_size, device, group, engine, config):
        if config is None and engine in (None, "overlap"):
            config = _config(M, N, world_size, collective.name)
        d = original(collective, M, N, K, dtype, world_size, device, group, engine, config)
        decisions.append(d)
        return d

    monkeypatch.setattr(ops, "decide", decide)
    monkeypatch.setattr(ops, "_CALLS", {})  # no decision memoised by earlier tests
    yield decisions
    assert decisions and all(d.path == "overlap" for d in decisions), \
        [(d.path, d.engine) for d in decisions]


def _full_linear(K: int, N: int, dtype: torch.dtype, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    full = nn.Linear(K, N, device="cuda", dtype=dtype)
    with torch.no_grad():
        full.bias.normal_()
    return full


@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_parallel_linear_overlap_matches_linear(forced_overlap, lead, K, N, sequence_parallel, dtype):
    full = _full_linear(K, N, dtype)
    layer = fo.RowParallelLinear.shard_from_full(full, sequence_parallel=sequence_parallel, engine="overlap")
    x = torch.randn(*lead, K, device="cuda", dtype=dtype)
    x_ref, x_fo = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = full(x_ref), layer(x_fo)
    assert y.shape == y_ref.shape  # W = 1: the scattered shard is the whole output
    assert _rel(y, y_ref.float()) <= 1e-2
    grad = torch.randn_like(y)
    y_ref.backward(grad)
    y.backward(grad)
    assert _rel(x_fo.grad, x_ref.grad.float()) <= 1e-2
    assert _rel(layer.weight.grad, full.weight.grad.float()) <= 1e-2
    assert _rel(layer.bias.grad, full.bias.grad.float()) <= 1e-2


def test_default_engine_layer(world1):  # noqa: F811
    full = _full_linear(1024, 2048, torch.bfloat16)
    layer = fo.RowParallelLinear.shard_from_full(full)  # engine=None, W = 1: the plain GEMM
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    assert _rel(layer(x), full(x).float()) <= 1e-2


class _Block(nn.Module):
    """norm -> row-parallel projection -> residual: ops around the custom op for inductor to fuse."""

    def __init__(self, full: nn.Linear, sequence_parallel: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(full.in_features, device="cuda", dtype=full.weight.dtype)
        self.proj = fo.RowParallelLinear.shard_from_full(full, sequence_parallel=sequence_parallel,
                                                         engine="overlap")

    def forward(self, x):
        return torch.nn.functional.gelu(self.proj(self.norm(x))) * 2 + 1


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_torch_compile_fullgraph_matches_eager(forced_overlap, sequence_parallel):
    torch._dynamo.reset()
    block = _Block(_full_linear(2048, 4096, torch.bfloat16), sequence_parallel)
    compiled = torch.compile(block, fullgraph=True)  # default backend: inductor
    x = torch.randn(2, 2048, 2048, device="cuda", dtype=torch.bfloat16)
    x_e, x_c = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_e, y_c = block(x_e), compiled(x_c)
    assert _rel(y_c, y_e.float()) <= 1e-2
    grad = torch.randn_like(y_e)
    y_e.backward(grad)
    y_c.backward(grad)
    assert _rel(x_c.grad, x_e.grad.float()) <= 2e-2
    with torch.no_grad():  # a second shape recompiles and still matches
        x2 = torch.randn(4, 1024, 2048, device="cuda", dtype=torch.bfloat16)
        assert _rel(compiled(x2), block(x2).float()) <= 1e-2


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_cuda_graph_replays_layer_forward(forced_overlap, sequence_parallel):
    full = _full_linear(2048, 4096, torch.bfloat16)
    layer = fo.RowParallelLinear.shard_from_full(full, sequence_parallel=sequence_parallel, engine="overlap")
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: communicator, JIT, plan check
            for _ in range(2):
                layer(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer(x)
        for _ in range(5):
            x.copy_(torch.randn_like(x))
            y.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert _rel(y, full(x).float()) <= 1e-2


def test_patch_dtensor_model_on_gpu(forced_overlap):
    """parallelize_module on a CUDA mesh of one rank, patched vs unpatched, same parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    mlp = nn.Sequential()
    mlp.add_module("up", nn.Linear(1024, 4096, bias=False, device="cuda", dtype=torch.bfloat16))
    mlp.add_module("act", nn.GELU())
    mlp.add_module("down", nn.Linear(4096, 1024, device="cuda", dtype=torch.bfloat16))
    parallelize_module(mlp, init_device_mesh("cuda", (1,)),
                       {"up": ColwiseParallel(), "down": RowwiseParallel()})
    x = torch.randn(2, 2048, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = mlp(x)
        result = fo.patch_tensor_parallel(mlp, engine="overlap")
        assert result.patched == ["down"]
        got = mlp(x)
        result.undo()
        again = mlp(x)
    assert isinstance(got, torch.Tensor) and got.shape == want.shape
    assert _rel(got, want.float()) <= 1e-2
    assert torch.equal(again, want)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_layer_residual_fused_no_less_accurate_than_separate_add(forced_overlap,
                                                                sequence_parallel):
    """layer(x, residual=r) through the fused custom op (the residual added in the GEMM
    epilogue, before the one rounding): no less accurate than torch's linear + r in bf16, eager and
    under torch.compile (inductor, bitwise the eager op); the residual's gradient is the
    output's."""
    full = _full_linear(2048, 4096, torch.bfloat16)
    layer = fo.RowParallelLinear.shard_from_full(full, sequence_parallel=sequence_parallel,
                                                 engine="overlap")
    layer.bias = None
    x = torch.randn(4, 512, 2048, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(4, 512, 4096, device="cuda", dtype=torch.bfloat16)
    exact = x.double() @ full.weight.double().t() + r.double()
    separate = torch.nn.functional.linear(x, full.weight) + r  # torch: matmul, then add
    limit = 1.05 * _rel(separate, exact) + 1e-6
    fused = layer(x, residual=r)
    assert _rel(fused, exact) <= limit, (_rel(fused, exact), limit)
    compiled = torch.compile(lambda t, res: layer(t, residual=res), fullgraph=True)
    assert torch.equal(compiled(x, r), fused)
    rg = r.clone().requires_grad_()
    up = torch.randn_like(fused)
    (layer(x, residual=rg) * up).sum().backward()
    assert torch.equal(rg.grad, up)
