"""GEMM + AllToAll (plain and grouped) on gloo, W = 2 and 3, against float64 references.

One spawn per world size keeps CI time down: each rank runs every case.  Every rank builds
every rank's inputs from shared seeds, so the float64 reference -- and its gradients, through
a differentiable float64 model of the whole exchange -- is computed locally.  Random splits
include zero-size splits, experts without rows and ranks that receive nothing.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import flashoverlap as fo  # noqa: F401  (registers the custom ops)
from dist_harness import run_distributed
from flashoverlap.all_to_all_ops import gemm_all_to_all, grouped_gemm_all_to_all
from flashoverlap.plan import PlanConfig

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _case(case: int, W: int):
    g = torch.Generator().manual_seed(100 + case)
    E = 1 + case % 3
    K = int(torch.randint(1, 24, (1,), generator=g))
    N = int(torch.randint(1, 40, (1,), generator=g))
    counts = torch.randint(0, 7, (W, E, W), generator=g)  # [source rank][expert][destination]
    counts[torch.rand(counts.shape, generator=g) < 0.3] = 0  # zero-size segments
    if case % 4 == 1:
        counts[:, -1, :] = 0  # an expert without rows on every rank
    if case % 4 == 2:
        counts[:, :, 0] = 0  # rank 0 receives nothing
    dtype = (torch.float32, torch.bfloat16)[case % 2]
    transposed = case % 3 == 0
    return E, K, N, counts, dtype, transposed


def _inputs(case: int, rank: int, E, K, N, counts, dtype, transposed):
    g = torch.Generator().manual_seed(1000 * case + rank)
    M = int(counts[rank].sum())
    a = torch.randn(M, K, generator=g).to(dtype)
    if transposed:  # [E, N, K] expert weights used as w.transpose(1, 2)
        w = torch.randn(E, N, K, generator=g).to(dtype).transpose(1, 2)
    else:
        w = torch.randn(E, K, N, generator=g).to(dtype)
    return a, w


def _reference(W, counts, a_all, w_all):
    """Rank r's result for every r, differentiable: rows by source, expert, row order."""
    results = []
    for r in range(W):
        rows = []
        for s in range(W):
            E = counts.shape[1]
            off = 0
            for e in range(E):
                for d in range(W):
                    n = int(counts[s, e, d])
                    if d == r and n:
                        rows.append(a_all[s][off:off + n] @ w_all[s][e])
                    off += n
        results.append(torch.cat(rows) if rows else a_all[0][:0] @ w_all[0][0])
    return results


def _rel_err(x, ref):
    if ref.numel() == 0:
        return 0.0
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _check_cases(rank: int, W: int) -> None:
    for case in range(6):
        E, K, N, counts, dtype, transposed = _case(case, W)
        data = [_inputs(case, s, E, K, N, counts, dtype, transposed) for s in range(W)]
        a, w = data[rank]
        a_all = [x.double().requires_grad_() for x, _ in data]
        w_all = [y.double().requires_grad_() for _, y in data]
        refs = _reference(W, counts, a_all, w_all)
        out_splits = [int(counts[s, :, rank].sum()) for s in range(W)]
        mine = counts[rank]
        what = f"case {case} W={W} E={E} K={K} N={N} {dtype} transposed={transposed}"
        for engine in ("reference", "sequential"):
            out = torch.full((sum(out_splits), N), float("nan"), dtype=dtype)
            got = grouped_gemm_all_to_all(a, w, mine, out_splits, out=out, engine=engine)
            assert got is out
            assert _rel_err(out, refs[rank].detach()) <= TOL[dtype], (engine, what)
            # nested-list counts, a fresh result, plans of two ring offsets per group
            cfg = PlanConfig(block_m=16, block_n=16, num_ctas=3, group_m=1,
                             group_bands=(2,) * (W // 2) + (1,) * (W % 2))
            got = grouped_gemm_all_to_all(a, w, mine.tolist(), out_splits, engine=engine,
                                          config=cfg if engine == "reference" else None)
            assert torch.equal(got, out), (engine, what)
        # the plain form: E = 1 slices of the same data, against all_to_all_single itself
        in_splits = counts[rank, 0].tolist()
        rows0 = sum(in_splits)
        out0 = [int(counts[s, 0, rank]) for s in range(W)]
        want = torch.empty(sum(out0), N, dtype=dtype)
        dist.all_to_all_single(want, (a[:rows0].double() @ w[0].double()).to(dtype), out0,
                               in_splits)
        got = gemm_all_to_all(a[:rows0], w[0], out0, in_splits, engine="reference")
        torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype] * 10)

        # gradients (fp32 and bf16), through the custom op's backward
        g = torch.Generator().manual_seed(7 + case)
        grads = [torch.randn(sum(int(counts[s, :, r].sum()) for s in range(W)), N,
                             generator=g).double() for r in range(W)]
        sum((res * gr).sum() for res, gr in zip(refs, grads)).backward()
        engine = ("reference", "sequential")[case % 2]
        a_g, w_g = a.clone().requires_grad_(), w.detach().clone().requires_grad_()
        res = grouped_gemm_all_to_all(a_g, w_g, mine, out_splits, engine=engine)
        (res * grads[rank].to(dtype)).sum().backward()
        tol = TOL[dtype] * (3 if dtype == torch.bfloat16 else 1)
        want_a, want_w = (x.grad if x.grad is not None else torch.zeros_like(x)
                          for x in (a_all[rank], w_all[rank]))
        assert torch.isfinite(a_g.grad).all() and torch.isfinite(w_g.grad).all(), what
        assert _rel_err(a_g.grad, want_a) <= tol, ("grad a", what)
        assert _rel_err(w_g.grad, want_w) <= tol, ("grad w", what)


