"""The pipeline cost model and its exact band-grouping DP (no GPU).

The central property: :func:`optimal_partition` equals the brute-force minimum of
:func:`predict` over all ``2**(n-1)`` groupings of ``n`` bands, bit for bit, on random
instances -- including latency-dominated collectives (where few groups win),
bandwidth-dominated ones (where many groups win), several bands ending in the same wave, and
arbitrary non-monotone costs (the exactness argument does not need monotone costs, so the
test does not assume them either).
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashoverlap.tuning.model import (
    CommCurve,
    band_end_times,
    linear_time,
    optimal_partition,
    overlap_wins,
    predict,
    sequential_time,
    wave_end_times,
)

EXAMPLES = settings(max_examples=250, deadline=None)


def compositions(n: int):
    """Every partition of ``n`` bands into consecutive groups (``2**(n-1)`` of them)."""
    for cuts in itertools.product((False, True), repeat=n - 1):
        sizes, size = [], 1
        for cut in cuts:
            if cut:
                sizes.append(size)
                size = 1
            else:
                size += 1
        sizes.append(size)
        yield tuple(sizes)


def brute_force(ends, bytes_fn, comm_fn, overhead):
    return min(predict(p, ends, bytes_fn, comm_fn, group_overhead=overhead)
               for p in compositions(len(ends)))


positive = st.floats(min_value=1e-7, max_value=1e-3, allow_nan=False, allow_infinity=False)


@st.composite
def comm_curves(draw):
    """Random monotone curves: latency-dominated, bandwidth-dominated, or measured-like."""
    kind = draw(st.sampled_from(["latency", "bandwidth", "points"]))
    if kind == "latency":  # a huge fixed cost: one group should usually win
        return linear_time(draw(st.floats(1e-12, 1e-10)), draw(st.floats(1e-4, 1e-2)))
    if kind == "bandwidth":
        return linear_time(draw(st.floats(1e-11, 1e-8)), draw(st.floats(0, 1e-6)))
    count = draw(st.integers(1, 8))
    sizes = sorted(draw(st.sets(st.integers(1, 1 << 30), min_size=count, max_size=count)))
    times = draw(st.lists(positive, min_size=count, max_size=count))
    return CommCurve(tuple(sizes), tuple(times), latency=draw(st.sampled_from([0.0, 1e-5])))


@st.composite
def instances(draw, max_bands: int = 10):
    """Bands of a real-looking GEMM: waves of P steps, bands of uneven step counts (several
    may end in one wave, a band may span waves), a short last band."""
    n = draw(st.integers(1, max_bands))
    P = draw(st.integers(1, 132))
    band_steps = draw(st.lists(st.integers(1, 300), min_size=n, max_size=n))
    step_end = list(itertools.accumulate(band_steps))
    num_waves = -(-step_end[-1] // P)
    waves = draw(st.lists(positive, min_size=num_waves, max_size=num_waves))
    waves[0] += draw(st.floats(0, 1e-4))  # first-wave warm-up
    ends = band_end_times(wave_end_times(waves), step_end, P)
    row_bytes = draw(st.sampled_from([2 * 1024, 2 * 8192, 4 * 4096]))
    band_rows = draw(st.lists(st.integers(1, 256), min_size=n, max_size=n))
    row_lo = [0, *itertools.accumulate(band_rows)]

    def bytes_fn(start: int, stop: int) -> int:
        return (row_lo[stop] - row_lo[start]) * row_bytes

    comm = draw(comm_curves())
    overhead = draw(st.sampled_from([0.0, 5e-6, draw(st.floats(0, 1e-4))]))
    return ends, bytes_fn, comm, overhead


@EXAMPLES
@given(instances())
def test_dp_equals_brute_force(inst):
    ends, bytes_fn, comm, overhead = inst
    best = optimal_partition(ends, bytes_fn, comm, group_overhead=overhead)
    assert sum(best.group_bands) == len(ends)
    assert all(w >= 1 for w in best.group_bands)
    assert best.time == brute_force(ends, bytes_fn, comm, overhead)
    assert best.time == predict(best.group_bands, ends, bytes_fn, comm, group_overhead=overhead)


@EXAMPLES
@given(st.data())
def test_dp_exact_for_arbitrary_costs(data):
    """Non-monotone, non-subadditive group costs: the DP is still exact (max-plus argument)."""
    n = data.draw(st.integers(1, 9))
    ends = wave_end_times(data.draw(st.lists(positive, min_size=n, max_size=n)))
    table = {(i, j): data.draw(positive) for i in range(n) for j in range(i + 1, n + 1)}
    # Encode the pair as "bytes" and look the cost up: an arbitrary cost per group.
    bytes_fn = lambda i, j: i * 1000 + j  # noqa: E731
    comm = lambda b: table[(int(b) // 1000, int(b) % 1000)]  # noqa: E731
    best = optimal_partition(ends, bytes_fn, comm)
    assert best.time == brute_force(ends, bytes_fn, comm, 0.0)
    assert best.time == predict(best.group_bands, ends, bytes_fn, comm)


def test_band_end_times():
    """Step s runs in wave s // P; a band ends with the wave of its last step."""
    wave_ends = [1.0, 2.5, 4.0]  # P = 10: steps 0-9, 10-19, 20-29
    assert band_end_times(wave_ends, [5, 10, 11, 30], 10) == [1.0, 1.0, 2.5, 4.0]
    assert band_end_times(wave_ends, [25], 10) == [4.0]  # a partial last wave
    with pytest.raises(ValueError):
        band_end_times(wave_ends, [31], 10)  # beyond the waves given
    with pytest.raises(ValueError):
        band_end_times(wave_ends, [5], 0)


