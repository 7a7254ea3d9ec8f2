"""The sequential path: one GEMM, then one collective.  One implementation for the ops'
fallback (a plan predicted to gain nothing), the ``sequential`` engine and the benchmarks'
baseline.

Two transports: ``torch.distributed`` (any backend: what a user would write, and the CPU), or
flashoverlap's own NCCL communicator on the current stream (``comm=``).  The latter is the
overlap engine's fallback: a raw ``ncclAllReduce`` through ctypes costs ~5 us of host time
against ~50 us through c10d, and small-M calls are host-bound, so the fallback stays at least
as fast as the plain torch sequence.

The residual is added after the collective, as ``torch.matmul`` -> collective -> ``torch.add``
would (into a scratch result first when ``out`` is the residual and the collective is in place,
since the GEMM would overwrite it).  At world size 1 a collective that is then the identity
(``Collective.trivial_at_one_rank``) is skipped: the result is the GEMM, with the residual
folded in by ``addmm``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed import ProcessGroup

from ..collectives import Collective, NcclStream
from ..nccl_enqueue import enqueue_binding


def _nccl_stream(comm: Any, dtype: torch.dtype, stream: torch.cuda.Stream) -> NcclStream:
    from ..nccl_lib import nccl_dtype, nccl_red_op

    return NcclStream(*enqueue_binding(comm), stream.cuda_stream, nccl_dtype(dtype),
                      nccl_red_op("sum"), comm.rank, comm.world_size)


def run_sequential(
    collective: Collective,
    a: torch.Tensor,
    b: torch.Tensor,
    group: ProcessGroup | None,
    out: torch.Tensor,
    *,
    world_size: int,
    residual: torch.Tensor | None = None,
    comm: Any = None,
) -> torch.Tensor:
    """``out`` <- ``collective(a @ b)`` (+ ``residual``): GEMM, then one collective.

    ``comm``: a :class:`flashoverlap.comm.NcclCommunicator` to issue the collective through on
    the current stream (else ``torch.distributed`` on ``group``).
    """
    if world_size == 1 and collective.trivial_at_one_rank:
        if residual is None:
            torch.matmul(a, b, out=out)
        elif residual.data_ptr() == out.data_ptr():
            out.addmm_(a, b)
        else:
            torch.addmm(residual, a, b, out=out)
        return out
    M, N = a.shape[0], b.shape[1]
    if collective.in_place_for(world_size):
        aliased = residual is not None and residual.data_ptr() == out.data_ptr()
        result = torch.empty_like(out) if aliased else out
        dest = result
    else:
        result = torch.empty_like(out) if residual is not None else out
        dest = torch.empty((M, N), dtype=a.dtype, device=a.device)
    torch.matmul(a, b, out=dest)
    if comm is not None:
        stream = torch.cuda.current_stream(a.device)
        collective.launch_group(_nccl_stream(comm, a.dtype, stream), dest.data_ptr(),
                                result.data_ptr(), dest.numel(), result.numel())
    else:
        collective.torch_group(dest, result, group)()
    if residual is not None:
        torch.add(result, residual, out=out)
    return out
