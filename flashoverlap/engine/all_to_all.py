"""The three engines for a (grouped) GEMM + AllToAll plan (:mod:`flashoverlap.all_to_all_plan`).

* :func:`run_a2a_reference` -- the plan group by group with ``torch.matmul`` per segment (into
  the send buffer at the segment's (destination, expert) rows, or into ``out`` for this
  rank's own block) and the group's point-to-point transfers started asynchronously
  (``batch_isend_irecv``); any backend, so gloo on CPU checks the plan end to end.
* :func:`run_a2a_sequential` -- the grouped GEMM into a send buffer in (destination, expert)
  order, then one ``all_to_all_single`` (``torch.distributed``) or the whole exchange through
  flashoverlap's NCCL communicator (grouped ``ncclSend``/``ncclRecv``).
* :func:`run_a2a_overlap` -- CUDA + NCCL: the grouped signal GEMM
  (:mod:`flashoverlap.kernels.grouped_signal_gemm`) on the caller's stream, each group's
  transfers on the high-priority watcher stream once the group's counter completes.  Same
  protocol as :mod:`flashoverlap.engine.overlap` (counters zeroed on the caller stream and
  an ``armed`` event, ``cuStreamWaitValue32`` per group, ``done`` waited by the caller; CUDA
  graphs capture it after a warm-up call); a group without transfers (the self block) needs
  no wait.  Workspaces (step table, counters, send buffer, events) are cached per plan, LRU
  (:data:`MAX_A2A_WORKSPACES`): MoE counts change from call to call, so a plan is rebuilt
  whenever they do, and only a handful are worth keeping.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any

import torch
from torch.distributed import ProcessGroup

from ..all_to_all_plan import AllToAllPlan
from ..collectives import NcclStream
from ..collectives.all_to_all import AllToAll
from ..dist_utils import register_group_cache
from ..nccl_enqueue import enqueue_binding

MAX_A2A_WORKSPACES = 16


def _segment_matmuls(plan: AllToAllPlan, a: torch.Tensor, w: torch.Tensor, send: torch.Tensor,
                     out: torch.Tensor, group: int | None = None) -> None:
    for seg in plan.segments:
        if group is not None and seg.group != group:
            continue
        dest = out if seg.to_out else send
        torch.matmul(a[seg.a_lo:seg.a_lo + seg.rows], w[seg.expert],
                     out=dest[seg.dest_lo:seg.dest_lo + seg.rows])


def run_a2a_reference(plan: AllToAllPlan, a: torch.Tensor, w: torch.Tensor,
                      group: ProcessGroup, out: torch.Tensor) -> torch.Tensor:
    """``out`` <- the plan with torch ops: per group its segments' matmuls, then its transfers
    (asynchronous); the transfers are waited for in order at the end."""
    send = torch.empty((plan.send_rows, plan.problem.N), dtype=a.dtype, device=a.device) \
        if plan.needs_send_buffer else out
    finishes = []
    for g, coll in enumerate(plan.group_collectives):
        _segment_matmuls(plan, a, w, send, out, g)
        if not coll.empty:
            finishes.append(coll.torch_group(send, out, group))
    for finish in finishes:
        finish()
    return out


def grouped_matmul_send(plan: AllToAllPlan, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The send side ``[M, N]`` in (destination, expert) order, computed with torch (one
    matmul per expert when the segments of an expert are many)."""
    send = torch.empty((plan.send_rows, plan.problem.N), dtype=a.dtype, device=a.device)
    if plan.problem.E == 1:
        torch.matmul(a, w[0], out=send)  # (destination) order is a's own order
        return send
    for seg in plan.segments:
        torch.matmul(a[seg.a_lo:seg.a_lo + seg.rows], w[seg.expert],
                     out=send[seg.send_lo:seg.send_lo + seg.rows])
    return send


