"""The overlap hot loop: signal GEMM on the caller's stream, collectives on a watcher stream.

One eager call of ``run_overlap(plan, a, b, group, out)`` (call ``n`` on its workspace)::

    caller stream : [wait previous `done`: another stream's call] ─
                    signal GEMM (P CTAs; tile -> its row of the result or send buffer,
                                 residual added in the epilogue where the rule says,
                                 bump the group's counter)
    watcher stream: for g in groups:
                        [wait counter g >= n x tiles(g)] ─ collective(g) [─ residual add(g)]
                    ─ record `done`;   caller stream waits `done`

Why each step is the way it is:

* **Epoch targets, no re-arm**: eager calls never reset the counters.  Call ``n`` waits for
  ``n x tiles(g)`` (mod 2**32; ``cuStreamWaitValue32``'s ``GEQ`` compares wrap-safely), which
  only this call's GEMM can complete: the next call's GEMM is ordered after ``done`` (the
  caller stream waited on it at the end of the previous call, or waits at the start when the
  call comes from another stream), so no count of a later call arrives before this call's
  waits have passed.  Against zeroing the counters per call this saves one driver call per
  call (2-5 us of host time on the H200 host; before it, the watcher zeroed them after its
  last wait, and before that the caller zeroed them and recorded ``armed``: two calls more).
  The watcher needs no event from the caller before its waits: a wait passes only once this
  call's GEMM has signalled, which it can only do after everything before it on the caller
  stream (the inputs, ``out``, a cloned residual) is complete.  A call that fails after its
  GEMM was launched still advances the epoch (the GEMM counts regardless) and leaves the
  workspace ``dirty``: ``done`` does not cover the NCCL calls it made, so the next call
  records ``done`` on the watcher first and waits on it.
* **Captured calls** (CUDA graph capture) replay fixed targets, so they count on the
  workspace's second counter set, from zero: ``armed`` recorded on the caller brings the
  watcher into the capture (the cross-stream edge), the watcher waits for the tile counts,
  zeroes that set after its last wait (every replay starts from zero) and records ``armed``
  again for the caller to wait on.  ``done`` stays the eager calls' event; eager calls and
  replays of one workspace never see each other's counts.
* **Visibility**: the GEMM stores a tile, barriers the CTA, then does a release atomic add at
  GPU scope (:mod:`flashoverlap.kernels.signal_gemm`); the front-end wait
  (``cuStreamWaitValue32``) or the spin kernel's acquire load orders NCCL's reads after the
  tile's stores.
* **No restore**: a group is a run of whole row bands (:mod:`flashoverlap.plan`), so the
  collective reads the rows the GEMM wrote and writes the result rows directly.  Per group the
  host enqueues one wait and the collective's NCCL call(s) -- nothing else (plus a small add
  when a non-replicated residual must follow an in-place reduction).
* **SM sharing**: the GEMM runs on ``P = SMs - r`` CTAs and the communicator has
  ``maxCTAs = r``; stream priority does not preempt running CTAs, so NCCL needs SMs the
  persistent GEMM leaves free (or room beside it).
* **Reuse across calls and streams**: each eager call's caller stream first waits on the
  previous call's ``done`` (from whichever stream it was made), so no GEMM overwrites the send
  buffer or bumps counters that the watcher still waits on -- unless the previous eager call
  came from the same stream, which already waits on that ``done`` at its end (one driver
  call less on the common path).  Not during capture: an event recorded in a capture cannot be
  waited on outside it, and inside one graph the order is the capture order.
* **In-place residual**: ``out`` may be the residual.  Where the residual is added in the GEMM
  epilogue a tile reads its residual rows before it stores them, and a group's collective
  writes its rows only after all of the group's tiles; where it is added after the group (a
  non-replicated residual of an in-place collective, whose GEMM overwrites ``out``) it is
  copied first.
* **CUDA graphs**: GEMM, waits, NCCL and the zeroing are capturable; one-time work
  (communicator, plan check, Triton JIT) must happen in a warm-up call
  (:func:`get_workspace` refuses to build during capture).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch.distributed import ProcessGroup

from .. import timeline
from ..plan import OverlapPlan
from .workspace import GroupStep, Workspace, get_workspace


_MASK = 0xFFFFFFFF


def run_overlap(
    plan: OverlapPlan,
    a: torch.Tensor,
    b: torch.Tensor,
    group: ProcessGroup,
    out: torch.Tensor,
    *,
    rank: int,
    residual: torch.Tensor | None = None,
    residual_replicated: bool = False,
) -> torch.Tensor:
    """``out`` <- ``plan.collective`` over ``group`` of ``a @ b`` (+ ``residual``), overlapped.

    Trusts its caller (:mod:`flashoverlap.ops` validated the call): shapes match the plan,
    ``out`` is a contiguous result on the current device, ``residual`` is row-major.
    """
    device = a.device
    ws = get_workspace(plan, device, group, rank)
    # The caller stream as a raw handle (what Triton itself uses): a torch.cuda.Stream object
    # costs microseconds per call, and only a timeline recorder needs one.
    handle = torch._C._cuda_getCurrentRawStream(device.index)
    sync = ws.sync
    caller_h = sync.bind_current(handle, device)
    if torch._C._cuda_isCurrentStreamCapturing():
        return _run_captured(ws, a, b, out, caller_h, handle, residual, residual_replicated)
    if ws.dirty:
        # An eager call failed after its GEMM: `done` does not cover the NCCL calls it made.
        sync.record(ws.done_h, ws.watcher_h)
        sync.wait(caller_h, ws.done_h)
        ws.dirty = False
    elif ws.used and handle != ws.last_caller:
        # (The previous eager call from this same stream already made it wait on `done`.)
        sync.wait(caller_h, ws.done_h)
    ws.used = True
    ws.last_caller = handle

    if residual is not None or timeline.active_recorder() is not None:
        return _run_eager_general(ws, a, b, out, caller_h, handle, residual,
                                  residual_replicated)
    dest = out if ws.send is None else ws.send
    ws.gemm(None)(a, b, dest, None, handle, capturing=False)
    # From here on the GEMM is counting: the next call's targets are one epoch further even
    # if this call fails below (then `dirty`: the next call waits for what this one enqueued).
    epoch = ws.epoch = (ws.epoch + 1) & _MASK
    ws.dirty = True
    # The hot loop: one wait and the collective's NCCL call(s) per group, raw handles
    # throughout (no current-stream switch, no per-group argument checks).
    launch, nccl, wait = plan.collective.launch_group, ws.nccl, ws.wait_value
    send_base, recv_base = dest.data_ptr(), out.data_ptr()
    for arg, tiles, send_offset, recv_offset, send_count, recv_count in ws.hot_steps:
        wait(arg, (epoch * tiles) & _MASK)
        launch(nccl, send_base + send_offset, recv_base + recv_offset, send_count, recv_count)
    sync.record(ws.done_h, ws.watcher_h)
    ws.dirty = False
    sync.wait(caller_h, ws.done_h)
    return out


def _eager_targets(ws: Workspace, epoch: int) -> list[GroupStep]:
    return [dataclasses.replace(s, target=(epoch * s.target) & _MASK) for s in ws.steps]


def _residual_parts(ws: Workspace, out: torch.Tensor, residual: torch.Tensor | None,
                    replicated: bool) -> tuple[int | None, torch.Tensor | None]:
    """``(epilogue_block, after)``: the row block whose GEMM tiles add ``residual`` (None:
    none), and the residual to add after each group's collective (None: none)."""
    if residual is None:
        return None, None
    rule = ws.residual_rule(replicated)
    after = residual if rule.after_group else None
    if after is not None and after.data_ptr() == out.data_ptr():
        # out is the residual: the GEMM (in place) or the collective (into the result rows)
        # overwrites a group's rows before its residual is added
        after = after.clone()
    return rule.epilogue_block, after


