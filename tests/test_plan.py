"""Property tests of the overlap plan (pure Python, no GPU): band groups, dest rows, spans.

A plan's step table says which tile each step computes (``row_start..col_stop``), where it
lands (``dest_row`` of a row-major ``[M, N]`` destination: the result for AllReduce, the
packed send buffer for ReduceScatter), which group it signals and which row block it is in.
The properties below are what the engines rely on; ``simulate`` runs a plan's layout end to
end (GEMM stores, one collective per group's span) in numpy.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashoverlap.plan import (
    BLOCK, COL_START, COL_STOP, DEST_ROW, GROUP, ROW_START, ROW_STOP, STEP_TABLE_COLUMNS,
    PlanConfig, Problem, band_layout, make_plan, num_bands_for, num_waves_for,
    swizzled_tile_order,
)

EXAMPLES = settings(max_examples=200, deadline=None)


@st.composite
def plans(draw, op=None):
    op = op or draw(st.sampled_from(["all_reduce", "reduce_scatter"]))
    W = draw(st.integers(1, 5))
    bm = draw(st.sampled_from([1, 2, 4, 8, 16]))
    bn = draw(st.sampled_from([1, 2, 4, 8, 16]))
    M = draw(st.integers(1, 70)) * W if op == "reduce_scatter" else draw(st.integers(1, 200))
    N = draw(st.integers(1, 90))
    P = draw(st.integers(1, 12))
    group_m = draw(st.integers(1, 9))
    problem = Problem(M=M, N=N, K=3, dtype="float32", world_size=W, op=op)
    probe = PlanConfig(block_m=bm, block_n=bn, num_ctas=P, group_m=group_m)
    bands = num_bands_for(problem, probe)
    if draw(st.booleans()):
        group_bands = None  # the default: one group per band
    else:  # a random composition of `bands` into groups
        cuts = sorted(draw(st.sets(st.integers(1, bands), max_size=bands)) - {bands})
        bounds = [0, *cuts, bands]
        group_bands = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    config = PlanConfig(block_m=bm, block_n=bn, num_ctas=P, group_m=group_m,
                        group_bands=group_bands)
    return make_plan(problem, config)


@EXAMPLES
@given(plans())
def test_table_shape_and_columns(plan):
    assert STEP_TABLE_COLUMNS == ("row_start", "row_stop", "col_start", "col_stop", "dest_row",
                                  "group", "block")
    assert plan.step_table.dtype == np.int32 and plan.step_table.shape == (plan.num_tiles, 7)
    assert not plan.step_table.flags.writeable
    B = plan.problem.row_blocks
    assert B == (plan.problem.world_size if plan.problem.op == "reduce_scatter" else 1)
    assert plan.num_tiles == B * plan.tiles_m * plan.tiles_n
    assert plan.num_waves == math.ceil(plan.num_tiles / plan.config.num_ctas)
    assert num_waves_for(plan.problem, plan.config) == plan.num_waves


@EXAMPLES
@given(plans())
def test_tiles_cover_the_output_exactly_once(plan):
    M, N = plan.problem.M, plan.problem.N
    rows = plan.problem.rows_per_block
    cover = np.zeros((M, N), dtype=np.int64)
    for r0, r1, c0, c1, _, _, k in plan.step_table:
        assert 0 < r1 - r0 <= plan.config.block_m and 0 < c1 - c0 <= plan.config.block_n
        assert k * rows <= r0 and r1 <= (k + 1) * rows, "a tile straddles two row blocks"
        cover[r0:r1, c0:c1] += 1
    assert (cover == 1).all()


@EXAMPLES
@given(plans())
def test_dest_rows_are_a_permutation_of_the_output_rows(plan):
    """Every destination element is written by exactly one tile, and a tile's rows land as
    one contiguous run (so the destination is a row permutation of the GEMM output)."""
    M, N = plan.problem.M, plan.problem.N
    cover = np.zeros((M, N), dtype=np.int64)
    source_row = np.full(M, -1, dtype=np.int64)
    for r0, r1, c0, c1, dest, _, _ in plan.step_table:
        assert 0 <= dest and dest + (r1 - r0) <= M
        cover[dest:dest + r1 - r0, c0:c1] += 1
        for i in range(r1 - r0):  # the same source row for every column tile of the row
            assert source_row[dest + i] in (-1, r0 + i)
            source_row[dest + i] = r0 + i
    assert (cover == 1).all()
    assert sorted(source_row.tolist()) == list(range(M))
    if plan.collective.in_place_for(plan.problem.world_size):  # tiles land where they are
        assert (plan.step_table[:, DEST_ROW] == plan.step_table[:, ROW_START]).all()


@EXAMPLES
@given(plans())
def test_groups_are_contiguous_runs_of_whole_bands(plan):
    groups = plan.step_table[:, GROUP]
    bounds = plan.group_bounds
    assert bounds[0] == 0 and bounds[-1] == plan.num_tiles
    assert (np.diff(groups) >= 0).all(), "groups must follow execution order"
    layout = band_layout(plan.problem, plan.config)
    expected_bands = plan.config.group_bands or (1,) * layout.num_bands
    assert plan.num_groups == len(expected_bands)
    band_bounds = np.concatenate([[0], np.cumsum(expected_bands)])
    # a group's rows are whole bands: its row bounds are band bounds
    assert plan.group_rows.tolist() == layout.band_row_lo[band_bounds].tolist()
    B = plan.problem.row_blocks
    rows = plan.problem.rows_per_block
    for g in range(plan.num_groups):
        lo, hi = bounds[g], bounds[g + 1]
        assert hi > lo, "no empty group"
        assert (groups[lo:hi] == g).all()
        # its tiles are exactly the tiles of its rows, in every block
        steps = plan.step_table[lo:hi]
        local = steps[:, ROW_START] - steps[:, BLOCK] * rows
        r_lo, r_hi = plan.group_rows[g], plan.group_rows[g + 1]
        assert ((local >= r_lo) & (local < r_hi)).all()
        assert set(steps[:, BLOCK].tolist()) == set(range(B))
        tile_rows = -(-(r_hi - r_lo) // plan.config.block_m)
        assert hi - lo == B * tile_rows * plan.tiles_n


@EXAMPLES
@given(plans())
def test_counter_targets_are_tile_counts(plan):
    counts = np.bincount(plan.step_table[:, GROUP], minlength=plan.num_groups)
    assert plan.group_tile_counts.tolist() == counts.tolist()
    assert int(plan.group_tile_counts.sum()) == plan.num_tiles


@EXAMPLES
@given(plans())
def test_spans_partition_send_and_result_rows(plan):
    B = plan.problem.row_blocks
    spans = plan.spans()
    assert [s.index for s in spans] == list(range(plan.num_groups))
    assert spans[0].send_lo == 0 and spans[-1].send_hi == plan.problem.M
    assert spans[0].recv_lo == 0 and spans[-1].recv_hi == plan.out_rows
    for s, t in zip(spans, spans[1:]):
        assert s.send_hi == t.send_lo and s.recv_hi == t.recv_lo
    for s in spans:
        assert s.send_rows == B * s.recv_rows > 0
        assert (s.recv_lo, s.recv_hi) == (plan.group_rows[s.index], plan.group_rows[s.index + 1])
        if plan.collective.in_place_for(plan.problem.world_size):
            assert (s.send_lo, s.send_hi) == (s.recv_lo, s.recv_hi)


@EXAMPLES
@given(plans())
def test_tiles_land_inside_their_group_span_packed_by_block(plan):
    rows = plan.problem.rows_per_block
    spans = plan.spans()
    for r0, r1, _, _, dest, g, k in plan.step_table:
        s = spans[g]
        assert s.send_lo <= dest and dest + (r1 - r0) <= s.send_hi
        # block k's rows of the band come at send_lo + k * (hi - lo), in row order
        assert dest == s.send_lo + k * s.recv_rows + (r0 - k * rows - s.recv_lo)


@EXAMPLES
@given(plans(op="reduce_scatter"))
def test_reduce_scatter_share_of_each_span_is_one_block(plan):
    """ncclReduceScatter over a span hands rank r its r-th equal share: those rows must all
    come from row block r (the rows rank r receives)."""
    W = plan.problem.world_size
    spans = plan.spans()
    for r0, _, _, _, dest, g, k in plan.step_table:
        s = spans[g]
        share = s.send_rows // W
        assert (dest - s.send_lo) // share == k


def simulate(plan):
    """GEMM stores per the step table, then one collective per group span; returns (C, the
    result every rank holds)."""
    M, N = plan.problem.M, plan.problem.N
    B = plan.problem.row_blocks
    C = np.arange(M * N, dtype=np.int64).reshape(M, N) + 1
    dest = np.full((M, N), -1, dtype=np.int64)
    for r0, r1, c0, c1, d, _, _ in plan.step_table:
        dest[d:d + r1 - r0, c0:c1] = C[r0:r1, c0:c1]
    results = []
    for r in range(B):
        out = np.full((plan.out_rows, N), -2, dtype=np.int64)
        for s in plan.spans():
            share = s.recv_rows
            out[s.recv_lo:s.recv_hi] = dest[s.send_lo + r * share: s.send_lo + (r + 1) * share]
        results.append(out)
    return C, results


@EXAMPLES
@given(plans())
def test_layout_round_trip(plan):
    """Rank r's result, read straight from the spans (no restore), is its block of C."""
    C, results = simulate(plan)
    rows = plan.out_rows
    for r, out in enumerate(results):
        np.testing.assert_array_equal(out, C[r * rows:(r + 1) * rows])


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


