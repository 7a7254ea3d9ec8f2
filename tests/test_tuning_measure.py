"""Measurement plumbing with fake timers (the CUDA defaults are exercised on GPUs only).

The fakes make every timed callable *return* its simulated duration, and the fake timer
reports what the call returned; this checks warm-up, medians, the max over ranks, the
differencing of truncated GEMMs and the order of calls without a device.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest

from flashoverlap.tuning import measure


def fake_timer(fn):
    return float(fn())


def test_time_call_warmup_median_and_reduce():
    calls = []
    durations = iter([9.0, 9.0, 1.0, 5.0, 3.0, 100.0, 2.0])  # 2 warm-up, 5 timed

    def fn():
        calls.append(1)
        return next(durations)

    t = measure.time_call(fn, timer=fake_timer, warmup=2, iters=5, reduce_max=lambda x: x * 10)
    assert len(calls) == 7
    assert t == 30.0  # median of 1, 5, 3, 100, 2 is 3; the outlier does not matter
    with pytest.raises(ValueError):
        measure.time_call(fn, timer=fake_timer, iters=0)


def test_default_sizes():
    assert measure.default_sizes(1) == [1 << 15]
    sizes = measure.default_sizes(3 << 20, min_bytes=1 << 20)
    assert sizes == [1 << 20, 2 << 20, 4 << 20]
    with pytest.raises(ValueError):
        measure.default_sizes(0)


def comm_model(nbytes: int) -> float:
    return 10e-6 + nbytes / 100e9


def test_bandwidth_curve_alone():
    seen = []

    def comm_fn(nbytes):
        seen.append(nbytes)
        return comm_model(nbytes)

    sizes = [1 << 16, 1 << 20, 1 << 24]
    progress = []
    curve = measure.measure_bandwidth_curve(comm_fn, sizes, with_gemm_beside=False,
                                            timer=fake_timer, warmup=2, iters=3,
                                            progress=progress.append)
    assert seen == [s for s in sizes for _ in range(5)]  # same sizes, same order: every rank
    assert curve.sizes == tuple(map(float, sizes))
    assert curve.seconds == pytest.approx([comm_model(s) for s in sizes])
    assert progress == [1, 1, 1]


def test_bandwidth_curve_with_gemm_beside():
    """The collective is timed inside the beside context; contention shows in the numbers."""
    state = {"beside": False}
    hints = []

    @contextlib.contextmanager
    def running(seconds):
        hints.append(seconds)
        try:
            yield lambda: state.update(beside=True)  # started inside the timed call
        finally:
            state["beside"] = False

    def comm_fn(nbytes):
        return comm_model(nbytes) * (1.5 if state["beside"] else 1.0)

    sizes = [1 << 20, 1 << 22]
    curve = measure.measure_bandwidth_curve(comm_fn, sizes, beside=running, timer=fake_timer,
                                            warmup=1, iters=4, reduce_max=lambda x: x)
    assert curve.seconds == pytest.approx([1.5 * comm_model(s) for s in sizes])
    # The GEMM is asked to cover the uncontended time of each size, once per timed call.
    assert hints == pytest.approx([comm_model(s) for s in sizes for _ in range(4)])
    with pytest.raises(ValueError, match="gemm_fn"):
        measure.measure_bandwidth_curve(comm_fn, sizes, timer=fake_timer)
    with pytest.raises(ValueError):
        measure.measure_bandwidth_curve(comm_fn, [], with_gemm_beside=False, timer=fake_timer)


def test_bandwidth_curve_reduces_over_ranks():
    curve = measure.measure_bandwidth_curve(lambda b: comm_model(b), [1 << 20],
                                            with_gemm_beside=False, timer=fake_timer,
                                            warmup=0, iters=1, reduce_max=lambda x: 2 * x)
    assert curve.seconds[0] == pytest.approx(2 * comm_model(1 << 20))


def gemm_model(k: int) -> float:
    """Launch + warm-up 7 us, then 20 us per wave, the last (partial) wave 12 us."""
    n = 9
    return 7e-6 + 20e-6 * min(k, n - 1) + (12e-6 if k == n else 0.0)


def test_wave_times_by_differencing():
    waves = measure.measure_wave_times(gemm_model, 9, timer=fake_timer, warmup=0, iters=1)
    assert waves == pytest.approx([27e-6] + [20e-6] * 7 + [12e-6])
    assert sum(waves) == pytest.approx(gemm_model(9))


def test_wave_times_with_fewer_points_interpolate():
    timed = []

    def gemm(k):
        timed.append(k)
        return 5e-6 + 10e-6 * k

    waves = measure.measure_wave_times(gemm, 40, timer=fake_timer, warmup=0, iters=1,
                                       max_points=6)
    assert sorted(set(timed)) == measure._wave_points(40, 6)
    assert len(set(timed)) <= 6 and {1, 2, 40} <= set(timed)
    assert waves == pytest.approx([15e-6] + [10e-6] * 39)


def test_wave_times_are_never_negative():
    noisy = iter(itertools.cycle([5.0, 4.0, 6.0, 5.5, 9.0]))  # T_2 < T_1, T_4 < T_3
    waves = measure.measure_wave_times(lambda k: next(noisy), 5, timer=fake_timer, warmup=0,
                                       iters=1)
    assert all(w >= 0 for w in waves) and len(waves) == 5
    assert sum(waves) == pytest.approx(9.0)


def test_wave_points():
    assert measure._wave_points(5, None) == [1, 2, 3, 4, 5]
    assert measure._wave_points(5, 8) == [1, 2, 3, 4, 5]
    points = measure._wave_points(100, 10)
    assert points[0] == 1 and points[1] == 2 and points[-1] == 100 and len(points) <= 10
    with pytest.raises(ValueError):
        measure._wave_points(100, 2)
    with pytest.raises(ValueError):
        measure.measure_wave_times(gemm_model, 0, timer=fake_timer)
