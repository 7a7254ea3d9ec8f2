"""The overlap hot loop: signal GEMM on the caller's stream, collectives on a watcher stream.

One call of ``run_overlap(plan, a, b, group, out)``::

    caller stream : [wait previous `done`: another stream's call] ─
                    signal GEMM (P CTAs; tile -> its row of the result or send buffer,
                                 residual added in the epilogue where the rule says,
                                 bump the group's counter)
    watcher stream: for g in groups:
                        [wait counter g >= tiles(g)] ─ collective(g) [─ residual add(g)]
                    ─ zero the counters ─ record `done`;   caller stream waits `done`

Why each step is the way it is:

* **The watcher re-arms the counters** after its last wait of a call, and records ``done``
  after that; the next call's GEMM is ordered after ``done`` (the caller stream waited on it
  at the end of the previous call, or waits at the start when the call comes from another
  stream), and the watcher's next waits after the zeroing (stream order).  So no wait sees a
  previous call's count, without epoch arithmetic, and a captured CUDA graph re-arms itself
  on every replay.  Targets are the group's tile counts with the wrap-safe ``GEQ`` compare.
  The watcher needs no event from the caller before its waits: a wait passes only once this
  call's GEMM has signalled, which it can only do after everything before it on the caller
  stream (the inputs, ``out``, a cloned residual) is complete.  Only under capture does the
  caller record ``armed`` for the watcher to wait on: that cross-stream edge is what brings
  the watcher stream into the capture.  This order costs the eager call two driver calls
  fewer than zeroing on the caller (measured: ``scripts/host_breakdown.py``).  A call that
  fails between its GEMM and the re-arm leaves the workspace ``dirty``; the next one zeroes
  the counters on the watcher stream first (behind any waits the failed call left there).
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
  buffer or re-arms counters that the watcher still uses -- unless the previous eager call came
  from the same stream, which already waits on that ``done`` at its end (one driver call
  less on the common path).  Not during capture: an event
  recorded in a capture cannot be waited on outside it, and inside one graph the order is the
  capture order.
* **In-place residual**: ``out`` may be the residual.  Where the residual is added in the GEMM
  epilogue a tile reads its residual rows before it stores them, and a group's collective
  writes its rows only after all of the group's tiles; where it is added after the group (a
  non-replicated residual of an in-place collective, whose GEMM overwrites ``out``) it is
  copied first.
* **CUDA graphs**: zeroing, GEMM, waits and NCCL are capturable; one-time work (communicator,
  plan check, Triton JIT) must happen in a warm-up call (:func:`get_workspace` refuses to
  build during capture).
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from .. import timeline
from ..plan import OverlapPlan
from .workspace import get_workspace


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
    ws = get_workspace(plan, a.device, group, rank)
    collective = plan.collective
    # The caller stream as a raw handle (what Triton itself uses): a torch.cuda.Stream object
    # costs microseconds per call, and only a timeline recorder needs one.
    handle = torch._C._cuda_getCurrentRawStream(a.device.index)
    sync = ws.sync
    caller_h = sync.bind_current(handle, a.device)
    capturing = torch._C._cuda_isCurrentStreamCapturing()
    if capturing:
        ws.pinned = True  # the graph's replays will use these buffers
    elif ws.used and handle != ws.last_caller:
        # (The previous eager call from this same stream already made it wait on `done`.)
        sync.wait(caller_h, ws.done_h)
    ws.used = not capturing
    ws.last_caller = handle if not capturing else None

    rule = ws.residual_rule(residual_replicated) if residual is not None else None
    epilogue_block = rule.epilogue_block if rule is not None else None
    after = residual if rule is not None and rule.after_group else None
    dest = out if ws.send is None else ws.send
    if after is not None and after.data_ptr() == out.data_ptr():
        # out is the residual: the GEMM (in place) or the collective (into the result rows)
        # overwrites a group's rows before its residual is added
        after = after.clone()

    marks = timeline.active_recorder() is not None
    caller = torch.cuda.current_stream(a.device) if marks else None
    if ws.dirty:
        # A call failed between its GEMM and its re-arm: the counters hold its counts, and
        # the watcher may still wait on them.  Zero them behind those waits.
        if capturing:
            raise RuntimeError("flashoverlap: the previous call of this shape failed; make one "
                               "eager call (it repairs the workspace) before capturing")
        sync.zero_counters(ws.watcher_h)
        sync.record(ws.done_h, ws.watcher_h)
        sync.wait(caller_h, ws.done_h)
    if capturing:
        # The event pulls the watcher stream into the capture (eagerly it is not needed:
        # see the module docstring).
        sync.record(ws.armed_h, caller_h)
    ws.dirty = True
    if marks:
        timeline.mark(caller, "gemm_start")
    ws.gemm(epilogue_block)(a, b, dest, residual if epilogue_block is not None else None,
                            handle)
    if marks:
        timeline.mark(caller, "gemm_end")

    watcher = ws.watcher
    if capturing:
        sync.wait(ws.watcher_h, ws.armed_h)
    launch, nccl, enqueue_wait = collective.launch_group, ws.nccl, ws.enqueue_wait
    send_base, recv_base = dest.data_ptr(), out.data_ptr()
    if after is None and not marks:
        # The hot loop: one wait and the collective's NCCL call(s) per group, raw handles
        # throughout (no current-stream switch, no per-group argument checks).
        for step in ws.steps:
            enqueue_wait(step)
            launch(nccl, send_base + step.send_offset, recv_base + step.recv_offset,
                   step.send_count, step.recv_count)
    elif after is None:
        for step in ws.steps:
            timeline.mark(watcher, "wait_start", step.index)
            enqueue_wait(step)
            timeline.mark(watcher, "wait_end", step.index)
            launch(nccl, send_base + step.send_offset, recv_base + step.recv_offset,
                   step.send_count, step.recv_count)
            timeline.mark(watcher, "comm_end", step.index)
    else:
        with torch.cuda.stream(watcher):
            for step in ws.steps:
                enqueue_wait(step)
                launch(nccl, send_base + step.send_offset, recv_base + step.recv_offset,
                       step.send_count, step.recv_count)
                rows = slice(step.recv_lo, step.recv_hi)
                out[rows].add_(after[rows])
        if after is not residual:
            after.record_stream(watcher)
    # Re-arm for the next call: behind this call's last wait, before `done`.
    sync.zero_counters(ws.watcher_h)
    sync.record(ws.done_h, ws.watcher_h)
    ws.dirty = False
    sync.wait(caller_h, ws.done_h)
    return out
