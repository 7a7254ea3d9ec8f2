"""ColumnParallelLinear (and the column -> row MLP block) on gloo against unsharded nn.Linear.

Forward, input gradient and weight/bias gradients of the column layer with and without
sequence parallelism; RowParallelLinear's sequence-parallel backward (now an
``all_gather_gemm``); a 2-layer tensor-parallel MLP (column -> GELU -> row) trained 20 SGD
steps with and without SP, whose losses must equal the unsharded model's within fp32
tolerance; ``from_linear``; ``torch.compile(fullgraph=True)``; ``patch_tensor_parallel(
colwise=True)`` on a DTensor ColwiseParallel/RowwiseParallel MLP.  One spawn per world size.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import flashoverlap as fo
from dist_harness import run_distributed
from flashoverlap.column_parallel import ColumnParallelLinear

TOL = dict(rtol=1e-5, atol=1e-5)


def _shard(t: torch.Tensor, rank: int, W: int, dim: int = 0) -> torch.Tensor:
    return t.chunk(W, dim=dim)[rank]


def _check_column_layer(rank: int, W: int, engine: str, sp: bool) -> None:
    torch.manual_seed(0)
    H, F, S, B = 6, 4 * W, 2 * W, 3
    full = nn.Linear(H, F)
    x = torch.randn(S, B, H)
    gy = torch.randn(S, B, F)
    layer = ColumnParallelLinear.shard_from_full(full, sequence_parallel=sp, engine=engine)
    assert tuple(layer.weight.shape) == (F // W, H)
    x_full = x.clone().requires_grad_()
    y_full = full(x_full)
    (y_full * gy).sum().backward()
    x_in = (_shard(x, rank, W) if sp else x).clone().requires_grad_()
    y = layer(x_in)
    assert tuple(y.shape) == (S, B, F // W)
    torch.testing.assert_close(y, _shard(y_full.detach(), rank, W, dim=-1), **TOL)
    (y * _shard(gy, rank, W, dim=-1)).sum().backward()
    want_gx = _shard(x_full.grad, rank, W) if sp else x_full.grad
    torch.testing.assert_close(x_in.grad, want_gx, **TOL)
    torch.testing.assert_close(layer.weight.grad, _shard(full.weight.grad, rank, W), **TOL)
    torch.testing.assert_close(layer.bias.grad, _shard(full.bias.grad, rank, W), **TOL)


def _check_row_sp_backward(rank: int, W: int, engine: str) -> None:
    """RowParallelLinear's SP backward (all_gather_gemm of grad_out) against nn.Linear."""
    torch.manual_seed(1)
    F, H, S, B = 4 * W, 5, 2 * W, 2
    full = nn.Linear(F, H, bias=False)
    x = torch.randn(S, B, F)
    gy = torch.randn(S, B, H)
    x_full = x.clone().requires_grad_()
    (full(x_full) * gy).sum().backward()
    layer = fo.RowParallelLinear.shard_from_full(full, sequence_parallel=True, engine=engine)
    x_in = _shard(x, rank, W, dim=-1).clone().requires_grad_()
    y = layer(x_in)
    (y * _shard(gy, rank, W)).sum().backward()
    torch.testing.assert_close(x_in.grad, _shard(x_full.grad, rank, W, dim=-1), **TOL)
    torch.testing.assert_close(layer.weight.grad, _shard(full.weight.grad, rank, W, dim=1),
                               **TOL)