def _nccl_stream(comm: Any, dtype: torch.dtype, stream_handle: int, rank: int,
                 world_size: int) -> NcclStream:
    from ..nccl_lib import nccl_dtype, nccl_red_op

    return NcclStream(*enqueue_binding(comm), stream_handle, nccl_dtype(dtype),
                      nccl_red_op("sum"), rank, world_size)


def run_a2a_sequential(plan: AllToAllPlan, a: torch.Tensor, w: torch.Tensor,
                       group: ProcessGroup, out: torch.Tensor, *, comm: Any = None) -> torch.Tensor:
    """``out`` <- grouped GEMM, then the whole AllToAll (``comm``: flashoverlap's NCCL
    communicator on the current stream; else ``torch.distributed.all_to_all_single``)."""
    problem = plan.problem
    if problem.world_size == 1:
        _segment_matmuls(plan, a, w, out, out)  # every segment is the self block: into out
        return out
    send = grouped_matmul_send(plan, a, w)
    if comm is not None:
        stream = torch.cuda.current_stream(a.device).cuda_stream
        plan.exchange.launch_group(
            _nccl_stream(comm, a.dtype, stream, problem.rank, problem.world_size),
            send.data_ptr(), out.data_ptr(), send.numel(), out.numel())
    else:
        import torch.distributed as dist

        dist.all_to_all_single(out, send, list(problem.recv_splits),
                               list(problem.send_splits), group=group)
    return out


# -- overlap engine ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class A2AGroupStep:
    """One group as plain ints (what ``workspace._wait_enqueuer`` reads) and its transfers."""

    index: int
    counter_addr: int
    target: int
    collective: AllToAll


@dataclasses.dataclass
class A2AWorkspace:
    plan: AllToAllPlan
    comm: Any
    nccl: NcclStream | None
    step_table: torch.Tensor | None
    counters: torch.Tensor | None
    send: torch.Tensor | None
    armed: torch.cuda.Event
    done: torch.cuda.Event
    watcher: torch.cuda.Stream
    steps: list[A2AGroupStep]
    enqueue_wait: Any
    sync: Any
    armed_h: Any
    done_h: Any
    watcher_h: Any
    launcher: Any
    used: bool = False
    pinned: bool = False


_LOCK = threading.Lock()
_A2A_WORKSPACES: collections.OrderedDict = collections.OrderedDict()


def clear_a2a_workspaces() -> None:
    with _LOCK:
        _A2A_WORKSPACES.clear()


# Workspaces are keyed by (and hold) process groups: released at exit and on a new world.
register_group_cache(clear_a2a_workspaces)


