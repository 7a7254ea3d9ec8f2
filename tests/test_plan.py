"""Property tests of the overlap plan (pure Python, no GPU): slots, groups, waves, restore."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashoverlap.defaults import default_plan_config, split_waves
from flashoverlap.plan import (
    COL_START, COL_STOP, GROUP, ROW_START, ROW_STOP, SLOT,
    PlanConfig, Problem, make_plan, num_waves_for, swizzled_tile_order,
)

EXAMPLES = settings(max_examples=250, deadline=None)


@st.composite
def plans(draw, op=None):
    op = op or draw(st.sampled_from(["all_reduce", "reduce_scatter"]))
    W = draw(st.integers(1, 5))
    bm = draw(st.sampled_from([1, 2, 4, 8, 16]))
    bn = draw(st.sampled_from([1, 2, 4, 8, 16]))
    rows = draw(st.integers(1, 70))
    M = rows * W if op == "reduce_scatter" else draw(st.integers(1, 200))
    N = draw(st.integers(1, 90))
    P = draw(st.integers(1, 12))
    if op == "reduce_scatter":
        P *= W
    group_m = draw(st.integers(1, 9))
    problem = Problem(M=M, N=N, K=3, dtype="float32", world_size=W, op=op)
    probe = PlanConfig(block_m=bm, block_n=bn, num_ctas=P, group_m=group_m)
    waves = num_waves_for(problem, probe)
    # a random composition of `waves` into groups
    cuts = sorted(draw(st.sets(st.integers(1, max(waves - 1, 1)), max_size=waves - 1)))
    cuts = [c for c in cuts if c < waves]
    bounds = [0, *cuts, waves]
    group_waves = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    config = PlanConfig(block_m=bm, block_n=bn, num_ctas=P, group_m=group_m, group_waves=group_waves)
    return make_plan(problem, config)


@EXAMPLES
@given(plans())
def test_slot_map_is_a_bijection(plan):
    slots = plan.step_table[:, SLOT]
    assert sorted(slots.tolist()) == list(range(plan.num_tiles))


@EXAMPLES
@given(plans())
def test_groups_are_contiguous_in_execution_order(plan):
    groups = plan.step_table[:, GROUP]
    assert (np.diff(groups) >= 0).all(), "groups must follow execution order"
    for g in range(plan.num_groups):
        lo, hi = plan.group_bounds[g], plan.group_bounds[g + 1]
        assert hi > lo, "no empty group"
        assert (groups[lo:hi] == g).all()
        assert sorted(plan.step_table[lo:hi, SLOT].tolist()) == list(range(lo, hi))


@EXAMPLES
@given(plans())
def test_waves_follow_the_persistent_schedule(plan):
    P = plan.config.num_ctas
    assert plan.num_waves == math.ceil(plan.num_tiles / P)
    assert sum(plan.config.group_waves) == plan.num_waves
    # every group boundary is a wave boundary: CTA p's k-th tile is step k*P + p
    ends = np.cumsum(plan.config.group_waves) * P
    assert plan.group_bounds[1:].tolist() == np.minimum(ends, plan.num_tiles).tolist()


@EXAMPLES
@given(plans())
def test_tiles_cover_the_output_exactly_once(plan):
    M, N = plan.problem.M, plan.problem.N
    cover = np.zeros((M, N), dtype=np.int64)
    for r0, r1, c0, c1 in plan.step_table[:, [ROW_START, ROW_STOP, COL_START, COL_STOP]]:
        assert 0 < r1 - r0 <= plan.config.block_m and 0 < c1 - c0 <= plan.config.block_n
        cover[r0:r1, c0:c1] += 1
    assert (cover == 1).all()


@EXAMPLES
@given(plans(op="reduce_scatter"))
def test_reduce_scatter_shares_are_equal_and_packed_by_rank(plan):
    W = plan.problem.world_size
    rows = plan.problem.M // W
    for g in range(plan.num_groups):
        lo, hi = plan.group_bounds[g], plan.group_bounds[g + 1]
        assert (hi - lo) % W == 0
        share = (hi - lo) // W
        steps = plan.step_table[lo:hi]
        by_slot = steps[np.argsort(steps[:, SLOT])]
        for r in range(W):
            part = by_slot[r * share : (r + 1) * share]
            assert ((part[:, ROW_START] >= r * rows) & (part[:, ROW_STOP] <= (r + 1) * rows)).all()


def simulate(plan):
    """Pack a known C into slots per the step table, 'communicate', restore; return outputs."""
    M, N = plan.problem.M, plan.problem.N
    BM, BN = plan.config.block_m, plan.config.block_n
    W = plan.problem.world_size
    C = np.arange(M * N, dtype=np.int64).reshape(M, N) + 1
    buf = np.full((plan.num_tiles, BM, BN), -1, dtype=np.int64)
    for r0, r1, c0, c1, slot, _ in plan.step_table:
        buf[slot, : r1 - r0, : c1 - c0] = C[r0:r1, c0:c1]
    outs = []
    ranks = range(W) if plan.problem.op == "reduce_scatter" else [0]
    for r in ranks:
        if plan.problem.op == "reduce_scatter":
            # ncclReduceScatter on each group's range hands rank r the r-th share
            recv = np.concatenate([
                buf[lo + r * ((hi - lo) // W) : lo + (r + 1) * ((hi - lo) // W)]
                for lo, hi in zip(plan.group_bounds, plan.group_bounds[1:])
            ])
        else:
            recv = buf
        assert recv.shape[0] == plan.recv_tiles
        out = np.full((plan.tiles_m * BM, plan.tiles_n * BN), -2, dtype=np.int64)
        for g in range(plan.num_groups):
            for s in range(plan.restore_bounds[g], plan.restore_bounds[g + 1]):
                tm, tn = plan.restore_tile_m[s], plan.restore_tile_n[s]
                out[tm * BM : (tm + 1) * BM, tn * BN : (tn + 1) * BN] = recv[s]
        outs.append(out[: plan.out_rows, :N])
    return C, outs


@EXAMPLES
@given(plans())
def test_restore_inverts_the_slot_map(plan):
    C, outs = simulate(plan)
    rows = plan.out_rows
    for r, out in enumerate(outs):
        np.testing.assert_array_equal(out, C[r * rows : (r + 1) * rows])


@EXAMPLES
@given(st.integers(1, 30), st.integers(1, 30), st.integers(1, 10))
def test_swizzle_is_a_permutation_of_the_grid(tiles_m, tiles_n, group_m):
    order = swizzled_tile_order(tiles_m, tiles_n, group_m)
    assert len({(int(m), int(n)) for m, n in order}) == tiles_m * tiles_n
    assert order[:, 0].max() < tiles_m and order[:, 1].max() < tiles_n


def test_swizzle_bands_of_group_m_rows():
    order = swizzled_tile_order(8, 3, 4)
    # first band: rows 0..3 column-major
    assert order[:5].tolist() == [[0, 0], [1, 0], [2, 0], [3, 0], [0, 1]]


@EXAMPLES
@given(plans())
def test_hash_is_deterministic_and_config_sensitive(plan):
    again = make_plan(plan.problem, plan.config)
    assert again.hash == plan.hash and again.hash_int64() == plan.hash_int64()
    assert 0 <= plan.hash_int64() < 2**63
    other = PlanConfig(
        block_m=plan.config.block_m, block_n=plan.config.block_n,
        num_ctas=plan.config.num_ctas, group_m=plan.config.group_m + 1,
        group_waves=plan.config.group_waves,
    )
    assert make_plan(plan.problem, other).hash != plan.hash


def test_hash_is_stable_across_processes():
    # a fixed plan's hash is a constant of the implementation: a change must be deliberate
    # (bump PLAN_FORMAT_VERSION) since ranks running different versions would disagree.
    import subprocess
    import sys

    code = ("from flashoverlap.plan import *; print(make_plan(Problem(300,200,64,'bfloat16',4,"
            "'reduce_scatter'), PlanConfig(block_m=32,block_n=64,num_ctas=8)).hash)")
    here = make_plan(Problem(300, 200, 64, "bfloat16", 4, "reduce_scatter"),
                     PlanConfig(block_m=32, block_n=64, num_ctas=8)).hash
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert there.stdout.strip() == here


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(problem=Problem(8, 8, 8, "float32", 2, "reduce_scatter"),
              config=PlanConfig(block_m=4, block_n=4, num_ctas=3)), "divisible"),
        (dict(problem=Problem(8, 8, 8, "float32", 1, "all_reduce"),
              config=PlanConfig(block_m=4, block_n=4, num_ctas=1, group_waves=(1, 1))), "waves"),
    ],
)
def test_inconsistent_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_plan(**kwargs)


@pytest.mark.parametrize("bad", [dict(block_m=0), dict(block_n=96), dict(num_ctas=-1),
                                 dict(group_waves=()), dict(group_waves=(1, 0))])
def test_bad_config_values(bad):
    with pytest.raises(ValueError):
        PlanConfig(**bad)


def test_bad_problems():
    with pytest.raises(ValueError, match="divisible"):
        Problem(10, 8, 8, "float32", 3, "reduce_scatter")
    with pytest.raises(ValueError, match="op"):
        Problem(10, 8, 8, "float32", 3, "all_gather")
    with pytest.raises(ValueError):
        Problem(0, 8, 8, "float32", 1, "all_reduce")


@given(st.integers(1, 200))
def test_split_waves_sums(n):
    waves = split_waves(n)
    assert sum(waves) == n and all(w >= 1 for w in waves) and waves[0] == 1


@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter"])
@pytest.mark.parametrize("M", [16, 4096, 16384])
def test_default_config_builds(op, M):
    problem = Problem(M, 8192, 2048, "bfloat16", 4, op)
    plan = make_plan(problem, default_plan_config(problem, num_sms=132))
    blocks = 4 if op == "reduce_scatter" else 1
    assert plan.num_tiles == blocks * math.ceil(M / blocks / 128) * 32
    assert plan.config.num_ctas % blocks == 0 and plan.config.num_ctas <= 132