class _MLP(nn.Module):
    def __init__(self, up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _check_training(rank: int, W: int, engine: str, sp: bool) -> None:
    """20 SGD steps of column -> GELU -> row; losses equal the unsharded model's."""
    torch.manual_seed(2)
    H, F, S, B = 8, 4 * W, 2 * W, 3
    ref = _MLP(nn.Linear(H, F), nn.Linear(F, H))
    with torch.no_grad():
        ref.down.bias.normal_()
    tp = _MLP(ColumnParallelLinear.shard_from_full(ref.up, sequence_parallel=sp, engine=engine),
              fo.RowParallelLinear.shard_from_full(ref.down, sequence_parallel=sp,
                                                   engine=engine))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    tp_opt = torch.optim.SGD(tp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(5)
    for step in range(20):
        x = torch.randn(S, B, H, generator=g)
        target = torch.randn(S, B, H, generator=g)
        numel = target.numel()
        ref_opt.zero_grad()
        ref_loss = (ref(x) - target).square().sum() / numel
        ref_loss.backward()
        ref_opt.step()

        tp_opt.zero_grad()
        if sp:
            y = tp(_shard(x, rank, W))
            local = (y - _shard(target, rank, W)).square().sum() / numel
            local.backward()
            # SP: the replicated row bias sees only this rank's rows (Megatron sums it)
            dist.all_reduce(tp.down.bias.grad)
            loss = local.detach().clone()
            dist.all_reduce(loss)
        else:
            loss = (tp(x) - target).square().sum() / numel
            loss.backward()
        tp_opt.step()
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"step {step} sp={sp}: {m}")


def _check_compile_and_api(rank: int, W: int) -> None:
    torch.manual_seed(3)
    full = nn.Linear(5, 2 * W)
    for sp in (False, True):
        layer = ColumnParallelLinear.shard_from_full(full, sequence_parallel=sp,
                                                     engine="reference")
        x = torch.randn(2 if sp else 4, 3, 5)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager = layer(x1)
        eager.square().sum().backward()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x2)
        compiled.square().sum().backward()
        torch.testing.assert_close(compiled, eager, **TOL)
        torch.testing.assert_close(x2.grad, x1.grad, **TOL)
    # from_linear shares the local shard's parameters
    local = nn.Linear(5, 2)
    wrapped = ColumnParallelLinear.from_linear(local, sequence_parallel=False)
    assert wrapped.weight is local.weight and wrapped.bias is local.bias
    assert wrapped.out_features == 2 * W and "per rank 2" in repr(wrapped)
    with pytest.raises(ValueError, match="not divisible"):
        ColumnParallelLinear(4, 2 * W + 1)
    with pytest.raises(ValueError, match="engine"):
        ColumnParallelLinear(4, 2 * W, engine="fast")
    with pytest.raises(ValueError, match="features"):
        ColumnParallelLinear(4, 2 * W)(torch.randn(3, 5))
    # nn.Linear's initialization of the full layer: weight and bias uniform in +-1/sqrt(K)
    # (a sharded bias, unlike the row-parallel layer's replicated zero one)
    fresh = ColumnParallelLinear(64, 16 * W)
    bound = 1 / 64 ** 0.5
    for p in (fresh.weight, fresh.bias):
        assert p.abs().max() <= bound and torch.count_nonzero(p) == p.numel()
    assert fresh.bias.std() > bound / 4  # spread over the range, not a constant
    assert fresh.group.size() == W and copy.deepcopy(fresh).group_name == fresh.group_name


def _check_colwise_patch(rank: int, W: int) -> None:
    """patch_tensor_parallel(colwise=True): ColwiseParallel linears run through the column op
    (input gradient as GEMM + AllReduce), values and gradients unchanged; SP colwise skipped."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from flashoverlap import ops

    mesh = init_device_mesh("cpu", (W,))
    torch.manual_seed(4)
    ref = _MLP(nn.Linear(8, 4 * W), nn.Linear(4 * W, 8))
    model = copy.deepcopy(ref)
    parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    x, gy = torch.randn(2, 3, 8), torch.randn(2, 3, 8)

    def run(m):
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y * gy).sum().backward()
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                 for n, p in m.named_parameters()}
        return y.detach(), xi.grad, grads

    want = run(ref)
    calls: list[str] = []
    original = ops._run

    def counted(collective, *args, **kwargs):
        calls.append(collective.name)
        return original(collective, *args, **kwargs)

    ops._run = counted
    try:
        result = fo.patch_tensor_parallel(model, engine="reference", colwise=True)
        assert result.patched == ["up", "down"], result
        got = run(model)
        assert calls == ["all_reduce", "all_reduce"], calls  # down's forward, up's input grad
        torch.testing.assert_close(got[0], want[0], **TOL)
        torch.testing.assert_close(got[1], want[1], **TOL)
        for n in want[2]:
            torch.testing.assert_close(got[2][n], want[2][n], **TOL, msg=n)
        result.undo()
        assert fo.patch_tensor_parallel(model, engine="reference").patched == ["down"]
    finally:
        ops._run = original
    sp = copy.deepcopy(ref)
    parallelize_module(sp, mesh, {"up": ColwiseParallel(input_layouts=Shard(1)),
                                  "down": RowwiseParallel(output_layouts=Shard(1))})
    result = fo.patch_tensor_parallel(sp, colwise=True)
    assert result.patched == ["down"] and "sequence-parallel" in result.skipped["up"]


def _check_all(rank: int, W: int) -> None:
    for engine in ("reference", "sequential"):
        for sp in (False, True):
            _check_column_layer(rank, W, engine, sp)
        _check_row_sp_backward(rank, W, engine)
    for sp in (False, True):
        _check_training(rank, W, "reference", sp)
    if W == 2:
        _check_training(rank, W, "sequential", True)
        _check_compile_and_api(rank, W)
        _check_colwise_patch(rank, W)


@pytest.mark.parametrize("W", [2, 3])
def test_column_parallel_layer_mlp_training_and_compile(W):
    run_distributed(_check_all, W)


def test_tp_block_example_trains_like_the_unsharded_block():
    """examples/tp_block.py under torchrun (2 CPU ranks, sequence parallel): losses match."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(port), str(root / "examples" / "tp_block.py"),
           "--sequence-parallel", "--steps", "6"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RESULT: OK" in proc.stdout and "sequence_parallel=True" in proc.stdout
