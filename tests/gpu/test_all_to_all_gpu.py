"""GEMM + AllToAll on one GPU: the grouped signal GEMM against its torch definition, the ops
on a one-rank NCCL world (overlap, sequential and reference engines agree; gradients), and
CUDA-graph capture with fixed counts.

At world size 1 every row is this rank's own block, which the GEMM stores straight into
``out``: the watcher/NCCL part of the overlap engine runs only at W >= 2 (multi-GPU: run the
example ``examples/moe_expert_parallel.py`` under torchrun on several GPUs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _counts(seed, W, E, scale=40):
    rng = np.random.default_rng(seed)
    c = rng.integers(0, scale, size=(W, E, W))
    c[rng.random(c.shape) < 0.25] = 0
    return c


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize("W,E,rank", [(1, 8, 0), (2, 4, 1), (3, 3, 0)])
def test_grouped_kernel_matches_reference(W, E, rank, transposed, use_tma):
    from flashoverlap.all_to_all_plan import AllToAllProblem, make_all_to_all_plan
    from flashoverlap.kernels import GemmConfig
    from flashoverlap.kernels import grouped_signal_gemm as gk
    from flashoverlap.plan import PlanConfig

    c = _counts(W * 100 + E, W, E, scale=300)
    K, N = 256, 384
    p = AllToAllProblem(c[rank].tolist(), c[:, :, rank].sum(1).tolist(), N, K, "bfloat16",
                        rank, W)
    plan = make_all_to_all_plan(p, PlanConfig(block_m=128, block_n=256, num_ctas=100,
                                              group_m=8))
    dev = torch.device("cuda")
    a = torch.randn(p.M, K, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(E, N, K, device=dev, dtype=torch.bfloat16).transpose(1, 2) if transposed
         else torch.randn(E, K, N, device=dev, dtype=torch.bfloat16))
    table = torch.from_numpy(plan.step_table.copy()).to(dev)
    send = torch.full((p.M, N), float("nan"), device=dev, dtype=torch.bfloat16)
    out = torch.full((p.recv_rows, N), float("nan"), device=dev, dtype=torch.bfloat16)
    counters = torch.zeros(plan.num_groups, dtype=torch.int32, device=dev)
    gk.grouped_signal_gemm(a, w, send, out, step_table=table, block_m=128, block_n=256,
                           num_ctas=100, counters=counters,
                           config=GemmConfig(use_tma=use_tma))
    send_ref, out_ref = torch.full_like(send, float("nan")), torch.full_like(out, float("nan"))
    gk.grouped_signal_gemm_ref(a, w, send_ref, out_ref, table)
    torch.testing.assert_close(send, send_ref, equal_nan=True, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, out_ref, equal_nan=True, rtol=2e-2, atol=2e-2)
    assert counters.tolist() == plan.group_tile_counts.tolist()


def _expected(a, w, counts):
    rows, off = [], 0
    for e in range(w.shape[0]):
        n = int(counts[e][0])
        rows.append(a[off:off + n].float() @ w[e].float())
        off += n
    return torch.cat(rows)


@pytest.mark.parametrize("transposed", [False, True])
def test_ops_world1_engines_and_grads(world1, transposed):
    import flashoverlap as fo

    E, K, N = 8, 512, 1024
    counts = _counts(3, 1, E, scale=400)[0]  # [E][1]
    M = int(counts.sum())
    dev = torch.device("cuda")
    a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(E, N, K, device=dev, dtype=torch.bfloat16).transpose(1, 2) / K**0.5
         if transposed else torch.randn(E, K, N, device=dev, dtype=torch.bfloat16) / K**0.5)
    want = _expected(a, w, counts)
    for engine in ("overlap", "sequential", "reference"):
        got = fo.grouped_gemm_all_to_all(a, w, counts, [M], engine=engine)
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2, msg=engine)
    got = fo.gemm_all_to_all(a, w[0], engine="overlap")
    torch.testing.assert_close(got.float(), a.float() @ w[0].float(), rtol=2e-2, atol=2e-2)
    # gradients: against torch autograd of the per-expert loop
    ag, wg = a.clone().requires_grad_(), w.detach().clone().requires_grad_()
    g = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    (fo.grouped_gemm_all_to_all(ag, wg, counts, [M]) * g).sum().backward()
    ar, wr = a.float().requires_grad_(), w.detach().float().requires_grad_()
    (_expected(ar, wr, counts) * g.float()).sum().backward()
    torch.testing.assert_close(ag.grad.float(), ar.grad, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(wg.grad.float(), wr.grad, rtol=3e-2, atol=3e-1)


def test_cuda_graph_capture_fixed_counts(world1):
    import flashoverlap as fo

    E, K, N = 16, 1024, 2048
    counts = _counts(4, 1, E, scale=500)[0]
    M = int(counts.sum())
    dev = torch.device("cuda")
    a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16).transpose(1, 2) / K**0.5
    out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
    fo.grouped_gemm_all_to_all(a, w, counts, [M], out=out, engine="overlap")  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        fo.grouped_gemm_all_to_all(a, w, counts, [M], out=out, engine="overlap")
    for _ in range(3):
        a.copy_(torch.randn_like(a))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), _expected(a, w, counts), rtol=2e-2, atol=2e-2)
