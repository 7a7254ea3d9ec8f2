"""AllGather as an *input-side* collective: ``all_gather_into_tensor(a_full, a_shard)`` feeding
``a_full @ b``.

The output-side collectives (:class:`~flashoverlap.collectives.base.Collective`: AllReduce,
ReduceScatter) consume the GEMM's output group by group.  An AllGather runs the other way
round: the collective *produces* the GEMM's input, chunk by chunk, and the GEMM consumes each
chunk as soon as it has arrived.  Its protocol is therefore its own small class
(:class:`AllGather`), used by :mod:`flashoverlap.gather_plan`,
:mod:`flashoverlap.engine.gather` and :mod:`flashoverlap.gather_ops`; nothing else in those
modules knows how a chunk travels.

Semantics (the spec every engine is checked against): rank ``r`` holds ``a_shard`` ``[m, K]``;
``a_full`` ``[m*W, K]`` holds rank ``s``'s shard at rows ``[s*m, (s+1)*m)`` (exactly
``torch.distributed.all_gather_into_tensor``); the result is ``a_full @ b``.

Chunks and their order
----------------------
A chunk is one source rank's shard.  Rank ``r`` receives chunk ``s`` at *arrival slot*
``j = (r - s) mod W``: slot 0 is its own shard (no communication: a device copy into
``a_full``), slot ``j >= 1`` arrives in step ``j`` of a *shifted exchange*: in step ``j``
every rank sends its shard to ``r + j`` and receives from ``r - j`` (mod ``W``), as one
``ncclGroupStart``/``ncclSend``/``ncclRecv``/``ncclGroupEnd``.  So every rank's GEMM works on
its own rows first, then on the chunk that arrives first, and so on.

Why grouped send/recv and not one ``ncclBroadcast`` per source rank (the other natural
chunking): (1) a broadcast is a collective of all ranks, so the root's own chunk would still
cost a step, while here the local chunk needs no NCCL at all; (2) in every exchange step each
rank sends one shard and receives one, so every rank's links carry traffic in every step (on
an NVSwitch all ``W`` transfers of a step run at once), whereas a broadcast funnels one
chunk from one root through a ring or tree per step; (3) every rank gets its first remote
chunk after one point-to-point transfer, not after a pipelined broadcast's fill.  The bytes
per rank are the same as ``ncclAllGather``'s: ``(W-1)`` shards in and out.

Backward (Megatron sequence parallelism, DTensor ``Shard(0) -> Replicate``): the gradient of
``a_shard`` is rank ``r``'s rows of the ReduceScatter of ``grad(a_full)`` over the group --
which is exactly a GEMM + ReduceScatter (``grad(a_full) = grad_out @ b.T``), overlapped by
:func:`flashoverlap.gemm_reduce_scatter`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .base import NcclStream

__all__ = ["ALL_GATHER", "AllGather", "GatherChunk"]


@dataclasses.dataclass(frozen=True)
class GatherChunk:
    """One chunk of ``a_full`` on one rank: arrival ``slot`` (0: the local shard), source rank
    ``src``, and its rows ``[row_lo, row_hi)`` of ``a_full``; ``send_to`` is the rank this
    rank sends its own shard to in the same step (itself for slot 0)."""

    slot: int
    src: int
    send_to: int
    row_lo: int
    row_hi: int


@dataclasses.dataclass(frozen=True)
class AllGather:
    """``all_gather_into_tensor`` along rows, chunked by source rank (module docstring)."""

    name = "all_gather"

    # -- semantics -------------------------------------------------------------------------
    def full_rows(self, m: int, world_size: int) -> int:
        return m * world_size

    def source_of_slot(self, slot: int, rank: int, world_size: int) -> int:
        return (rank - slot) % world_size

    def chunks(self, m: int, rank: int, world_size: int) -> list[GatherChunk]:
        """The chunks in arrival order (slot 0 first)."""
        out = []
        for j in range(world_size):
            src = self.source_of_slot(j, rank, world_size)
            out.append(GatherChunk(j, src, (rank + j) % world_size, src * m, (src + 1) * m))
        return out

    # -- communication ---------------------------------------------------------------------
    def launch_chunk(self, nccl: NcclStream, shard_ptr: int, chunk_ptr: int, count: int,
                     chunk: GatherChunk) -> None:
        """Enqueue one exchange step on ``nccl.stream``: this rank's shard (``count`` elements
        at ``shard_ptr``) to ``chunk.send_to``, chunk ``chunk.src`` into ``chunk_ptr``.  Slot 0
        (the local shard) is not communicated: the engine copies it."""
        lib = nccl.lib
        lib.group_start()  # send and receive progress together (no ordering deadlock)
        try:
            lib.send(shard_ptr, count, nccl.dtype, chunk.send_to, nccl.comm, nccl.stream)
            lib.recv(chunk_ptr, count, nccl.dtype, chunk.src, nccl.comm, nccl.stream)
        finally:
            lib.group_end()

    def torch_chunk(self, shard: torch.Tensor, chunk: torch.Tensor, step: GatherChunk,
                    group: ProcessGroup) -> Callable[[], None]:
        """Start one exchange step with ``torch.distributed`` (any backend) and return a
        function that waits for it.  Slot 0 copies the shard."""
        if step.slot == 0:
            chunk.copy_(shard)
            return lambda: None
        to = dist.get_global_rank(group, step.send_to)
        frm = dist.get_global_rank(group, step.src)
        ops = [dist.P2POp(dist.isend, shard, to, group, tag=step.slot),
               dist.P2POp(dist.irecv, chunk, frm, group, tag=step.slot)]
        works = dist.batch_isend_irecv(ops)

        def finish() -> None:
            for work in works:
                work.wait()
        return finish

    # -- cost ------------------------------------------------------------------------------
    def bus_bytes(self, shard_bytes: float, world_size: int) -> float:
        """Bytes per rank received over the interconnect in one call."""
        return shard_bytes * (world_size - 1)

    # -- backward --------------------------------------------------------------------------
    def backward(self, grad_full: torch.Tensor, group_name: str,
                 world_size: int) -> torch.Tensor:
        """Gradient of ``a_shard`` from the gradient of ``a_full`` (ReduceScatter along rows;
        traceable).  The layers fuse it with the GEMM that produces ``grad_full`` instead
        (:func:`flashoverlap.gemm_reduce_scatter`)."""
        if world_size == 1:
            return grad_full
        out = torch.ops._c10d_functional.reduce_scatter_tensor(
            grad_full.contiguous(), "sum", world_size, group_name)
        return torch.ops._c10d_functional.wait_tensor(out)


ALL_GATHER = AllGather()
