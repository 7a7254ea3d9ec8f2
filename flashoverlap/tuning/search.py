"""Joint search over tile shape and SM reservation; analytic defaults; the tuning driver.

Role
----
A plan has coupled knobs: the tile ``BM x BN`` and the band height ``group_m`` (how many row
bands, hence how fine the groups can be), the SMs ``r`` left to NCCL (``P = SMs - r`` GEMM
CTAs: less compute per unit time, but a faster and less intrusive collective), and the
grouping of bands (:func:`flashoverlap.tuning.model.optimal_partition`).  For each
``(tile, r)`` the DP gives the best grouping exactly, so the search is an enumeration of a
handful of ``(tile, r)`` pairs with an exact inner optimum: :func:`search`.

Groups are runs of whole row bands (restore-free plans, :mod:`flashoverlap.plan`): a band is
complete when the wave holding its last step ends, and a group's collective moves its send
rows, ``row_blocks x (rows of its bands) x N`` elements.  Nothing here depends on which
collective runs: its row blocks and its bus traffic come from the
:class:`~flashoverlap.collectives.Collective` object (``problem.collective``).

``group_m``: the model does not see L2 reuse, so left to itself it would always pick one tile
row per band (more cut points never hurt a prediction).  The search therefore takes
``group_m`` as given, by default :func:`flashoverlap.defaults.band_group_m` (the swizzle
width 8 unless that leaves too few bands).

Three sources feed the same search:

* **measured** (:func:`tune`, GPU): wave times of the signal GEMM per ``(tile, P)`` and one
  bandwidth curve per reservation, measured with the GEMM running beside the collective; the
  top-k predictions are then run for real and the fastest measured one wins;
* **analytic** (:func:`analytic_default`, :func:`analytic_search`, CPU): a GEMM rate per SM
  and a bus-bandwidth table (:class:`AnalyticModel`), used when the cache has no entry;
* **fakes** in the tests.

SM reservation and starvation: a persistent GEMM that holds every SM (``r = 0``) starves NCCL
until its last CTA exits, so for ``r = 0`` every collective is modelled as starting after the
whole GEMM: no overlap, whatever the grouping.  Measured on one H200
(``scripts/bench_sm_sharing.py``): beside the GEMM on all 132 SMs no kernel of NCCL's CTA
shape, nor any smaller one down to 32 threads, started before the GEMM's CTAs retired;
beside ``P = 116`` they started at once on the free SMs (without thread-block clusters,
which :func:`flashoverlap.comm.overlap_communicator` turns off).

Never slower: :func:`predict_gain` compares the best overlap prediction with the sequential
baseline (all-SM GEMM, then one collective) and says overlap only if it wins by more than 2%.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flashoverlap.defaults import DEFAULT_BLOCK, band_group_m
from flashoverlap.kernels import (
    DTYPE_ALIASES,
    GEMM_FLOPS,
    GEMM_LAUNCH_S,
    GEMM_POWER_EXPONENT,
    GEMM_REF_SMS,
    SPLIT_FIXUP_S,
    SPLIT_PER_PART_S,
    SPLIT_SLOWDOWN,
    TILE_RATES,
    gemm_config_for,
    wave_times,
)
from flashoverlap.plan import PlanConfig, Problem, band_layout, num_waves_for
from flashoverlap.tuning.model import (
    GroupBytesFn,
    TimeFn,
    band_end_times,
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
    "engine_default",
    "analytic_search",
    "band_ends_for",
    "dtype_size",
    "group_bytes_fn",
    "num_ctas_for",
    "predict_gain",
    "predict_times",
    "search",
    "tune",
]

# BM=128/BN=256 is the fast Hopper tile; 128x128 has more, smaller tiles (finer waves for
# small problems) at 0.92 of its rate (kernels.TILE_RATES, which the model charges).  256x128
# does not fit in SMEM with the signal GEMM's pipeline.
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


def num_ctas_for(num_sms: int, reserved_sms: int) -> int:
    """``P = SMs - r`` GEMM CTAs; 0 when nothing is left for the GEMM."""
    return max(num_sms - reserved_sms, 0)


def group_bytes_fn(problem: Problem, config: PlanConfig) -> GroupBytesFn:
    """``(start_band, stop_band) -> send bytes`` of the group of those bands.

    A run of bands covers local rows ``[row_lo[start], row_lo[stop])`` of every row block;
    its collective is given those rows of every block, full width (exactly, no padding).
    """
    layout = band_layout(problem, config)
    row_lo = [int(r) for r in layout.band_row_lo]
    row_bytes = layout.row_blocks * problem.N * dtype_size(problem.dtype)

    def nbytes(start: int, stop: int) -> int:
        return (row_lo[stop] - row_lo[start]) * row_bytes

    return nbytes


def band_ends_for(problem: Problem, config: PlanConfig, wave_times: Sequence[float], *,
                  starved: bool = False) -> list[float]:
    """End time of every band of ``config`` from its per-wave GEMM times.

    ``starved`` (the GEMM holds every SM): NCCL cannot run before the GEMM has ended, so
    every band is modelled as ending with the GEMM.
    """
    n = num_waves_for(problem, config)
    if len(wave_times) != n:
        raise ValueError(f"got {len(wave_times)} wave times for {config}, the plan has {n} "
                         f"waves")
    ends = wave_end_times(wave_times)
    if starved:
        ends = [ends[-1]] * n
    return band_end_times(ends, band_layout(problem, config).band_step_end, config.num_ctas)


def _candidate_configs(
    problem: Problem,
    num_sms: int,
    tile_configs: Sequence[tuple[int, int]],
    reservations: Sequence[int],
    group_m: int | None,
) -> list[tuple[int, PlanConfig]]:
    """``(r, config)`` pairs to evaluate, in input order, without repeats of ``(BM, BN, P)``
    (repeated reservations; the first is kept).  ``group_m=None``: per tile,
    :func:`~flashoverlap.defaults.band_group_m`."""
    out: dict[tuple[int, int, int], tuple[int, PlanConfig]] = {}
    for block_m, block_n in tile_configs:
        gm = group_m if group_m is not None else band_group_m(problem, block_m)
        for r in reservations:
            if r < 0:
                raise ValueError(f"reserved SMs must be >= 0, got {r}")
            P = num_ctas_for(num_sms, r)
            if P >= 1:
                out.setdefault((block_m, block_n, P), (r, PlanConfig(
                    block_m=block_m, block_n=block_n, num_ctas=P, group_m=gm)))
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
    tile_configs: Sequence[tuple[int, int]] = DEFAULT_TILE_CONFIGS,
    reservations: Sequence[int] = DEFAULT_RESERVATIONS,
    group_m: int | None = None,
    group_overhead: float = 0.0,
    top_k: int = 5,
) -> SearchResult:
    """Best :class:`PlanConfig` over tiles x reservations, each with its optimal grouping.

    Args:
        wave_times_fn: per-wave seconds of the signal GEMM for a config (``group_bands`` is
            ``None``; ``block_m``, ``block_n`` and ``num_ctas`` matter); its length must be the
            config's wave count.
        comm_curve_fn: ``reserved_sms -> (send bytes -> seconds)`` of the collective with
            NCCL limited to that many CTAs and the GEMM running beside it.
        group_m: band height in tile rows; ``None``: :func:`flashoverlap.defaults.band_group_m`
            per tile.
        group_overhead: fixed seconds per group (counter wait + launch).
        top_k: how many candidates to return, best first.

    Deterministic: the same inputs give the same answer on every rank.
    """
    candidates: list[Candidate] = []
    for r, base in _candidate_configs(problem, num_sms, tile_configs, reservations, group_m):
        ends = band_ends_for(problem, base, list(wave_times_fn(base)),
                             starved=base.num_ctas == num_sms)
        part = optimal_partition(ends, group_bytes_fn(problem, base), comm_curve_fn(r),
                                 group_overhead=group_overhead)
        config = dataclasses.replace(base, group_bands=part.group_bands)
        candidates.append(Candidate(config, r, part.time))
    # Ties: prefer fewer reserved SMs, then the earlier tile config (the sort is stable).
    candidates.sort(key=lambda c: (c.predicted_s, c.reserved_sms))
    top = tuple(candidates[:max(top_k, 1)])
    return SearchResult(best=top[0], top=top)


# --------------------------------------------------------------------------------------
# Analytic model: defaults when nothing was measured
# --------------------------------------------------------------------------------------

# The GEMM's rates and fixed times are the kernels' model (flashoverlap.kernels.GEMM_FLOPS,
# GEMM_POWER_EXPONENT, GEMM_LAUNCH_S, SPLIT_FIXUP_S, SPLIT_PER_PART_S: fitted there, with the
# measurements they come from); the fields below default to them.

# Bus bandwidth (bytes/s) for (world_size, p2p), large messages, NCCL uncapped, nothing else
# running; measured with AllReduce, applied to every collective through its bus_bytes.
# p2p=True: NVLink (NV18); measured 0.64 ms for a 128 MiB AllReduce on 4 x H200 (docs/design.md)
# -> algbw 210 GB/s -> busbw 315 GB/s.  p2p=False (NCCL_P2P_DISABLE=1,
# traffic through host memory): 8.3 ms for the same -> busbw 24 GB/s.  Other sizes are rough.
DEFAULT_BUS_BANDWIDTH: Mapping[tuple[int, bool], float] = {
    (2, True): 300e9, (4, True): 315e9, (8, True): 360e9,
    (2, False): 24e9, (4, False): 24e9, (8, False): 20e9,
}

# Fraction of the uncapped bandwidth NCCL keeps when limited to r CTAs (per communicator).
# docs/design.md, "Reference numbers": 4 x H200 NVLink, 128 MiB AllReduce: 16 CTAs 0.71 ms
# vs 0.65 ms, 8 CTAs 1.12 ms.
DEFAULT_CTA_EFFICIENCY: Mapping[int, float] = {8: 0.58, 16: 0.92, 24: 0.97, 32: 1.0}


@dataclasses.dataclass(frozen=True)
class AnalyticModel:
    """Documented defaults for a Hopper-class GPU; every number is a field to override.

    GEMM: :func:`flashoverlap.kernels.wave_times` with these fields -- a tile costs
    ``2*BM*BN*K`` FLOPs at ``gemm_flops[dtype] / ref_sms`` per SM, times ``(ref_sms / P) **
    power_exponent`` for a GEMM of ``P`` CTAs (power-capped clocks), times the tile's
    ``tile_rates`` (:data:`~flashoverlap.kernels.TILE_RATES`: 128 x 128 runs at 0.92 of
    128 x 256's rate, measured; the rate is fitted on 128 x 256 rows), a wave costs one tile
    time (partial waves too: wave quantization), the first wave adds ``launch_s``; a last
    wave the signal GEMM splits along K (:func:`~flashoverlap.kernels.tail_split` with
    ``block_k``; ``split_tail`` as in its default config) costs its longest part,
    ``ceil(k_tiles / parts) / k_tiles`` of a tile, times ``1 + split_slowdown``, plus
    ``split_fixup_s + split_per_part_s * parts * area`` (``area``: the tile against
    128 x 256; both kernels, pipelined and warp-specialized, split alike).
    Collective: ``latency + bus_bytes / busbw``, where ``bus_bytes`` is what
    the collective says crosses the interconnect for the send bytes
    (:meth:`~flashoverlap.collectives.Collective.bus_bytes`: AllReduce ``2(W-1)/W``,
    ReduceScatter ``(W-1)/W`` of them) and ``busbw`` comes from the bus-bandwidth table,
    times the CTA-limit efficiency (p2p only), times ``contention[p2p]`` while a GEMM runs
    beside it.  No restore term: plans are restore-free.
    """

    gemm_flops: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: dict(GEMM_FLOPS))
    ref_sms: int = GEMM_REF_SMS
    power_exponent: float = GEMM_POWER_EXPONENT
    tile_rates: Mapping[tuple[int, int], float] = dataclasses.field(
        default_factory=lambda: dict(TILE_RATES))
    launch_s: float = GEMM_LAUNCH_S
    bus_bandwidth: Mapping[tuple[int, bool], float] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_BUS_BANDWIDTH))
    cta_efficiency: Mapping[int, float] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_CTA_EFFICIENCY))
    latency_s: Mapping[bool, float] = dataclasses.field(
        default_factory=lambda: {True: 15e-6, False: 30e-6})
    contention: Mapping[bool, float] = dataclasses.field(
        default_factory=lambda: {True: 0.85, False: 1.0})
    # GPU-side gap per group on the watcher stream (wait release, NCCL launch).
    # Host enqueue costs more (17-21 us per group on an H100 host with direct launches,
    # scripts/host_overhead.py, results/2026-11-25-h100/host-overhead.txt) but runs ahead
    # of the GPU whenever the call is GPU-bound, so it is not on the modelled critical path.
    group_overhead: float = 8e-6
    # The signal GEMM's K step and split last wave (GemmConfig.block_k / split_tail), and
    # what the split adds to its wave beyond its longest part (kernels.SPLIT_SLOWDOWN,
    # SPLIT_FIXUP_S and SPLIT_PER_PART_S; a test refits the fixed line).  At K = 8192
    # (6144 x 3072, 2 parts, wssplit-run2) the split cost ~26 us: long parts also lose the L2
    # sharing of CTAs that walk K in step -- the slowdown.
    block_k: int = 64
    split_tail: bool = True
    split_fixup_s: float = SPLIT_FIXUP_S
    split_per_part_s: float = SPLIT_PER_PART_S
    split_slowdown: float = SPLIT_SLOWDOWN

    # -- GEMM --------------------------------------------------------------------------
    def _flops(self, dtype: str) -> float:
        name = dtype.removeprefix("torch.")
        name = DTYPE_ALIASES.get(name, name)
        if name not in self.gemm_flops:
            raise ValueError(f"no GEMM rate for dtype {dtype!r}")
        return self.gemm_flops[name]

    def wave_times(self, problem: Problem, config: PlanConfig) -> list[float]:
        return wave_times(band_layout(problem, config).num_tiles, config.num_ctas, problem.K,
                          config.block_m, config.block_n, flops=self._flops(problem.dtype),
                          block_k=self.block_k, split_tail=self.split_tail,
                          ref_sms=self.ref_sms, power_exponent=self.power_exponent,
                          tile_rates=self.tile_rates, launch_s=self.launch_s,
                          split_fixup_s=self.split_fixup_s,
                          split_per_part_s=self.split_per_part_s,
                          split_slowdown=self.split_slowdown)

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
        """``send bytes -> seconds`` of the problem's collective (exact affine law)."""
        W = problem.world_size
        latency = self.latency_s[p2p]
        busbw = self._bus_bandwidth(W, p2p)
        if p2p:
            # Through host memory the bottleneck is PCIe, not NCCL's SMs or HBM (docs/design.md,
            # "Reference numbers": there concurrency reached max(GEMM, comm)), hence no CTA or
            # contention factor.
            busbw *= self._cta_efficiency(reserved_sms)
        # r = 0: the collectives wait for the whole GEMM (starved), so they run alone.
        if contended and reserved_sms:
            busbw *= self.contention[p2p]
        # Bus bytes are linear in the send bytes: the collective's factor per send byte.
        per_send_byte = problem.collective.bus_bytes(1.0, W)
        if per_send_byte < 0:
            raise ValueError(f"{problem.op}.bus_bytes is negative")
        return linear_time(per_send_byte / busbw, latency)

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
    group_m: int | None = None,
    top_k: int = 5,
) -> SearchResult:
    """:func:`search` fed by the analytic model (no GPU)."""
    model = model or AnalyticModel()
    return search(
        problem, num_sms,
        wave_times_fn=lambda c: model.wave_times(problem, c),
        # NCCL gets the r SMs the GEMM leaves, as in the engine, whose communicator is
        # created with maxCTAs = SMs - P.
        comm_curve_fn=lambda r: model.comm_time_fn(problem, r, p2p=p2p),
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
    group_m: int | None = None,
    model: AnalyticModel | None = None,
) -> PlanConfig:
    """The config the engine uses when the cache has no entry.

    ``P = num_sms - reserved_sms`` (16 by default: on NVLink that cap cost the collective
    ~9% alone and nothing under concurrency, docs/design.md "Reference numbers"), ``group_m`` from
    :func:`flashoverlap.defaults.band_group_m` unless given, groups from the DP on the
    analytic model.  Deterministic and cheap (microseconds for typical band counts).
    """
    model = model or AnalyticModel()
    P = num_ctas_for(num_sms, reserved_sms)
    if P < 1:
        raise ValueError(f"reserving {reserved_sms} of {num_sms} SMs leaves no GEMM CTAs")
    if group_m is None:
        group_m = band_group_m(problem, block_m)
    base = PlanConfig(block_m=block_m, block_n=block_n, num_ctas=P, group_m=group_m)
    part = optimal_partition(*_analytic_pipeline(problem, base, num_sms, p2p, model),
                             group_overhead=model.group_overhead)
    return dataclasses.replace(base, group_bands=part.group_bands)


