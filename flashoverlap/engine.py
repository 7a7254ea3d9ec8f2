"""Overlap engine: signal GEMM on the caller's stream, collectives on a watcher stream.

One call of ``run_overlap(plan, a, b, group, out)``::

    caller stream : wait previous `done` ─ zero counters ─ record `armed` ─
                    signal GEMM (P CTAs; tile -> slot, bump group counter)
    watcher stream: wait `armed` ─ for g in groups:
                        [wait counter g >= tiles(g)] ─ NCCL(g) ─ restore(g) (+ residual)
                    ─ record `done`;   caller stream waits `done`

Ordering and lifetime, the reasons behind each step:

* **Counters are zeroed on the caller's stream**, before the GEMM, and the watcher waits on the
  event recorded right after the zeroing, so no wait can see a previous call's count (no epoch
  arithmetic, and replaying a captured CUDA graph re-arms them).  Targets are the group's tile
  counts with the wrap-safe ``GEQ`` compare.
* **Visibility**: the GEMM stores a tile, barriers the CTA, then does a release atomic add at
  GPU scope (``flashoverlap.kernels.signal_gemm``); the front-end wait (``cuStreamWaitValue32``)
  or the spin kernel's acquire load then orders NCCL's reads after the tile's stores.
* **SM sharing**: the GEMM runs on ``P = SMs - r`` CTAs and the communicator is created with
  ``maxCTAs = r``, so NCCL kernels find free SMs while the GEMM runs instead of queueing
  behind a grid that holds every SM (stream priority does not preempt running CTAs).
* **Buffers**: comm buffer, receive buffer, counters and events belong to a workspace cached
  per (plan, device, group), least recently used first within a per-GPU byte budget
  (:func:`get_workspace`); a call allocates nothing but ``out`` (when not given).  Reuse is
  safe because each eager call's caller stream first waits on the previous call's ``done``
  (from whichever stream it was made), so no GEMM overwrites the comm buffer or re-arms
  counters that the watcher is still working on.  ``out`` is allocated on, and joined back
  to, the caller's stream, so the caching allocator needs no ``record_stream`` for it.
* **Residual**: ``residual=`` is added in the restores (fp32 add, the bits of ``torch.add``),
  so a transformer block's residual stream costs no extra pass over the output.
* **Same order on every rank**: the first use of a plan on a group all-gathers its hash (with
  the overlap decision) and raises on mismatch (``comm.exchange_check``) instead of hanging
  in mismatched collectives.
* **Host time**: per group, the watcher loop enqueues a stream wait, a raw ``ncclAllReduce``
  (ctypes) and a restore through its compiled kernel's launcher; the GEMM likewise skips the
  Triton JIT dispatch after its first call (``kernels.direct_launch``), and the counter
  reset and event records and waits are plain driver calls (``stream_ops``).  A small
  shape's GPU work is a few hundred microseconds, so every ten microseconds per group shows.
* **CUDA graphs**: zeroing, GEMM, waits, NCCL and restores are all capturable; the one-time
  work (communicator, hash check, NVRTC compile, Triton JIT) must happen in a warm-up call
  before capture, and raises a clear error if attempted during capture.
* **Never slower**: plans predicted to gain nothing (fewer than two groups, or the tuner says
  so) run the sequential path: cuBLAS GEMM, then one NCCL collective.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import threading
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from . import timeline
from .plan import OverlapPlan, PlanConfig, Problem

_LOCK = threading.Lock()
# Keyed by the plan objects themselves (identity-hashed and kept alive by the key), never by
# id(), which a collected plan could hand to a new one.  Least recently used first.
_WORKSPACES: collections.OrderedDict[tuple[OverlapPlan, int, ProcessGroup], "Workspace"] = (
    collections.OrderedDict())
# (plan, group) pairs whose hash every rank has checked: never forgotten, so that evicting
# and rebuilding a workspace stays a local affair (no collective at a point that depends on
# this rank's memory budget).
_VERIFIED: set[tuple[OverlapPlan, ProcessGroup]] = set()
WORKSPACE_BUDGET_ENV = "FLASHOVERLAP_WORKSPACE_MB"
_DEFAULT_WORKSPACE_MB = 1024
_WATCHERS: dict[int, torch.cuda.Stream] = {}
_GAIN: dict[OverlapPlan, bool] = {}


def num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tuned_entry(problem: Problem, device: torch.device):
    """The cache entry tuned for this problem on this machine, or None (never raises)."""
    try:
        from .tuning.cache import detect_key, lookup_entry

        return lookup_entry(detect_key(problem, device=device.index))
    except Exception as exc:  # noqa: BLE001 - a broken cache must never break the op
        warnings.warn(f"flashoverlap: tuning cache unusable ({exc}); using the analytic default")
        return None


@functools.lru_cache(maxsize=256)
def choose_config(problem: Problem, device: torch.device) -> PlanConfig:
    """Tuned config from the cache when one matches, else the analytic default.

    Cached per (problem, device): the cache lookup reads files and must stay off the hot path.
    """
    from .kernels import default_block_shape

    entry = _tuned_entry(problem, device)
    if entry is not None:
        return entry.plan_config
    block = default_block_shape(device)
    try:
        from .tuning.search import analytic_default

        return analytic_default(problem, num_sms(device), block_m=block[0], block_n=block[1])
    except ImportError:
        from .defaults import default_plan_config

        return default_plan_config(problem, num_sms(device), block)


def predicts_gain(plan: OverlapPlan, device: torch.device) -> bool:
    """Whether to overlap at all (never slower than sequential).

    Needs two groups; then the measured decision of a matching tuned entry, else the
    analytic model's prediction.  Decided once per plan.
    """
    if plan.num_groups < 2:
        return False
    cached = _GAIN.get(plan)
    if cached is None:
        entry = _tuned_entry(plan.problem, device)
        if entry is not None and entry.plan_config == plan.config:
            cached = bool(entry.use_overlap)
        else:
            try:
                from .tuning.search import predict_gain

                cached = bool(predict_gain(plan.problem, plan.config, num_sms(device)))
            except ImportError:
                cached = True
        _GAIN[plan] = cached
    return cached


def _watcher_stream(device: torch.device) -> torch.cuda.Stream:
    """One high-priority watcher stream per device (its collectives are latency-critical)."""
    index = device.index
    stream = _WATCHERS.get(index)
    if stream is None:
        high, _ = torch.cuda.Stream.priority_range()
        stream = _WATCHERS[index] = torch.cuda.Stream(device=device, priority=high)
    return stream


@dataclasses.dataclass
class Workspace:
    """Everything a plan needs on one device and group, allocated once."""

    plan: OverlapPlan
    comm: Any  # flashoverlap.comm.NcclCommunicator
    step_table: torch.Tensor  # int32 [T, 6]
    restore_tile_m: torch.Tensor
    restore_tile_n: torch.Tensor
    buf: torch.Tensor  # [T, BM, BN] comm buffer
    recv: torch.Tensor  # [T/W, BM, BN] for ReduceScatter, else buf
    counters: torch.Tensor  # int32 [G]
    armed: torch.cuda.Event
    done: torch.cuda.Event
    watcher: torch.cuda.Stream
    steps: list["GroupStep"]
    enqueue_wait: Any  # (GroupStep) -> None, on the watcher stream
    used: bool  # a call has run: `done` is recorded
    pinned: bool  # captured in a CUDA graph: never evicted
    nbytes: int  # comm-buffer bytes (what the cache budget counts)
    sync: Any  # flashoverlap.stream_ops: counter reset, event records and waits
    armed_h: Any  # `armed`, `done` and the watcher as `sync` takes them
    done_h: Any
    watcher_h: Any
    gemm: Any  # flashoverlap.kernels.signal_gemm.SignalGemmLauncher into buf
    restore: Any  # flashoverlap.kernels.restore.RestoreLauncher from recv


@dataclasses.dataclass(frozen=True)
class GroupStep:
    """Raw launch arguments of one group, computed once per workspace.

    The watcher loop runs per group per call; with plain tensor slicing, argument checks and
    context managers it cost ~140 us of host time per group on an H100 host, more than the
    GPU work of a small group, so the GPU starved.  Everything here is a Python int.
    """

    index: int
    counter_addr: int
    target: int
    send_ptr: int
    recv_ptr: int
    send_count: int
    recv_count: int
    restore_lo: int
    restore_slots: int


def _group_steps(plan: OverlapPlan, counters: torch.Tensor, buf: torch.Tensor,
                 recv: torch.Tensor) -> list[GroupStep]:
    tile = plan.tile_elems
    size = buf.element_size()
    steps = []
    for g in range(plan.num_groups):
        lo, hi = int(plan.group_bounds[g]), int(plan.group_bounds[g + 1])
        rlo, rhi = int(plan.restore_bounds[g]), int(plan.restore_bounds[g + 1])
        steps.append(GroupStep(
            index=g,
            counter_addr=counters.data_ptr() + 4 * g,
            target=hi - lo,
            send_ptr=buf.data_ptr() + lo * tile * size,
            recv_ptr=recv.data_ptr() + rlo * tile * size,
            send_count=(hi - lo) * tile,
            recv_count=(rhi - rlo) * tile,
            restore_lo=rlo,
            restore_slots=rhi - rlo,
        ))
    return steps


def _wait_enqueuer(method: str, counters: torch.Tensor, watcher: torch.cuda.Stream):
    """A closure enqueueing 'wait until counter >= target' on the watcher stream.

    The driver path builds its cuda-bindings handles once; the kernel fallback goes through
    the checked public function (it launches a kernel anyway).
    """
    from .stream_wait import wait_counter_geq

    if method != "driver":
        def wait(step: GroupStep) -> None:
            g = step.index
            wait_counter_geq(counters[g : g + 1], step.target, watcher, method=method)
        return wait

    from .stream_wait import _check, _driver

    driver = _driver()
    stream = driver.CUstream(watcher.cuda_stream)
    flag = int(driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)
    addrs = {}

    def wait(step: GroupStep) -> None:
        addr = addrs.get(step.index)
        if addr is None:
            addr = addrs[step.index] = driver.CUdeviceptr(step.counter_addr)
        result = driver.cuStreamWaitValue32(stream, addr, step.target, flag)
        if result[0] if isinstance(result, tuple) else result:
            _check(driver, "cuStreamWaitValue32", result)
    return wait


def _reserved_sms(plan: OverlapPlan, device: torch.device) -> int | None:
    """CTAs NCCL may use: the SMs the GEMM leaves free (None: NCCL's own default)."""
    reserved = num_sms(device) - plan.config.num_ctas
    return reserved if reserved > 0 else None


def workspace_budget_bytes() -> int:
    """Comm-buffer bytes the cached workspaces of one device may hold (``$FLASHOVERLAP_WORKSPACE_MB``)."""
    value = os.environ.get(WORKSPACE_BUDGET_ENV)
    try:
        mb = float(value) if value is not None else _DEFAULT_WORKSPACE_MB
    except ValueError:
        raise ValueError(f"{WORKSPACE_BUDGET_ENV} must be a number of MiB, got {value!r}") from None
    return int(mb * 2**20)


def _evict_workspaces(device_index: int, keep: tuple) -> None:
    """Drop least recently used workspaces of the device until the budget holds (caller holds
    the lock).  Never the one being built, never one a CUDA graph captured (its replays use
    its buffers).  Freed buffers are safe to reuse: every workspace tensor was marked as used
    by the watcher stream, whose last work on them comes after the GEMM's last store."""
    budget = workspace_budget_bytes()
    mine = [(k, w) for k, w in list(_WORKSPACES.items()) if k[1] == device_index]
    total = sum(w.nbytes for _, w in mine)
    for k, w in mine:
        if total <= budget:
            break
        if k == keep or w.pinned:
            continue
        del _WORKSPACES[k]
        total -= w.nbytes


def get_workspace(plan: OverlapPlan, device: torch.device, group: ProcessGroup) -> Workspace:
    """The plan's cached workspace on ``device`` for ``group``, built on first use.

    Workspaces are kept least-recently-used within a per-device byte budget of comm buffers
    (:func:`workspace_budget_bytes`, default 1 GiB): serving variable prompt lengths means a
    new ``M`` -- a new plan and buffer -- on many calls, which must not grow without bound.
    """
    key = (plan, device.index, group)
    ws = _WORKSPACES.get(key)
    if ws is not None and ws.comm.handle is not None:
        _WORKSPACES.move_to_end(key)
        return ws  # (a destroyed communicator -- destroy_communicators() -- means rebuild)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "flashoverlap: the first call of a shape (plan) must run outside CUDA graph capture "
            "(it creates the communicator and checks the plan on every rank); warm up first"
        )
    from .comm import exchange_check, get_communicator
    from .stream_wait import prepare_wait

    with _LOCK:
        # Collective setup, identical on every rank: the plan check first so a mismatch
        # raises before any NCCL communicator is built around a wrong assumption.
        if (plan, group) not in _VERIFIED and dist.get_world_size(group) > 1:
            exchange_check(group, plan.hash_int64(), f"overlap plan {plan.describe()}")
        _VERIFIED.add((plan, group))
        max_ctas = _reserved_sms(plan, device)
        comm = get_communicator(group, max_ctas=max_ctas, device=device)
        method = prepare_wait(device, os.environ.get("FLASHOVERLAP_WAIT") or None)
        BM, BN = plan.config.block_m, plan.config.block_n
        dtype = getattr(torch, plan.problem.dtype)
        buf = torch.empty(plan.num_tiles, BM, BN, dtype=dtype, device=device)
        recv = (torch.empty(plan.recv_tiles, BM, BN, dtype=dtype, device=device)
                if plan.problem.op == "reduce_scatter" else buf)
        ws = Workspace(
            plan=plan,
            comm=comm,
            step_table=torch.from_numpy(plan.step_table.copy()).to(device),
            restore_tile_m=torch.from_numpy(plan.restore_tile_m.astype("int32")).to(device),
            restore_tile_n=torch.from_numpy(plan.restore_tile_n.astype("int32")).to(device),
            buf=buf,
            recv=recv,
            counters=torch.zeros(plan.num_groups, dtype=torch.int32, device=device),
            armed=torch.cuda.Event(),
            done=torch.cuda.Event(),
            watcher=_watcher_stream(device),
            steps=[],
            enqueue_wait=None,
            used=False,
            pinned=False,
            nbytes=0,
            sync=None,
            armed_h=None,
            done_h=None,
            watcher_h=None,
            gemm=None,
            restore=None,
        )
        ws.steps = _group_steps(plan, ws.counters, ws.buf, ws.recv)
        ws.enqueue_wait = _wait_enqueuer(method, ws.counters, ws.watcher)
        from .kernels.restore import RestoreLauncher
        from .kernels.signal_gemm import SignalGemmLauncher

        ws.gemm = SignalGemmLauncher(ws.buf, ws.step_table, ws.counters, block_m=BM,
                                     block_n=BN, num_ctas=plan.config.num_ctas)
        ws.restore = RestoreLauncher(ws.recv, ws.restore_tile_m, ws.restore_tile_n, BM, BN)
        from .stream_ops import stream_ops_for

        ws.sync = stream_ops_for(ws.counters)
        current = torch.cuda.current_stream(device)
        ws.armed_h = ws.sync.bind_event(ws.armed, current)
        ws.done_h = ws.sync.bind_event(ws.done, current)
        ws.watcher_h = ws.sync.bind_stream(ws.watcher)
        for t in (ws.buf, ws.recv, ws.step_table, ws.restore_tile_m, ws.restore_tile_n,
                  ws.counters):
            t.record_stream(ws.watcher)  # freed on eviction: reuse waits for the watcher
        ws.nbytes = sum(t.untyped_storage().nbytes() for t in {id(ws.buf): ws.buf,
                                                                 id(ws.recv): ws.recv}.values())
        _WORKSPACES[key] = ws
        _evict_workspaces(device.index, key)
    return ws


