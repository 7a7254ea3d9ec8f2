"""GPU measurements that feed the cost model: bandwidth curves and GEMM wave times.

Role
----
:mod:`flashoverlap.tuning.model` needs two measured inputs per candidate config:

* a **bandwidth curve** ``bytes -> seconds`` of the collective, measured *while a GEMM runs
  on another stream* (:func:`measure_bandwidth_curve`), because that is the situation of the
  watcher stream: contention for memory bandwidth and SMs is in the numbers, not modelled;
* the **wave times** of the signal GEMM (:func:`measure_wave_times`).  The simplest robust
  method: time the GEMM truncated to ``k`` waves (``k * P`` tiles) for ``k = 1..n`` and take
  differences.  Wave 1 then carries the launch and pipeline warm-up.  The model groups row
  bands, not waves, but a band is complete when the wave holding its last step ends, so
  wave times give every band's end time (``model.band_end_times``).  Reading the counters'
  timestamps would need a clock per tile and a kernel change; differencing needs neither.

There is nothing else to measure: plans are restore-free (no copy after a group).

Design
------
Every function is written against small callables -- ``comm_fn(nbytes)``, ``gemm_fn(k)``, a
``timer(fn) -> seconds`` and a ``reduce_max(x)`` -- so the plumbing (warm-up, medians, the
order of calls, monotone clean-up) is tested on CPU with fake timers.  Only the defaults
(:func:`cuda_event_timer`, :class:`GemmBeside`, :class:`EngineBackend`) touch CUDA, and they
import torch lazily.

Distributed runs: every per-size / per-``k`` median goes through ``reduce_max`` (the max over
ranks, docs/design.md "Measuring"), so all ranks end up with identical numbers, run the
same deterministic search and pick the same plan -- a plan must be identical on every rank.
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from flashoverlap.plan import PlanConfig, Problem
from flashoverlap.tuning.model import CommCurve

# One call of ``fn`` -> its duration in seconds.
Timer = Callable[[Callable[[], Any]], float]
# ``with beside(seconds) as start:`` -- calling ``start()`` inside the timed region launches
# a GEMM beside it, lasting at least ``seconds``; leaving the block joins it back.
Beside = Callable[[float], AbstractContextManager[Callable[[], Any]]]

__all__ = [
    "Beside",
    "GemmBeside",
    "Timer",
    "EngineBackend",
    "TuningBackend",
    "cuda_event_timer",
    "default_sizes",
    "engine_backend",
    "measure_bandwidth_curve",
    "measure_wave_times",
    "time_call",
]


def _identity(x: float) -> float:
    return x


def time_call(
    fn: Callable[[], Any],
    *,
    timer: Timer,
    warmup: int = 3,
    iters: int = 20,
    reduce_max: Callable[[float], float] = _identity,
) -> float:
    """Median seconds of ``fn`` over ``iters`` timed calls after ``warmup`` untimed ones,
    then the max over ranks."""
    if iters < 1 or warmup < 0:
        raise ValueError("time_call needs iters >= 1 and warmup >= 0")
    for _ in range(warmup):
        fn()
    return reduce_max(statistics.median(timer(fn) for _ in range(iters)))


def default_sizes(max_bytes: int, *, min_bytes: int = 1 << 15) -> list[int]:
    """Powers of two from ``min_bytes`` up to the first one ``>= max_bytes`` (log-spaced
    points are what the curve's log-log interpolation wants)."""
    if max_bytes < 1:
        raise ValueError("max_bytes must be positive")
    sizes = [min_bytes]
    while sizes[-1] < max_bytes:
        sizes.append(sizes[-1] * 2)
    return sizes


def measure_bandwidth_curve(
    comm_fn: Callable[[int], Any],
    sizes: Sequence[int],
    *,
    with_gemm_beside: bool = True,
    gemm_fn: Callable[[], Any] | None = None,
    beside: Beside | None = None,
    timer: Timer | None = None,
    warmup: int = 3,
    iters: int = 20,
    reduce_max: Callable[[float], float] = _identity,
    progress: Callable[[int], Any] | None = None,
) -> CommCurve:
    """Collective time vs message size, with a GEMM running beside it.

    Args:
        comm_fn: ``comm_fn(nbytes)`` enqueues one collective of ``nbytes`` on the current
            stream (same sizes, same order on every rank).
        sizes: message sizes in bytes.
        with_gemm_beside: measure under contention.  Uses ``beside`` if given, else a
            :class:`GemmBeside` around ``gemm_fn`` (CUDA).  The GEMM should be the one that
            will really run beside the collectives: the signal GEMM on ``P = SMs - r`` CTAs.
        timer: defaults to :func:`cuda_event_timer`.
        reduce_max: max over ranks of a local median (identity on one rank).
        progress: called with 1 after each size (a tqdm ``update``).

    Returns:
        A :class:`CommCurve` of the median (max over ranks) time per size.
    """
    if not sizes:
        raise ValueError("measure_bandwidth_curve needs at least one size")
    timer = timer or cuda_event_timer()
    if with_gemm_beside and beside is None:
        if gemm_fn is None:
            raise ValueError("with_gemm_beside needs gemm_fn (the GEMM to run beside) or beside")
        beside = GemmBeside(gemm_fn, timer=timer)
    seconds = []
    for nbytes in sizes:
        run = functools.partial(comm_fn, nbytes)
        for _ in range(warmup):
            run()
        if with_gemm_beside:
            assert beside is not None
            # How long the GEMM must keep running: the uncontended time, on every rank the same.
            alone = reduce_max(timer(run))
            samples = []
            for _ in range(iters):
                with beside(alone) as start:
                    # Launched inside the timed call, i.e. after anything the timer does
                    # first (the L2 flush): the GEMM must overlap the collective itself.
                    samples.append(timer(functools.partial(_after, start, run)))
        else:
            samples = [timer(run) for _ in range(iters)]
        seconds.append(reduce_max(statistics.median(samples)))
        if progress is not None:
            progress(1)
    return CommCurve(tuple(float(s) for s in sizes), tuple(seconds))


def _after(first: Callable[[], Any], then: Callable[[], Any]) -> Any:
    first()
    return then()


def _wave_points(num_waves: int, max_points: int | None) -> list[int]:
    """Which truncations ``k`` to time: all of ``1..n``, or ``max_points`` of them spread over
    the range (always ``1``, ``2`` and ``n``: the warm-up wave and the last, partial, wave
    differ from the steady state; the middle is linear and interpolates well)."""
    n = num_waves
    if max_points is None or n <= max_points:
        return list(range(1, n + 1))
    if max_points < 3:
        raise ValueError("max_points must be at least 3")
    inner = max_points - 1  # points spread over [2, n]
    ks = {1} | {round(2 + i * (n - 2) / (inner - 1)) for i in range(inner)}
    return sorted(ks)


def measure_wave_times(
    gemm_fn: Callable[[int], Any],
    num_waves: int,
    *,
    timer: Timer | None = None,
    warmup: int = 3,
    iters: int = 20,
    max_points: int | None = None,
    reduce_max: Callable[[float], float] = _identity,
    progress: Callable[[int], Any] | None = None,
) -> list[float]:
    """Per-wave seconds of the signal GEMM, by differencing truncated runs.

    Args:
        gemm_fn: ``gemm_fn(k)`` runs the GEMM with only its first ``k`` waves (``k * P``
            tiles; ``k = num_waves`` is the full GEMM).
        num_waves: waves of the full GEMM.
        max_points: time at most this many truncations and interpolate ``T_k`` linearly in
            between (``None``: all ``n``; timing all of them costs O(n^2) GEMM work).

    Returns:
        ``[T_1 - T_0, T_2 - T_1, ..., T_n - T_{n-1}]`` with ``T_0 = 0``: wave 1 includes the
        launch and warm-up.  ``T_k`` is made non-decreasing first (running max), so noise
        never yields a negative wave time.
    """
    if num_waves < 1:
        raise ValueError("num_waves must be >= 1")
    timer = timer or cuda_event_timer()
    ks = _wave_points(num_waves, max_points)
    measured: dict[int, float] = {0: 0.0}
    for k in ks:
        measured[k] = time_call(functools.partial(gemm_fn, k), timer=timer, warmup=warmup,
                                iters=iters, reduce_max=reduce_max)
        if progress is not None:
            progress(1)
    points = sorted(measured)
    totals, running = [], 0.0
    for k in points:
        running = max(running, measured[k])
        totals.append(running)
    # T_k for every k by linear interpolation between timed truncations.
    cumulative = [0.0] * (num_waves + 1)
    for (k0, t0), (k1, t1) in zip(zip(points, totals), zip(points[1:], totals[1:])):
        for k in range(k0, k1 + 1):
            cumulative[k] = t0 + (t1 - t0) * (k - k0) / (k1 - k0)
    return [cumulative[k] - cumulative[k - 1] for k in range(1, num_waves + 1)]


# --------------------------------------------------------------------------------------
# CUDA defaults (lazy torch imports: importing this module never touches CUDA)
# --------------------------------------------------------------------------------------


def cuda_event_timer(*, flush_l2_bytes: int = 256 << 20,
                     before: Callable[[], Any] | None = None,
                     host_lead_cycles: int = 1_000_000) -> Timer:
    """A :data:`Timer` using CUDA events on the current stream.

    Before each start event it overwrites a ``flush_l2_bytes`` scratch buffer, so the inputs
    are not served from L2 (H100 L2 is 50 MB), then calls ``before`` (e.g. a one-element
    AllReduce that lines the ranks up, so a collective's time does not include waiting for a
    late rank), then keeps the GPU busy for ``host_lead_cycles`` clock cycles (~0.5 ms) so
    that the host has enqueued the start event, ``fn``'s work and the end event before the
    start event runs: otherwise a slow host's launch time lands between the events (seen on
    the H200 VM host: truncated GEMM runs of 1..18 waves all timed alike, ~the launch time).
    All of it is outside the timed region.
    """
    import torch

    scratch = (torch.empty(flush_l2_bytes, dtype=torch.uint8, device="cuda")
               if flush_l2_bytes else None)
    if host_lead_cycles:
        torch.cuda._sleep(1)  # load the kernel now (lazy module loading), not mid-measurement

    def timer(fn: Callable[[], Any]) -> float:
        if scratch is not None:
            scratch.zero_()
        if before is not None:
            before()
        if host_lead_cycles:
            torch.cuda._sleep(host_lead_cycles)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3

    return timer


class GemmBeside:
    """Keeps ``gemm_fn`` running on a side stream while a collective is timed.

    ``with GemmBeside(gemm_fn)(seconds) as start:`` -- ``start()`` (called inside the timed
    region, after the timer's start event) makes the side stream wait for the current one and
    enqueues enough back-to-back GEMMs to outlast ``seconds`` by 50%, so both start together;
    leaving the block makes the current stream wait for the side stream, so the next timed
    call does not run into this one's GEMMs.
    """

    def __init__(self, gemm_fn: Callable[[], Any], *, timer: Timer | None = None) -> None:
        import torch

        self._gemm_fn = gemm_fn
        self._timer = timer or cuda_event_timer()
        self._stream = torch.cuda.Stream()
        self._gemm_s: float | None = None

    def __call__(self, seconds: float) -> AbstractContextManager[Callable[[], None]]:
        return self._running(seconds)

    @contextlib.contextmanager
    def _running(self, seconds: float) -> Iterator[Callable[[], None]]:
        import torch

        if self._gemm_s is None:
            self._gemm_s = time_call(self._gemm_fn, timer=self._timer, warmup=2, iters=5)
        repeats = max(1, math.ceil(1.5 * seconds / max(self._gemm_s, 1e-9)))
        current = torch.cuda.current_stream()

        def start() -> None:
            self._stream.wait_stream(current)
            with torch.cuda.stream(self._stream):
                for _ in range(repeats):
                    self._gemm_fn()

        try:
            yield start
        finally:
            current.wait_stream(self._stream)


class TuningBackend(Protocol):
    """What the tuning driver (:func:`flashoverlap.tuning.search.tune`) needs from a machine.

    Implemented on GPUs by :class:`EngineBackend`, by fakes in the CPU tests.  Every method
    is called in the same order on every rank.
    """

    num_sms: int
    timer: Timer

    def reduce_max(self, x: float) -> float:
        """Max of ``x`` over ranks (identity on one rank)."""

    def comm_fn(self, reserved_sms: int) -> Callable[[int], Any]:
        """``f(nbytes)`` runs the problem's collective on ``nbytes`` send bytes with NCCL
        limited to about ``reserved_sms`` CTAs (0: NCCL's default)."""

    def gemm_fn(self, config: PlanConfig) -> Callable[[int], Any]:
        """``f(k)`` runs the signal GEMM of ``config`` truncated to its first ``k`` waves."""

    def beside(self, gemm: Callable[[], Any]) -> Beside:
        """Runs ``gemm`` beside a measured collective (a :class:`GemmBeside`)."""

    def run_plan(self, config: PlanConfig) -> Callable[[], Any]:
        """A zero-argument call of the whole overlapped op under ``config``."""

    def run_sequential(self) -> Callable[[], Any]:
        """A zero-argument call of the baseline: ``torch.matmul`` then the collective."""


class EngineBackend:
    """The GPU :class:`TuningBackend`, built on flashoverlap's own engine pieces.

    * collectives: the problem's :class:`~flashoverlap.collectives.Collective`, launched raw
      (``launch_group``, the call the watcher stream makes per group) on ``flashoverlap.comm``
      communicators created with ``maxCTAs`` equal to what the engine gives NCCL for that
      reservation (``SMs - P``; NCCL's default when ``P = SMs``), i.e. the very communicator
      configuration the overlapped op runs with.  Message sizes are send bytes;
    * GEMM waves: ``flashoverlap.kernels.signal_gemm`` on the plan's step table truncated to
      its first ``k * P`` steps (a persistent CTA stops when the table ends), writing a
      row-major ``[M, N]`` buffer as the real op does;
    * the overlapped op: ``flashoverlap.engine.run_overlap`` (always overlaps);
    * the baseline: ``flashoverlap.engine.run_sequential`` (``torch.matmul`` + NCCL).

    Inputs are random (never zeros: power and clocks depend on the data), allocated once;
    the timer flushes L2 before each timed call.  Everything is imported lazily.
    """

    def __init__(self, problem: Problem, group: Any = None, device: Any = None) -> None:
        import torch
        import torch.distributed as dist

        from flashoverlap.dist_utils import resolve_group

        self._torch = torch
        self.problem = problem
        self.collective = problem.collective
        self.group = resolve_group(group)
        self.rank = dist.get_rank(self.group)
        self.device = (torch.device("cuda", torch.cuda.current_device()) if device is None
                       else torch.device(device))
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self._one = torch.ones(1, device=self.device)
        self.timer = cuda_event_timer(before=self._line_up_ranks)
        self.dtype = getattr(torch, problem.dtype.removeprefix("torch."))
        gen = torch.Generator(device=self.device).manual_seed(1234)
        # Scaled so that fp16 outputs stay finite after the reduction over ranks.
        self._a = torch.randn(problem.M, problem.K, dtype=self.dtype, device=self.device,
                              generator=gen)
        self._b = torch.randn(problem.K, problem.N, dtype=self.dtype, device=self.device,
                              generator=gen) / problem.K ** 0.5
        self._out = torch.empty(self.collective.result_rows(problem.M, problem.world_size),
                                problem.N, dtype=self.dtype, device=self.device)
        self._gemm_out: Any = None  # the signal GEMM's [M, N] destination, made on first use
        self._send_buf: Any = None
        self._recv_buf: Any = None

    def _line_up_ranks(self) -> None:
        """A tiny AllReduce ends at about the same time on every rank: a start line."""
        import torch.distributed as dist

        if dist.get_world_size(self.group) > 1:
            dist.all_reduce(self._one, group=self.group)

    def reduce_max(self, x: float) -> float:
        import torch.distributed as dist

        if dist.get_world_size(self.group) == 1:
            return x
        t = self._torch.tensor([x], dtype=self._torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t.item())

    def comm_fn(self, reserved_sms: int) -> Callable[[int], Any]:
        from flashoverlap import nccl_lib
        from flashoverlap.collectives import NcclStream
        from flashoverlap.comm import overlap_communicator
        from flashoverlap.nccl_enqueue import enqueue_binding

        torch = self._torch
        free = min(max(reserved_sms, 0), self.num_sms)  # the SMs the GEMM (P = SMs - r) leaves
        comm = overlap_communicator(self.group, free, device=self.device)
        W = self.problem.world_size
        blocks = self.collective.row_blocks(W)
        elem = self._a.element_size()
        quantum = elem * blocks  # whole rows of every block: the result share is exact
        dtype_code = nccl_lib.nccl_dtype(self.dtype)
        sum_op = nccl_lib.nccl_red_op("sum")

        def run(nbytes: int) -> None:
            n = max(quantum, nbytes // quantum * quantum) // elem  # send elements
            if self._send_buf is None or self._send_buf.numel() < n:
                # Grown once (sizes are measured in increasing order), outside the timing
                # of later calls.
                self._send_buf = torch.randn(n, dtype=self.dtype, device=self.device)
                self._recv_buf = (None if self.collective.in_place else
                                  torch.empty(n // blocks, dtype=self.dtype, device=self.device))
            send_ptr = self._send_buf.data_ptr()
            recv_ptr = send_ptr if self._recv_buf is None else self._recv_buf.data_ptr()
            stream = torch.cuda.current_stream(self.device).cuda_stream
            lib, handle = enqueue_binding(comm)
            nccl = NcclStream(lib=lib, comm=handle, stream=stream, dtype=dtype_code,
                              sum_op=sum_op, rank=self.rank, world_size=W)
            self.collective.launch_group(nccl, send_ptr, recv_ptr, n, n // blocks)

        return run

    def gemm_fn(self, config: PlanConfig) -> Callable[[int], Any]:
        import dataclasses

        from flashoverlap.kernels.signal_gemm import signal_gemm
        from flashoverlap.plan import make_plan

        torch = self._torch
        plan = make_plan(self.problem, dataclasses.replace(config, group_bands=None))
        table = torch.from_numpy(plan.step_table.copy()).to(self.device)
        if self._gemm_out is None:
            self._gemm_out = torch.empty(self.problem.M, self.problem.N, dtype=self.dtype,
                                         device=self.device)
        out = self._gemm_out
        # Signals on, as in the real op; nobody waits, so the counts may simply grow.
        counters = torch.zeros(plan.num_groups, dtype=torch.int32, device=self.device)
        P, T = config.num_ctas, plan.num_tiles
        full_tiles = plan.full_tiles  # the kernel the engine runs for this plan

        def run(k: int) -> None:
            signal_gemm(self._a, self._b, out, step_table=table[:min(k * P, T)],
                        block_m=config.block_m, block_n=config.block_n, num_ctas=P,
                        counters=counters, full_tiles=full_tiles)

        return run

    def beside(self, gemm: Callable[[], Any]) -> Beside:
        return GemmBeside(gemm, timer=self.timer)

    def run_plan(self, config: PlanConfig) -> Callable[[], Any]:
        from flashoverlap import engine
        from flashoverlap.plan import make_plan

        plan = make_plan(self.problem, config)
        return lambda: engine.run_overlap(plan, self._a, self._b, self.group, self._out,
                                          rank=self.rank)

    def run_sequential(self) -> Callable[[], Any]:
        from flashoverlap import engine

        return lambda: engine.run_sequential(self.collective, self._a, self._b, self.group,
                                             self._out, world_size=self.problem.world_size)


def engine_backend(problem: Problem, group: Any = None) -> EngineBackend:
    """Backend factory for ``flashoverlap tune --backend`` (the default one)."""
    return EngineBackend(problem, group)
