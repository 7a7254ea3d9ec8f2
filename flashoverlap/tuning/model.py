"""Pipeline cost model of one overlapped op, and the exact grouping optimum.

Role
----
Predict how long ``gemm -> collective`` takes when the GEMM's output is cut into groups of
row *bands* (:mod:`flashoverlap.plan`) and each group's collective runs on the watcher stream
while later bands still compute, and choose the grouping (``PlanConfig.group_bands``) that
minimises that prediction.  Pure Python: the inputs are numbers and small callables, so the
model runs (and is tested) without a GPU; measured curves (``measure.py``) or analytic
defaults (``search.py``) plug into it the same way.

The model mirrors the engine
----------------------------
* The unit of grouping is the band (``group_m`` tile rows of every row block, full width):
  plans are restore-free, so a group must be whole rows, i.e. a run of whole bands.  ``e_b``
  is the time at which band ``b`` is complete.  The persistent GEMM runs in waves of ``P``
  steps and band ``b`` of every block is done after step ``band_step_end[b]``, so ``e_b`` is
  the end of the wave holding that step (:func:`band_end_times`; waves are what can be
  measured, bands are what can be grouped).  The GEMM is not delayed by the watcher: NCCL
  runs on SMs the GEMM does not use (SM reservation); contention belongs in the measured
  wave times and bandwidth curves.
* The bands are cut into consecutive groups.  The watcher stream handles the groups one
  after another, ``wait(counter) -> collective``; group ``g+1``'s collective cannot start
  before group ``g``'s ends (one in-order stream).  With ``f_g`` the time the watcher
  finishes group ``g`` (``f_{-1} = 0``)::

      f_g = max(e[last band of g], f_{g-1}) + overhead + comm(bytes_g)

  and the prediction is ``f_{G-1}``.  There is no restore term: the collective reads the
  rows where the GEMM wrote them and delivers straight into the result (an earlier,
  wave-grouped design paid a restore copy per group here).
* ``comm`` is a :class:`CommCurve`: measured ``(bytes, seconds)`` points, interpolated, with a
  latency floor, in *send* bytes of the group (the collective's own bus-traffic factor is in
  the curve).  ``overhead`` is the fixed per-group cost of the wait and the launch.

Why one fixed cost per group matters: it is what makes "one group per band" lose for small
messages (latency-dominated collectives), and "one group" lose for large ones (no overlap).
The optimum in between is found exactly by :func:`optimal_partition`.

Units are whatever the callables return (seconds everywhere in this package); the cache
converts to milliseconds at its boundary.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

# (start_band, stop_band) -> send bytes of the group's collective.
GroupBytesFn = Callable[[int, int], int]
# bytes -> seconds.
TimeFn = Callable[[float], float]

__all__ = [
    "CommCurve",
    "Partition",
    "band_end_times",
    "group_cost",
    "linear_time",
    "optimal_partition",
    "overlap_wins",
    "predict",
    "sequential_time",
    "wave_end_times",
]


@dataclasses.dataclass(frozen=True)
class CommCurve:
    """Collective time as a function of message size, from measured points.

    Between measured sizes the time is interpolated linearly in ``(log bytes, log seconds)``:
    that is exact on both regimes a collective lives in (flat, latency-bound: slope 0;
    bandwidth-bound, ``t ~ bytes``: slope 1) and never overshoots between two points, unlike
    interpolating time itself in log-size, which overestimates a linear segment by up to ~6%
    between powers of two.  Below the smallest size the time is the smallest measured one
    (a collective never gets faster than its latency); above the largest it grows at the
    marginal bandwidth of the last segment.  ``latency`` is an extra floor (seconds), e.g.
    the launch latency when the points are sparse.

    The points are made non-decreasing (running maximum) at construction: measurement noise
    must not make a larger message look cheaper, which would reward absurd groupings.
    """

    sizes: tuple[float, ...]
    seconds: tuple[float, ...]
    latency: float = 0.0

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.seconds) or not self.sizes:
            raise ValueError("CommCurve needs the same, non-zero number of sizes and times")
        pairs = sorted(zip(map(float, self.sizes), map(float, self.seconds)))
        sizes = [s for s, _ in pairs]
        if sizes[0] <= 0 or any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"CommCurve sizes must be positive and distinct, got {self.sizes}")
        if any(not math.isfinite(t) or t <= 0 for _, t in pairs) or self.latency < 0:
            raise ValueError(f"CommCurve times must be positive and finite, got {self.seconds}")
        times, running = [], 0.0
        for _, t in pairs:
            running = max(running, t)
            times.append(running)
        object.__setattr__(self, "sizes", tuple(sizes))
        object.__setattr__(self, "seconds", tuple(times))
        object.__setattr__(self, "_log_sizes", tuple(math.log(s) for s in sizes))
        object.__setattr__(self, "_log_times", tuple(math.log(t) for t in times))

    @classmethod
    def analytic(cls, latency: float, bandwidth: float, *, max_bytes: float = 2.0**34) -> CommCurve:
        """``t = latency + bytes / bandwidth`` (bandwidth in bytes/s), sampled on powers of 2."""
        if latency <= 0 or bandwidth <= 0:
            raise ValueError("analytic CommCurve needs a positive latency and bandwidth")
        sizes = [2.0**k for k in range(0, int(math.log2(max_bytes)) + 1)]
        return cls(tuple(sizes), tuple(latency + s / bandwidth for s in sizes))

    def __call__(self, nbytes: float) -> float:
        sizes, times = self.sizes, self.seconds
        if nbytes <= sizes[0]:
            t = times[0]
        elif nbytes >= sizes[-1]:
            t = times[-1]
            if len(sizes) > 1 and times[-1] > times[-2]:
                # Marginal bandwidth of the last segment: large messages are bandwidth-bound.
                t += (nbytes - sizes[-1]) * (times[-1] - times[-2]) / (sizes[-1] - sizes[-2])
            else:
                t *= nbytes / sizes[-1]
        else:
            i = bisect.bisect_right(sizes, nbytes)  # sizes[i-1] < nbytes < sizes[i]
            ls, lt = self._log_sizes, self._log_times  # type: ignore[attr-defined]
            frac = (math.log(nbytes) - ls[i - 1]) / (ls[i] - ls[i - 1])
            t = math.exp(lt[i - 1] + frac * (lt[i] - lt[i - 1]))
        return max(t, self.latency)


def linear_time(per_byte: float, fixed: float = 0.0) -> TimeFn:
    """``bytes -> fixed + per_byte * bytes`` (an affine collective cost)."""
    if per_byte < 0 or fixed < 0:
        raise ValueError("linear_time needs non-negative coefficients")
    return lambda nbytes: fixed + per_byte * nbytes


def wave_end_times(wave_times: Sequence[float]) -> list[float]:
    """Cumulative end time of every wave from per-wave durations."""
    ends, t = [], 0.0
    for dt in wave_times:
        if dt < 0 or not math.isfinite(dt):
            raise ValueError(f"wave times must be finite and non-negative, got {dt}")
        t += dt
        ends.append(t)
    return ends


def band_end_times(wave_ends: Sequence[float], band_step_end: Sequence[int],
                   num_ctas: int) -> list[float]:
    """``e_b``: end of the wave that runs the last step of band ``b``.

    The persistent GEMM runs step ``s`` in wave ``s // P``; band ``b`` of every row block is
    complete after ``band_step_end[b]`` steps (:func:`flashoverlap.plan.band_layout`).
    """
    if num_ctas < 1:
        raise ValueError(f"num_ctas must be positive, got {num_ctas}")
    ends = []
    for steps in band_step_end:
        wave = (int(steps) - 1) // num_ctas
        if not 0 <= wave < len(wave_ends):
            raise ValueError(f"band ending at step {int(steps)} lies outside the "
                             f"{len(wave_ends)} waves of P={num_ctas}")
        ends.append(wave_ends[wave])
    return ends


def group_cost(
    start: int,
    stop: int,
    group_bytes_fn: GroupBytesFn,
    comm_time_fn: TimeFn,
    group_overhead: float = 0.0,
) -> float:
    """Watcher-stream time of the group of bands ``[start, stop)``: overhead + comm.

    Both :func:`predict` and :func:`optimal_partition` go through this one function so that
    they perform the same floating-point operations (the DP's optimum then equals ``predict``
    of its partition bit for bit).
    """
    return group_overhead + comm_time_fn(group_bytes_fn(start, stop))


def _check_partition(partition: Sequence[int], n: int) -> None:
    if not partition or any(not isinstance(w, int) or w < 1 for w in partition):
        raise ValueError(f"partition must be positive band counts, got {tuple(partition)}")
    if sum(partition) != n:
        raise ValueError(f"partition {tuple(partition)} sums to {sum(partition)}, not {n} bands")


def predict(
    partition: Sequence[int],
    band_ends: Sequence[float],
    group_bytes_fn: GroupBytesFn,
    comm_time_fn: TimeFn,
    *,
    group_overhead: float = 0.0,
) -> float:
    """Predicted time of the whole op for one grouping.

    Args:
        partition: bands per group, in order (``PlanConfig.group_bands``).
        band_ends: ``e_b``, time at which band ``b`` is complete, from the GEMM launch
            (:func:`band_end_times`).
        group_bytes_fn: ``(start_band, stop_band) -> send bytes`` of that group's collective.
        comm_time_fn: ``bytes -> seconds`` of the collective (a :class:`CommCurve`).
        group_overhead: fixed seconds per group (counter wait + launch).

    Returns:
        End of the watcher stream: the end of the last collective.
    """
    n = len(band_ends)
    _check_partition(partition, n)
    finish, start = 0.0, 0
    for size in partition:
        stop = start + size
        cost = group_cost(start, stop, group_bytes_fn, comm_time_fn, group_overhead)
        finish = max(band_ends[stop - 1], finish) + cost
        start = stop
    return finish


class Partition(NamedTuple):
    """A grouping and its predicted time."""

    group_bands: tuple[int, ...]
    time: float


def optimal_partition(
    band_ends: Sequence[float],
    group_bytes_fn: GroupBytesFn,
    comm_time_fn: TimeFn,
    *,
    group_overhead: float = 0.0,
) -> Partition:
    """The grouping that minimises :func:`predict`, over all ``2**(n-1)`` of them, in O(n^2).

    Dynamic programme over the ``n`` bands.  State ``j`` (``0..n``): the bands ``[0, j)`` are
    grouped and the last group ends at band ``j - 1``.  Value ``F[j]``: the earliest time the
    watcher stream can have finished those groups.  ``F[0] = 0`` and::

        F[j] = min over i < j of  max(e[j-1], F[i]) + cost(i, j)

    The answer is ``F[n]``; back-pointers recover the partition.

    Why this is exact.  For a fixed grouping of the remaining bands ``[j, n)``, the end time
    is a composition of maps ``x -> max(e, x) + c``, one per remaining group.  Each map is
    non-decreasing in ``x`` (max-plus structure), so the end time is a non-decreasing function
    of the prefix finish time ``x = F``.  Hence, among all groupings of ``[0, j)``, one with
    the smallest finish time is never worse than any other, whatever follows: replacing an
    optimal solution's prefix by the DP's prefix cannot make it later.  Induction over ``j``
    gives ``F[n] = min over all partitions of predict(...)``.  The argument needs nothing of
    ``comm`` (no monotonicity, no sub-additivity) nor of ``e`` (several bands may end in the
    same wave) and survives floating point, because rounding is monotone: ``a <= b`` implies
    ``fl(a + c) <= fl(b + c)``; and since the DP evaluates exactly the operations
    :func:`predict` does, the returned ``time`` equals ``predict(group_bands, ...)`` bit for
    bit.  Ties keep the smallest ``i`` (the longest last group); any minimiser is optimal.

    ``cost(i, j)`` is computed once per pair: O(n^2) calls of the callables, O(n^2) time.
    """
    n = len(band_ends)
    if n < 1:
        raise ValueError("optimal_partition needs at least one band")
    best = [math.inf] * (n + 1)
    best[0] = 0.0
    back = [0] * (n + 1)
    for j in range(1, n + 1):
        e = band_ends[j - 1]
        for i in range(j):
            t = max(e, best[i]) + group_cost(i, j, group_bytes_fn, comm_time_fn,
                                             group_overhead)
            if t < best[j]:
                best[j], back[j] = t, i
    groups: list[int] = []
    j = n
    while j > 0:
        groups.append(j - back[j])
        j = back[j]
    return Partition(tuple(reversed(groups)), best[n])


def sequential_time(gemm_time: float, total_bytes: float, comm_time_fn: TimeFn) -> float:
    """The baseline: the whole GEMM (all SMs, e.g. cuBLAS), then one collective of all
    ``total_bytes`` (the send side: ``M x N`` elements)."""
    return gemm_time + comm_time_fn(total_bytes)


def overlap_wins(overlap_time: float, sequential: float, min_gain: float = 0.02) -> bool:
    """The never-slower decision: overlap only if predicted more than ``min_gain`` faster.

    The margin absorbs model error: a predicted 1% win is within the noise of the model, and
    losing is worse than not winning (the engine then falls back to ``sequential``: docs/design.md, "Engines").
    """
    if not 0 <= min_gain < 1:
        raise ValueError(f"min_gain must be in [0, 1), got {min_gain}")
    return overlap_time < (1.0 - min_gain) * sequential
