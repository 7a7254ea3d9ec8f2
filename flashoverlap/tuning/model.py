"""Pipeline cost model of one overlapped op, and the exact grouping optimum.

Role
----
Predict how long ``gemm -> collective`` takes when the GEMM's waves are grouped and each
group's collective runs on the watcher stream while later waves still compute, and choose the
grouping (``PlanConfig.group_waves``) that minimises that prediction.  Pure Python: the inputs
are numbers and small callables, so the model runs (and is tested) without a GPU; measured
curves (``measure.py``) or analytic defaults (``search.py``) plug into it the same way.

The model mirrors the engine (DESIGN.md, "Data flow")
-----------------------------------------------------
* The GEMM runs waves ``w = 0..n-1``; ``e_w`` is the time at which wave ``w`` has finished
  (cumulative wave times, the first wave including launch / pipeline warm-up).  The GEMM is not
  delayed by the watcher: NCCL runs on SMs the GEMM does not use (SM reservation).  Contention
  (memory traffic, fewer SMs) belongs in the measured wave times and bandwidth curves.
* The waves are cut into consecutive groups.  The watcher stream handles the groups one after
  another, and for each one does ``wait(counter) -> collective -> restore``.  Because all three
  sit on one in-order stream, group ``g+1``'s collective cannot start before group ``g``'s
  restore ends.  With ``f_g`` the time the watcher finishes group ``g`` (``f_{-1} = 0``)::

      f_g = max(e[last wave of g], f_{g-1}) + overhead + comm(bytes_g) + restore(bytes_g)

  and the prediction is ``f_{G-1}`` (end of the last collective plus the last restore).
* ``comm`` is a :class:`CommCurve`: measured ``(bytes, seconds)`` points, interpolated, with a
  latency floor.  ``overhead`` is the fixed per-group cost of the wait and the launch.

Why one fixed cost per group matters: it is what makes "one group per wave" lose for small
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

# (start_wave, stop_wave) -> bytes moved by the group's collective (its comm-buffer range).
GroupBytesFn = Callable[[int, int], int]
# bytes -> seconds.
TimeFn = Callable[[float], float]

__all__ = [
    "CommCurve",
    "Partition",
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
    """``bytes -> fixed + per_byte * bytes``, e.g. a restore kernel (read + write at HBM speed)."""
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


def group_cost(
    start: int,
    stop: int,
    group_bytes_fn: GroupBytesFn,
    comm_time_fn: TimeFn,
    restore_time_fn: TimeFn,
    group_overhead: float = 0.0,
) -> float:
    """Watcher-stream time of the group of waves ``[start, stop)``: overhead + comm + restore.

    Both :func:`predict` and :func:`optimal_partition` go through this one function so that
    they perform the same floating-point operations (the DP's optimum then equals ``predict``
    of its partition bit for bit).
    """
    nbytes = group_bytes_fn(start, stop)
    return group_overhead + comm_time_fn(nbytes) + restore_time_fn(nbytes)


def _check_partition(partition: Sequence[int], n: int) -> None:
    if not partition or any(not isinstance(w, int) or w < 1 for w in partition):
        raise ValueError(f"partition must be positive wave counts, got {tuple(partition)}")
    if sum(partition) != n:
        raise ValueError(f"partition {tuple(partition)} sums to {sum(partition)}, not {n} waves")


def predict(
    partition: Sequence[int],
    wave_end_times: Sequence[float],
    group_bytes_fn: GroupBytesFn,
    comm_time_fn: TimeFn,
    restore_time_fn: TimeFn,
    *,
    group_overhead: float = 0.0,
) -> float:
    """Predicted time of the whole op for one grouping.

    Args:
        partition: waves per group, in order (``PlanConfig.group_waves``).
        wave_end_times: ``e_w``, end of wave ``w`` measured from the GEMM launch.
        group_bytes_fn: ``(start_wave, stop_wave) -> bytes`` of that group's collective.
        comm_time_fn: ``bytes -> seconds`` of the collective (a :class:`CommCurve`).
        restore_time_fn: ``bytes -> seconds`` of the group's restore (given the same bytes as
            the collective; for ReduceScatter fold the ``1/W`` received share into it).
        group_overhead: fixed seconds per group (counter wait + launches).

    Returns:
        End of the watcher stream: last collective plus last restore.
    """
    n = len(wave_end_times)
    _check_partition(partition, n)
    finish, start = 0.0, 0
    for size in partition:
        stop = start + size
        cost = group_cost(start, stop, group_bytes_fn, comm_time_fn, restore_time_fn,
                          group_overhead)
        finish = max(wave_end_times[stop - 1], finish) + cost
        start = stop
    return finish


class Partition(NamedTuple):
    """A grouping and its predicted time."""

    group_waves: tuple[int, ...]
    time: float


def optimal_partition(
    wave_end_times: Sequence[float],
    group_bytes_fn: GroupBytesFn,
    comm_time_fn: TimeFn,
    restore_time_fn: TimeFn,
    *,
    group_overhead: float = 0.0,
) -> Partition:
    """The grouping that minimises :func:`predict`, over all ``2**(n-1)`` of them, in O(n^2).

    Dynamic programme.  State ``j`` (``0..n``): the waves ``[0, j)`` are grouped and the last
    group ends at wave ``j - 1``.  Value ``F[j]``: the earliest time the watcher stream can
    have finished those groups.  ``F[0] = 0`` and::

        F[j] = min over i < j of  max(e[j-1], F[i]) + cost(i, j)

    The answer is ``F[n]``; back-pointers recover the partition.

    Why this is exact.  For a fixed grouping of the remaining waves ``[j, n)``, the end time
    is a composition of maps ``x -> max(e, x) + c``, one per remaining group.  Each map is
    non-decreasing in ``x`` (max-plus structure), so the end time is a non-decreasing function
    of the prefix finish time ``x = F``.  Hence, among all groupings of ``[0, j)``, one with
    the smallest finish time is never worse than any other, whatever follows: replacing an
    optimal solution's prefix by the DP's prefix cannot make it later.  Induction over ``j``
    gives ``F[n] = min over all partitions of predict(...)``.  The argument needs nothing of
    ``comm`` (no monotonicity, no sub-additivity) and survives floating point, because
    rounding is monotone: ``a <= b`` implies ``fl(a + c) <= fl(b + c)``; and since the DP
    evaluates exactly the operations :func:`predict` does, the returned ``time`` equals
    ``predict(group_waves, ...)`` bit for bit.  Ties keep the smallest ``i`` (the longest
    last group); any minimiser is optimal.

    ``cost(i, j)`` is computed once per pair: O(n^2) calls of the callables, O(n^2) time.
    """
    n = len(wave_end_times)
    if n < 1:
        raise ValueError("optimal_partition needs at least one wave")
    best = [math.inf] * (n + 1)
    best[0] = 0.0
    back = [0] * (n + 1)
    for j in range(1, n + 1):
        e = wave_end_times[j - 1]
        for i in range(j):
            cost = group_cost(i, j, group_bytes_fn, comm_time_fn, restore_time_fn,
                              group_overhead)
            t = max(e, best[i]) + cost
            if t < best[j]:
                best[j], back[j] = t, i
    groups: list[int] = []
    j = n
    while j > 0:
        groups.append(j - back[j])
        j = back[j]
    return Partition(tuple(reversed(groups)), best[n])


def sequential_time(gemm_time: float, total_bytes: float, comm_time_fn: TimeFn) -> float:
    """The baseline: the whole GEMM (all SMs, e.g. cuBLAS), then one collective of everything.

    The sequential engine writes the row-major output directly, so there is no restore.
    """
    return gemm_time + comm_time_fn(total_bytes)


def overlap_wins(overlap_time: float, sequential: float, min_gain: float = 0.02) -> bool:
    """The never-slower decision: overlap only if predicted more than ``min_gain`` faster.

    The margin absorbs model error: a predicted 1% win is within the noise of the model, and
    losing is worse than not winning (DESIGN.md: the engine falls back to ``sequential``).
    """
    if not 0 <= min_gain < 1:
        raise ValueError(f"min_gain must be in [0, 1), got {min_gain}")
    return overlap_time < (1.0 - min_gain) * sequential
