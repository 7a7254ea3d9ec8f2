"""Tensor-parallel layers and model patching on CPU process groups (gloo, W = 2).

Parity tests against an unsharded reference: every rank builds the same full model and input
(same seeds), the tensor-parallel version runs on its shard, and outputs and gradients must
equal the reference's (sliced to the shard) in float32.  One spawn per group of checks keeps
the module fast: layers + torch.compile, then patching.  The example runs under torchrun.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import flashoverlap as fo
from dist_harness import run_distributed

W = 2
TOL = dict(rtol=1e-5, atol=1e-5)
ROOT = Path(__file__).resolve().parents[1]


def _full_problem(lead: tuple[int, ...], K: int = 12, N: int = 10, seed: int = 0):
    """A full nn.Linear with a non-zero bias, an input and an upstream gradient: same on all ranks."""
    g = torch.Generator().manual_seed(seed)
    full = nn.Linear(K, N)
    with torch.no_grad():
        full.weight.copy_(torch.randn(N, K, generator=g))
        full.bias.copy_(torch.randn(N, generator=g))
    return full, torch.randn(*lead, K, generator=g), torch.randn(*lead, N, generator=g)


def _check_layer_parity(rank: int, engine: str, sequence_parallel: bool, lead: tuple[int, ...]) -> None:
    full, x, grad = _full_problem(lead, seed=len(lead) + 10 * sequence_parallel)
    x_full = x.clone().requires_grad_()
    y_full = full(x_full)
    (y_full * grad).sum().backward()

    layer = fo.RowParallelLinear.shard_from_full(full, sequence_parallel=sequence_parallel, engine=engine)
    K_r = layer.in_features_per_rank
    cols = slice(rank * K_r, (rank + 1) * K_r)
    x_r = x[..., cols].clone().requires_grad_()
    y = layer(x_r)
    # sequence parallel: rank r owns rows [r*S/W, (r+1)*S/W) of dim 0 (seq-first layout)
    want = y_full.chunk(W, 0)[rank] if sequence_parallel else y_full
    what = f"engine={engine} sp={sequence_parallel} input {tuple(x_r.shape)}"
    assert y.shape == want.shape, what
    torch.testing.assert_close(y, want, **TOL, msg=what)  # the bias is in `want` exactly once
    (y * (grad.chunk(W, 0)[rank] if sequence_parallel else grad)).sum().backward()
    torch.testing.assert_close(x_r.grad, x_full.grad[..., cols], **TOL, msg=what)
    torch.testing.assert_close(layer.weight.grad, full.weight.grad[:, cols], **TOL, msg=what)
    bias_grad = layer.bias.grad.clone()
    if sequence_parallel:  # each rank holds its rows' part (nn.py docstring)
        dist.all_reduce(bias_grad)
    torch.testing.assert_close(bias_grad, full.bias.grad, **TOL, msg=what)


def _check_compile(rank: int) -> None:
    """fullgraph torch.compile (fake impls, registered autograd) equals eager, both forms."""
    full, x, _ = _full_problem((4, 3), seed=5)
    ar = fo.RowParallelLinear.shard_from_full(full, engine="reference")
    rs = fo.RowParallelLinear.shard_from_full(full, sequence_parallel=True, engine="sequential")

    def fn(x_r):
        return ar(x_r).sum(1), rs(x_r) * 2

    x_r = x[..., rank * 6 : (rank + 1) * 6]
    x_eager, x_comp = x_r.clone().requires_grad_(), x_r.clone().requires_grad_()
    eager = fn(x_eager)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x_comp)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, **TOL)
    sum(t.square().sum() for t in eager).backward()
    sum(t.square().sum() for t in compiled).backward()
    torch.testing.assert_close(x_comp.grad, x_eager.grad, **TOL)


def _check_layer_errors_and_api(rank: int) -> None:
    with pytest.raises(ValueError, match="not divisible"):
        fo.RowParallelLinear(7, 4)
    with pytest.raises(ValueError, match="not divisible"):
        fo.RowParallelLinear.shard_from_full(nn.Linear(7, 4))
    with pytest.raises(ValueError, match="engine"):
        fo.RowParallelLinear(8, 4, engine="fast")
    sp = fo.RowParallelLinear(8, 4, sequence_parallel=True)
    with pytest.raises(ValueError, match="3 is not divisible by 2"):
        sp(torch.randn(3, 5, 4))  # dim 0 (sequence) of 3 over 2 ranks: raised before any collective
    with pytest.raises(ValueError, match="features"):
        sp(torch.randn(4, 8))  # full K instead of the shard's K/W

    layer = fo.RowParallelLinear(8, 4)
    assert layer.weight.shape == (4, 4) and torch.count_nonzero(layer.bias) == 0
    assert fo.RowParallelLinear(8, 4, bias=False).bias is None
    assert copy.deepcopy(layer).group_name == layer.group_name  # no ProcessGroup attribute

    # from_linear keeps the Parameter objects of a linear that already holds the shard
    torch.manual_seed(3 + rank)
    local = nn.Linear(4, 6)
    wrapped = fo.RowParallelLinear.from_linear(local, engine="reference")
    assert wrapped.weight is local.weight and wrapped.bias is local.bias
    assert wrapped.in_features == 8 and wrapped.in_features_per_rank == 4
    x_r = torch.randn(5, 4)
    want = x_r @ local.weight.t()
    dist.all_reduce(want)
    torch.testing.assert_close(wrapped(x_r), want + local.bias, **TOL)


def _check_residual(rank: int, engine: str) -> None:
    """layer(x, residual=r) == layer(x) + r in value and gradients (r's gradient is the
    upstream one), for both forms, scatter along dim 1 too, eager and compiled."""
    full, x, grad = _full_problem((4, 6), seed=21)
    for sp in (False, True):
        layer = fo.RowParallelLinear.shard_from_full(full, sequence_parallel=sp, engine=engine)
        K_r = layer.in_features_per_rank
        x_r = x[..., rank * K_r:(rank + 1) * K_r]
        out_shape = (4 // W, 6, 10) if sp else (4, 6, 10)
        # the AllReduce form's residual is the replicated residual stream (same on every
        # rank; rank 0 adds it before the reduction); the ReduceScatter form's is the rank's
        # own rows
        g = torch.Generator().manual_seed(7 + (rank if sp else 0))
        res = torch.randn(out_shape, generator=g)
        up = torch.randn(out_shape, generator=g)
        xa, xb = x_r.clone().requires_grad_(), x_r.clone().requires_grad_()
        ra, rb = res.clone().requires_grad_(), res.clone().requires_grad_()
        fused = layer(xa, residual=ra)
        plain = layer(xb) + rb
        torch.testing.assert_close(fused, plain, **TOL)
        (fused * up).sum().backward()
        (plain * up).sum().backward()
        torch.testing.assert_close(ra.grad, up, **TOL)
        torch.testing.assert_close(xa.grad, xb.grad, **TOL)
        compiled = torch.compile(lambda t, r: layer(t, residual=r), fullgraph=True,
                                 backend="aot_eager")
        torch.testing.assert_close(compiled(x_r, res), plain, **TOL)
        with pytest.raises(ValueError, match="residual has shape"):
            layer(x_r, residual=res[:1])
    # the ReduceScatter form along dim 1 (batch-first input), residual in output layout
    from flashoverlap.nn import row_parallel_linear

    x_r, weight = x[..., rank * 6:(rank + 1) * 6], full.weight[:, rank * 6:(rank + 1) * 6]
    name = dist.group.WORLD.group_name
    y = row_parallel_linear(x_r, weight, None, name, W, scatter_dim=1, engine=engine)
    res = torch.randn(y.shape)
    got = row_parallel_linear(x_r, weight, None, name, W, scatter_dim=1, engine=engine,
                              residual=res)
    torch.testing.assert_close(got, y + res, **TOL)


def _layers(rank: int, world: int) -> None:
    for engine in ("reference", "sequential"):
        for lead in ((), (8,), (4, 3)):  # 1-D, 2-D and 3-D ([S, B, K]) inputs
            _check_layer_parity(rank, engine, False, lead)
            if lead:
                _check_layer_parity(rank, engine, True, lead)
    _check_layer_errors_and_api(rank)
    _check_compile(rank)
    for engine in ("reference", "sequential"):
        _check_residual(rank, engine)


def test_row_parallel_linear_parity_errors_and_compile():
    run_distributed(_layers, W)


# ------------------------------------------------------------------ patching
class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block0 = _MLP(8, 16)
        self.block1 = _MLP(8, 12, bias=False)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = x + self.block0(x)
        return self.head(h + self.block1(h))


def _run(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, output=lambda y: y):
    """Output, input gradient and full parameter gradients of one forward/backward."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = output(model(x))
    (y * grad).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return y.detach(), x.grad, grads