def test_single_band():
    ends = [3.0]
    best = optimal_partition(ends, lambda i, j: 10, lambda b: 2.0, group_overhead=0.25)
    assert best.group_bands == (1,)
    assert best.time == 3.0 + 0.25 + 2.0
    assert predict((1,), ends, lambda i, j: 10, lambda b: 2.0, group_overhead=0.25) == best.time


def test_pipeline_by_hand():
    """Two bands ending at 1 and 2; each group's comm costs 1.5 per band of bytes."""
    ends = [1.0, 2.0]
    bytes_fn = lambda i, j: j - i  # noqa: E731
    comm = lambda b: 1.5 * b  # noqa: E731
    # One group: start 2, +3 comm.
    assert predict((2,), ends, bytes_fn, comm) == pytest.approx(5.0)
    # Two groups: g0 ends 1+1.5=2.5; g1 waits for the watcher (2.5 > 2): 2.5+1.5 = 4.0.
    assert predict((1, 1), ends, bytes_fn, comm) == pytest.approx(4.0)
    best = optimal_partition(ends, bytes_fn, comm)
    assert best.group_bands == (1, 1) and best.time == pytest.approx(4.0)
    # A fixed per-group overhead of 2 makes the single group win (5+2 < 4+4).
    best = optimal_partition(ends, bytes_fn, comm, group_overhead=2.0)
    assert best.group_bands == (2,) and best.time == pytest.approx(7.0)


def test_bands_in_one_wave_are_best_sent_together():
    """Bands 0 and 1 end in the same wave: splitting them only adds a group's overhead.

    By hand: (3) 2.8, (2, 1) 2.6, (1, 2) 2.7, (1, 1, 1) 2.8."""
    ends = [1.0, 1.0, 2.0]
    bytes_fn = lambda i, j: j - i  # noqa: E731
    comm = linear_time(0.1, 0.0)
    best = optimal_partition(ends, bytes_fn, comm, group_overhead=0.5)
    assert best.group_bands == (2, 1)
    assert best.time == pytest.approx(2.6)
    assert predict((1, 1, 1), ends, bytes_fn, comm, group_overhead=0.5) == pytest.approx(2.8)


def test_latency_dominated_prefers_one_group_bandwidth_dominated_prefers_many():
    ends = wave_end_times([1e-5] * 8)
    bytes_fn = lambda i, j: (j - i) << 20  # noqa: E731
    latency_bound = linear_time(1e-15, 1e-3)
    assert optimal_partition(ends, bytes_fn, latency_bound).group_bands == (8,)
    bandwidth_bound = linear_time(1e-11, 0.0)  # 10 us per MiB band, as long as a band
    assert optimal_partition(ends, bytes_fn, bandwidth_bound).group_bands == (1,) * 8


