"""Search over tiles x reservations, the analytic defaults, and the tuning driver (fakes)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashoverlap.plan import PlanConfig, Problem, make_plan, num_waves_for
from flashoverlap.tuning import search as S
from flashoverlap.tuning.model import linear_time, optimal_partition, predict, wave_end_times


@st.composite
def problems(draw):
    W = draw(st.sampled_from([1, 2, 4, 8]))
    op = draw(st.sampled_from(["all_reduce", "reduce_scatter"]))
    M = draw(st.integers(1, 64)) * (W if op == "reduce_scatter" else 1) * draw(
        st.sampled_from([1, 16, 128]))
    return Problem(M, draw(st.sampled_from([256, 1000, 8192])),
                   draw(st.sampled_from([512, 2048, 7168])), "bfloat16", W, op)


def test_dtype_size_and_num_ctas():
    assert S.dtype_size("bfloat16") == S.dtype_size("torch.float16") == 2
    assert S.dtype_size("float32") == 4
    with pytest.raises(ValueError):
        S.dtype_size("int8")
    ar = Problem(1024, 1024, 1024, "bfloat16", 8, "all_reduce")
    rs = dataclasses.replace(ar, op="reduce_scatter")
    assert S.num_ctas_for(ar, 132, 8) == 124
    assert S.num_ctas_for(rs, 132, 8) == 120  # rounded down to a multiple of W
    assert S.num_ctas_for(ar, 132, 200) == 0


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from([(128, 256), (128, 128), (64, 64)]),
       st.sampled_from([0, 8, 16]))
def test_group_bytes_match_the_plan(problem, tile, reserved):
    P = S.num_ctas_for(problem, 132, reserved)
    config = PlanConfig(block_m=tile[0], block_n=tile[1], num_ctas=P)
    plan = make_plan(problem, config)
    nbytes = S.group_bytes_fn(problem, config)
    slot = tile[0] * tile[1] * 2
    # One group per wave: each group's bytes are its comm-buffer slot range.
    for w in range(plan.num_waves):
        assert nbytes(w, w + 1) == int(np.diff(plan.group_bounds)[w]) * slot
    assert nbytes(0, plan.num_waves) == plan.num_tiles * slot


@settings(max_examples=40, deadline=None)
@given(problems(), st.booleans())
def test_analytic_choices_build_valid_plans(problem, p2p):
    result = S.analytic_search(problem, 132, p2p=p2p, top_k=3)
    assert 1 <= len(result.top) <= 3
    times = [c.predicted_s for c in result.top]
    assert times == sorted(times) and result.best == result.top[0]
    for c in result.top:
        plan = make_plan(problem, c.config)  # consistent wave count, RS divisibility
        assert plan.num_groups == len(c.config.group_waves)
        assert c.config.num_ctas == S.num_ctas_for(problem, 132, c.reserved_sms)
    default = S.analytic_default(problem, 132, p2p=p2p)
    make_plan(problem, default)
    overlap, sequential = S.predict_times(problem, default, 132, p2p=p2p)
    assert overlap > 0 and sequential > 0


def test_search_is_exact_over_candidates():
    """The best candidate is the minimum over (tile, r) of each candidate's DP optimum."""
    problem = Problem(8192, 8192, 2048, "bfloat16", 4, "all_reduce")
    model = S.AnalyticModel()
    result = S.search(problem, 132,
                      wave_times_fn=lambda c: model.wave_times(problem, c),
                      comm_curve_fn=lambda r: model.comm_time_fn(problem, r),
                      restore_time_fn=model.restore_time, top_k=100,
                      group_overhead=model.group_overhead)
    assert len(result.top) == len(S.DEFAULT_TILE_CONFIGS) * len(S.DEFAULT_RESERVATIONS)
    for c in result.top:
        base = dataclasses.replace(c.config, group_waves=None)
        ends = wave_end_times(model.wave_times(problem, base))
        if c.reserved_sms == 0:
            ends = [ends[-1]] * len(ends)
        args = (ends, S.group_bytes_fn(problem, base), model.comm_time_fn(problem, c.reserved_sms),
                model.restore_time)
        assert c.predicted_s == predict(c.config.group_waves, *args,
                                        group_overhead=model.group_overhead)
        assert c.predicted_s == optimal_partition(*args, group_overhead=model.group_overhead).time