def clear_workspaces() -> None:
    """Drop cached workspaces (frees comm buffers); communicators stay cached in ``comm``."""
    with _LOCK:
        _WORKSPACES.clear()
        _VERIFIED.clear()
        _GAIN.clear()
        _AGREED.clear()
        _FALLBACK_COMMS.clear()


_AGREED: dict[tuple[OverlapPlan, ProcessGroup, bool], bool] = {}


def decide_overlap(plan: OverlapPlan, device: torch.device, group: ProcessGroup,
                   force: bool = False) -> bool:
    """Overlap or fall back, agreed by every rank of ``group`` on first use of the plan.

    The choice reads a per-machine tuning cache, so two nodes could decide differently; a
    rank running the overlap engine against one running the sequential path would hang in
    mismatched collectives.  The first decision is all-gathered with the plan hash (one small
    collective, then memoised) and a disagreement raises a clear error on every rank.
    """
    key = (plan, group, force)
    decided = _AGREED.get(key)
    if decided is None:
        decided = bool(force or predicts_gain(plan, device))
        if dist.get_world_size(group) > 1:
            from .comm import exchange_check

            exchange_check(group, plan.hash_int64() ^ int(decided),
                           f"overlap decision ({'overlap' if decided else 'sequential'}) and "
                           f"plan {plan.describe()}")
            # That check covered the plan hash too: the workspace needs no second one (one
            # blocking collective per new shape, not two -- serving sees many shapes).
            _VERIFIED.add((plan, group))
        _AGREED[key] = decided
    return decided