def engine_default(
    problem: Problem,
    num_sms: int,
    capability: tuple[int, int] | None = None,
    *,
    reserved_sms: int = 16,
    p2p: bool = True,
    model: AnalyticModel | None = None,
) -> PlanConfig:
    """The plan config the overlap engine takes for ``problem`` without a tuned entry.

    :func:`analytic_default` with the tile the kernel table picks for the problem on the
    ``num_sms - reserved_sms`` CTAs it leaves the GEMM
    (:func:`~flashoverlap.kernels.gemm_config_for` for ``capability``; ``None`` is sm_90:
    128 x 256, or 128 x 128 where that wastes less of a last wave).  Pure: no GPU needed, so
    ``flashoverlap tune --analytic`` prints what the engine would run.
    """
    P = max(num_ctas_for(num_sms, reserved_sms), 1)
    try:
        gemm = gemm_config_for(problem.M, problem.N, problem.K, problem.dtype, P,
                               capability).config
        block_m, block_n = gemm.block_m, gemm.block_n
    except TypeError:  # a dtype the kernel table does not know: the rule-based default tile
        block_m, block_n = DEFAULT_BLOCK
    return analytic_default(problem, num_sms, block_m, block_n, reserved_sms=reserved_sms,
                            p2p=p2p, model=model)