def test_reserving_no_sm_means_no_overlap():
    """r = 0: the persistent GEMM starves NCCL, so the prediction is GEMM end + all comm."""
    problem = Problem(8192, 8192, 2048, "bfloat16", 4, "all_reduce")
    model = S.AnalyticModel()
    result = S.search(problem, 132, wave_times_fn=lambda c: model.wave_times(problem, c),
                      comm_curve_fn=lambda r: model.comm_time_fn(problem, r),
                      restore_time_fn=model.restore_time, reservations=(0,),
                      tile_configs=((128, 256),), group_overhead=model.group_overhead)
    c = result.best
    gemm_end = sum(model.wave_times(problem, c.config))
    total = S.group_bytes_fn(problem, c.config)(0, num_waves_for(problem, c.config))
    assert c.config.group_waves == (num_waves_for(problem, c.config),)
    assert c.predicted_s == pytest.approx(
        gemm_end + model.group_overhead + model.comm_time_fn(problem, 0)(total)
        + model.restore_time(total))


def test_reduce_scatter_restores_the_received_share():
    problem = Problem(4096, 4096, 1024, "bfloat16", 4, "reduce_scatter")
    seen = []

    def restore(nbytes):
        seen.append(nbytes)
        return 0.0

    config = S.search(problem, 132, wave_times_fn=lambda c: [1e-5] * num_waves_for(problem, c),
                      comm_curve_fn=lambda r: linear_time(1e-12, 1e-6), restore_time_fn=restore,
                      tile_configs=((128, 128),), reservations=(16,)).best.config
    send = S.group_bytes_fn(problem, config)(0, 1)
    assert send / 4 in seen  # a one-wave group restores a quarter of what it sends


def test_search_validates_wave_counts():
    problem = Problem(4096, 4096, 1024, "bfloat16", 2, "all_reduce")
    with pytest.raises(ValueError, match="waves"):
        S.search(problem, 132, wave_times_fn=lambda c: [1e-5],
                 comm_curve_fn=lambda r: linear_time(1e-12), restore_time_fn=linear_time(0),
                 reservations=(16,))
    with pytest.raises(ValueError, match="no feasible"):
        S.search(problem, 8, wave_times_fn=lambda c: [1e-5],
                 comm_curve_fn=lambda r: linear_time(1e-12), restore_time_fn=linear_time(0),
                 reservations=(8, 16))


def test_never_slower_decisions():
    tiny = Problem(64, 8192, 2048, "bfloat16", 4, "all_reduce")
    assert not S.predict_gain(tiny, None, 132)  # one wave: nothing to overlap
    big = Problem(8192, 8192, 7168, "bfloat16", 4, "all_reduce")
    assert S.predict_gain(big, None, 132)
    pcie = Problem(8192, 8192, 32768, "bfloat16", 4, "all_reduce")
    assert S.predict_gain(pcie, None, 132, p2p=False)
    # Any config: a single group of everything cannot beat sequential.
    one_group = dataclasses.replace(S.analytic_default(big, 132), group_waves=None)
    waves = num_waves_for(big, one_group)
    assert not S.predict_gain(big, dataclasses.replace(one_group, group_waves=(waves,)), 132)
    # The engine's call: predict_gain(plan.problem, plan.config, num_sms).
    assert S.predict_gain(big, S.analytic_default(big, 132), 132)


def test_analytic_default_shape():
    problem = Problem(8192, 8192, 2048, "bfloat16", 4, "reduce_scatter")
    config = S.analytic_default(problem, 132)
    assert config.num_ctas == 116 and config.num_ctas % 4 == 0
    assert (config.block_m, config.block_n) == (128, 256)
    assert sum(config.group_waves) == num_waves_for(problem, config)
    assert len(config.group_waves) > 1
    with pytest.raises(ValueError):
        S.analytic_default(problem, 16, reserved_sms=16)