_FALLBACK_COMMS: dict[tuple[ProcessGroup, int], Any] = {}
# group-lifetime hook (issue 12): these caches hold groups; let go of them at exit / new world.
from .dist_utils import register_group_cache  # noqa: E402

register_group_cache(clear_workspaces)


@functools.lru_cache(maxsize=None)
def _nccl_codes(dtype: torch.dtype) -> tuple[int, int]:
    from .nccl_lib import nccl_dtype, nccl_red_op

    return nccl_dtype(dtype), nccl_red_op("sum")


def run_sequential_nccl(plan: OverlapPlan, a: torch.Tensor, b: torch.Tensor,
                        group: ProcessGroup, out: torch.Tensor,
                        residual: torch.Tensor | None = None) -> torch.Tensor:
    """The never-slower fallback: cuBLAS GEMM, then one NCCL collective, on the caller's stream.

    Through flashoverlap's own communicator (a raw ``ncclAllReduce`` call, ~5 us of host time)
    rather than ``torch.distributed`` (~50 us through c10d): small-M calls are host-bound, and
    this keeps the fallback at least as fast as the plain torch sequence.
    """
    comm = _FALLBACK_COMMS.get((group, a.device.index))
    if comm is None or comm.handle is None:  # first use, or destroy_communicators() since
        from .comm import get_communicator

        comm = _FALLBACK_COMMS[(group, a.device.index)] = get_communicator(group, device=a.device)
    stream = torch.cuda.current_stream(a.device).cuda_stream
    dtype, red = _nccl_codes(out.dtype)
    # With a residual the result goes to scratch first when out shares memory with it.
    target = out
    if residual is not None:
        from .checks import byte_extent, spans_intersect

        if spans_intersect(out.data_ptr(), byte_extent(out), residual.data_ptr(),
                           byte_extent(residual)):
            target = torch.empty_like(out)
    if plan.problem.op == "all_reduce":
        torch.matmul(a, b, out=target)
        comm.lib.all_reduce(target.data_ptr(), target.data_ptr(), target.numel(), dtype, red,
                            comm.handle, stream)
    else:
        full = a @ b  # allocated and consumed on this stream: safe for the caching allocator
        comm.lib.reduce_scatter(full.data_ptr(), target.data_ptr(), target.numel(), dtype, red,
                                comm.handle, stream)
    if residual is not None:
        torch.add(target, residual, out=out)
    return out


