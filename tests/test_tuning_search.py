"""Search over tiles x reservations, the analytic defaults, and the tuning driver (fakes)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashoverlap.collectives import Collective, register
from flashoverlap.collectives import base as collectives_base
from flashoverlap.plan import (
    COL_START, COL_STOP, GROUP, ROW_START, ROW_STOP, PlanConfig, Problem, make_plan,
    num_bands_for,
)
from flashoverlap.tuning import search as S
from flashoverlap.tuning.model import linear_time, predict


@st.composite
def problems(draw):
    W = draw(st.sampled_from([1, 2, 4, 8]))
    op = draw(st.sampled_from(["all_reduce", "reduce_scatter"]))
    M = draw(st.integers(1, 64)) * (W if op == "reduce_scatter" else 1) * draw(
        st.sampled_from([1, 16, 128]))
    return Problem(M, draw(st.sampled_from([256, 1000, 8192])),
                   draw(st.sampled_from([512, 2048, 7168])), "bfloat16", W, op)


def compositions(n: int):
    """Every grouping of ``n`` bands (``2**(n-1)`` of them)."""
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


def band_ends_from_plan(problem, config, wave_times, starved=False):
    """Reference: build the one-group-per-band plan and take, for every band, the wave of
    the last step that writes it (step s runs in wave s // P)."""
    plan = make_plan(problem, dataclasses.replace(config, group_bands=None))
    ends = np.cumsum(wave_times)
    if starved:
        ends[:] = ends[-1]
    groups = plan.step_table[:, GROUP]
    last_step = [int(np.flatnonzero(groups == g).max()) for g in range(plan.num_groups)]
    return [float(ends[s // config.num_ctas]) for s in last_step]


def test_dtype_size_and_num_ctas():
    assert S.dtype_size("bfloat16") == S.dtype_size("torch.float16") == 2
    assert S.dtype_size("float32") == 4
    with pytest.raises(ValueError):
        S.dtype_size("int8")
    assert S.num_ctas_for(132, 8) == 124  # no rounding to W: groups are whole bands
    assert S.num_ctas_for(132, 200) == 0


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from([(128, 256), (128, 128), (64, 64)]),
       st.sampled_from([0, 8, 16]), st.sampled_from([1, 2, 8]))
def test_group_bytes_and_band_ends_match_the_plan(problem, tile, reserved, group_m):
    P = S.num_ctas_for(132, reserved)
    config = PlanConfig(block_m=tile[0], block_n=tile[1], num_ctas=P, group_m=group_m)
    plan = make_plan(problem, config)  # one group per band
    nbytes = S.group_bytes_fn(problem, config)
    table = plan.step_table
    area = ((table[:, ROW_STOP] - table[:, ROW_START]).astype(np.int64)
            * (table[:, COL_STOP] - table[:, COL_START]))
    # A group's bytes are the output elements its tiles write (no padding), and its spans.
    for g in range(plan.num_groups):
        tile_elems = int(area[table[:, GROUP] == g].sum())
        assert nbytes(g, g + 1) == tile_elems * 2 == plan.spans()[g].send_rows * problem.N * 2
    assert nbytes(0, plan.num_groups) == problem.M * problem.N * 2
    waves = [1e-6 * (1 + (w * 7919) % 13) for w in range(plan.num_waves)]
    for starved in (False, True):
        assert S.band_ends_for(problem, config, waves, starved=starved) == pytest.approx(
            band_ends_from_plan(problem, config, waves, starved), rel=1e-12)
    with pytest.raises(ValueError, match="waves"):
        S.band_ends_for(problem, config, waves + [1.0])


@settings(max_examples=40, deadline=None)
@given(problems(), st.booleans())
def test_analytic_choices_build_valid_plans(problem, p2p):
    result = S.analytic_search(problem, 132, p2p=p2p, top_k=3)
    assert 1 <= len(result.top) <= 3
    times = [c.predicted_s for c in result.top]
    assert times == sorted(times) and result.best == result.top[0]
    for c in result.top:
        plan = make_plan(problem, c.config)  # the bands add up
        assert plan.num_groups == len(c.config.group_bands)
        assert c.config.num_ctas == 132 - c.reserved_sms
    default = S.analytic_default(problem, 132, p2p=p2p)
    make_plan(problem, default)
    overlap, sequential = S.predict_times(problem, default, 132, p2p=p2p)
    assert overlap > 0 and sequential > 0


def test_search_is_exact_over_candidates():
    """Every candidate's prediction is the brute-force optimum over all groupings of its
    bands (band ends and bytes computed from the plan itself), and the best is the min."""
    problem = Problem(8192, 8192, 2048, "bfloat16", 4, "all_reduce")
    model = S.AnalyticModel()
    result = S.search(problem, 132,
                      wave_times_fn=lambda c: model.wave_times(problem, c),
                      comm_curve_fn=lambda r: model.comm_time_fn(problem, r), top_k=100,
                      group_overhead=model.group_overhead)
    assert len(result.top) == len(S.DEFAULT_TILE_CONFIGS) * len(S.DEFAULT_RESERVATIONS)
    for c in result.top:
        base = dataclasses.replace(c.config, group_bands=None)
        plan = make_plan(problem, base)
        assert 2 <= plan.num_groups <= 12  # brute force stays cheap
        ends = band_ends_from_plan(problem, base, model.wave_times(problem, base),
                                   starved=c.reserved_sms == 0)
        send = [s.send_rows * problem.N * 2 for s in plan.spans()]
        bytes_fn = lambda i, j, send=send: sum(send[i:j])  # noqa: E731
        comm = model.comm_time_fn(problem, c.reserved_sms)
        brute = min(predict(p, ends, bytes_fn, comm, group_overhead=model.group_overhead)
                    for p in compositions(len(ends)))
        assert c.predicted_s == pytest.approx(brute, rel=1e-12)
        assert predict(c.config.group_bands, ends, bytes_fn, comm,
                       group_overhead=model.group_overhead) == pytest.approx(brute, rel=1e-12)
    assert result.best.predicted_s == min(c.predicted_s for c in result.top)


def test_reserving_no_sm_means_no_overlap():
    """r = 0: the persistent GEMM starves NCCL, so the prediction is GEMM end + all comm."""
    problem = Problem(8192, 8192, 2048, "bfloat16", 4, "all_reduce")
    model = S.AnalyticModel()
    result = S.search(problem, 132, wave_times_fn=lambda c: model.wave_times(problem, c),
                      comm_curve_fn=lambda r: model.comm_time_fn(problem, r), reservations=(0,),
                      tile_configs=((128, 256),), group_overhead=model.group_overhead)
    c = result.best
    gemm_end = sum(model.wave_times(problem, c.config))
    assert c.config.group_bands == (num_bands_for(problem, c.config),)
    assert c.predicted_s == pytest.approx(
        gemm_end + model.group_overhead + model.comm_time_fn(problem, 0)(8192 * 8192 * 2))


@dataclasses.dataclass(frozen=True)
class TripleTraffic(Collective):
    """A made-up collective: two row blocks, three bus bytes per send byte."""

    name = "test_tuning_triple_traffic"

    def row_blocks(self, world_size):
        return 2

    def launch_group(self, nccl, send_ptr, recv_ptr, send_count, recv_count):
        raise NotImplementedError

    def torch_group(self, send, recv, group):
        raise NotImplementedError

    def bus_bytes(self, send_bytes, world_size):
        return 3.0 * send_bytes


def test_the_model_asks_the_collective(monkeypatch):
    """Bus traffic and row blocks come from the Collective object, not from its name."""
    # Registered for this test only: other tests iterate over the registered collectives.
    monkeypatch.setattr(collectives_base, "_REGISTRY", dict(collectives_base._REGISTRY))
    register(TripleTraffic())
    model = S.AnalyticModel(latency_s={True: 1e-6, False: 1e-6})
    nbytes = 64 << 20
    times = {}
    for op in ("all_reduce", "reduce_scatter", TripleTraffic.name):
        problem = Problem(4096, 4096, 1024, "bfloat16", 4, op)
        times[op] = model.comm_time_fn(problem, None, contended=False)(nbytes) - 1e-6
    busbw = model.bus_bandwidth[(4, True)]
    assert times["all_reduce"] == pytest.approx(nbytes * 2 * 3 / 4 / busbw)
    assert times["reduce_scatter"] == pytest.approx(nbytes * 3 / 4 / busbw)
    assert times[TripleTraffic.name] == pytest.approx(3 * nbytes / busbw)
    # Two row blocks: a group of bands sends those rows of both blocks.
    problem = Problem(4096, 1000, 1024, "bfloat16", 4, TripleTraffic.name)
    config = PlanConfig(block_m=128, block_n=128, num_ctas=100, group_m=2)
    assert S.group_bytes_fn(problem, config)(0, 1) == 2 * 256 * 1000 * 2
    best = S.analytic_search(problem, 132, reservations=(16,), tile_configs=((128, 128),),
                             group_m=2).best
    assert sum(best.config.group_bands) == num_bands_for(problem, config) == 8
    assert TripleTraffic.name in collectives_base.registered()


def test_search_validates_wave_counts():
    problem = Problem(4096, 4096, 1024, "bfloat16", 2, "all_reduce")
    with pytest.raises(ValueError, match="waves"):
        S.search(problem, 132, wave_times_fn=lambda c: [1e-5],
                 comm_curve_fn=lambda r: linear_time(1e-12), reservations=(16,))
    with pytest.raises(ValueError, match="no feasible"):
        S.search(problem, 8, wave_times_fn=lambda c: [1e-5],
                 comm_curve_fn=lambda r: linear_time(1e-12), reservations=(8, 16))


def test_never_slower_decisions():
    tiny = Problem(64, 8192, 2048, "bfloat16", 4, "all_reduce")
    assert not S.predict_gain(tiny, None, 132)  # one wave: nothing to overlap
    big = Problem(8192, 8192, 7168, "bfloat16", 4, "all_reduce")
    assert S.predict_gain(big, None, 132)
    pcie = Problem(8192, 8192, 32768, "bfloat16", 4, "all_reduce")
    assert S.predict_gain(pcie, None, 132, p2p=False)
    # Any config: a single group of everything cannot beat sequential.
    default = S.analytic_default(big, 132)
    one_group = dataclasses.replace(default, group_bands=(num_bands_for(big, default),))
    assert not S.predict_gain(big, one_group, 132)
    # group_bands=None is the plan's meaning: one group per band.
    per_band = dataclasses.replace(default, group_bands=None)
    assert S.predict_times(big, per_band, 132)[0] == S.predict_times(
        big, dataclasses.replace(per_band, group_bands=(1,) * num_bands_for(big, default)),
        132)[0]
    # The engine's call: predict_gain(plan.problem, plan.config, num_sms).
    assert S.predict_gain(big, S.analytic_default(big, 132), 132)


def test_analytic_default_shape():
    problem = Problem(8192, 8192, 2048, "bfloat16", 4, "reduce_scatter")
    config = S.analytic_default(problem, 132)
    assert config.num_ctas == 116
    assert S.analytic_default(problem, 130).num_ctas == 114  # no rounding to W
    assert (config.block_m, config.block_n) == (128, 256)
    # 2048 rows per block = 16 tile rows: group_m 2 gives the 8 bands the rule asks for.
    assert config.group_m == 2 and num_bands_for(problem, config) == 8
    assert sum(config.group_bands) == 8 and len(config.group_bands) > 1
    assert S.analytic_default(problem, 132, group_m=8).group_m == 8
    with pytest.raises(ValueError):
        S.analytic_default(problem, 16, reserved_sms=16)


def test_analytic_model_numbers_match_design_md():
    """The defaults reproduce docs/design.md's 4 x H200 AllReduce of 128 MiB (0.64 ms) and the
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


def test_analytic_wave_times_follow_the_split_last_wave():
    """A last wave the pipelined signal GEMM splits along K costs its longest part (slowed by
    ``split_slowdown``, + the fix-up); a last wave more than half full, or the split switched
    off, costs a whole tile.  Both kernels split alike, so whole-tile plans (the
    warp-specialized kernel on sm_90) and plans with a short tile follow the same rule."""
    from flashoverlap.tuning.search import AnalyticModel

    model = AnalyticModel()
    cfg = PlanConfig(block_m=128, block_n=256, num_ctas=132)
    tile_s = 2.0 * 128 * 256 * 8192 / (model.gemm_flops["bfloat16"] / model.ref_sms)
    # 16384 x 8192: 4096 tiles = 31 waves + 4 tiles -> 4 parts of 32 of 128 K steps
    waves = model.wave_times(Problem(16384, 8192, 8192, "bfloat16", 1, "all_reduce"), cfg)
    assert len(waves) == 32
    assert waves[0] == pytest.approx(tile_s + model.launch_s)
    assert waves[1:-1] == pytest.approx([tile_s] * 30)
    assert waves[-1] == pytest.approx(tile_s * 32 / 128 * (1 + model.split_slowdown)
                                      + model.split_fixup_s + 4 * model.split_per_part_s)
    # K = 200: 4 K steps of 64, one part per 4 -> no split (parts < 2)
    short = model.wave_times(Problem(16384, 8192, 200, "bfloat16", 1, "all_reduce"), cfg)
    assert short[-1] == pytest.approx(short[1])
    # 4096 x 8192: 1024 tiles, last wave 100 of 132 -> whole
    waves = model.wave_times(Problem(4096, 8192, 8192, "bfloat16", 1, "all_reduce"), cfg)
    assert waves[1:] == pytest.approx([tile_s] * 7)
    off = AnalyticModel(split_tail=False)
    waves = off.wave_times(Problem(16384, 8192, 8192, "bfloat16", 1, "all_reduce"), cfg)
    assert waves[-1] == pytest.approx(tile_s)


def test_analytic_wave_times_split_whole_and_partial_tile_plans_alike():
    """Whole 128 x 256 tiles (the warp-specialized kernel) and a short last tile row (the
    pipelined kernel) both split their last wave."""
    from flashoverlap.tuning.search import AnalyticModel

    model = AnalyticModel()
    cfg = PlanConfig(block_m=128, block_n=256, num_ctas=132)
    tile_s = 2.0 * 128 * 256 * 8192 / (model.gemm_flops["bfloat16"] / model.ref_sms)
    whole = model.wave_times(Problem(16384, 8192, 8192, "bfloat16", 1, "all_reduce"), cfg)
    assert whole[-1] == pytest.approx(tile_s / 4 * (1 + model.split_slowdown)
                                      + model.split_fixup_s
                                      + 4 * model.split_per_part_s)  # 4 tiles, 4 parts
    ragged = model.wave_times(Problem(15990, 8192, 8192, "bfloat16", 1, "all_reduce"), cfg)
    # a short last tile row: 4000 tiles, 40 left -> 3 parts of at most 43 of 128 K steps
    assert ragged[-1] == pytest.approx(tile_s * 43 / 128 * (1 + model.split_slowdown)
                                       + model.split_fixup_s + 3 * model.split_per_part_s)