def _assert_same(got, want, what: str) -> None:
    torch.testing.assert_close(got[0], want[0], **TOL, msg=f"{what}: output")
    torch.testing.assert_close(got[1], want[1], **TOL, msg=f"{what}: input grad")
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], **TOL, msg=f"{what}: grad of {name}")


def _count_op_calls(calls: list[str]) -> None:
    """Record the collective of every call that reaches the engines (proof that the patched
    path runs): the custom op and the functional ops share ``ops._run``."""
    from flashoverlap import ops

    original = ops._run

    def counted(collective, *args, **kwargs):
        calls.append(collective.name)
        return original(collective, *args, **kwargs)

    ops._run = counted


def _check_dtensor_patch(rank: int, engine: str, calls: list[str]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (W,))
    torch.manual_seed(0)
    ref = _Toy()
    model = copy.deepcopy(ref)
    parallelize_module(model, mesh, {
        "block0.up": ColwiseParallel(), "block0.down": RowwiseParallel(),
        "block1.up": ColwiseParallel(), "block1.down": RowwiseParallel(),
    })
    x, grad = torch.randn(2, 4, 8), torch.randn(2, 4, 5)
    want = _run(ref, x, grad)
    unpatched = _run(model, x, grad)
    _assert_same(unpatched, want, "unpatched DTensor model")
    params = {name: p for name, p in model.named_parameters()}
    forward_before = model.block0.down.forward

    calls.clear()
    result = fo.patch_tensor_parallel(model, engine=engine)
    assert result.patched == ["block0.down", "block1.down"], result
    assert {name: p for name, p in model.named_parameters()} == params  # same Parameter objects
    _assert_same(_run(model, x, grad), want, f"patched ({engine})")
    assert calls == ["all_reduce"] * 2
    with pytest.raises(ValueError, match="already patched"):
        fo.patch_tensor_parallel(model)
    copy.deepcopy(model)  # the instance forward is a bound method: deepcopy rebinds it

    fo.unpatch_tensor_parallel(result)
    result.undo()  # idempotent
    assert "forward" not in model.block0.down.__dict__
    assert model.block0.down.forward == forward_before
    calls.clear()
    after = _run(model, x, grad)
    assert not calls
    for got, exp in zip(after[:2], unpatched[:2]):
        assert torch.equal(got, exp)

    # a glob selects modules; the column-parallel linear it also matches is skipped with a reason
    result = fo.patch_tensor_parallel(model, pattern="block1.*", engine=engine)
    assert result.patched == ["block1.down"] and "block1.up" in result.skipped
    _assert_same(_run(model, x, grad), want, "glob-patched DTensor model")
    result.undo()

    # sequence-parallel layout: output Shard(1) of a batch-first [B, S, H] (ReduceScatter along
    # dim 1 after moving it first), returned as a DTensor (use_local_output=False), with bias
    torch.manual_seed(1)
    mlp_ref = _MLP(8, 16)
    mlp = copy.deepcopy(mlp_ref)
    parallelize_module(mlp, mesh, {"up": ColwiseParallel(),
                                   "down": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)})
    grad = torch.randn(2, 4, 8)
    want = _run(mlp_ref, x, grad)
    want = (want[0].chunk(W, 1)[rank],) + want[1:]
    grad_r = grad.chunk(W, 1)[rank]
    def local(y):
        return y.to_local()

    _assert_same(_run(mlp, x, grad_r, local), want, "unpatched Shard(1) MLP")
    calls.clear()
    result = fo.patch_tensor_parallel(mlp, engine=engine)
    assert result.patched == ["down"]
    _assert_same(_run(mlp, x, grad_r, local), want, f"patched Shard(1) MLP ({engine})")
    assert calls == ["reduce_scatter"]
    result.undo()