def run_overlap(
    plan: OverlapPlan,
    a: torch.Tensor,
    b: torch.Tensor,
    group: ProcessGroup,
    out: torch.Tensor,
    *,
    force_overlap: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Execute ``plan``: ``out`` <- collective over ``group`` of ``a @ b`` (+ ``residual``,
    fused into the restores; ``residual`` may be ``out`` itself), overlapped.

    ``force_overlap`` skips the never-slower decision (the caller decided, e.g. the ops
    after :func:`decide_overlap`, or the tuner; the workspace still checks the plan across
    ranks on first use).
    """
    device = a.device
    if not force_overlap and not decide_overlap(plan, device, group):
        return run_sequential_nccl(plan, a, b, group, out, residual=residual)
    ws = get_workspace(plan, device, group)
    reduce_scatter = plan.problem.op == "reduce_scatter"
    caller = torch.cuda.current_stream(device)
    if out.device.index != torch.cuda.current_device():
        raise ValueError(f"out is on {out.device}, the current device is cuda:{torch.cuda.current_device()}")

    # The workspace (comm buffer, counters) is shared by every stream that runs this plan:
    # the previous call's watcher work must be done before this GEMM overwrites the buffer
    # and the counters are re-armed.  Same-stream calls already are (see the end); this
    # covers a call from another stream.  Only after an eager call: an event recorded during
    # capture cannot be waited on outside that graph (CUDA_ERROR_INVALID_VALUE), and inside
    # one graph the order is the capture order.  Replays are ordered by the stream the user
    # replays them on, like any graph's.
    sync = ws.sync
    caller_h = sync.bind_stream(caller)
    capturing = torch.cuda.is_current_stream_capturing()
    if capturing:
        ws.pinned = True  # the graph's replays will use these buffers
    elif ws.used:
        sync.wait(caller_h, ws.done_h)
    ws.used = not capturing
    sync.zero_counters(caller_h)
    sync.record(ws.armed_h, caller_h)
    timeline.mark(caller, "gemm_start")
    ws.gemm(a, b, caller)
    timeline.mark(caller, "gemm_end")

    watcher = ws.watcher
    sync.wait(ws.watcher_h, ws.armed_h)
    lib, comm = ws.comm.lib, ws.comm.handle
    dtype, red = _nccl_codes(out.dtype)
    handle = watcher.cuda_stream
    restore, enqueue_wait = ws.restore, ws.enqueue_wait
    # Raw handles throughout: no current-stream switch, no per-group argument checks.
    for step in ws.steps:
        timeline.mark(watcher, "wait_start", step.index)
        enqueue_wait(step)
        timeline.mark(watcher, "wait_end", step.index)
        if reduce_scatter:
            lib.reduce_scatter(step.send_ptr, step.recv_ptr, step.recv_count, dtype, red,
                               comm, handle)
        else:
            lib.all_reduce(step.send_ptr, step.send_ptr, step.send_count, dtype, red, comm,
                           handle)
        timeline.mark(watcher, "comm_end", step.index)
        restore(out, step.restore_lo, step.restore_slots, watcher, residual)
        timeline.mark(watcher, "restore_end", step.index)
    sync.record(ws.done_h, ws.watcher_h)
    sync.wait(caller_h, ws.done_h)
    return out