def test_starved_gemm_gives_one_group():
    """All bands "end" with the GEMM (no SMs for NCCL): any split only adds overhead."""
    ends = [5.0] * 6
    best = optimal_partition(ends, lambda i, j: j - i, linear_time(1.0, 0.5),
                             group_overhead=0.1)
    assert best.group_bands == (6,)


def test_predict_rejects_bad_partitions():
    ends = [1.0, 2.0, 3.0]
    args = (ends, lambda i, j: 1, lambda b: 1.0)
    for bad in [(1, 1), (2, 2), (), (0, 3), (1, -1, 3)]:
        with pytest.raises(ValueError):
            predict(bad, *args)
    with pytest.raises(ValueError):
        optimal_partition([], *args[1:])


# -- CommCurve ---------------------------------------------------------------------------


def test_comm_curve_through_points_floor_and_extrapolation():
    curve = CommCurve((1024, 4096, 1 << 20), (10e-6, 10e-6, 100e-6))
    assert curve(1024) == 10e-6 and curve(1 << 20) == pytest.approx(100e-6)
    assert curve(1) == 10e-6  # latency floor below the smallest size
    assert curve(2048) == pytest.approx(10e-6)  # flat segment stays flat
    # Above the last point: the last segment's marginal bandwidth.
    slope = (100e-6 - 10e-6) / ((1 << 20) - 4096)
    assert curve(2 << 20) == pytest.approx(100e-6 + slope * (1 << 20))
    assert CommCurve((1024,), (5e-6,), latency=7e-6)(1 << 30) >= 7e-6


def test_comm_curve_exact_on_power_laws():
    """Log-log interpolation is exact for a bandwidth-bound (t ~ bytes) segment."""
    curve = CommCurve((1 << 20, 1 << 24), (1e-5, 16e-5))
    for nbytes in (3 << 20, 5 << 20, 10 << 20):
        assert curve(nbytes) == pytest.approx(1e-5 * nbytes / (1 << 20), rel=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 1 << 30), positive), min_size=1, max_size=10,
                unique_by=lambda p: p[0]),
       st.lists(st.integers(1, 1 << 31), min_size=2, max_size=10))
def test_comm_curve_is_monotone(points, queries):
    """Noisy points (a larger message measured faster) never make the curve decrease."""
    curve = CommCurve(tuple(p[0] for p in points), tuple(p[1] for p in points))
    queries = sorted(queries)
    values = [curve(q) for q in queries]
    assert all(a <= b * (1 + 1e-12) for a, b in zip(values, values[1:]))


def test_comm_curve_validation_and_analytic():
    for sizes, times in [((), ()), ((1, 2), (1.0,)), ((0,), (1.0,)), ((1, 1), (1.0, 2.0)),
                         ((1,), (0.0,)), ((1,), (math.nan,))]:
        with pytest.raises(ValueError):
            CommCurve(sizes, times)
    curve = CommCurve.analytic(1e-5, 1e11)
    for nbytes in (1 << 10, 1 << 20, 1 << 27):
        assert curve(nbytes) == pytest.approx(1e-5 + nbytes / 1e11, rel=0.02)


# -- sequential baseline / never slower --------------------------------------------------


def test_sequential_and_overlap_decision():
    comm = linear_time(1e-9, 1e-5)
    assert sequential_time(1e-3, 1e6, comm) == pytest.approx(1e-3 + 1e-5 + 1e-3)
    assert overlap_wins(0.90, 1.0)
    assert not overlap_wins(0.99, 1.0)  # within the 2% margin
    assert not overlap_wins(1.10, 1.0)
    assert overlap_wins(0.99, 1.0, min_gain=0.0)
    with pytest.raises(ValueError):
        overlap_wins(1.0, 1.0, min_gain=1.5)


def test_wave_end_times():
    assert wave_end_times([1.0, 2.0, 0.5]) == [1.0, 3.0, 3.5]
    with pytest.raises(ValueError):
        wave_end_times([1.0, -1.0])
