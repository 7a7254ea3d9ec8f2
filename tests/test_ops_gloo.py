"""Both ops on CPU process groups (gloo, W = 2 and 3) against matmul + collective in float64.

Each spawned group runs many random cases (one spawn per (W, engine) keeps CI fast); inputs
differ per rank, outputs are poisoned with NaN first so unwritten elements fail.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import flashoverlap as fo
from dist_harness import run_distributed

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _cases(seed: int, W: int):
    g = torch.Generator().manual_seed(seed)
    for case in range(12):
        dtype = (torch.float32, torch.bfloat16)[case % 2]
        M = int(torch.randint(1, 150, (1,), generator=g)) * W
        N = int(torch.randint(1, 140, (1,), generator=g))
        K = int(torch.randint(1, 70, (1,), generator=g))
        transposed = bool(case % 3 == 0)
        bm, bn = [(16, 16), (32, 64), (8, 32), (64, 16)][case % 4]
        yield case, dtype, M, N, K, transposed, bm, bn


def _inputs(rank, case, dtype, M, N, K, transposed):
    g = torch.Generator().manual_seed(1000 * case + rank)
    a = torch.randn(M, K, generator=g).to(dtype)
    if transposed:  # an nn.Linear weight [N, K] used as w.t()
        b = torch.randn(N, K, generator=g).to(dtype).t()
    else:
        b = torch.randn(K, N, generator=g).to(dtype)
    return a, b


def _expected(W, case, dtype, M, N, K, transposed):
    total = torch.zeros(M, N, dtype=torch.float64)
    for r in range(W):
        a, b = _inputs(r, case, dtype, M, N, K, transposed)
        total += a.double() @ b.double()
    return total


def _rel_err(x, ref):
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _check_ops(rank, W, engine):
    for case, dtype, M, N, K, transposed, bm, bn in _cases(7, W):
        a, b = _inputs(rank, case, dtype, M, N, K, transposed)
        ref = _expected(W, case, dtype, M, N, K, transposed)
        def config(op):
            if engine != "reference" or case % 2 == 0:
                return None  # the default plan
            # explicit small-tile plans: one group per band of one tile row
            problem = fo.Problem(M, N, K, str(dtype)[6:], W, op)
            base = fo.PlanConfig(block_m=bm, block_n=bn, num_ctas=W, group_m=1)
            bands = fo.plan.num_bands_for(problem, base)
            return fo.PlanConfig(block_m=bm, block_n=bn, num_ctas=W, group_m=1,
                                 group_bands=(1,) * bands)

        out = torch.full((M, N), float("nan"), dtype=dtype)
        res = fo.gemm_all_reduce(a, b, out=out, engine=engine, config=config("all_reduce"))
        assert res is out
        err = _rel_err(out, ref)
        assert err <= TOL[dtype], f"all_reduce case {case} {dtype} M={M} N={N} K={K}: {err}"

        out = torch.full((M // W, N), float("nan"), dtype=dtype)
        fo.gemm_reduce_scatter(a, b, out=out, engine=engine, config=config("reduce_scatter"))
        rows = ref[rank * (M // W) : (rank + 1) * (M // W)]
        err = _rel_err(out, rows)
        assert err <= TOL[dtype], f"reduce_scatter case {case} {dtype} M={M} N={N} K={K}: {err}"

        # without `out`, the result equals torch.distributed's own collective of torch.matmul
        if dtype == torch.float32:
            got = fo.gemm_all_reduce(a, b, engine=engine)
            want = a @ b
            dist.all_reduce(want)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("engine", ["reference", "sequential"])
def test_ops_match_float64_reference(W, engine):
    run_distributed(_check_ops, W, engine)


def _check_residual(rank, W, engine):
    """``residual=`` adds a tensor to the reduced result (each rank its own residual, added
    once, after the reduction), separately or in place (``out=residual``)."""
    for case, dtype, M, N, K, transposed, _, _ in list(_cases(11, W))[:6]:
        a, b = _inputs(rank, case, dtype, M, N, K, transposed)
        ref = _expected(W, case, dtype, M, N, K, transposed)
        g = torch.Generator().manual_seed(50 + case + 100 * rank)
        for op, rows in (("all_reduce", slice(0, M)),
                         ("reduce_scatter", slice(rank * (M // W), (rank + 1) * (M // W)))):
            fn = fo.gemm_all_reduce if op == "all_reduce" else fo.gemm_reduce_scatter
            shape = (rows.stop - rows.start, N)
            residual = torch.randn(shape, generator=g).to(dtype)
            # The reduced result is rounded to dtype before the add, as the fused restore does.
            want = ref[rows].to(dtype).double() + residual.double()
            kept = residual.clone()
            out = torch.full(shape, float("nan"), dtype=dtype)
            got = fn(a, b, out=out, residual=residual, engine=engine)
            assert got is out and torch.equal(residual, kept), "residual must stay untouched"
            assert _rel_err(out, want) <= TOL[dtype], (op, case)
            inplace = residual.clone()
            got = fn(a, b, out=inplace, residual=inplace, engine=engine)
            assert got is inplace
            torch.testing.assert_close(inplace, out, rtol=0, atol=0)  # same bits, in place
            fresh = fn(a, b, residual=residual, engine=engine)  # no out: a new tensor
            torch.testing.assert_close(fresh, out, rtol=0, atol=0)


@pytest.mark.parametrize("W", [1, 2, 3])
@pytest.mark.parametrize("engine", ["reference", "sequential"])
def test_residual_is_added_after_the_reduction(W, engine):
    run_distributed(_check_residual, W, engine)


def _check_default_engine_is_reference_on_cpu(rank, W):
    a = torch.randn(8, 4)
    b = torch.randn(4, 6)
    out = fo.gemm_all_reduce(a, b)  # engine=None -> reference on CPU
    want = a @ b
    dist.all_reduce(want)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="overlap engine cannot run"):
        fo.gemm_all_reduce(a, b, engine="overlap")


def test_default_engine_and_overlap_refusal_on_cpu():
    run_distributed(_check_default_engine_is_reference_on_cpu, 2)
