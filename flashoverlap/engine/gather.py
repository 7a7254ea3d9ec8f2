"""AllGather + GEMM engines: the overlap hot loop (CUDA), the reference engine, the sequential path.

``out = all_gather(a_shard) @ b`` with the gathered input landing in ``full`` (``[m*W, K]``,
the caller's ``gathered=`` or a workspace buffer).  The collective is
:mod:`flashoverlap.collectives.all_gather` (chunks by source rank, arrival slot 0 = this
rank), the tile order :mod:`flashoverlap.gather_plan` (slot by slot), the kernel
:mod:`flashoverlap.kernels.gather_gemm` (waits on a per-chunk flag before loading a chunk's
rows).

One overlapped call (``run_gather_overlap``)::

    caller stream : wait previous `done` ─ zero flags ─ record `armed` ─┐
    watcher stream: wait `armed` ─ [copy own shard -> full, write flag 0] ─
                    for slot j = 1..W-1: [grouped send/recv step j, write flag j] ─ record `done`
    caller stream : gather GEMM (P CTAs; tile of slot j spins until flag j) ─ wait `done`

The watcher's work is enqueued on the host *before* the GEMM launch: the GEMM's CTAs spin on
device memory, invisible to CUDA's scheduler, so anything the watcher needs that could wait
for the GEMM (lazy module loading of NCCL's kernels on a first launch synchronises the
context) must be issued before the GEMM exists.  Flags are written with
``cuStreamWriteValue32`` (a front-end memory operation, no SM; without
``NO_MEMORY_BARRIER`` it is ordered after, and makes visible, all prior work of the stream:
the NCCL kernel's writes into ``full``).  The kernel reads a flag with an acquire load at GPU
scope and then, on the TMA path, a ``fence.proxy.async`` before its bulk loads.

Deadlock freedom
----------------
The GEMM's CTAs busy-wait, so the chunks they wait for must be delivered by work that does
not need the GEMM to finish.  The watcher's chain per slot is: a device copy (copy engine,
no SM) or NCCL's send/recv kernel (``<= r`` CTAs, the communicator's ``maxCTAs``), then a
stream memory write (no SM).  Hence:

1. *Resources*: the GEMM is persistent with ``P = SMs - r`` CTAs, at most one per SM (each
   uses most of an SM's shared memory), so ``r`` SMs stay free of GEMM CTAs for the whole
   kernel and NCCL's ``<= r`` CTAs can always become resident, however long GEMM CTAs spin.
   Stream priority cannot preempt a running CTA; the reservation is what guarantees
   progress.
2. *Ordering*: the watcher waits only on ``armed`` (recorded before the GEMM launch on the
   caller stream, so it never waits for the GEMM) and on NCCL; the caller stream waits on
   ``done`` only after the GEMM.  No cycle: GEMM -> flags -> watcher -> (armed, peers'
   watchers), and every peer's watcher depends only on its own ``armed`` and its peers'
   watchers, never on a GEMM.
3. *Cross-rank*: every rank enqueues the same exchange steps in the same order (the plan is
   agreed), so step ``j``'s send/recv pairs match on every rank; each rank's NCCL kernel
   finds free SMs by (1).
4. *Host*: every NCCL call and flag write is enqueued before the GEMM is launched, and the
   first call of a workspace also loads the kernels (see above).

Not covered (refused or documented): ``CUDA_DEVICE_MAX_CONNECTIONS=1`` funnels all streams
into one hardware queue, where the watcher's NCCL kernel would queue behind the spinning
GEMM -- :func:`overlap_refusal` sends such calls to the sequential path; other kernels that
the application itself runs concurrently on other streams and that occupy the reserved SMs
until the GEMM ends.  ``tests/gpu/test_all_gather_gpu.py`` delays the watcher on purpose
(a sleep kernel before the first chunk) for 1,000 calls.

Reference engine (``run_gather_reference``): every exchange step is started at once with
asynchronous ``torch.distributed`` point-to-point calls, the own chunk's rows are multiplied
first, then each chunk's rows as it arrives (slot order).  Sequential
(``run_gather_sequential``): ``all_gather_into_tensor`` then one matmul.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import torch
from torch.distributed import ProcessGroup

from ..collectives.all_gather import ALL_GATHER
from ..dist_utils import register_group_cache
from ..gather_plan import GatherPlan
from ..nccl_enqueue import enqueue_binding

# Test hook: cycles of torch.cuda._sleep on the watcher stream before the first chunk (the
# delayed-watcher test).  0 in production.
WATCHER_DELAY_CYCLES = 0


def overlap_refusal() -> str | None:
    """Why overlapping an AllGather + GEMM is unsafe in this process, or None."""
    if os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "").strip() == "1":
        return ("CUDA_DEVICE_MAX_CONNECTIONS=1 puts the watcher's NCCL kernel behind the "
                "GEMM that waits for it")
    return None


# -- reference and sequential ---------------------------------------------------------------
def run_gather_reference(plan: GatherPlan, a_shard: torch.Tensor, b: torch.Tensor,
                         group: ProcessGroup, out: torch.Tensor, full: torch.Tensor, *,
                         rank: int) -> torch.Tensor:
    """``out <- full @ b`` with ``full`` gathered chunk by chunk (module docstring)."""
    m, W = plan.problem.m, plan.problem.world_size
    chunks = ALL_GATHER.chunks(m, rank, W)
    finishes = [ALL_GATHER.torch_chunk(a_shard, full[c.row_lo:c.row_hi], c, group)
                for c in chunks]
    for c, finish in zip(chunks, finishes):
        finish()
        rows = slice(c.row_lo, c.row_hi)
        torch.matmul(full[rows], b, out=out[rows])
    return out


def run_gather_sequential(a_shard: torch.Tensor, b: torch.Tensor, group: ProcessGroup | None,
                          out: torch.Tensor, full: torch.Tensor, *, world_size: int,
                          comm: Any = None) -> torch.Tensor:
    """``all_gather_into_tensor(full, a_shard)`` then ``torch.matmul(full, b, out=out)``;
    through flashoverlap's NCCL communicator on the current stream when ``comm`` is given."""
    if world_size == 1:
        full.copy_(a_shard)
    elif comm is not None:
        comm.all_gather(a_shard, full, torch.cuda.current_stream(a_shard.device))
    else:
        import torch.distributed as dist

        # torch >= 2.13 renames all_gather_into_tensor (deprecated) to all_gather_single
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fn(full, a_shard.contiguous(), group=group)
    torch.matmul(full, b, out=out)
    return out