def _check_equal_splits(rank: int, W: int) -> None:
    """None splits are equal splits, as in torch; both layouts of b."""
    g = torch.Generator().manual_seed(rank)
    a = torch.randn(4 * W, 5, generator=g)
    for b in (torch.randn(5, 3, generator=g), torch.randn(3, 5, generator=g).t()):
        want = torch.empty(4 * W, 3)
        dist.all_to_all_single(want, a @ b)
        for engine in ("reference", "sequential"):
            torch.testing.assert_close(gemm_all_to_all(a, b, engine=engine), want)


def _check_errors_and_compile(rank: int, W: int) -> None:
    a, w = torch.randn(6, 4), torch.randn(2, 4, 3)
    # counts that do not add up to a's rows: raised before any collective
    with pytest.raises(ValueError, match="add up"):
        grouped_gemm_all_to_all(a, w, [[1, 1], [1, 1]], [2, 2], engine="reference")
    with pytest.raises(ValueError, match="one row per local expert"):
        grouped_gemm_all_to_all(a, w, [[3, 3]], [3, 3], engine="reference")
    with pytest.raises(ValueError, match="one per rank"):
        grouped_gemm_all_to_all(a, w, [[3], [3]], [3, 3], engine="reference")
    with pytest.raises(ValueError, match="itself"):  # self split != own output split
        grouped_gemm_all_to_all(a, w, [[2, 1], [1, 2]], [9, 9], engine="reference")
    with pytest.raises(ValueError, match="device-side|host"):
        grouped_gemm_all_to_all(a, w, torch.ones(2, 2, dtype=torch.int64).to("meta"), [2, 2])
    with pytest.raises(ValueError, match="divisible"):
        gemm_all_to_all(torch.randn(5, 4), torch.randn(4, 3), engine="reference")
    # inconsistent across ranks (rank 0 expects 2 rows from rank 1, rank 1 sends 3): every
    # rank raises instead of hanging
    counts = [[3, 3], [0, 0]]  # each rank: 3 rows to itself, 3 to the other
    out_splits = [3, 3] if rank == 1 else [3, 2]
    with pytest.raises(ValueError, match="inconsistent"):
        grouped_gemm_all_to_all(a, w, counts, out_splits, engine="reference")
    # and then a consistent call works (nothing left half-done)
    got = grouped_gemm_all_to_all(a, w, counts, [3, 3], engine="reference")
    assert got.shape == (6, 3)

    # torch.compile(fullgraph) through the custom op: forward and backward equal eager
    name = dist.group.WORLD.group_name
    flat = [3, 3, 0, 0]

    def fn(x, y):
        return torch.ops.flashoverlap.grouped_gemm_all_to_all(x, y, flat, [3, 3], name,
                                                              "reference", "").sin()

    xe, ye = a.clone().requires_grad_(), w.clone().requires_grad_()
    xc, yc = a.clone().requires_grad_(), w.clone().requires_grad_()
    eager = fn(xe, ye)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(xc, yc)
    torch.testing.assert_close(compiled, eager)
    eager.sum().backward()
    compiled.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(yc.grad, ye.grad)


def _all_checks(rank: int, W: int) -> None:
    _check_cases(rank, W)
    _check_equal_splits(rank, W)
    if W == 2:
        _check_errors_and_compile(rank, W)


@pytest.mark.parametrize("W", [2, 3])
def test_gemm_all_to_all_gloo(W):
    run_distributed(_all_checks, W)
