"""AllToAll: ``torch.distributed.all_to_all_single(out, a @ b, output_splits, input_splits)``.

Rows of the GEMM output are grouped by destination rank: rank ``r`` sends
``input_splits[d]`` consecutive rows to rank ``d`` and receives ``output_splits[s]`` rows from
rank ``s``, stored in ``out`` ordered by source rank.  The grouped (MoE) form
(:func:`flashoverlap.grouped_gemm_all_to_all`) computes ``a_e @ w[e]`` per local expert and
reorders the rows from (expert, destination) to (destination, expert) before the same
exchange; its plan is :mod:`flashoverlap.all_to_all_plan`.

Unlike AllReduce and ReduceScatter an AllToAll is not one NCCL collective over one range:
it is a set of point-to-point transfers (``ncclSend``/``ncclRecv`` to and from each peer, in
one NCCL group so that they progress together and cannot deadlock on ordering).  An
:class:`AllToAll` object therefore *carries* its transfers -- ``(peer, element offset, element
count)`` on the send side and on the result side, zero-size transfers dropped -- and one
object describes either the whole exchange (:meth:`AllToAll.from_splits`: the sequential
path) or one group of an overlap plan (the transfers of the destinations the group covers;
built by the plan).  Such objects are per call signature and are not registered by name (the
splits are data, not a kind of collective); the registered :data:`ALL_TO_ALL` (no transfers)
only names the collective.

Transfers to oneself: in the whole exchange the self block is a local copy (NCCL send/recv to
oneself in the same group; ``torch_group`` copies).  Overlap plans never have one: the GEMM
writes the self block straight into ``out``.

Backward: the gradient of the send side is the *reverse* AllToAll of the result gradient
(input and output splits swapped) -- :func:`reverse_all_to_all`, through
``torch.ops._c10d_functional.all_to_all_single`` so that ``torch.compile`` traces it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .base import Collective, NcclStream, register

Transfer = tuple[int, int, int]  # (peer, offset in elements, count in elements)


@dataclasses.dataclass(frozen=True)
class AllToAll(Collective):
    """Point-to-point transfers of one group (or of the whole exchange).

    ``sends``/``recvs``: ``(peer, element offset, element count)`` relative to the send side
    and to the result passed to :meth:`launch_group` / :meth:`torch_group`; ``elem_bytes``:
    bytes per element (pointer offsets); ``send_rows``/``recv_rows``: rows of the whole send
    side and result (``check_problem``/``result_rows``).
    """

    name = "all_to_all"
    in_place = False
    trivial_at_one_rank = False

    sends: tuple[Transfer, ...] = ()
    recvs: tuple[Transfer, ...] = ()
    elem_bytes: int = 2
    send_rows: int = 0
    recv_rows: int = 0

    @classmethod
    def from_splits(cls, send_splits: Sequence[int], recv_splits: Sequence[int], N: int,
                    elem_bytes: int) -> AllToAll:
        """The whole exchange: ``send_splits[d]`` rows (of ``N`` elements) to rank ``d``,
        ``recv_splits[s]`` rows from rank ``s``, each side packed by peer rank."""
        def transfers(splits: Sequence[int]) -> tuple[Transfer, ...]:
            out, off = [], 0
            for peer, rows in enumerate(splits):
                if rows:
                    out.append((peer, off * N, rows * N))
                off += rows
            return tuple(out)
        return cls(transfers(send_splits), transfers(recv_splits), elem_bytes,
                   int(sum(send_splits)), int(sum(recv_splits)))

    # -- semantics -----------------------------------------------------------------------
    def result_rows(self, M: int, world_size: int) -> int:
        return self.recv_rows

    def check_problem(self, M: int, N: int, world_size: int) -> None:
        if M != self.send_rows:
            raise ValueError(f"all_to_all: the send splits add up to {self.send_rows} rows, "
                             f"the GEMM output has {M}")

    @property
    def empty(self) -> bool:
        """No transfer at all (a group holding only this rank's own block)."""
        return not self.sends and not self.recvs

    # -- communication -------------------------------------------------------------------
    def launch_group(self, nccl: NcclStream, send_ptr: int, recv_ptr: int, send_count: int,
                     recv_count: int) -> None:
        if not self.sends and not self.recvs:
            return
        lib, eb = nccl.lib, self.elem_bytes
        lib.group_start()  # every peer's send and receive progress together
        try:
            for peer, off, count in self.sends:
                lib.send(send_ptr + off * eb, count, nccl.dtype, peer, nccl.comm, nccl.stream)
            for peer, off, count in self.recvs:
                lib.recv(recv_ptr + off * eb, count, nccl.dtype, peer, nccl.comm, nccl.stream)
        finally:
            lib.group_end()

    def torch_group(self, send: torch.Tensor, recv: torch.Tensor,
                    group: ProcessGroup) -> Callable[[], None]:
        rank = dist.get_rank(group)
        flat_send, flat_recv = send.reshape(-1), recv.view(-1)
        ops, copies = [], []
        for peer, off, count in self.sends:
            if peer == rank:
                copies.append((off, count))
            else:
                ops.append(dist.P2POp(dist.isend, flat_send[off:off + count],
                                      dist.get_global_rank(group, peer), group))
        self_recv = [(off, count) for peer, off, count in self.recvs if peer == rank]
        for peer, off, count in self.recvs:
            if peer != rank:
                ops.append(dist.P2POp(dist.irecv, flat_recv[off:off + count],
                                      dist.get_global_rank(group, peer), group))
        for (so, n), (ro, _) in zip(copies, self_recv):
            flat_recv[ro:ro + n].copy_(flat_send[so:so + n])
        works = dist.batch_isend_irecv(ops) if ops else []

        def finish() -> None:
            for work in works:
                work.wait()
        return finish

    def bus_bytes(self, send_bytes: float, world_size: int) -> float:
        return send_bytes * (world_size - 1) / world_size

    def backward(self, grad_result: torch.Tensor, group_name: str,
                 world_size: int) -> torch.Tensor:
        raise NotImplementedError("AllToAll's backward needs the splits: reverse_all_to_all")


ALL_TO_ALL = register(AllToAll())


def reverse_all_to_all(grad_result: torch.Tensor, send_splits: Sequence[int],
                       recv_splits: Sequence[int], group_name: str,
                       world_size: int) -> torch.Tensor:
    """Gradient of the send side (``[sum(send_splits), N]``, packed by destination) from the
    gradient of the result (``[sum(recv_splits), N]``, packed by source): the AllToAll with
    the splits swapped.  Traceable (``_c10d_functional``)."""
    if world_size == 1:
        return grad_result
    out = torch.ops._c10d_functional.all_to_all_single(
        grad_result.contiguous(), [int(x) for x in send_splits],
        [int(x) for x in recv_splits], group_name)
    return torch.ops._c10d_functional.wait_tensor(out)
