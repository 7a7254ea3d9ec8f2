"""``all_gather_gemm`` on CPU process groups (gloo, W = 2 and 3) against float64.

One spawn per (W, engine) runs many random cases: odd shard rows, both layouts of ``b``
(row-major ``[K, N]`` and an ``nn.Linear`` weight's ``.t()``), fp32 and bf16, explicit
small-tile plans; ``out``/``gathered`` are poisoned with NaN first so unwritten rows fail.
Then autograd (``grad_a`` = the ReduceScatter of ``grad_out @ b.T``, ``grad_b`` =
``a_full.T @ grad_out``), the plan's tile order, errors and agreement.
"""

from __future__ import annotations

import pytest
import torch

import flashoverlap as fo
from dist_harness import run_distributed
from flashoverlap.gather_ops import all_gather_gemm
from flashoverlap.gather_plan import GatherProblem, make_gather_plan

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _cases(W: int):
    g = torch.Generator().manual_seed(17 + W)
    for case in range(8):
        dtype = (torch.float32, torch.bfloat16)[case % 2]
        m = 2 * int(torch.randint(1, 40, (1,), generator=g)) + 1  # odd shard rows
        N = int(torch.randint(1, 90, (1,), generator=g))
        K = int(torch.randint(1, 50, (1,), generator=g))
        yield case, dtype, m, N, K, case % 3 == 0


def _inputs(rank, case, dtype, m, N, K, transposed):
    g = torch.Generator().manual_seed(100 * case + rank)
    a = torch.randn(m, K, generator=g).to(dtype)
    g_b = torch.Generator().manual_seed(100 * case + 99)  # b is the same on every rank
    b = (torch.randn(N, K, generator=g_b).to(dtype).t() if transposed
         else torch.randn(K, N, generator=g_b).to(dtype))
    return a, b


def _rel_err(x, ref):
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _check_values(rank, W, engine):
    for case, dtype, m, N, K, transposed in _cases(W):
        a, b = _inputs(rank, case, dtype, m, N, K, transposed)
        full = torch.cat([_inputs(r, case, dtype, m, N, K, transposed)[0] for r in range(W)])
        ref = full.double() @ b.double()
        config = None
        if engine == "reference" and case % 2:
            config = fo.PlanConfig(block_m=8, block_n=16, num_ctas=3, group_m=2)
        out = torch.full((m * W, N), float("nan"), dtype=dtype)
        gathered = torch.full((m * W, K), float("nan"), dtype=dtype)
        got = all_gather_gemm(a, b, out=out, gathered=gathered, engine=engine, config=config)
        assert got is out
        assert torch.equal(gathered, full), f"gathered, case {case}"
        err = _rel_err(out, ref)
        assert err <= TOL[dtype], f"case {case} {dtype} m={m} N={N} K={K} t={transposed}: {err}"
        fresh = all_gather_gemm(a, b, engine=engine)  # no out, no gathered
        torch.testing.assert_close(fresh, out, rtol=0, atol=0)




def _check_autograd(rank, W):
    m, N, K = 5, 6, 4
    g = torch.Generator().manual_seed(3)
    a_all = torch.randn(W, m, K, generator=g, dtype=torch.float64)
    b0 = torch.randn(K, N, generator=g, dtype=torch.float64)
    gy = torch.randn(m * W, N, generator=g, dtype=torch.float64)
    for engine in ("reference", "sequential", None):
        a = a_all[rank].float().requires_grad_()
        b = b0.float().requires_grad_()
        y = all_gather_gemm(a, b, engine=engine)
        (y * gy.float()).sum().backward()
        full = a_all.reshape(m * W, K)
        torch.testing.assert_close(y.double(), full @ b0, rtol=1e-5, atol=1e-5)
        # loss = sum over ranks of <y, gy>: y is the same everywhere, so d/da_r of the summed
        # loss is W * (gy @ b.T)[rank rows]; per rank (one loss) it is the RS of gy @ b.T,
        # i.e. W copies summed: W * rows.
        grad_full = gy @ b0.t()
        torch.testing.assert_close(a.grad.double(), W * grad_full[rank * m:(rank + 1) * m],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.grad.double(), full.t() @ gy, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="automatic differentiation"):
        all_gather_gemm(a, b, out=torch.empty(m * W, N))


