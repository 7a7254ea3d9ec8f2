"""An expert-parallel MoE layer whose down projection overlaps the combine AllToAll.

Each rank owns ``E_local`` of the ``W * E_local`` experts.  Per step::

    router top-k  ->  sort token copies by (owner rank, local expert)
    dispatch      :  all_to_all_single (torch.distributed.nn: differentiable)
    experts       :  sort the received rows by (local expert, source rank); up projection
                     per expert (torch), SiLU
    combine       :  fo.grouped_gemm_all_to_all(h, w_down, counts, output_split_sizes) --
                     the down projection's tiles leave for their owner rank while later
                     tiles still compute, and arrive in the order the dispatch sent them
    unsort, weight by the router's gates, sum over the k choices

Checked against a dense float64 computation of the same layer (every rank can build every
expert's weights: they come from per-expert seeds), forward and the input gradient.  Runs on
CPU (gloo; reference engine) and on GPUs (NCCL; overlap engine)::

    torchrun --nproc-per-node 2 examples/moe_expert_parallel.py
    mpirun -n 2 python examples/moe_expert_parallel.py
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn
import torch.nn.functional as F

import flashoverlap as fo
from flashoverlap.dist_utils import init_from_env


def expert_weights(e: int, hidden: int, ffn: int, dtype, device):
    g = torch.Generator().manual_seed(1234 + e)
    up = torch.randn(hidden, ffn, generator=g) / hidden**0.5
    down = torch.randn(ffn, hidden, generator=g) / ffn**0.5
    return up.to(device, dtype), down.to(device, dtype)


def moe_layer(x, router, w_up, w_down, top_k, group=None):
    """Expert-parallel MoE forward (differentiable).  ``w_up`` ``[E_local, H, F]``,
    ``w_down`` ``[E_local, F, H]`` are this rank's experts."""
    W = dist.get_world_size(group)
    E_local = w_up.shape[0]
    T, H = x.shape
    logits = x.float() @ router
    gates, experts = torch.topk(logits.softmax(-1), top_k, dim=-1)  # [T, k]
    flat_expert = experts.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)  # by owner rank, then local expert
    token_of = order // top_k
    sorted_expert = flat_expert[order]
    # rows per (destination rank, local expert), exchanged so each rank knows what arrives
    send_counts = torch.bincount(sorted_expert, minlength=W * E_local).view(W, E_local)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)  # [source, local expert]
    send_splits = send_counts.sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    dispatched = dnn.all_to_all_single(
        x.new_empty(sum(recv_splits), H), x[token_of], recv_splits, send_splits, group=group)
    # received rows: by source rank, then local expert -> by local expert, then source
    local_expert = torch.repeat_interleave(
        torch.arange(E_local, device=x.device).repeat(W), recv_counts.reshape(-1).to(x.device))
    by_expert = torch.argsort(local_expert, stable=True)
    a = dispatched[by_expert]
    counts = recv_counts.t().cpu()  # [local expert][destination = source rank], host ints
    rows_per_expert = counts.sum(1).tolist()
    h = torch.cat([F.silu(chunk @ w_up[e]) for e, chunk in
                   enumerate(torch.split(a, rows_per_expert))]) if sum(rows_per_expert) \
        else a.new_zeros(0, w_up.shape[2])
    # the down projection and the combine AllToAll, overlapped: rows come back ordered as
    # this rank dispatched them (by owner rank, then its expert order)
    y = fo.grouped_gemm_all_to_all(h, w_down, counts, send_splits, group=group)
    out = torch.zeros_like(x, dtype=torch.float32)
    out.index_add_(0, token_of, y.float() * gates.reshape(-1)[order, None])
    return out.to(x.dtype)


def dense_reference(x, router, top_k, num_experts, hidden, ffn, device):
    x = x.double()
    logits = x.float() @ router
    gates, experts = torch.topk(logits.softmax(-1), top_k, dim=-1)
    out = torch.zeros_like(x)
    for e in range(num_experts):
        up, down = expert_weights(e, hidden, ffn, torch.float64, device)
        token, slot = (experts == e).nonzero(as_tuple=True)
        if token.numel():
            out.index_add_(0, token, (F.silu(x[token] @ up) @ down) * gates[token, slot, None])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=96)
    parser.add_argument("--experts-per-rank", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args()
    rank, world = init_from_env()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    E_local, E = args.experts_per_rank, args.experts_per_rank * world
    mine = [expert_weights(rank * E_local + e, args.hidden, args.ffn, dtype, device)
            for e in range(E_local)]
    w_up = torch.stack([u for u, _ in mine])
    w_down = torch.stack([d for _, d in mine]).requires_grad_()
    router = torch.randn(args.hidden, E, generator=torch.Generator().manual_seed(5)).to(device)
    torch.manual_seed(100 + rank)
    x = torch.randn(args.tokens, args.hidden, device=device).to(dtype).requires_grad_()

    y = moe_layer(x, router, w_up, w_down, args.top_k)
    grad = torch.randn_like(y)
    y.backward(grad)

    x_ref = x.detach().double().requires_grad_()
    y_ref = dense_reference(x_ref, router, args.top_k, E, args.hidden, args.ffn, device)
    y_ref.backward(grad.double())
    y, y_ref = y.detach(), y_ref.detach()
    errs = torch.tensor([float((y.double() - y_ref).norm() / y_ref.norm()),
                         float((x.grad.double() - x_ref.grad).norm() / x_ref.grad.norm())],
                        device=device)
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    ok = bool((errs <= tol).all()) and w_down.grad is not None
    if rank == 0:
        engine = fo.ops.resolve_engine(None, device, dist.group.WORLD)
        print(f"moe_expert_parallel: world_size={world} device={device.type} engine={engine} "
              f"experts={E} top_k={args.top_k} max rel. error: output {float(errs[0]):.2e}, "
              f"input grad {float(errs[1]):.2e}")
        print("RESULT: OK" if ok else "RESULT: MISMATCH")
    dist.barrier()
    dist.destroy_process_group()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
