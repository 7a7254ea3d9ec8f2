"""Autograd of the overlapped ops under tensor-parallel conventions (gloo, W = 2 and 3).

The sharded problem is a row-parallel linear: rank ``r`` holds ``a_r = X[:, K-shard r]`` and
``b_r = Wt[K-shard r, :]`` of an unsharded ``X [M, K_total] @ Wt [K_total, N]``.  The loss is
the same function of the full output on every path: ``sum(out * G)`` for a fixed random
``G``; for AllReduce the output is replicated and so is the loss; for ReduceScatter rank
``r`` holds rows ``r`` of the output and its loss term uses its rows of ``G`` (the total loss
is the sum over ranks).  So on rank ``r`` ``grad a_r`` must be the K-shard ``r`` of the
unsharded ``dX``, ``grad b_r`` the K-shard of ``dWt``, and the residual's gradient its
rows of ``G`` -- computed here by autograd on the unsharded model in float64.

Every engine that runs on CPU (reference, sequential), the functional ops and
``torch.ops.flashoverlap.gemm_collective`` (one path), both ``b`` layouts (``[K, N]`` and a
``[N, K]`` weight's ``.t()``), residual kinds and explicit multi-group plans.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import flashoverlap as fo
from dist_harness import run_distributed

TOL = dict(rtol=1e-4, atol=1e-4)


def _full_model(case: int, W: int, M: int, N: int, K: int):
    """Unsharded float64 problem, the same on every rank: X, Wt, G and one residual per rank
    (rank 0's doubles as the replicated residual)."""
    g = torch.Generator().manual_seed(100 + case)
    X = torch.randn(M, W * K, generator=g, dtype=torch.float64)
    Wt = torch.randn(W * K, N, generator=g, dtype=torch.float64)
    G = torch.randn(M, N, generator=g, dtype=torch.float64)
    R = torch.randn(W, M, N, generator=g, dtype=torch.float64)
    return X, Wt, G, R


def _reference(coll: str, W: int, rank: int, X, Wt, G, R, residual: str | None):
    """Output of ``rank`` and the gradients rank ``rank`` must see, by autograd in float64."""
    X, Wt = X.clone().requires_grad_(), Wt.clone().requires_grad_()
    M = X.shape[0]
    R = R.clone().requires_grad_()
    full = X @ Wt
    if coll == "all_reduce":
        res = {None: None, "own": R[rank], "replicated": R[0]}[residual]
        out = full if res is None else full + res
        loss = (out * G).sum()  # replicated output, replicated loss
        my_out = out
    else:
        rows = M // W
        outs = [full[k * rows:(k + 1) * rows] + (R[k, :rows] if residual else 0)
                for k in range(W)]
        loss = sum((outs[k] * G[k * rows:(k + 1) * rows]).sum() for k in range(W))
        my_out = outs[rank]
    loss.backward()
    K = X.shape[1] // W
    shard = slice(rank * K, (rank + 1) * K)
    if coll == "all_reduce":
        grad_res = None if residual is None else (R.grad[rank] if residual == "own"
                                                  else R.grad[0])
    else:
        grad_res = R.grad[rank, :M // W] if residual else None
    return my_out.detach(), X.grad[:, shard], Wt.grad[shard], grad_res


def _sharded(coll, W, rank, X, Wt, G, R, residual, *, engine, via, weight_layout, need,
             config):
    """The rank's call on fp32 shards; returns (out, grad_a, grad_b, grad_residual)."""
    M = X.shape[0]
    K = X.shape[1] // W
    shard = slice(rank * K, (rank + 1) * K)
    a = X[:, shard].float().requires_grad_("a" in need)
    if weight_layout:  # an nn.Linear weight [N, K]; b is its transposed view
        weight = Wt[shard].t().contiguous().float().requires_grad_("b" in need)
        b = weight.t()
    else:
        weight = Wt[shard].float().requires_grad_("b" in need)
        b = weight
    rows = slice(None) if coll == "all_reduce" else slice(rank * (M // W), (rank + 1) * (M // W))
    res = None
    if residual is not None:
        src = R[0] if residual == "replicated" else R[rank]
        res = src[: (M if coll == "all_reduce" else M // W)].float().requires_grad_("r" in need)
    replicated = residual == "replicated"
    if via == "torch.ops":
        out = torch.ops.flashoverlap.gemm_collective(
            a, b, res, coll, dist.group.WORLD.group_name, engine, fo.ops.config_to_json(config),
            replicated)
    elif coll == "all_reduce":
        out = fo.gemm_all_reduce(a, b, residual=res, residual_replicated=replicated,
                                 engine=engine, config=config)
    else:
        out = fo.gemm_reduce_scatter(a, b, residual=res, engine=engine, config=config)
    assert out.requires_grad and out.grad_fn is not None
    (out * G[rows].float()).sum().backward()
    grad_b = None
    if weight.grad is not None:
        grad_b = weight.grad.t() if weight_layout else weight.grad
    return out.detach(), a.grad, grad_b, None if res is None else res.grad


def _check_grads(rank: int, W: int, engine: str) -> None:
    M, N, K = 6 * W, 10, 5
    residuals = {"all_reduce": (None, "own", "replicated"), "reduce_scatter": (None, "own")}
    cases = [(coll, res, via) for coll in ("all_reduce", "reduce_scatter")
             for res in residuals[coll] for via in ("functional", "torch.ops")]
    needs = itertools.cycle(["abr", "a", "b", "r", "ab"])
    for case, (coll, residual, via) in enumerate(cases):
        need = next(needs)
        if residual is None and need == "r":
            need = "ab"
        weight_layout = case % 2 == 1
        config = None
        if engine == "reference" and case % 3 != 0:  # explicit plan: one group per band
            config = fo.PlanConfig(block_m=4, block_n=4, num_ctas=W, group_m=1)
        X, Wt, G, R = _full_model(case, W, M, N, K)
        want = _reference(coll, W, rank, X, Wt, G, R, residual)
        got = _sharded(coll, W, rank, X, Wt, G, R, residual, engine=engine, via=via,
                       weight_layout=weight_layout, need=need, config=config)
        what = (f"rank {rank} W={W} {engine} {coll} residual={residual} via={via} "
                f"weight_layout={weight_layout} grads of {need} config={config}")
        torch.testing.assert_close(got[0].double(), want[0], **TOL, msg=f"output: {what}")
        for i, (name, key) in enumerate((("a", "a"), ("b", "b"), ("residual", "r")), start=1):
            if key in need and (key != "r" or residual is not None):
                assert got[i] is not None, f"no gradient of {name}: {what}"
                torch.testing.assert_close(got[i].double(), want[i], **TOL,
                                           msg=f"grad of {name}: {what}")
            else:
                assert got[i] is None, f"unexpected gradient of {name}: {what}"


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("engine", ["reference", "sequential"])
def test_gradients_match_the_unsharded_model(W, engine):
    run_distributed(_check_grads, W, engine)


def _check_paths_agree_and_out_refused(rank: int, W: int) -> None:
    """The functional op and torch.ops give the same bits, forward and backward, on every
    engine; ``out=`` with an input that requires grad raises a clear ValueError (on every
    rank, before any collective); under no_grad ``out=`` works."""
    M, N, K = 4 * W, 7, 3
    X, Wt, G, _ = _full_model(50, W, M, N, K)
    shard = slice(rank * K, (rank + 1) * K)
    for engine, coll in itertools.product(("reference", "sequential"),
                                          ("all_reduce", "reduce_scatter")):
        grads = []
        for via in ("functional", "torch.ops"):
            a = X[:, shard].float().requires_grad_()
            b = Wt[shard].float().requires_grad_()
            if via == "torch.ops":
                out = torch.ops.flashoverlap.gemm_collective(
                    a, b, None, coll, dist.group.WORLD.group_name, engine, "", False)
            else:
                out = fo.gemm_collective(a, b, fo.collectives.get(coll), engine=engine)
            rows = slice(None) if coll == "all_reduce" else \
                slice(rank * (M // W), (rank + 1) * (M // W))
            (out * G[rows].float()).sum().backward()
            grads.append((out.detach(), a.grad, b.grad))
        for x, y in zip(*grads):
            assert torch.equal(x, y), (engine, coll)

        a = X[:, shard].float().requires_grad_()
        b = Wt[shard].float()
        out = torch.full((M if coll == "all_reduce" else M // W, N), 5.0)
        with pytest.raises(ValueError, match="out= does not support automatic differentiation"):
            fo.gemm_collective(a, b, fo.collectives.get(coll), out=out, engine=engine)
        assert (out == 5.0).all()
        with torch.no_grad():
            got = fo.gemm_collective(a, b, fo.collectives.get(coll), out=out, engine=engine)
        assert got is out and not got.requires_grad
        assert not (out == 5.0).all()


def test_functional_and_torch_ops_share_one_path():
    run_distributed(_check_paths_agree_and_out_refused, 2)


def _check_compiled_ops(rank: int, W: int) -> None:
    """``torch.compile(fullgraph=True)`` of the functional ops equals eager, forward and both
    gradients, with ``group=None`` and with an explicit group.  Dynamo hands an explicit
    group to the ops' name lookup as a ``FakeScriptObject`` that passes for the group; it was
    once cached as the group and reached the engine at run time (``AttributeError ...
    FakeScriptObject``), and ``gemm_all_reduce``/``gemm_reduce_scatter`` did not trace at all
    (a lock in the collective registry)."""
    M, N, K = 4 * W, 5, 3
    X, Wt, G, _ = _full_model(60, W, M, N, K)
    shard = slice(rank * K, (rank + 1) * K)
    explicit = dist.new_group(list(range(W)))
    ops = {"all_reduce": fo.gemm_all_reduce, "reduce_scatter": fo.gemm_reduce_scatter,
           "all_gather": fo.all_gather_gemm}
    for group, (name, op) in itertools.product((explicit, None), ops.items()):
        def loss(a, b, op=op, group=group):
            return (op(a, b, group=group, engine="reference") ** 2).sum()

        a = X[:, shard].float() if name != "all_gather" else X[rank * (M // W):][:M // W, :K].float()
        b = Wt[shard].float()
        runs = []  # compiled first: the group's first sight is the traced one
        for fn in (torch.compile(loss, fullgraph=True, backend="aot_eager"), loss):
            a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
            value = fn(a_, b_)
            value.backward()
            runs.append((value.detach(), a_.grad, b_.grad))
        for compiled, eager in zip(*runs):
            torch.testing.assert_close(compiled, eager, **TOL, msg=f"{name}, group={group}")
    # Dynamo keeps the compiled graphs, and with them the explicit group they were handed,
    # for the life of ``loss``'s code object (torch._dynamo.reset() does not drop them): the
    # group outlives its destroy, idle -- its last collective finished long before exit.
    dist.destroy_process_group(explicit)


def test_compiled_functional_ops_with_the_default_and_an_explicit_group():
    run_distributed(_check_compiled_ops, 2)
