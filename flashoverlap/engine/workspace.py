"""The overlap engine's per-plan workspace: counters, events, send buffer, launchers; cached.

A workspace holds everything one plan needs on one device and group, built once: the step
table and group counters on the device (two sets: see below), the ``armed``/``done`` events,
the communicator (with NCCL limited to the SMs the GEMM leaves free), the send buffer of a
collective that is not in place (ReduceScatter's packed ``[M, N]`` buffer; AllReduce needs
none: the GEMM writes the result), the per-group byte offsets and counts the hot loop turns
into pointers, the counter wait, the signal-GEMM launchers and, where the GEMM splits its
last wave (:func:`flashoverlap.kernels.tail_split`), that split's fp32 slots and tickets
(up to ``P x BLOCK_M x BLOCK_N x 4`` bytes: 16.5 MiB for 132 tiles of 128 x 256).

Two counter sets.  Eager calls count on the *eager* set and never reset it: call ``n`` (from
1) waits for ``n x tiles(g)`` (mod 2**32, the wrap-safe ``GEQ`` compare), so an eager call
enqueues no re-arm at all (one driver call, 2-5 us of host time on the H200 host, fewer per
call).  A CUDA graph replays fixed wait targets, so a call captured in a graph counts on the
*captured* set, which its graph zeroes at its end (every replay starts from zero); replays
and eager calls of one workspace therefore never see each other's counts.  Each set starts
on a 16-byte boundary, so one compiled GEMM serves both.

Cache: least recently used first within ``FLASHOVERLAP_WORKSPACE_MB`` (default 1 GiB) of device
memory (send buffers, step tables, counters, split-tail slots) and :data:`MAX_WORKSPACES` workspaces per GPU, because serving prompts of many lengths means a new ``M`` -- a new plan -- on
many calls.  Workspaces captured in a CUDA graph are pinned (their replays use the buffers).
Every workspace tensor is ``record_stream``-ed on the watcher, so an evicted buffer is reused
only after the watcher's last work on it.  Plan checks across ranks are remembered apart from
workspaces (:mod:`flashoverlap.policy`), so evicting and rebuilding is a local affair.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any

import torch
from torch.distributed import ProcessGroup

from ..collectives import NcclStream, ResidualRule
from ..dist_utils import register_group_cache
from ..nccl_enqueue import enqueue_binding
from ..plan import OverlapPlan
from ..settings import settings

_LOCK = threading.Lock()
# Keyed by the plan objects themselves (identity-hashed and kept alive by the key), never by
# id(), which a collected plan could hand to a new one.  Least recently used first.
_WORKSPACES: collections.OrderedDict[tuple[OverlapPlan, int, ProcessGroup], "Workspace"] = (
    collections.OrderedDict())
_WATCHERS: dict[int, torch.cuda.Stream] = {}
# Besides the byte budget: workspaces per GPU (each holds events and compiled-kernel entries).
MAX_WORKSPACES = 256


@dataclasses.dataclass(frozen=True)
class GroupStep:
    """One group as plain ints, computed once per workspace (the hot loop runs per group per
    call: tensor slicing and checks there cost ~140 us per group on an H100 host)."""

    index: int
    counter_addr: int
    target: int  # tiles of the group: its counter's final value
    send_offset: int  # bytes from the send side's base
    recv_offset: int  # bytes from the result's base
    send_count: int  # elements
    recv_count: int
    recv_lo: int  # result rows, for a residual added after the group
    recv_hi: int


# The hot loop's per-group record: (counter-wait argument, tiles of the group, send byte
# offset, result byte offset, send elements, result elements).  A tuple, unpacked in the loop:
# attribute loads on a dataclass cost more per group.
HotStep = tuple[Any, int, int, int, int, int]


@dataclasses.dataclass
class Workspace:
    plan: OverlapPlan
    comm: Any  # flashoverlap.comm.NcclCommunicator
    nccl: NcclStream  # what the collective's launch_group gets
    step_table: torch.Tensor  # int32 [T, 7]
    counters: torch.Tensor  # int32 [G]: the eager set (counts up across calls, never reset)
    captured_counters: torch.Tensor  # int32 [G]: the set of captured calls (zeroed per replay)
    send: torch.Tensor | None  # [M, N] packed send buffer (None: in place in the result)
    rank: int
    armed: torch.cuda.Event
    done: torch.cuda.Event
    watcher: torch.cuda.Stream
    steps: list[GroupStep]  # on the eager set
    captured_steps: list[GroupStep]  # on the captured set
    hot_steps: list[HotStep]  # `steps` for the hot loop
    enqueue_wait: Any  # (GroupStep) -> None: wait for step.target, on the watcher stream
    wait_value: Any  # (HotStep[0], target) -> None: wait for target, on the watcher stream
    sync: Any  # flashoverlap.stream_ops: re-arm of the captured set, event records and waits
    armed_h: Any
    done_h: Any
    watcher_h: Any
    tail_scratch: Any  # the GEMM's split-last-wave slots and tickets, or None (no split)
    nbytes: int  # device bytes it holds (what the cache budget counts)
    epoch: int = 0  # eager GEMMs launched on `counters` (mod 2**32): each adds tiles(g)
    used: bool = False  # an eager call has run: `done` is recorded
    last_caller: int | None = None  # raw caller stream of the last eager call (it waits `done`)
    dirty: bool = False  # an eager call failed after its GEMM, before recording `done`
    pinned: bool = False  # captured in a CUDA graph: never evicted
    _launchers: dict = dataclasses.field(default_factory=dict)

    def residual_rule(self, replicated: bool) -> ResidualRule:
        W = self.plan.problem.world_size
        return self.plan.collective.residual_rule(self.rank, W, replicated)

    def gemm(self, residual_block: int | None) -> Any:
        """The signal-GEMM launcher that adds a residual to ``residual_block`` (None: none);
        it bumps the eager set unless a call passes ``counters=ws.captured_counters``.  All
        launchers share the workspace's split-tail scratch (their launches are ordered)."""
        launcher = self._launchers.get(residual_block)
        if launcher is None:
            from ..kernels import plan_gemm_config
            from ..kernels.signal_gemm import SignalGemmLauncher

            cfg, problem = self.plan.config, self.plan.problem
            # the table's kernel options for this shape and P (the cluster kernel at reduced
            # P on sm_90), as bench_gemm measures them
            config = plan_gemm_config(problem.M, problem.N, problem.K, problem.dtype,
                                      cfg.num_ctas, cfg.block_m, cfg.block_n,
                                      torch.cuda.get_device_capability(self.step_table.device))
            launcher = self._launchers[residual_block] = SignalGemmLauncher(
                self.step_table, self.counters, block_m=cfg.block_m, block_n=cfg.block_n,
                num_ctas=cfg.num_ctas, residual_block=residual_block or 0,
                rows_per_block=self.plan.problem.rows_per_block, tail_scratch=self.tail_scratch,
                full_tiles=self.plan.full_tiles, config=config)
        return launcher