# -- overlap -----------------------------------------------------------------------------------
@dataclasses.dataclass
class GatherWorkspace:
    plan: GatherPlan
    rank: int
    comm: Any
    nccl: Any  # collectives.NcclStream on the watcher stream
    chunks: list  # GatherChunk in slot order
    step_table: torch.Tensor
    flags: torch.Tensor  # int32 [W]
    flag_addrs: list  # driver CUdeviceptr per slot
    watcher: torch.cuda.Stream
    armed: torch.cuda.Event
    done: torch.cuda.Event
    launcher: Any  # kernels.gather_gemm.GatherGemmLauncher
    full: torch.Tensor | None = None  # [m*W, K] when the caller passes no gathered=
    used: bool = False
    pinned: bool = False


_LOCK = threading.Lock()
_WORKSPACES: dict[tuple, GatherWorkspace] = {}
MAX_WORKSPACES = 64


def clear_gather_workspaces() -> None:
    with _LOCK:
        _WORKSPACES.clear()


# Workspaces are keyed by (and hold) process groups: released at exit and on a new world.
register_group_cache(clear_gather_workspaces)


def get_gather_workspace(plan: GatherPlan, device: torch.device, group: ProcessGroup,
                         rank: int) -> GatherWorkspace:
    key = (plan, device.index, group, rank)
    ws = _WORKSPACES.get(key)
    if ws is not None and ws.comm.handle is not None:
        return ws
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "flashoverlap: the first all_gather_gemm call of a shape must run outside CUDA "
            "graph capture (it creates the communicator and compiles the kernel); warm up first")
    from ..collectives import NcclStream
    from ..comm import overlap_communicator
    from ..kernels.gather_gemm import GatherGemmLauncher
    from ..nccl_lib import nccl_dtype, nccl_red_op
    from ..stream_wait import _driver
    from .workspace import reserved_sms, watcher_stream

    with _LOCK:
        comm = overlap_communicator(group, reserved_sms(plan.config.num_ctas, device),
                                    device=device)
        problem = plan.problem
        dtype = getattr(torch, problem.dtype)
        watcher = watcher_stream(device)
        flags = torch.zeros(problem.world_size, dtype=torch.int32, device=device)
        driver = _driver()
        step_table = torch.from_numpy(plan.step_table(rank).copy()).to(device)
        cfg = plan.config
        ws = GatherWorkspace(
            plan=plan, rank=rank, comm=comm,
            nccl=NcclStream(*enqueue_binding(comm), watcher.cuda_stream, nccl_dtype(dtype),
                            nccl_red_op("sum"), rank, problem.world_size),
            chunks=ALL_GATHER.chunks(problem.m, rank, problem.world_size),
            step_table=step_table, flags=flags,
            flag_addrs=[driver.CUdeviceptr(flags.data_ptr() + 4 * j)
                        for j in range(problem.world_size)],
            watcher=watcher, armed=torch.cuda.Event(), done=torch.cuda.Event(),
            launcher=GatherGemmLauncher(step_table, flags, block_m=cfg.block_m,
                                        block_n=cfg.block_n, num_ctas=cfg.num_ctas,
                                        full_tiles=plan.full_tiles),
        )
        for t in (step_table, flags):
            t.record_stream(watcher)
        if len(_WORKSPACES) >= MAX_WORKSPACES:
            for k in [k for k, w in _WORKSPACES.items() if not w.pinned][:len(_WORKSPACES) // 2]:
                del _WORKSPACES[k]
        _WORKSPACES[key] = ws
    return ws


def _write_flag(driver: Any, stream: Any, addr: Any, value: int) -> None:
    flag = int(driver.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT)
    result = driver.cuStreamWriteValue32(stream, addr, value, flag)
    if result[0] if isinstance(result, tuple) else result:
        from ..stream_wait import _check

        _check(driver, "cuStreamWriteValue32", result)


def run_gather_overlap(plan: GatherPlan, a_shard: torch.Tensor, b: torch.Tensor,
                       group: ProcessGroup, out: torch.Tensor, full: torch.Tensor | None, *,
                       rank: int) -> torch.Tensor:
    """``out <- all_gather(a_shard) @ b``, the chunks' transfers overlapped with the GEMM;
    ``full`` receives ``a_full`` (None: a workspace buffer).  Trusts its caller
    (:mod:`flashoverlap.gather_ops` validated the call)."""
    from ..stream_wait import _driver

    ws = get_gather_workspace(plan, a_shard.device, group, rank)
    problem = plan.problem
    if full is None:
        if ws.full is None:
            ws.full = torch.empty(problem.M, problem.K, dtype=a_shard.dtype,
                                  device=a_shard.device)
            ws.full.record_stream(ws.watcher)
        full = ws.full
    driver = _driver()
    caller = torch.cuda.current_stream(a_shard.device)
    watcher = ws.watcher
    capturing = torch.cuda.is_current_stream_capturing()
    if capturing:
        ws.pinned = True
    elif ws.used:
        caller.wait_event(ws.done)
    ws.used = not capturing

    ws.flags.zero_()  # on the caller stream, before `armed`
    ws.armed.record(caller)
    watcher.wait_event(ws.armed)
    w_handle = driver.CUstream(watcher.cuda_stream)
    with torch.cuda.stream(watcher):
        if WATCHER_DELAY_CYCLES:
            torch.cuda._sleep(WATCHER_DELAY_CYCLES)
        elem = a_shard.element_size()
        count = problem.m * problem.K
        shard_ptr, full_ptr = a_shard.data_ptr(), full.data_ptr()
        for chunk in ws.chunks:
            if chunk.slot == 0:
                full[chunk.row_lo:chunk.row_hi].copy_(a_shard)  # copy engine, no SM
            else:
                ALL_GATHER.launch_chunk(ws.nccl, shard_ptr,
                                        full_ptr + chunk.row_lo * problem.K * elem, count,
                                        chunk)
            _write_flag(driver, w_handle, ws.flag_addrs[chunk.slot], 1)
        ws.done.record(watcher)
    if not capturing:
        for t in (a_shard, full):
            t.record_stream(watcher)
    ws.launcher(full, b, out, caller.cuda_stream)
    caller.wait_event(ws.done)
    return out