def _check_compile(rank, W):
    from flashoverlap.library_ops import resolve_group_name  # noqa: F401

    a = torch.randn(3, 4, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    b = torch.randn(4, 5, generator=torch.Generator().manual_seed(9)).requires_grad_()
    fn = lambda x, y: all_gather_gemm(x, y, engine="reference").square().sum()  # noqa: E731
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    eager = fn(a, b)
    eager.backward()
    comp = torch.compile(fn, fullgraph=True, backend="aot_eager")(a2, b2)
    comp.backward()
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(a2.grad, a.grad)
    torch.testing.assert_close(b2.grad, b.grad)


def _check_errors(rank, W):
    a, b = torch.randn(4, 3), torch.randn(3, 5)
    with pytest.raises(ValueError, match="out has shape"):
        all_gather_gemm(a, b, out=torch.empty(4, 5))
    with pytest.raises(ValueError, match="gathered has shape"):
        all_gather_gemm(a, b, gathered=torch.empty(4, 3))
    with pytest.raises(TypeError, match="dtype"):
        all_gather_gemm(a, b.double())
    with pytest.raises(ValueError, match="overlap engine cannot run"):
        all_gather_gemm(a, b, engine="overlap")
    # ranks disagreeing on the shape raise on every rank instead of hanging
    with pytest.raises(ValueError, match="differ|mismatch|agree"):
        all_gather_gemm(torch.randn(4 + rank, 3), b, engine="reference")


def _check_all(rank, W):
    for engine in ("reference", "sequential"):
        _check_values(rank, W, engine)
    _check_autograd(rank, W)
    if W == 2:
        _check_compile(rank, W)
    _check_errors(rank, W)


@pytest.mark.parametrize("W", [2, 3])
def test_all_gather_gemm_values_autograd_compile_errors(W):
    """One spawn per W (spawning dominates on a small CI machine)."""
    run_distributed(_check_all, W)


def test_gather_plan_tile_order_and_tables():
    """Slot 0 (own chunk) first, slots in arrival order, every output element once, tiles
    inside one chunk, slot j's rows from source rank (r - j) mod W."""
    for W, m, N, cfg in ((3, 37, 50, fo.PlanConfig(block_m=16, block_n=16, num_ctas=4,
                                                   group_m=2)),
                         (2, 8, 8, fo.PlanConfig(block_m=8, block_n=8, num_ctas=1, group_m=1)),
                         (1, 5, 300, fo.PlanConfig(block_m=16, block_n=256, num_ctas=1))):
        plan = make_gather_plan(GatherProblem(m, N, 7, "float32", W), cfg)
        assert plan.num_tiles == W * plan.tiles_per_chunk
        assert (torch.from_numpy(plan.slot_table[:, 0].astype("int64")).diff() >= 0).all()
        for rank in range(W):
            t = plan.step_table(rank)
            cover = torch.zeros(m * W, N, dtype=torch.int64)
            for rs, re_, cs, ce, dest, slot, src in t.tolist():
                assert dest == rs and src == (rank - slot) % W
                assert src * m <= rs < re_ <= (src + 1) * m
                cover[rs:re_, cs:ce] += 1
            assert bool((cover == 1).all())
            assert t[0, 6] == rank  # the own chunk first
        other = make_gather_plan(GatherProblem(m, N, 7, "float32", W), cfg)
        assert other.hash == plan.hash
    with pytest.raises(ValueError, match="group_bands"):
        make_gather_plan(GatherProblem(4, 4, 4, "float32", 2),
                         fo.PlanConfig(block_m=8, block_n=8, num_ctas=1, group_bands=(1,)))


def test_default_gather_config_takes_the_kernel_tables_tile():
    """A GPU gather plan takes the tile and band height gemm_config_for picks for the gathered
    GEMM on the CTAs left after NCCL's SMs (the dense planners' choice), band shrunk to a
    chunk's tile rows; CPU configs keep small tiles."""
    from flashoverlap.gather_plan import default_gather_config
    from flashoverlap.kernels import gemm_config_for

    seen = set()
    for m, N, K, W, sms, reserve, cap in (
            (256, 2048, 8192, 8, 132, 16, (9, 0)),    # 128 x 256 leaves a poor last wave
            (1024, 8192, 8192, 8, 132, 16, (9, 0)),   # full waves: 128 x 256
            (1024, 8192, 2048, 8, 132, 16, (9, 0)),   # band rule at short K, capped by m
            (4096, 8192, 2048, 4, 132, 16, (9, 0)),   # band rule at short K
            (40, 8192, 4096, 8, 132, 0, (9, 0)),      # one short tile row per chunk
            (1024, 8192, 8192, 8, 108, 16, (8, 0)),   # sm_80 table
            (512, 4096, 4096, 2, 132, 16, None)):     # None: planned as sm_90
        problem = GatherProblem(m, N, K, "bfloat16", W)
        cfg = default_gather_config(problem, sms, cap, reserved_sms=reserve)
        choice = gemm_config_for(m * W, N, K, "bfloat16", sms - reserve, cap)
        assert (cfg.block_m, cfg.block_n) == (choice.config.block_m, choice.config.block_n)
        assert cfg.num_ctas == sms - reserve and cfg.group_bands is None
        tiles_m = -(-m // cfg.block_m)
        assert cfg.group_m <= max(1, min(choice.group_m, tiles_m)) and cfg.group_m >= 1
        assert cfg.group_m == choice.group_m or cfg.group_m * 2 > tiles_m
        make_gather_plan(problem, cfg)  # a valid plan
        seen.add((cfg.block_n, cfg.group_m))
    assert {bn for bn, _ in seen} == {128, 256} and 16 in {gm for _, gm in seen}
    cpu = default_gather_config(GatherProblem(5, 8, 8, "float32", 2))
    assert (cpu.block_m, cpu.block_n, cpu.num_ctas) == (16, 64, 4)


def test_overlap_refused_with_one_device_connection(monkeypatch):
    """CUDA_DEVICE_MAX_CONNECTIONS=1 would queue the watcher's NCCL behind the spinning GEMM:
    the policy sends such calls to the sequential path."""
    from flashoverlap.engine.gather import overlap_refusal

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    assert overlap_refusal() is None
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    assert "CUDA_DEVICE_MAX_CONNECTIONS" in overlap_refusal()