def highest_stream_priority() -> int:
    """The greatest stream priority: ``torch.cuda.Stream.priority_range()`` is ``(least,
    greatest)`` (``cudaDeviceGetStreamPriorityRange``), and lower numbers are higher
    priorities, so this is the range's minimum (negative on GPUs with priorities)."""
    return min(torch.cuda.Stream.priority_range())


def watcher_stream(device: torch.device) -> torch.cuda.Stream:
    """One watcher stream per device at the greatest priority (its collectives are
    latency-critical: their kernels go before pending kernels of lower-priority streams)."""
    index = device.index
    stream = _WATCHERS.get(index)
    if stream is None:
        stream = _WATCHERS[index] = torch.cuda.Stream(device=device,
                                                      priority=highest_stream_priority())
    return stream


def _group_steps(plan: OverlapPlan, counters: torch.Tensor, elem: int) -> list[GroupStep]:
    N = plan.problem.N
    counts = plan.group_tile_counts
    return [GroupStep(
        index=s.index,
        counter_addr=counters.data_ptr() + 4 * s.index,
        target=int(counts[s.index]),
        send_offset=s.send_lo * N * elem,
        recv_offset=s.recv_lo * N * elem,
        send_count=s.send_rows * N,
        recv_count=s.recv_rows * N,
        recv_lo=s.recv_lo,
        recv_hi=s.recv_hi,
    ) for s in plan.spans()]


