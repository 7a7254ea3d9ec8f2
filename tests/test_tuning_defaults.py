"""The rule-based defaults (``flashoverlap.defaults``): valid band groupings for any problem."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashoverlap.defaults import (
    band_group_m,
    cpu_plan_config,
    default_plan_config,
    split_bands,
)
from flashoverlap.plan import Problem, make_plan


@st.composite
def problems(draw):
    W = draw(st.integers(1, 8))
    op = draw(st.sampled_from(["all_reduce", "reduce_scatter"]))
    rows = draw(st.integers(1, 5000))
    M = rows * W if op == "reduce_scatter" else rows
    return Problem(M, draw(st.integers(1, 3000)), 64, "bfloat16", W, op)


@given(st.integers(1, 300), st.integers(1, 8))
def test_split_bands(n, target):
    groups = split_bands(n, target)
    assert sum(groups) == n and all(g >= 1 for g in groups)
    assert len(groups) == min(n, max(target, 1))
    if len(groups) > 1:
        assert groups[0] == 1  # the first collective starts after one band
        assert max(groups[1:]) - min(groups[1:]) <= 1  # the rest as equal as can be


@given(st.integers(1, 20000), st.sampled_from([64, 128]), st.sampled_from([1, 2, 8]))
def test_band_group_m(M, block_m, max_group_m):
    problem = Problem(M, 128, 64, "bfloat16", 1, "all_reduce")
    g = band_group_m(problem, block_m, max_group_m=max_group_m, min_bands=8)
    tiles_m = math.ceil(M / block_m)
    assert g in (1, 2, 4, 8) and g <= max_group_m
    # Largest power of two that leaves 8 bands, else 1.
    fits = [c for c in (1, 2, 4, 8) if c <= max_group_m and math.ceil(tiles_m / c) >= 8]
    assert g == (max(fits) if fits else 1)


@settings(max_examples=150, deadline=None)
@given(problems(), st.sampled_from([(128, 256), (128, 128), (64, 64)]),
       st.sampled_from([(132, 16), (132, 0), (114, 32), (8, 16)]))
def test_default_plan_config_builds(problem, block, sms):
    num_sms, reserved = sms
    config = default_plan_config(problem, num_sms, block, reserved)
    plan = make_plan(problem, config)  # raises if the bands do not add up
    assert config.num_ctas == max(num_sms - reserved, 1)
    assert (config.block_m, config.block_n) == block
    assert plan.num_groups == min(4, len(plan.group_rows) - 1)
    assert plan.group_rows[-1] == problem.rows_per_block


@settings(max_examples=150, deadline=None)
@given(problems())
def test_cpu_plan_config_gives_several_groups(problem):
    config = cpu_plan_config(problem)
    plan = make_plan(problem, config)
    assert config.group_m == 1 and config.block_n == 64
    assert config.block_m in (16, 32, 64)
    tile_rows = math.ceil(problem.rows_per_block / config.block_m)
    assert plan.num_groups == min(4, tile_rows)
    if problem.rows_per_block >= 4 * 16:
        assert plan.num_groups == 4  # small M still gives four groups
    # Every row of every block is in exactly one group.
    assert np.all(np.diff(plan.group_rows) > 0) and plan.group_rows[-1] == problem.rows_per_block


def test_cpu_plan_shrinks_tiles_for_small_m():
    assert cpu_plan_config(Problem(1024, 64, 64, "float32", 2, "all_reduce")).block_m == 64
    assert cpu_plan_config(Problem(128, 64, 64, "float32", 2, "all_reduce")).block_m == 32
    small = cpu_plan_config(Problem(64, 64, 64, "float32", 2, "reduce_scatter"))
    assert small.block_m == 16 and small.group_bands == (1, 1)  # 32 rows per block


@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter"])
@pytest.mark.parametrize("M", [16, 4096, 16384])
def test_default_config_shapes(op, M):
    problem = Problem(M, 8192, 2048, "bfloat16", 4, op)
    plan = make_plan(problem, default_plan_config(problem, num_sms=132))
    blocks = 4 if op == "reduce_scatter" else 1
    assert plan.num_tiles == blocks * math.ceil(M / blocks / 128) * 32
    assert plan.config.num_ctas == 116


def test_band_group_m_takes_the_gemm_preference():
    """Without ``max_group_m`` the band height is the GEMM's preferred one
    (``kernels.gemm_config_for``: 16 below K = 4096, else 8), lowered to keep MIN_BANDS."""
    def gm(M, K, op="all_reduce", W=1):
        return band_group_m(Problem(M, 8192, K, "bfloat16", W, op), 128)

    assert gm(16384, 2048) == 16   # 128 tile rows: 8 bands of 16
    assert gm(16384, 4096) == 8    # K >= 4096: the default swizzle width
    assert gm(8192, 2048) == 8     # 64 tile rows: 16 would leave 4 bands
    assert gm(32768, 2048) == 16
    assert gm(32768, 2048, "reduce_scatter", 2) == 16  # 16384 rows per block
    assert gm(32768, 2048, "reduce_scatter", 4) == 8   # 8192 rows per block
    assert gm(16384, 2048, "all_reduce") == band_group_m(
        Problem(16384, 8192, 2048, "float16", 1, "all_reduce"), 128)


def test_band_group_m_accepts_the_tuners_dtype_names():
    """Problems may carry short dtype names ("bf16", "half", ...), which the tuner accepts;
    the band height reads them the same, and a dtype the GEMM table does not know gets the
    default swizzle instead of an error."""
    def gm(dtype):
        return band_group_m(Problem(16384, 8192, 2048, dtype, 1, "all_reduce"), 128)

    assert gm("bf16") == gm("bfloat16") == gm("torch.bfloat16") == 16
    assert gm("fp16") == gm("half") == 16
    assert gm("fp32") == gm("float32") == 8  # fp32 never takes a rule
    assert gm("int8") == 8