def test_a_worked_reduce_scatter_example():
    # M=12 over W=2: blocks of 6 rows; BM=2, group_m=2 -> bands of 4 rows: [0,4), [4,6)
    plan = make_plan(Problem(12, 4, 8, "float32", 2, "reduce_scatter"),
                     PlanConfig(block_m=2, block_n=4, num_ctas=2, group_m=2))
    assert plan.group_rows.tolist() == [0, 4, 6]
    assert [(s.send_lo, s.send_hi, s.recv_lo, s.recv_hi) for s in plan.spans()] == \
        [(0, 8, 0, 4), (8, 12, 4, 6)]
    table = plan.step_table
    # step s runs a tile of block s % 2; block 1's first tile (rows 6..8) lands at row 4
    assert table[:, BLOCK].tolist() == [0, 1, 0, 1, 0, 1]
    assert table[:, ROW_START].tolist() == [0, 6, 2, 8, 4, 10]
    assert table[:, DEST_ROW].tolist() == [0, 4, 2, 6, 8, 10]
    assert table[:, GROUP].tolist() == [0, 0, 0, 0, 1, 1]
    assert plan.group_tile_counts.tolist() == [4, 2]
    assert table[:, COL_START].tolist() == [0] * 6 and table[:, COL_STOP].tolist() == [4] * 6
    assert table[:, ROW_STOP].tolist() == [2, 8, 4, 10, 6, 12]