def _value_waiter(method: str, watcher: torch.cuda.Stream):
    """``(wait_arg(address, view), wait)``: ``wait(arg, target)`` enqueues 'wait until the
    counter of ``arg`` >= target' (target in ``[0, 2**32)``) on the watcher stream; ``arg`` is
    built once per counter by ``wait_arg`` (a driver pointer object, or the counter's view
    for the kernel fallback)."""
    if method != "driver":
        from ..stream_wait import wait_counter_geq

        def wait_kernel(view: torch.Tensor, target: int) -> None:
            wait_counter_geq(view, target, watcher, method=method)
        return (lambda address, view: view), wait_kernel

    from ..stream_wait import _check, _driver

    driver = _driver()
    stream = driver.CUstream(watcher.cuda_stream)
    flag = int(driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)
    call = driver.cuStreamWaitValue32

    def wait(addr: Any, target: int) -> None:
        result = call(stream, addr, target, flag)
        if result[0] if isinstance(result, tuple) else result:
            _check(driver, "cuStreamWaitValue32", result)
    return (lambda address, view: driver.CUdeviceptr(address)), wait


def _wait_enqueuer(method: str, counters: torch.Tensor, watcher: torch.cuda.Stream):
    """A closure enqueueing 'wait until the step's counter >= step.target' on the watcher
    stream (a step's ``counter_addr`` lies in ``counters``); the wait argument of each
    counter is built once."""
    wait_arg, wait_value = _value_waiter(method, watcher)
    base = counters.data_ptr()
    args: dict[int, Any] = {}

    def wait(step: GroupStep) -> None:
        arg = args.get(step.counter_addr)
        if arg is None:
            i = (step.counter_addr - base) // 4
            arg = args[step.counter_addr] = wait_arg(step.counter_addr, counters[i : i + 1])
        wait_value(arg, step.target & 0xFFFFFFFF)
    return wait


