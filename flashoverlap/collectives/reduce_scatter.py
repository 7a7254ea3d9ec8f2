"""ReduceScatter: ``torch.distributed.reduce_scatter_tensor(out, a @ b)`` along rows.

Rank ``r`` receives rows ``[r*M/W, (r+1)*M/W)`` of the sum.  Layout (restore-free): the GEMM
output has ``W`` row blocks of ``M/W`` rows (tiles never straddle two); the tile order
interleaves the blocks, so a group holds the same band of rows of every block.  The GEMM
writes the group's tiles into a send buffer packed by destination -- block 0's rows of the
band, then block 1's, ... in row-major order -- and ``ncclReduceScatter`` over that range
hands rank ``r`` the band of its own block, which it receives straight into its result rows.

Residual: rank ``r`` adds its residual shard to block ``r`` in the GEMM epilogue; the sum over
ranks then contains it exactly once (no pass after the collective).

Backward (Megatron sequence parallelism, DTensor ``Partial -> Shard(0)``): the gradient of
every rank's partial product is the all-gather of the result gradients along rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .base import Collective, NcclStream, ResidualRule, register


def _is_gloo(group: ProcessGroup) -> bool:
    return "gloo" in str(dist.get_backend(group)).lower()


@dataclasses.dataclass(frozen=True)
class ReduceScatter(Collective):
    """Rank ``r``'s rows ``[r*M/W, (r+1)*M/W)`` of the sum over the group; ``[M/W, N]``."""

    name = "reduce_scatter"
    in_place = False
    trivial_at_one_rank = True

    def row_blocks(self, world_size: int) -> int:
        return world_size

    def in_place_for(self, world_size: int) -> bool:
        # One rank: one block, the send layout is the result's; ncclReduceScatter with
        # recvbuff == sendbuff + rank * recvcount is NCCL's in-place form (no copy).
        return world_size == 1

    def check_problem(self, M: int, N: int, world_size: int) -> None:
        if M % world_size:
            raise ValueError(f"gemm_reduce_scatter needs M divisible by the group size: M={M}, "
                             f"group size={world_size}")

    def launch_group(self, nccl: NcclStream, send_ptr: int, recv_ptr: int, send_count: int,
                     recv_count: int) -> None:
        nccl.lib.reduce_scatter(send_ptr, recv_ptr, recv_count, nccl.dtype, nccl.sum_op,
                                nccl.comm, nccl.stream)

    def torch_group(self, send: torch.Tensor, recv: torch.Tensor,
                    group: ProcessGroup) -> Callable[[], None]:
        W = dist.get_world_size(group)
        if W == 1:
            recv.copy_(send)
            return lambda: None
        if _is_gloo(group):
            # gloo has no reduce_scatter on every torch version: reduce the whole range and
            # keep this rank's share (same result, more traffic; gloo is for checking).
            work = dist.all_reduce(send, group=group, async_op=True)
            rank = dist.get_rank(group)
            share = send.view(W, -1, *send.shape[1:])[rank]

            def finish() -> None:
                work.wait()
                recv.copy_(share)
            return finish
        from ..dist_utils import reduce_scatter_rows

        work = reduce_scatter_rows(recv, send, group, async_op=True)
        return work.wait

    def bus_bytes(self, send_bytes: float, world_size: int) -> float:
        return send_bytes * (world_size - 1) / world_size

    def residual_rule(self, rank: int, world_size: int, replicated: bool) -> ResidualRule:
        return ResidualRule(epilogue_block=rank)

    def backward(self, grad_result: torch.Tensor, group_name: str,
                 world_size: int) -> torch.Tensor:
        if world_size == 1:
            return grad_result
        gathered = torch.ops._c10d_functional.all_gather_into_tensor(
            grad_result.contiguous(), world_size, group_name)
        return torch.ops._c10d_functional.wait_tensor(gathered)

    def backward_gemms(self, grad_result: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       group_name: str, world_size: int, engine: str,
                       needs: tuple[bool, bool]) -> tuple[torch.Tensor | None,
                                                          torch.Tensor | None]:
        # all_gather(grad_result) @ b.T as one overlapped AllGather + GEMM; the gathered
        # gradient it returns is the weight gradient's operand.
        if world_size == 1:
            return super().backward_gemms(grad_result, a, b, group_name, world_size, engine,
                                          needs)
        # By its registered name (``flashoverlap.gather_ops`` registers it on import): the
        # collectives stay below the ops layer, with no import of it.
        grad_a, gathered = torch.ops.flashoverlap.all_gather_gemm(
            grad_result.contiguous(), b.t(), group_name, engine, "")
        return (grad_a if needs[0] else None, a.t() @ gathered if needs[1] else None)


REDUCE_SCATTER = register(ReduceScatter())