def _local_shard_mlp(full: _MLP, rank: int) -> _MLP:
    """The MLP as a plain model holding rank's shards: up by rows, down by columns."""
    hidden = full.up.out_features // W
    rows = slice(rank * hidden, (rank + 1) * hidden)
    mlp = _MLP(full.up.in_features, hidden)
    with torch.no_grad():
        mlp.up.weight.copy_(full.up.weight[rows])
        mlp.up.bias.copy_(full.up.bias[rows])
        mlp.down.weight.copy_(full.down.weight[:, rows])
        mlp.down.bias.copy_(full.down.bias)
    return mlp


def _check_pattern_patch(rank: int, calls: list[str]) -> None:
    torch.manual_seed(2)
    full = _MLP(8, 16)
    hidden = slice(rank * 8, (rank + 1) * 8)
    for pattern, sp in (("*down", False), (re.compile(r"down$"), True)):
        mlp = _local_shard_mlp(full, rank)
        x, grad = torch.randn(4, 3, 8), torch.randn(4, 3, 8)  # [S, B, H]
        want = _run(full, x, grad)
        calls.clear()
        result = fo.patch_tensor_parallel(mlp, pattern=pattern, engine="reference", sequence_parallel=sp)
        assert result.patched == ["down"]
        y, x_grad, grads = _run(mlp, x, grad.chunk(W, 0)[rank] if sp else grad)
        assert calls == ["reduce_scatter" if sp else "all_reduce"]
        torch.testing.assert_close(y, want[0].chunk(W, 0)[rank] if sp else want[0], **TOL)
        # column-parallel `up` has no backward all-reduce in this plain model: sum it here
        dist.all_reduce(x_grad)
        torch.testing.assert_close(x_grad, want[1], **TOL)
        torch.testing.assert_close(grads["down.weight"], want[2]["down.weight"][:, hidden], **TOL)
        torch.testing.assert_close(grads["up.weight"], want[2]["up.weight"][hidden], **TOL)
        result.undo()
        assert "forward" not in mlp.down.__dict__

    mlp = _local_shard_mlp(full, rank)
    with pytest.raises(ValueError, match="no row-parallel"):
        fo.patch_tensor_parallel(mlp)  # plain model, no pattern
    with pytest.raises(ValueError, match="no row-parallel"):
        fo.patch_tensor_parallel(mlp, pattern="*nothing*")
    with pytest.raises(ValueError, match="engine"):
        fo.patch_tensor_parallel(mlp, pattern="down", engine="fast")
    result = fo.patch_tensor_parallel(mlp, pattern="down", sequence_parallel=True)
    with pytest.raises(ValueError, match="not divisible"):
        mlp(torch.randn(3, 2, 8))  # 3 sequence positions over 2 ranks
    result.undo()


