"""A collective of your own: GEMM + send each finished row band to the next pipeline stage.

flashoverlap overlaps *any* collective with the GEMM that produces its data.  A collective is
a small object implementing :class:`flashoverlap.collectives.Collective`: the NCCL call(s) of
one group from raw pointers (the overlap engine, CUDA), the same with ``torch.distributed``
(the reference engine, any backend), and a few facts about its layout.  This one forwards
each rank's GEMM output to the next rank, as a pipeline stage hands activations on:

    result on rank r  =  a_{r-1} @ b_{r-1}        (rank 0 receives from rank W-1)

so a row band leaves as soon as the GEMM has finished it (``ncclSend``/``ncclRecv`` fused in
one NCCL group), while later bands still compute.

Runs on CPU (gloo, reference engine) and on GPUs (NCCL, overlap engine)::

    torchrun --nproc-per-node 2 examples/pipeline_send.py
    mpirun -n 2 python examples/pipeline_send.py
    torchrun --nproc-per-node 1 examples/pipeline_send.py --force-overlap   # one GPU

and checks the result against ``torch.matmul`` + ``all_gather`` computed in float32.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

import flashoverlap as fo
from flashoverlap.collectives import Collective, NcclStream
from flashoverlap.dist_utils import init_from_env


@dataclasses.dataclass(frozen=True)
class SendToNextStage(Collective):
    """Rank r's result is rank r-1's GEMM output (``[M, N]``, same shape on every rank)."""

    name = "examples.send_to_next_stage"
    in_place = False  # the GEMM writes a send buffer; the result receives the previous rank's
    trivial_at_one_rank = True  # one rank sends to itself: the result is its own GEMM output

    def launch_group(self, nccl: NcclStream, send_ptr: int, recv_ptr: int, send_count: int,
                     recv_count: int) -> None:
        W = nccl.world_size
        lib = nccl.lib
        lib.group_start()  # send and receive progress together (no ordering deadlock)
        try:
            lib.send(send_ptr, send_count, nccl.dtype, (nccl.rank + 1) % W, nccl.comm,
                     nccl.stream)
            lib.recv(recv_ptr, recv_count, nccl.dtype, (nccl.rank - 1) % W, nccl.comm,
                     nccl.stream)
        finally:
            lib.group_end()

    def torch_group(self, send: torch.Tensor, recv: torch.Tensor,
                    group: ProcessGroup) -> Callable[[], None]:
        W, rank = dist.get_world_size(group), dist.get_rank(group)
        if W == 1:
            recv.copy_(send)
            return lambda: None
        peers = [dist.get_global_rank(group, (rank + d) % W) for d in (1, -1)]
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, peers[0], group),
                                        dist.P2POp(dist.irecv, recv, peers[1], group)])

        def finish() -> None:
            for work in works:
                work.wait()
        return finish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # (no --n / --k: torchrun claims every option that prefixes one of its own)
    parser.add_argument("--rows", type=int, default=1000, help="M: rows of a")
    parser.add_argument("--out-features", type=int, default=384, help="N")
    parser.add_argument("--in-features", type=int, default=256, help="K")
    parser.add_argument("--force-overlap", action="store_true",
                        help="an explicit multi-group plan (the overlap engine on a GPU even "
                             "at world size 1)")
    args = parser.parse_args()
    rank, world = init_from_env()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(7 + rank)
    a = torch.randn(args.rows, args.in_features, device=device, dtype=dtype)
    w = torch.randn(args.out_features, args.in_features, device=device, dtype=dtype)
    w /= args.in_features**0.5

    stage = fo.collectives.register(SendToNextStage())  # plans refer to it by name
    config = None
    if args.force_overlap:  # one group per band of two tile rows
        from flashoverlap.plan import Problem, num_bands_for

        if cuda:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            base = fo.PlanConfig(block_m=128, block_n=256, num_ctas=sms - 16, group_m=2)
        else:
            base = fo.PlanConfig(block_m=64, block_n=128, num_ctas=4, group_m=2)
        problem = Problem(args.rows, args.out_features, args.in_features, str(dtype)[6:],
                          world, stage.name)
        config = dataclasses.replace(base, group_bands=(1,) * num_bands_for(problem, base))
    got = fo.gemm_collective(a, w.t(), stage, config=config)

    mine = (a.float() @ w.float().t()).contiguous()
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    want = every[(rank - 1) % world]
    err = torch.tensor([float((got.float() - want).norm() / want.norm())], device=device)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    if rank == 0:
        print(f"pipeline_send: world_size={world} device={device.type} "
              f"engine={fo.ops.resolve_engine(None, device, dist.group.WORLD)} "
              f"rows={args.rows} max rel. error={float(err):.2e}")
        print("RESULT: OK" if float(err) <= tol else "RESULT: MISMATCH")
    ok = float(err) <= tol
    dist.barrier()
    dist.destroy_process_group()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
