"""Train a small tensor-parallel transformer block whose every GEMM overlaps its communication.

The block (pre-norm, sequence-first ``[S, B, H]``)::

    h = x + o_proj(attention(q(ln1(x)), k(ln1(x)), v(ln1(x))))
    y = h + down(gelu(up(ln2(h))))

``q``, ``k``, ``v``, ``up`` are :class:`flashoverlap.ColumnParallelLinear` (each rank holds
``heads/W`` heads and ``F/W`` hidden units); ``o_proj`` and ``down`` are
:class:`flashoverlap.RowParallelLinear`.  With ``--sequence-parallel`` (Megatron SP) the
activations between the blocks' halves are sharded along the sequence: each column layer
all-gathers its input overlapped with its GEMM (``all_gather_gemm``), each row layer
reduce-scatters its output overlapped with its GEMM, and the backward runs the mirror images
(GEMM + ReduceScatter, AllGather + GEMM).  Without SP the column layers' input gradients are
overlapped GEMM + AllReduce.

Every rank also builds the unsharded block from the same seed and trains it on the same data;
the script checks that the losses agree step by step (fp32 on CPU, loose on a GPU's bf16).

    torchrun --nproc-per-node 2 examples/tp_block.py                     # CPU (gloo)
    torchrun --nproc-per-node 2 examples/tp_block.py --sequence-parallel
    torchrun --nproc-per-node 8 examples/tp_block.py --sequence-parallel --hidden 1024 --seq 2048
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import flashoverlap as fo
from flashoverlap.dist_utils import init_from_env


class Block(nn.Module):
    """The unsharded block (the reference)."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.o_proj = nn.Linear(hidden, hidden)
        self.up, self.down = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def attention(self, q, k, v):
        S, B, _ = q.shape
        split = lambda t: t.reshape(S, B, -1, self.head_dim).permute(1, 2, 0, 3)  # noqa: E731
        o = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        return o.permute(2, 0, 1, 3).reshape(S, B, -1)

    @property
    def head_dim(self) -> int:
        return self.q.in_features // self.heads

    def forward(self, x):
        a = self.ln1(x)
        h = x + self.o_proj(self.attention(self.q(a), self.k(a), self.v(a)))
        return h + self.down(F.gelu(self.up(self.ln2(h))))


class TPBlock(nn.Module):
    """The same block, tensor-parallel (optionally sequence-parallel), sharded from ``full``."""

    def __init__(self, full: Block, sp: bool, group=None) -> None:
        super().__init__()
        W = dist.get_world_size(group)
        self.sp, self.head_dim = sp, full.head_dim
        self.ln1, self.ln2 = full.ln1, full.ln2  # replicated (shared with nothing: deep-copied)
        col = lambda lin: fo.ColumnParallelLinear.shard_from_full(  # noqa: E731
            lin, group, sequence_parallel=sp)
        row = lambda lin: fo.RowParallelLinear.shard_from_full(  # noqa: E731
            lin, group, sequence_parallel=sp)
        self.q, self.k, self.v, self.up = col(full.q), col(full.k), col(full.v), col(full.up)
        self.o_proj, self.down = row(full.o_proj), row(full.down)
        self.local_heads = full.heads // W

    def forward(self, x):  # x: [S, B, H], or [S/W, B, H] with SP
        a = self.ln1(x)
        q, k, v = self.q(a), self.k(a), self.v(a)  # [S, B, H/W]: this rank's heads
        S, B, _ = q.shape
        split = lambda t: t.reshape(S, B, -1, self.head_dim).permute(1, 2, 0, 3)  # noqa: E731
        o = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        o = o.permute(2, 0, 1, 3).reshape(S, B, -1)
        h = self.o_proj(o, residual=x)  # AllReduce (or ReduceScatter) + residual, fused
        return self.down(F.gelu(self.up(self.ln2(h))), residual=h)

    def replicated_parameters(self):
        """Parameters every rank holds whole whose gradients under SP cover only this rank's
        sequence rows (Megatron all-reduces them)."""
        return [*self.ln1.parameters(), *self.ln2.parameters(), self.o_proj.bias,
                self.down.bias]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=None, help="default: 4 * hidden")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args()
    rank, W = init_from_env()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    ffn = args.ffn or 4 * args.hidden
    if args.heads % W or ffn % W or (args.sequence_parallel and args.seq % W):
        raise SystemExit(f"heads, ffn (and seq with SP) must be divisible by {W}")

    torch.manual_seed(0)  # the same full block on every rank
    ref = Block(args.hidden, args.heads, ffn).to(device, dtype)
    tp = TPBlock(copy.deepcopy(ref), args.sequence_parallel)  # shards of the same weights
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    tp_opt = torch.optim.SGD(tp.parameters(), lr=0.05)
    sp = args.sequence_parallel
    g = torch.Generator(device="cpu").manual_seed(1)
    worst = 0.0
    for step in range(args.steps):
        x = torch.randn(args.seq, args.batch, args.hidden, generator=g).to(device, dtype)
        target = torch.randn(args.seq, args.batch, args.hidden, generator=g).to(device, dtype)
        n = target.numel()
        ref_opt.zero_grad()
        ref_loss = (ref(x).float() - target.float()).square().sum() / n
        ref_loss.backward()
        ref_opt.step()

        tp_opt.zero_grad()
        mine = slice(rank * args.seq // W, (rank + 1) * args.seq // W) if sp else slice(None)
        loss = (tp(x[mine]).float() - target[mine].float()).square().sum() / n
        loss.backward()
        if sp:
            for p in tp.replicated_parameters():
                dist.all_reduce(p.grad)
            loss = loss.detach().clone()
            dist.all_reduce(loss)
        tp_opt.step()
        loss, ref_loss = float(loss.detach()), float(ref_loss.detach())
        diff = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
        worst = max(worst, diff)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {float(loss):.6f}  unsharded {float(ref_loss):.6f}")
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    if rank == 0:
        engine = fo.ops.resolve_engine(None, device, dist.group.WORLD)
        print(f"tp_block: world_size={W} device={device.type} engine={engine} "
              f"sequence_parallel={sp} worst relative loss difference={worst:.2e}")
        print("RESULT: OK" if worst <= tol and math.isfinite(worst) else "RESULT: MISMATCH")
    dist.barrier()
    dist.destroy_process_group()
    raise SystemExit(0 if worst <= tol else 1)


if __name__ == "__main__":
    main()
