"""Joint search over tile shape and SM reservation; analytic defaults; the tuning driver.

Role
----
A plan has three coupled knobs: the tile ``BM x BN`` (how many waves, hence how fine the
groups can be), the SMs ``r`` left to NCCL (``P = SMs - r`` GEMM CTAs: fewer waves' worth of
compute per unit time, but a faster and less intrusive collective), and the grouping of waves
(:func:`flashoverlap.tuning.model.optimal_partition`).  For each ``(tile, r)`` the DP gives
the best grouping exactly, so the search is an enumeration of a handful of ``(tile, r)`` pairs
with an exact inner optimum: :func:`search`.

Three sources feed the same search:

* **measured** (:func:`tune`, GPU): wave times of the signal GEMM per ``(tile, P)`` and one
  bandwidth curve per reservation, measured with the GEMM running beside the collective; the
  top-k predictions are then run for real and the fastest measured one wins;
* **analytic** (:func:`analytic_default`, :func:`analytic_search`, CPU): a GEMM rate per SM
  and a bus-bandwidth table (:class:`AnalyticModel`), used when the cache has no entry;
* **fakes** in the tests.

SM reservation and starvation: a persistent GEMM that holds every SM (``r = 0``) starves NCCL
until its last CTA exits (DESIGN.md, "SM sharing"), so for ``r = 0`` every collective is
modelled as starting after the whole GEMM: no overlap, whatever the grouping.

Never slower: :func:`predict_gain` compares the best overlap prediction with the sequential
baseline (all-SM GEMM, then one collective) and says overlap only if it wins by more than 2%.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flashoverlap.plan import PlanConfig, Problem, num_waves_for
from flashoverlap.tuning.model import (
    GroupBytesFn,
    TimeFn,
    linear_time,
    optimal_partition,
    overlap_wins,
    predict,
    sequential_time,
    wave_end_times,
)

__all__ = [
    "AnalyticModel",
    "Candidate",
    "DEFAULT_RESERVATIONS",
    "DEFAULT_TILE_CONFIGS",
    "SearchResult",
    "TuneResult",
    "analytic_default",
    "analytic_search",
    "dtype_size",
    "group_bytes_fn",
    "num_ctas_for",
    "predict_gain",
    "predict_times",
    "search",
    "tune",
]

# BM=128/BN=256 is the fast Hopper tile (DESIGN.md, feasibility); 128x128 doubles the wave
# count, which lets small-M problems form more than one group.  256x128 does not fit in SMEM.
DEFAULT_TILE_CONFIGS: tuple[tuple[int, int], ...] = ((128, 256), (128, 128))
DEFAULT_RESERVATIONS: tuple[int, ...] = (0, 8, 16, 24, 32)

_DTYPE_SIZES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
                "float32": 4, "fp32": 4, "float": 4}


def dtype_size(dtype: str) -> int:
    """Bytes per element of the output (``"bfloat16"``, ``"torch.float16"``, ``"fp32"`` ...)."""
    name = dtype.removeprefix("torch.")
    if name not in _DTYPE_SIZES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_DTYPE_SIZES)}")
    return _DTYPE_SIZES[name]


def num_ctas_for(problem: Problem, num_sms: int, reserved_sms: int) -> int:
    """``P = SMs - r``; for ReduceScatter rounded down to a multiple of ``W`` (the plan needs
    ``P % W == 0`` so that every group holds the same tiles for every rank), i.e. a few more
    SMs are left to NCCL.  Returns 0 when nothing is left for the GEMM."""
    P = num_sms - reserved_sms
    if problem.op == "reduce_scatter":
        P -= P % problem.world_size
    return max(P, 0)


def _num_tiles(problem: Problem, block_m: int, block_n: int) -> int:
    return (problem.row_blocks * math.ceil(problem.rows_per_block / block_m)
            * math.ceil(problem.N / block_n))


def group_bytes_fn(problem: Problem, config: PlanConfig) -> GroupBytesFn:
    """``(start_wave, stop_wave) -> bytes`` of the group's comm-buffer range.

    Every tile is a padded ``BM x BN`` slot, and the last wave may be partial.  For
    ReduceScatter this is the send size of the group (what ``ncclReduceScatter`` is given).
    """
    T = _num_tiles(problem, config.block_m, config.block_n)
    P = config.num_ctas
    slot_bytes = config.block_m * config.block_n * dtype_size(problem.dtype)

    def nbytes(start: int, stop: int) -> int:
        return (min(stop * P, T) - start * P) * slot_bytes

    return nbytes


def _restore_per_group(problem: Problem, restore_time_fn: TimeFn) -> TimeFn:
    """The model passes the group's send bytes; a ReduceScatter rank restores only its
    ``1/W`` share of them."""
    share = problem.row_blocks
    if share == 1:
        return restore_time_fn
    return lambda nbytes: restore_time_fn(nbytes / share)


def _candidate_configs(
    problem: Problem,
    num_sms: int,
    tile_configs: Sequence[tuple[int, int]],
    reservations: Sequence[int],
    group_m: int,
) -> list[tuple[int, PlanConfig]]:
    """``(r, config)`` pairs to evaluate, in input order, without repeats of ``(BM, BN, P)``
    (ReduceScatter's rounding can map two reservations to one ``P``; the first is kept)."""
    out: dict[tuple[int, int, int], tuple[int, PlanConfig]] = {}
    for block_m, block_n in tile_configs:
        for r in reservations:
            if r < 0:
                raise ValueError(f"reserved SMs must be >= 0, got {r}")
            P = num_ctas_for(problem, num_sms, r)
            if P >= 1:
                out.setdefault((block_m, block_n, P), (r, PlanConfig(
                    block_m=block_m, block_n=block_n, num_ctas=P, group_m=group_m)))
    if not out:
        raise ValueError(f"no feasible configuration for {problem} on {num_sms} SMs")
    return list(out.values())


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One evaluated configuration."""

    config: PlanConfig
    reserved_sms: int
    predicted_s: float
    measured_s: float | None = None

    @property
    def prediction_error(self) -> float | None:
        if self.measured_s is None:
            return None
        return abs(self.predicted_s - self.measured_s) / self.measured_s


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """Best candidate and the ``top_k`` best by prediction (best first)."""

    best: Candidate
    top: tuple[Candidate, ...]


def search(
    problem: Problem,
    num_sms: int,
    *,
    wave_times_fn: Callable[[PlanConfig], Sequence[float]],
    comm_curve_fn: Callable[[int], TimeFn],
    restore_time_fn: TimeFn,
    tile_configs: Sequence[tuple[int, int]] = DEFAULT_TILE_CONFIGS,
    reservations: Sequence[int] = DEFAULT_RESERVATIONS,
    group_m: int = 8,
    group_overhead: float = 0.0,
    top_k: int = 5,
) -> SearchResult:
    """Best :class:`PlanConfig` over tiles x reservations, each with its optimal grouping.

    Args:
        wave_times_fn: per-wave seconds of the signal GEMM for a config (``group_waves`` is
            ``None``; ``block_m``, ``block_n`` and ``num_ctas`` matter); its length must be the
            config's wave count.
        comm_curve_fn: ``reserved_sms -> (bytes -> seconds)`` of the collective with NCCL
            limited to that many CTAs and the GEMM running beside it.
        restore_time_fn: ``bytes -> seconds`` of a restore, given the bytes it moves (for
            ReduceScatter the ``1/W`` received share; :func:`search` does the division).
        group_overhead: fixed seconds per group (counter wait + launches).
        top_k: how many candidates to return, best first.

    Deterministic: the same inputs give the same answer on every rank.
    """
    restore = _restore_per_group(problem, restore_time_fn)
    candidates: list[Candidate] = []
    for r, base in _candidate_configs(problem, num_sms, tile_configs, reservations, group_m):
        waves = list(wave_times_fn(base))
        n = num_waves_for(problem, base)
        if len(waves) != n:
            raise ValueError(f"wave_times_fn gave {len(waves)} waves for {base}, "
                             f"the plan has {n}")
        ends = wave_end_times(waves)
        if base.num_ctas == num_sms:
            # Starved NCCL: nothing communicates before the all-SM GEMM has ended.
            ends = [ends[-1]] * n
        part = optimal_partition(ends, group_bytes_fn(problem, base), comm_curve_fn(r),
                                 restore, group_overhead=group_overhead)
        config = dataclasses.replace(base, group_waves=part.group_waves)
        candidates.append(Candidate(config, r, part.time))
    # Ties: prefer fewer reserved SMs, then the earlier tile config (the sort is stable).
    candidates.sort(key=lambda c: (c.predicted_s, c.reserved_sms))
    top = tuple(candidates[:max(top_k, 1)])
    return SearchResult(best=top[0], top=top)


# --------------------------------------------------------------------------------------
# Analytic model: defaults when nothing was measured
# --------------------------------------------------------------------------------------

# Dense GEMM throughput of a whole Hopper GPU (132 SMs), FLOP/s, as reached by a good kernel
# (DESIGN.md: the bf16 shapes there run at 640-700 TFLOP/s on H100/H200).
DEFAULT_GEMM_FLOPS: Mapping[str, float] = {"bfloat16": 650e12, "float16": 650e12,
                                           "float32": 300e12}  # float32 via TF32

# AllReduce bus bandwidth (bytes/s) for (world_size, p2p), large messages, NCCL uncapped,
# nothing else running.  p2p=True: NVLink (NV18); measured 0.64 ms for a 128 MiB AllReduce
# on 4 GPUs (DESIGN.md) -> algbw 210 GB/s -> busbw 315 GB/s.  p2p=False (NCCL_P2P_DISABLE=1,
# traffic through host memory): 8.3 ms for the same -> busbw 24 GB/s.  Other sizes are rough.
DEFAULT_BUS_BANDWIDTH: Mapping[tuple[int, bool], float] = {
    (2, True): 300e9, (4, True): 315e9, (8, True): 360e9,
    (2, False): 24e9, (4, False): 24e9, (8, False): 20e9,
}

# Fraction of the uncapped bandwidth NCCL keeps when limited to r CTAs (per communicator).
# DESIGN.md, 4 x H200 NVLink, 128 MiB AllReduce: 16 CTAs 0.71 ms vs 0.65 ms, 8 CTAs 1.12 ms.
DEFAULT_CTA_EFFICIENCY: Mapping[int, float] = {8: 0.58, 16: 0.92, 24: 0.97, 32: 1.0}


@dataclasses.dataclass(frozen=True)
class AnalyticModel:
    """Documented defaults for a Hopper-class GPU; every number is a field to override.

    GEMM: a tile costs ``2*BM*BN*K`` FLOPs at ``gemm_flops[dtype] / ref_sms`` per SM, a wave
    costs one tile time (partial waves too: wave quantization), the first wave adds
    ``launch_s``.  Collective: ``latency + bytes / algbw`` with algbw from the bus-bandwidth
    table (AllReduce ``busbw * W / (2(W-1))``; ReduceScatter, whose bytes are the send
    size, ``busbw * W / (W-1)``), times the CTA-limit efficiency (p2p only), times
    ``contention[p2p]`` while a GEMM runs beside it.  Restore: read + write of the received bytes at ``hbm_bandwidth``.
    """

    gemm_flops: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_GEMM_FLOPS))
    ref_sms: int = 132
    launch_s: float = 6e-6
    bus_bandwidth: Mapping[tuple[int, bool], float] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_BUS_BANDWIDTH))
    cta_efficiency: Mapping[int, float] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_CTA_EFFICIENCY))
    latency_s: Mapping[bool, float] = dataclasses.field(
        default_factory=lambda: {True: 15e-6, False: 30e-6})
    contention: Mapping[bool, float] = dataclasses.field(
        default_factory=lambda: {True: 0.85, False: 1.0})
    # GPU-side gap per group on the watcher stream (wait release, NCCL and restore launches).
    # Host enqueue costs more (17-21 us per group on an H100 host with direct launches,
    # scripts/host_overhead.py, results/2026-11-25-h100/host-overhead.txt) but runs ahead
    # of the GPU whenever the call is GPU-bound, so it is not on the modelled critical path.
    group_overhead: float = 8e-6
    hbm_bandwidth: float = 3.0e12
    restore_launch_s: float = 3e-6

    # -- GEMM --------------------------------------------------------------------------
    def _flops(self, dtype: str) -> float:
        name = dtype.removeprefix("torch.")
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                "float": "float32"}.get(name, name)
        if name not in self.gemm_flops:
            raise ValueError(f"no GEMM rate for dtype {dtype!r}")
        return self.gemm_flops[name]

    def wave_times(self, problem: Problem, config: PlanConfig) -> list[float]:
        per_sm = self._flops(problem.dtype) / self.ref_sms
        tile_s = 2.0 * config.block_m * config.block_n * problem.K / per_sm
        n = num_waves_for(problem, config)
        return [tile_s + self.launch_s] + [tile_s] * (n - 1)

    def gemm_time(self, problem: Problem, num_sms: int) -> float:
        """The sequential baseline's GEMM (cuBLAS on every SM), no wave quantization."""
        flops = 2.0 * problem.M * problem.N * problem.K
        return self.launch_s + flops / (self._flops(problem.dtype) * num_sms / self.ref_sms)

    # -- collective --------------------------------------------------------------------
    def _bus_bandwidth(self, world_size: int, p2p: bool) -> float:
        same = [w for (w, p) in self.bus_bandwidth if p == p2p]
        if not same:
            raise ValueError(f"no bus bandwidth for p2p={p2p}")
        nearest = min(same, key=lambda w: (abs(math.log2(w) - math.log2(world_size)), w))
        return self.bus_bandwidth[(nearest, p2p)]

    def _cta_efficiency(self, reserved_sms: int | None) -> float:
        if not reserved_sms:  # None / 0: NCCL picks its own CTA count
            return 1.0
        table = sorted(self.cta_efficiency.items())
        if reserved_sms <= table[0][0]:
            return table[0][1] * reserved_sms / table[0][0]
        for (r0, f0), (r1, f1) in zip(table, table[1:]):
            if reserved_sms <= r1:
                return f0 + (f1 - f0) * (reserved_sms - r0) / (r1 - r0)
        return table[-1][1]

    def comm_time_fn(self, problem: Problem, reserved_sms: int | None, *, p2p: bool = True,
                     contended: bool = True) -> TimeFn:
        """``bytes -> seconds`` of the problem's collective (exact affine law, no sampling)."""
        W = problem.world_size
        latency = self.latency_s[p2p]
        if W == 1:  # NCCL still launches, but nothing moves
            return linear_time(0.0, latency)
        busbw = self._bus_bandwidth(W, p2p)
        algbw = busbw * W / (W - 1) / (2.0 if problem.op == "all_reduce" else 1.0)
        if p2p:
            # Through host memory the bottleneck is PCIe, not NCCL's SMs or HBM (DESIGN.md:
            # there, concurrency reached max(GEMM, comm)), hence no CTA or contention factor.
            algbw *= self._cta_efficiency(reserved_sms)
        # r = 0: the collectives wait for the whole GEMM (starved), so they run alone.
        if contended and reserved_sms:
            algbw *= self.contention[p2p]
        return linear_time(1.0 / algbw, latency)

    # -- restore -----------------------------------------------------------------------
    def restore_time(self, nbytes: float) -> float:
        return self.restore_launch_s + 2.0 * nbytes / self.hbm_bandwidth

    def sequential_time(self, problem: Problem, num_sms: int, *, p2p: bool = True) -> float:
        total = problem.M * problem.N * dtype_size(problem.dtype)
        curve = self.comm_time_fn(problem, None, p2p=p2p, contended=False)
        return sequential_time(self.gemm_time(problem, num_sms), total, curve)


def analytic_search(
    problem: Problem,
    num_sms: int,
    *,
    p2p: bool = True,
    model: AnalyticModel | None = None,
    tile_configs: Sequence[tuple[int, int]] = DEFAULT_TILE_CONFIGS,
    reservations: Sequence[int] = DEFAULT_RESERVATIONS,
    group_m: int = 8,
    top_k: int = 5,
) -> SearchResult:
    """:func:`search` fed by the analytic model (no GPU)."""
    model = model or AnalyticModel()
    return search(
        problem, num_sms,
        wave_times_fn=lambda c: model.wave_times(problem, c),
        # NCCL gets every SM the GEMM leaves (ReduceScatter rounding included), as in the
        # engine, whose communicator is created with maxCTAs = SMs - P.
        comm_curve_fn=lambda r: model.comm_time_fn(
            problem, num_sms - num_ctas_for(problem, num_sms, r), p2p=p2p),
        restore_time_fn=model.restore_time,
        tile_configs=tile_configs, reservations=reservations, group_m=group_m,
        group_overhead=model.group_overhead, top_k=top_k,
    )


def analytic_default(
    problem: Problem,
    num_sms: int,
    block_m: int = 128,
    block_n: int = 256,
    *,
    reserved_sms: int = 16,
    p2p: bool = True,
    group_m: int = 8,
    model: AnalyticModel | None = None,
) -> PlanConfig:
    """The config the engine uses when the cache has no entry.

    ``P = num_sms - reserved_sms`` (16 by default: on NVLink that cap cost the collective
    ~9% alone and nothing under concurrency, DESIGN.md), groups from the DP on the analytic
    model.  Deterministic and cheap (microseconds for typical wave counts).
    """
    model = model or AnalyticModel()
    P = num_ctas_for(problem, num_sms, reserved_sms)
    if P < 1:
        raise ValueError(f"reserving {reserved_sms} of {num_sms} SMs leaves no GEMM CTAs")
    base = PlanConfig(block_m=block_m, block_n=block_n, num_ctas=P, group_m=group_m)
    part = optimal_partition(*_analytic_pipeline(problem, base, num_sms, p2p, model),
                             group_overhead=model.group_overhead)
    return dataclasses.replace(base, group_waves=part.group_waves)


def _analytic_pipeline(problem: Problem, config: PlanConfig, num_sms: int, p2p: bool,
                       model: AnalyticModel) -> tuple[list[float], GroupBytesFn, TimeFn, TimeFn]:
    """``(wave_end_times, group_bytes_fn, comm_time_fn, restore_time_fn)`` of ``config``.

    NCCL gets the SMs the GEMM leaves (the engine creates its communicator with
    ``maxCTAs = SMs - P``); with none left it is starved until the GEMM ends.
    """
    reserved = max(num_sms - config.num_ctas, 0)
    ends = wave_end_times(model.wave_times(problem, config))
    if reserved == 0:
        ends = [ends[-1]] * len(ends)
    return (ends, group_bytes_fn(problem, config),
            model.comm_time_fn(problem, reserved, p2p=p2p),
            _restore_per_group(problem, model.restore_time))


def predict_times(
    problem: Problem,
    config: PlanConfig,
    num_sms: int,
    *,
    p2p: bool = True,
    model: AnalyticModel | None = None,
) -> tuple[float, float]:
    """Analytic ``(overlap_s, sequential_s)`` of ``config`` (its grouping, or the DP's if
    ``group_waves`` is ``None``).  The NCCL cap is taken as ``num_sms - num_ctas``."""
    model = model or AnalyticModel()
    args = _analytic_pipeline(problem, config, num_sms, p2p, model)
    if config.group_waves is None:
        overlap = optimal_partition(*args, group_overhead=model.group_overhead).time
    else:
        overlap = predict(config.group_waves, *args, group_overhead=model.group_overhead)
    return overlap, model.sequential_time(problem, num_sms, p2p=p2p)


def predict_gain(
    problem: Problem,
    config: PlanConfig | None,
    num_sms: int,
    *,
    p2p: bool = True,
    min_gain: float = 0.02,
    model: AnalyticModel | None = None,
) -> bool:
    """Never-slower decision without measurements: is overlap predicted more than
    ``min_gain`` (2%) faster than sequential?  ``False`` for e.g. tiny M, where the GEMM is
    a single wave and there is nothing to overlap.  ``config=None`` means
    :func:`analytic_default`.  (The engine calls ``predict_gain(plan.problem, plan.config,
    num_sms)``.)"""
    if config is None:
        config = analytic_default(problem, num_sms, p2p=p2p, model=model)
    overlap, sequential = predict_times(problem, config, num_sms, p2p=p2p, model=model)
    return overlap_wins(overlap, sequential, min_gain)


# --------------------------------------------------------------------------------------
# The measuring driver (GPU through a TuningBackend; fakes on CPU)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """Outcome of :func:`tune`: the chosen candidate and the evidence."""

    problem: Problem
    best: Candidate
    top: tuple[Candidate, ...]
    sequential_s: float | None
    use_overlap: bool


def tune(
    problem: Problem,
    backend: Any,
    *,
    tile_configs: Sequence[tuple[int, int]] = DEFAULT_TILE_CONFIGS,
    reservations: Sequence[int] = DEFAULT_RESERVATIONS,
    group_m: int = 8,
    top_k: int = 5,
    verify: bool = True,
    min_gain: float = 0.02,
    warmup: int = 3,
    iters: int = 20,
    max_wave_points: int | None = 12,
    model: AnalyticModel | None = None,
    progress: Callable[[int], Callable[[int], Any]] | None = None,
) -> TuneResult:
    """Measure, search, verify.  Runs identically on every rank.

    1. One bandwidth curve per reservation ``r``, with the signal GEMM (``P = SMs - r``, first
       tile config) running beside it; ``r = 0`` is measured alone (starved anyway).
    2. Wave times of the signal GEMM per ``(tile, P)`` by truncation differences.
    3. :func:`search` with the analytic restore cost and per-group overhead of ``model``.
    4. Time the sequential baseline; if ``verify``, run the top-k configs for real and the
       fastest measured wins (else the best predicted).  Overlap is used only if it beats
       sequential by ``min_gain``.

    Known gap: wave times are measured without a collective beside the GEMM, so the GEMM's
    own slowdown under NCCL traffic is not in the prediction; step 4 measures it.

    ``backend`` is a :class:`~flashoverlap.tuning.measure.TuningBackend`.  ``progress(total)``
    returns an ``update(n)`` callable (e.g. ``tqdm(total=total).update``).
    """
    from flashoverlap.tuning import measure

    model = model or AnalyticModel()
    num_sms = backend.num_sms
    timing = dict(timer=backend.timer, warmup=warmup, iters=iters,
                  reduce_max=backend.reduce_max)
    pairs = _candidate_configs(problem, num_sms, tile_configs, reservations, group_m)
    used_r = sorted({r for r, _ in pairs}, key=list(reservations).index)
    max_bytes = max(_num_tiles(problem, c.block_m, c.block_n) * c.block_m * c.block_n
                    for _, c in pairs) * dtype_size(problem.dtype)
    sizes = measure.default_sizes(max_bytes)
    total = (len(used_r) * len(sizes)
             + sum(len(measure._wave_points(num_waves_for(problem, c), max_wave_points))
                   for _, c in pairs)
             + min(top_k, len(pairs)) * verify + 1)
    update = progress(total) if progress is not None else None

    # 1. Bandwidth curves, one per NCCL CTA limit, under the GEMM that will run beside them.
    curves: dict[int, TimeFn] = {}
    for r in used_r:
        config = next(c for rr, c in pairs if rr == r)  # first tile config with this r
        gemm, full = backend.gemm_fn(config), num_waves_for(problem, config)
        starved = config.num_ctas == num_sms  # measured alone: it runs after the GEMM anyway
        curves[r] = measure.measure_bandwidth_curve(
            backend.comm_fn(r), sizes, with_gemm_beside=not starved,
            beside=None if starved else backend.beside(lambda g=gemm, k=full: g(k)),
            progress=update, **timing)

    # 2. Wave times of every candidate GEMM.
    waves: dict[tuple[int, int, int], list[float]] = {}
    for _, c in pairs:
        waves[(c.block_m, c.block_n, c.num_ctas)] = measure.measure_wave_times(
            backend.gemm_fn(c), num_waves_for(problem, c), max_points=max_wave_points,
            progress=update, **timing)

    # 3. Search (exact grouping per candidate).
    result = search(
        problem, num_sms,
        wave_times_fn=lambda c: waves[(c.block_m, c.block_n, c.num_ctas)],
        comm_curve_fn=lambda r: curves[r], restore_time_fn=model.restore_time,
        tile_configs=tile_configs, reservations=reservations, group_m=group_m,
        group_overhead=model.group_overhead, top_k=top_k)
    sequential = measure.time_call(backend.run_sequential(), **timing)
    if update is not None:
        update(1)
    if not verify:
        return TuneResult(problem, result.best, result.top, sequential,
                          overlap_wins(result.best.predicted_s, sequential, min_gain))

    # 4. Verify: the model ranks, the measurement decides.
    top: list[Candidate] = []
    for cand in result.top:
        top.append(dataclasses.replace(
            cand, measured_s=measure.time_call(backend.run_plan(cand.config), **timing)))
        if update is not None:
            update(1)
    best = min(top, key=lambda c: (c.measured_s or math.inf, c.predicted_s))
    return TuneResult(problem, best, tuple(top), sequential,
                      overlap_wins(best.measured_s or math.inf, sequential, min_gain))