def _run_eager_general(ws: Workspace, a, b, out, caller_h, handle, residual,
                       residual_replicated) -> torch.Tensor:
    """An eager call with a residual or a timeline recorder (the hot loop's general form)."""
    epilogue_block, after = _residual_parts(ws, out, residual, residual_replicated)
    dest = out if ws.send is None else ws.send
    marks = timeline.active_recorder() is not None
    caller = torch.cuda.current_stream(a.device) if marks else None
    if marks:
        timeline.mark(caller, "gemm_start")
    ws.gemm(epilogue_block)(a, b, dest, residual if epilogue_block is not None else None,
                            handle, capturing=False)
    if marks:
        timeline.mark(caller, "gemm_end")
    epoch = ws.epoch = (ws.epoch + 1) & _MASK
    ws.dirty = True
    _watch(ws, _eager_targets(ws, epoch), dest, out, after, marks)
    if after is not None and after is not residual:
        after.record_stream(ws.watcher)
    ws.sync.record(ws.done_h, ws.watcher_h)
    ws.dirty = False
    ws.sync.wait(caller_h, ws.done_h)
    return out


def _run_captured(ws: Workspace, a, b, out, caller_h, handle, residual,
                  residual_replicated) -> torch.Tensor:
    """A call being captured into a CUDA graph: on the captured counter set, re-armed by the
    watcher at the end (every replay starts from zero and waits for the tile counts)."""
    ws.pinned = True  # the graph's replays will use these buffers
    sync = ws.sync
    epilogue_block, after = _residual_parts(ws, out, residual, residual_replicated)
    dest = out if ws.send is None else ws.send
    # The event pulls the watcher stream into the capture (eagerly it is not needed: see the
    # module docstring).
    sync.record(ws.armed_h, caller_h)
    ws.gemm(epilogue_block)(a, b, dest, residual if epilogue_block is not None else None,
                            handle, counters=ws.captured_counters, capturing=True)
    sync.wait(ws.watcher_h, ws.armed_h)
    _watch(ws, ws.captured_steps, dest, out, after, False)
    if after is not None and after is not residual:
        after.record_stream(ws.watcher)
    sync.zero_counters(ws.watcher_h)
    # The caller's edge back from the watcher, through `armed` again: `done` stays the eager
    # calls' own (an eager call may wait on it; an event recorded in a capture cannot be).
    sync.record(ws.armed_h, ws.watcher_h)
    sync.wait(caller_h, ws.armed_h)
    return out


def _watch(ws: Workspace, steps: list[GroupStep], dest: torch.Tensor, out: torch.Tensor,
           after: torch.Tensor | None, marks: bool) -> None:
    """Per group: wait for its counter, its collective, and (``after``) its residual rows."""
    launch, nccl, enqueue_wait = ws.plan.collective.launch_group, ws.nccl, ws.enqueue_wait
    send_base, recv_base = dest.data_ptr(), out.data_ptr()
    watcher = ws.watcher
    with torch.cuda.stream(watcher) if after is not None else contextlib.nullcontext():
        for step in steps:
            if marks:
                timeline.mark(watcher, "wait_start", step.index)
            enqueue_wait(step)
            if marks:
                timeline.mark(watcher, "wait_end", step.index)
            launch(nccl, send_base + step.send_offset, recv_base + step.recv_offset,
                   step.send_count, step.recv_count)
            if marks:
                timeline.mark(watcher, "comm_end", step.index)
            if after is not None:
                rows = slice(step.recv_lo, step.recv_hi)
                out[rows].add_(after[rows])