def _patching(rank: int, world: int) -> None:
    calls: list[str] = []
    _count_op_calls(calls)
    for engine in ("reference", "sequential"):
        _check_dtensor_patch(rank, engine, calls)
    _check_pattern_patch(rank, calls)


def test_patch_tensor_parallel_dtensor_and_pattern():
    run_distributed(_patching, W)


def _hf_tp_plan(rank: int, world: int) -> None:
    """transformers' own tp_plan (5.x): DTensor weights, forward replaced by a style closure."""
    import fnmatch

    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, apply_tensor_parallelism

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=8,
                         num_key_value_heads=4, num_hidden_layers=2, vocab_size=128)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(config).eval()
    model = copy.deepcopy(ref)
    modules = dict(model.named_modules())
    plan = {f"model.{name}": style for name in dict(model.model.named_modules())
            for pattern, style in config.base_model_tp_plan.items() if fnmatch.fnmatchcase(name, pattern)}
    mesh = init_device_mesh("cpu", (W,))
    for name, style in plan.items():  # what from_pretrained(tp_plan=...) does while loading
        for param in ("weight", "bias"):
            ALL_PARALLEL_STYLES[style].shard_param(modules[name], param, mesh)
    apply_tensor_parallelism(model, mesh, plan)
    ids = torch.randint(0, 128, (2, 8))
    want = ref(ids).logits
    want.square().sum().backward()
    rowwise = [n for n, style in plan.items() if style == "rowwise"]
    theirs = modules[rowwise[0]].__dict__["forward"]
    result = fo.patch_tensor_parallel(model, engine="reference")
    assert result.patched == rowwise
    with torch.no_grad():  # transformers' local-tensor inference path
        torch.testing.assert_close(model(ids).logits, want, **TOL)
    got = model(ids).logits
    torch.testing.assert_close(got, want, **TOL)
    got.square().sum().backward()
    for name in result.patched:
        got_grad = modules[name].weight.grad.full_tensor()
        torch.testing.assert_close(got_grad, dict(ref.named_modules())[name].weight.grad, **TOL)
    assert modules[rowwise[0]].__dict__["forward"] is not theirs
    result.undo()
    assert modules[rowwise[0]].__dict__["forward"] is theirs  # transformers' forward is back

    # colwise=True: transformers' "colwise" linears too (their input is replicated, so they
    # run as column_parallel_linear: input gradient as an overlapped GEMM + AllReduce).
    colwise = [n for n, style in plan.items() if style == "colwise"]
    assert colwise
    theirs_col = modules[colwise[0]].__dict__.get("forward")
    model.zero_grad(set_to_none=True)
    result = fo.patch_tensor_parallel(model, engine="reference", colwise=True)
    assert modules[colwise[0]].__dict__.get("forward") is not theirs_col
    assert set(colwise) <= set(result.patched) and set(rowwise) <= set(result.patched), (
        result.patched, getattr(result, "skipped", None))
    got = model(ids).logits
    torch.testing.assert_close(got, want, **TOL)
    got.square().sum().backward()
    for name in colwise + rowwise:
        got_grad = modules[name].weight.grad.full_tensor()
        torch.testing.assert_close(got_grad, dict(ref.named_modules())[name].weight.grad, **TOL)
    result.undo()
    assert modules[colwise[0]].__dict__.get("forward") is theirs_col


def test_patch_transformers_tp_plan():
    pytest.importorskip("transformers")
    pytest.importorskip("transformers.distributed.tensor_parallel")
    from transformers.distributed import tensor_parallel

    if not hasattr(tensor_parallel, "apply_tensor_parallelism"):
        pytest.skip("this transformers has another tensor-parallel API")
    run_distributed(_hf_tp_plan, W)


# ------------------------------------------------------------------ the example
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp_llama_example(tmp_path):
    """transformers' Llama where installed (not a CI dependency), else the built-in one."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(W),
           "--master-port", str(_free_port()), str(ROOT / "examples" / "tp_llama.py"),
           "--preset", "tiny", "--seq", "16", "--warmup", "1", "--iters", "5", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RESULT: OK" in proc.stdout and "patched 4 row-parallel linears" in proc.stdout
    rows = json.loads((tmp_path / "e2e.json").read_text())
    assert [r["engine"] for r in rows] == ["torch", "flashoverlap"]
    assert all(r["bench"] == "e2e" and r["world_size"] == W and r["speedup"] > 0 for r in rows)
