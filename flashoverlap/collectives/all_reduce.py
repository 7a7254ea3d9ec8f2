"""AllReduce: ``torch.distributed.all_reduce(a @ b)``, reduced in place in the result.

Layout (restore-free): one row block; a group is a run of whole row bands of the output, so
its rows ``[lo, hi)`` are one contiguous range of the row-major result.  The GEMM stores its
tiles straight into the result and ``ncclAllReduce`` reduces that range in place: no comm
buffer, no copy back (an earlier design packed tiles into slots and restored them after each
group; on one H200 that cost 3-10% of the GEMM time and ~10 us of host time per group).

Residual: when the caller states that the residual is the same on every rank (the
tensor-parallel layers know it is), rank 0 adds it in the GEMM epilogue and the sum contains
it once; otherwise each rank adds its own after each group's reduction.

Backward (Megatron's row-parallel layer, DTensor ``Partial -> Replicate``): the result is
replicated, so its gradient is the gradient of every rank's partial product.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .base import Collective, NcclStream, ResidualRule, register


@dataclasses.dataclass(frozen=True)
class AllReduce(Collective):
    """Sum over the group of every rank's ``[M, N]`` GEMM output; the result is ``[M, N]``."""

    name = "all_reduce"
    in_place = True
    trivial_at_one_rank = True

    def launch_group(self, nccl: NcclStream, send_ptr: int, recv_ptr: int, send_count: int,
                     recv_count: int) -> None:
        nccl.lib.all_reduce(send_ptr, recv_ptr, send_count, nccl.dtype, nccl.sum_op,
                            nccl.comm, nccl.stream)

    def torch_group(self, send: torch.Tensor, recv: torch.Tensor,
                    group: ProcessGroup) -> Callable[[], None]:
        work = dist.all_reduce(send, group=group, async_op=True)
        return work.wait

    def bus_bytes(self, send_bytes: float, world_size: int) -> float:
        return send_bytes * 2 * (world_size - 1) / world_size

    def residual_rule(self, rank: int, world_size: int, replicated: bool) -> ResidualRule:
        if replicated:
            return ResidualRule(epilogue_block=0 if rank == 0 else None)
        return ResidualRule(after_group=True)

    def backward(self, grad_result: torch.Tensor, group_name: str,
                 world_size: int) -> torch.Tensor:
        return grad_result


ALL_REDUCE = register(AllReduce())
