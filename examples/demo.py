"""flashoverlap demo: GEMM+AllReduce and GEMM+ReduceScatter on every rank, checked.

Runs anywhere torch.distributed does:

    torchrun --nproc-per-node 2 examples/demo.py            # CPU (gloo) or one GPU per rank
    mpirun -n 2 python examples/demo.py                      # same, launched by MPI

Each rank multiplies its own random shard ``x[M, K/W] @ w[K/W, N]`` (a row-parallel layer),
the op sums the products over ranks, and the result is compared with ``torch.matmul`` +
``torch.distributed.all_reduce`` / ``reduce_scatter`` computed in float32.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

import flashoverlap as fo
from flashoverlap.dist_utils import init_from_env, reduce_scatter_rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512, help="rows of x per rank (its M is tokens x world size)")
    parser.add_argument("--out-features", type=int, default=384, help="N")
    parser.add_argument("--in-features", type=int, default=256, help="K: input features per rank")
    parser.add_argument("--engine", choices=fo.ENGINES, default=None, help="default: best available")
    args = parser.parse_args()

    rank, world = init_from_env()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(1234 + rank)
    x = torch.randn(args.tokens * world, args.in_features, device=device, dtype=dtype)
    weight = torch.randn(args.out_features, args.in_features, device=device, dtype=dtype) / args.in_features**0.5  # nn.Linear layout

    y = fo.gemm_all_reduce(x, weight.t(), engine=args.engine)
    y_rs = fo.gemm_reduce_scatter(x, weight.t(), engine=args.engine)

    want = x.float() @ weight.float().t()
    want_rs = torch.empty(args.tokens, args.out_features, device=device)
    reduce_scatter_rows(want_rs, want.clone(), dist.group.WORLD)
    dist.all_reduce(want)
    err = float((y.float() - want).norm() / want.norm())
    err_rs = float((y_rs.float() - want_rs).norm() / want_rs.norm())
    errs = torch.tensor([err, err_rs], device=device)
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    ok = bool((errs <= tol).all())
    if rank == 0:
        from flashoverlap.ops import resolve_engine

        engine = resolve_engine(args.engine, device, dist.group.WORLD)
        print(f"flashoverlap demo: world_size={world} device={device.type} dtype={str(dtype)[6:]} "
              f"engine={engine}")
        print(f"  gemm_all_reduce     [{x.shape[0]}x{args.in_features}] @ [{args.in_features}x{args.out_features}] -> {tuple(y.shape)}"
              f"  rel. error vs torch = {errs[0]:.2e}")
        print(f"  gemm_reduce_scatter -> {tuple(y_rs.shape)} per rank"
              f"  rel. error vs torch = {errs[1]:.2e}")
        print("RESULT: OK" if ok else "RESULT: MISMATCH")
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