@EXAMPLES
@given(plans())
def test_hash_is_deterministic_and_config_sensitive(plan):
    again = make_plan(plan.problem, plan.config)
    assert again.hash == plan.hash and again.hash_int64() == plan.hash_int64()
    assert 0 <= plan.hash_int64() < 2**63
    other = PlanConfig(block_m=plan.config.block_m, block_n=plan.config.block_n,
                       num_ctas=plan.config.num_ctas + 1, group_m=plan.config.group_m,
                       group_bands=plan.config.group_bands)
    assert make_plan(plan.problem, other).hash != plan.hash
    if plan.num_groups > 1:  # one group instead: another plan
        merged = PlanConfig(block_m=plan.config.block_m, block_n=plan.config.block_n,
                            num_ctas=plan.config.num_ctas, group_m=plan.config.group_m,
                            group_bands=(plan.num_groups if plan.config.group_bands is None
                                         else sum(plan.config.group_bands),))
        assert make_plan(plan.problem, merged).hash != plan.hash


def test_hash_is_stable_across_processes():
    # a fixed plan's hash is a constant of the implementation: a change must be deliberate
    # (bump PLAN_FORMAT_VERSION) since ranks running different versions would disagree.
    code = ("from flashoverlap.plan import *; print(make_plan(Problem(300,200,64,'bfloat16',4,"
            "'reduce_scatter'), PlanConfig(block_m=32,block_n=64,num_ctas=8,group_m=1,"
            "group_bands=(1,2))).hash)")
    here = make_plan(Problem(300, 200, 64, "bfloat16", 4, "reduce_scatter"),
                     PlanConfig(block_m=32, block_n=64, num_ctas=8, group_m=1,
                                group_bands=(1, 2))).hash
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True)
    assert there.stdout.strip() == here


@pytest.mark.parametrize("bands, message", [((1,), "sum to 1"), ((1, 1, 1, 1), "sum to 4"),
                                            ((2, 2), "sum to 4")])
def test_group_bands_must_sum_to_the_band_count(bands, message):
    # M=40 rows, BM=4 -> 10 tile rows; group_m=4 -> bands of 4, 4, 2 tile rows: 3 bands
    problem = Problem(40, 8, 8, "float32", 1, "all_reduce")
    config = PlanConfig(block_m=4, block_n=4, num_ctas=2, group_m=4, group_bands=bands)
    with pytest.raises(ValueError, match=message) as info:
        make_plan(problem, config)
    assert "3 bands" in str(info.value)
    ok = make_plan(problem, PlanConfig(block_m=4, block_n=4, num_ctas=2, group_m=4,
                                       group_bands=(2, 1)))
    assert ok.group_rows.tolist() == [0, 32, 40]


@pytest.mark.parametrize("bad", [dict(block_m=0), dict(block_n=96), dict(num_ctas=-1),
                                 dict(group_m=0), dict(group_bands=()),
                                 dict(group_bands=(1, 0)), dict(group_bands=(1, -2)),
                                 dict(group_bands=(1.0,)), dict(group_bands=(True,))])
def test_bad_config_values(bad):
    with pytest.raises(ValueError):
        PlanConfig(**bad)


def test_group_bands_list_becomes_a_tuple():
    config = PlanConfig(block_m=4, block_n=4, num_ctas=1, group_bands=[1, 2])
    assert config.group_bands == (1, 2)
    hash(config)


def test_bad_problems():
    with pytest.raises(ValueError, match="divisible"):
        Problem(10, 8, 8, "float32", 3, "reduce_scatter")
    with pytest.raises(ValueError, match="unknown collective"):
        Problem(10, 8, 8, "float32", 3, "all_gather")
    with pytest.raises(ValueError):
        Problem(0, 8, 8, "float32", 1, "all_reduce")
    with pytest.raises(ValueError):
        Problem(8, 8, 8, "float32", True, "all_reduce")