def _analytic_pipeline(problem: Problem, config: PlanConfig, num_sms: int, p2p: bool,
                       model: AnalyticModel) -> tuple[list[float], GroupBytesFn, TimeFn]:
    """``(band_end_times, group_bytes_fn, comm_time_fn)`` of ``config``.

    NCCL gets the SMs the GEMM leaves (the engine creates its communicator with
    ``maxCTAs = SMs - P``); with none left it is starved until the GEMM ends.
    """
    reserved = max(num_sms - config.num_ctas, 0)
    ends = band_ends_for(problem, config, model.wave_times(problem, config),
                         starved=reserved == 0)
    return (ends, group_bytes_fn(problem, config),
            model.comm_time_fn(problem, reserved, p2p=p2p))


def predict_times(
    problem: Problem,
    config: PlanConfig,
    num_sms: int,
    *,
    p2p: bool = True,
    model: AnalyticModel | None = None,
) -> tuple[float, float]:
    """Analytic ``(overlap_s, sequential_s)`` of ``config`` with its grouping
    (``group_bands=None``: one group per band, as in the plan).  The NCCL cap is taken as
    ``num_sms - num_ctas``."""
    model = model or AnalyticModel()
    ends, nbytes, comm = _analytic_pipeline(problem, config, num_sms, p2p, model)
    bands = config.group_bands if config.group_bands is not None else (1,) * len(ends)
    overlap = predict(bands, ends, nbytes, comm, group_overhead=model.group_overhead)
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
    a single band and there is nothing to overlap.  ``config=None`` means
    :func:`engine_default` (sm_90's kernel table).  (The engine calls
    ``predict_gain(plan.problem, plan.config, num_sms)``.)"""
    if config is None:
        config = engine_default(problem, num_sms, p2p=p2p, model=model)
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
    group_m: int | None = None,
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
    3. :func:`search` (exact band grouping per candidate) with the per-group overhead of
       ``model``.
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
    # The largest group sends everything: M x N elements (groups are whole rows, no padding).
    sizes = measure.default_sizes(problem.M * problem.N * dtype_size(problem.dtype))
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
    waves: dict[PlanConfig, list[float]] = {}
    for _, c in pairs:
        waves[c] = measure.measure_wave_times(
            backend.gemm_fn(c), num_waves_for(problem, c), max_points=max_wave_points,
            progress=update, **timing)

    # 3. Search (exact grouping per candidate).
    result = search(
        problem, num_sms,
        wave_times_fn=lambda c: waves[c],
        comm_curve_fn=lambda r: curves[r],
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