def _get_workspace(plan: AllToAllPlan, device: torch.device, group: ProcessGroup,
                   gemm_config: Any = None) -> A2AWorkspace:
    key = (plan, device.index, group)
    ws = _A2A_WORKSPACES.get(key)
    if ws is not None and (ws.comm is None or ws.comm.handle is not None):
        _A2A_WORKSPACES.move_to_end(key)
        return ws
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("flashoverlap: the first call of an AllToAll plan must run outside "
                           "CUDA graph capture (communicator, kernel JIT); warm up first")
    from ..kernels.grouped_signal_gemm import GroupedSignalGemmLauncher
    from ..settings import settings
    from ..stream_ops import stream_ops_for
    from ..stream_wait import prepare_wait
    from .workspace import _wait_enqueuer, reserved_sms, watcher_stream

    problem, cfg = plan.problem, plan.config
    dtype = getattr(torch, problem.dtype)
    with _LOCK:
        comm = nccl = None
        counters = None
        if plan.communicates:
            from ..comm import overlap_communicator
            from ..nccl_lib import nccl_dtype, nccl_red_op

            comm = overlap_communicator(group, reserved_sms(cfg.num_ctas, device), device=device)
            counters = torch.zeros(max(plan.num_groups, 1), dtype=torch.int32, device=device)
        watcher = watcher_stream(device)
        nccl = (NcclStream(*enqueue_binding(comm), watcher.cuda_stream, nccl_dtype(dtype),
                           nccl_red_op("sum"), problem.rank, problem.world_size)
                if comm is not None else None)
        step_table = (torch.from_numpy(plan.step_table.copy()).to(device)
                      if plan.num_tiles else None)
        send = (torch.empty(plan.send_rows, problem.N, dtype=dtype, device=device)
                if plan.needs_send_buffer else None)
        sync_target = counters if counters is not None else torch.zeros(
            1, dtype=torch.int32, device=device)
        sync = stream_ops_for(sync_target)
        method = prepare_wait(device, settings().wait_method) if counters is not None else None
        current = torch.cuda.current_stream(device)
        armed, done = torch.cuda.Event(), torch.cuda.Event()
        tiles = plan.group_tile_counts
        steps = [A2AGroupStep(g, counters.data_ptr() + 4 * g, int(tiles[g]), coll)
                 for g, coll in enumerate(plan.group_collectives)
                 if not coll.empty] if counters is not None else []
        launcher = (GroupedSignalGemmLauncher(step_table, counters, block_m=cfg.block_m,
                                              block_n=cfg.block_n, num_ctas=cfg.num_ctas,
                                              config=gemm_config)
                    if step_table is not None else None)
        ws = A2AWorkspace(
            plan=plan, comm=comm, nccl=nccl, step_table=step_table, counters=counters,
            send=send, armed=armed, done=done, watcher=watcher, steps=steps,
            enqueue_wait=(_wait_enqueuer(method, counters, watcher)
                          if counters is not None else None),
            sync=sync, armed_h=sync.bind_event(armed, current),
            done_h=sync.bind_event(done, current), watcher_h=sync.bind_stream(watcher),
            launcher=launcher)
        for t in (step_table, counters, send):
            if t is not None:
                t.record_stream(watcher)
        _A2A_WORKSPACES[key] = ws
        while len(_A2A_WORKSPACES) > MAX_A2A_WORKSPACES:
            victim = next((k for k, v in _A2A_WORKSPACES.items()
                           if k != key and not v.pinned), None)
            if victim is None:
                break
            del _A2A_WORKSPACES[victim]
    return ws


def run_a2a_overlap(plan: AllToAllPlan, a: torch.Tensor, w: torch.Tensor,
                    group: ProcessGroup, out: torch.Tensor, *,
                    gemm_config: Any = None) -> torch.Tensor:
    """``out`` <- the AllToAll of the grouped GEMM, each group's transfers overlapped with the
    GEMM's later tiles.  Trusts its caller (the ops validated the call)."""
    ws = _get_workspace(plan, a.device, group, gemm_config)
    handle = torch._C._cuda_getCurrentRawStream(a.device.index)
    if not ws.steps:
        # Nothing to send (world size 1, or only the self block): the grouped GEMM into out.
        if ws.launcher is not None:
            ws.launcher(a, w, ws.send if ws.send is not None else out, out, handle)
        return out
    sync = ws.sync
    caller_h = sync.bind_current(handle, a.device)
    capturing = torch.cuda.is_current_stream_capturing()
    if capturing:
        ws.pinned = True
    elif ws.used:
        sync.wait(caller_h, ws.done_h)
    ws.used = not capturing
    send = ws.send if ws.send is not None else out  # nothing to send: only receives
    sync.zero_counters(caller_h)
    sync.record(ws.armed_h, caller_h)
    if ws.launcher is not None:  # (no rows at all: nothing to compute)
        ws.launcher(a, w, send, out, handle)
    sync.wait(ws.watcher_h, ws.armed_h)
    send_base, recv_base, nccl = send.data_ptr(), out.data_ptr(), ws.nccl
    for step in ws.steps:
        ws.enqueue_wait(step)
        step.collective.launch_group(nccl, send_base, recv_base, 0, 0)
    sync.record(ws.done_h, ws.watcher_h)
    sync.wait(caller_h, ws.done_h)
    return out