def test_analytic_model_numbers_match_design_md():
    """The defaults reproduce DESIGN.md's 4 x H200 AllReduce of 128 MiB (0.64 ms) and the
    M=8192, K=2048 GEMM (0.38 ms) within 15%."""
    model = S.AnalyticModel()
    problem = Problem(8192, 8192, 2048, "bfloat16", 4, "all_reduce")
    alone = model.comm_time_fn(problem, None, contended=False)
    assert alone(128 << 20) == pytest.approx(0.64e-3, rel=0.15)
    assert model.gemm_time(problem, 132) == pytest.approx(0.384e-3, rel=0.15)
    pcie = model.comm_time_fn(problem, None, p2p=False, contended=False)
    assert pcie(128 << 20) == pytest.approx(8.3e-3, rel=0.15)


# -- the driver, with a fake backend ---------------------------------------------------


class FakeBackend:
    """Simulated machine: every call returns its duration; the timer reports it."""

    num_sms = 132

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.model = S.AnalyticModel()
        self.log: list[tuple] = []
        self.contended = False

    @staticmethod
    def timer(fn):
        return float(fn())

    def reduce_max(self, x):
        self.log.append(("reduce_max",))
        return x

    def comm_fn(self, reserved_sms):
        curve = self.model.comm_time_fn(self.problem, reserved_sms, contended=False)

        def run(nbytes):
            self.log.append(("comm", reserved_sms, nbytes))
            return curve(nbytes) / (0.85 if self.contended else 1.0)

        return run

    def gemm_fn(self, config):
        waves = self.model.wave_times(self.problem, config)

        def run(k):
            self.log.append(("gemm", config.block_m, config.block_n, config.num_ctas, k))
            return sum(waves[:k])

        return run

    def beside(self, gemm):
        import contextlib

        @contextlib.contextmanager
        def running(seconds):
            try:
                yield lambda: setattr(self, "contended", True)
            finally:
                self.contended = False

        return running

    def run_plan(self, config):
        overlap, _ = S.predict_times(self.problem, config, self.num_sms, model=self.model)
        return lambda: overlap * (1.1 if config.block_n == 256 else 1.0)

    def run_sequential(self):
        return lambda: self.model.sequential_time(self.problem, self.num_sms)


def test_tune_with_fake_backend():
    problem = Problem(8192, 8192, 2048, "bfloat16", 4, "all_reduce")
    backend = FakeBackend(problem)
    updates, totals = [], []

    def progress(total):
        totals.append(total)
        return updates.append

    result = S.tune(problem, backend, reservations=(0, 16, 32), top_k=3, warmup=1, iters=2,
                    max_wave_points=5, progress=progress)
    assert totals == [sum(updates)]  # the bar ends full
    assert len(result.top) == 3 and all(c.measured_s is not None for c in result.top)
    assert result.best.measured_s == min(c.measured_s for c in result.top)
    assert result.sequential_s == pytest.approx(backend.model.sequential_time(problem, 132))
    assert result.use_overlap == (result.best.measured_s < 0.98 * result.sequential_s)
    make_plan(problem, result.best.config)
    # Measured inputs equal the analytic ones here, so the predictions match the analytic
    # search (the curve is sampled, hence approx).
    analytic = S.analytic_search(problem, 132, reservations=(0, 16, 32), top_k=3)
    assert result.top[0].predicted_s == pytest.approx(analytic.best.predicted_s, rel=0.05)
    # Deterministic: a second run issues the same calls in the same order (same on every rank).
    again = FakeBackend(problem)
    S.tune(problem, again, reservations=(0, 16, 32), top_k=3, warmup=1, iters=2,
           max_wave_points=5)
    assert again.log == backend.log


def test_tune_without_verification():
    problem = Problem(64, 8192, 2048, "bfloat16", 4, "all_reduce")
    result = S.tune(problem, FakeBackend(problem), reservations=(16,), top_k=2, verify=False,
                    warmup=0, iters=1)
    assert all(c.measured_s is None for c in result.top)
    assert result.use_overlap is False  # tiny M: sequential is faster
    assert math.isfinite(result.sequential_s)