def reserved_sms(num_ctas: int, device: torch.device) -> int | None:
    """CTAs NCCL may use: the SMs a persistent GEMM of ``num_ctas`` CTAs leaves free (None:
    none, NCCL's own default)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    reserved = sms - num_ctas
    return reserved if reserved > 0 else None


def _evict(device_index: int, keep: tuple) -> None:
    """Drop least recently used workspaces of the device until the budget holds (caller holds
    the lock); never the one being built, never a pinned one."""
    budget = settings().workspace_bytes
    mine = [(k, w) for k, w in list(_WORKSPACES.items()) if k[1] == device_index]
    total, count = sum(w.nbytes for _, w in mine), len(mine)
    for k, w in mine:
        if total <= budget and count <= MAX_WORKSPACES:
            break
        if k == keep or w.pinned:
            continue
        del _WORKSPACES[k]
        total -= w.nbytes
        count -= 1


def get_workspace(plan: OverlapPlan, device: torch.device, group: ProcessGroup,
                  rank: int) -> Workspace:
    """The plan's cached workspace on ``device`` for ``group``, built on first use."""
    key = (plan, device.index, group)
    ws = _WORKSPACES.get(key)
    if ws is not None and ws.comm.handle is not None:
        _WORKSPACES.move_to_end(key)
        return ws  # (a destroyed communicator -- destroy_communicators() -- means rebuild)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "flashoverlap: the first call of a shape (plan) must run outside CUDA graph capture "
            "(it creates the communicator and compiles the kernel); warm up first")
    from ..comm import overlap_communicator
    from ..nccl_lib import nccl_dtype, nccl_red_op
    from ..stream_ops import stream_ops_for
    from ..stream_wait import prepare_wait

    with _LOCK:
        comm = overlap_communicator(group, reserved_sms(plan.config.num_ctas, device), device=device)
        method = prepare_wait(device, settings().wait_method)
        problem = plan.problem
        dtype = getattr(torch, problem.dtype)
        send = None
        if not plan.collective.in_place_for(problem.world_size):
            send = torch.empty(problem.M, problem.N, dtype=dtype, device=device)
        from ..kernels import config_for_tile, default_config
        from ..kernels.signal_gemm import tail_scratch_for

        bm, bn = plan.config.block_m, plan.config.block_n
        tail_scratch = tail_scratch_for(
            plan.step_table.shape[0], plan.config.num_ctas, problem.K, bm, bn,
            config_for_tile(default_config(device, dtype), bm, bn), device)
        G = plan.num_groups
        stride = -(-G // 4) * 4  # each set 16-byte aligned: one GEMM specialization for both
        counter_sets = torch.zeros(2 * stride, dtype=torch.int32, device=device)
        counters, captured = counter_sets[:G], counter_sets[stride : stride + G]
        watcher = watcher_stream(device)
        sync = stream_ops_for(captured)
        elem = torch.empty((), dtype=dtype).element_size()
        steps = _group_steps(plan, counters, elem)
        wait_arg, wait_value = _value_waiter(method, watcher)
        current = torch.cuda.current_stream(device)
        armed, done = torch.cuda.Event(), torch.cuda.Event()
        ws = Workspace(
            plan=plan,
            comm=comm,
            nccl=NcclStream(*enqueue_binding(comm), watcher.cuda_stream, nccl_dtype(dtype),
                            nccl_red_op("sum"), rank, problem.world_size),
            step_table=torch.from_numpy(plan.step_table.copy()).to(device),
            counters=counters,
            captured_counters=captured,
            send=send,
            rank=rank,
            armed=armed,
            done=done,
            watcher=watcher,
            steps=steps,
            captured_steps=_group_steps(plan, captured, elem),
            hot_steps=[(wait_arg(s.counter_addr, counters[s.index : s.index + 1]), s.target,
                        s.send_offset, s.recv_offset, s.send_count, s.recv_count)
                       for s in steps],
            enqueue_wait=_wait_enqueuer(method, counter_sets, watcher),
            wait_value=wait_value,
            tail_scratch=tail_scratch,
            sync=sync,
            armed_h=sync.bind_event(armed, current),
            done_h=sync.bind_event(done, current),
            watcher_h=sync.bind_stream(watcher),
            nbytes=0,
        )
        # Every workspace counts: an in-place collective has no send buffer, but serving
        # many prompt lengths would otherwise keep one step table, counter array and launcher
        # set per M forever.
        held = ((ws.step_table, counter_sets) + (() if send is None else (send,))
                + (tail_scratch or ()))
        ws.nbytes = sum(t.untyped_storage().nbytes() for t in held)
        for t in held:
            t.record_stream(watcher)  # freed on eviction: reuse waits for the watcher
        # The watcher's waits are not ordered after the caller stream (engine.overlap), so
        # the counters must be zero before the first wait can read them: once, here.
        current.synchronize()
        _WORKSPACES[key] = ws
        _evict(device.index, key)
    return ws


def clear_workspaces() -> None:
    """Drop cached workspaces (frees send buffers); communicators stay cached in ``comm``."""
    with _LOCK:
        _WORKSPACES.clear()


# Workspaces are keyed by (and hold) process groups: released at exit and on a new world.
register_group_cache(clear_workspaces)


def cached_workspaces() -> list[Workspace]:
    """The cached workspaces, least recently used first (for tests and diagnostics)."""
    return list(_WORKSPACES.values())
