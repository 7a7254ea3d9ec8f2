"""AllToAll segment plans (pure Python): coverage, the (destination, expert) reorder, and
transfers that match across ranks."""

from __future__ import annotations

import numpy as np
import pytest

from flashoverlap.all_to_all_plan import (
    DEST_ROW, EXPERT, GROUP, ROW_START, ROW_STOP, TO_OUT, COL_START, COL_STOP,
    AllToAllProblem, make_all_to_all_plan)
from flashoverlap.plan import PlanConfig


def _global_counts(seed, W, E):
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 40, size=(W, E, W))
    c[rng.random(c.shape) < 0.3] = 0
    return c


def _plans(c, N, config):
    W, E, _ = c.shape
    return [make_all_to_all_plan(AllToAllProblem(c[r].tolist(), c[:, :, r].sum(1).tolist(),
                                                 N, 8, "bfloat16", r, W), config)
            for r in range(W)]


@pytest.mark.parametrize("W,E,seed", [(1, 4, 0), (2, 1, 1), (2, 3, 2), (3, 2, 3), (4, 5, 4)])
def test_tiles_cover_every_row_once_in_destination_expert_order(W, E, seed):
    c = _global_counts(seed, W, E)
    N = 70
    cfg = PlanConfig(block_m=16, block_n=32, num_ctas=5, group_m=2)
    for r, plan in enumerate(_plans(c, N, cfg)):
        p = plan.problem
        t = plan.step_table.astype(np.int64)
        covered = np.zeros((p.M, N), dtype=np.int64)
        send_seen = np.zeros((p.M, N), dtype=np.int64)
        out_seen = np.zeros((p.recv_rows, N), dtype=np.int64)
        a_off, send_off, seg_off, recv_off = p.offsets()
        for row in t:
            r0, r1, c0, c1, dest, e, to_out = (row[ROW_START], row[ROW_STOP], row[COL_START],
                                               row[COL_STOP], row[DEST_ROW], row[EXPERT],
                                               row[TO_OUT])
            assert 0 < r1 - r0 <= 16 and 0 < c1 - c0 <= 32
            covered[r0:r1, c0:c1] += 1
            # the tile's rows lie in one segment of expert e; find its destination
            d = next(d for d in range(W) if a_off[e, d] <= r0 and r1 <= a_off[e, d] + c[r][e, d])
            local = r0 - a_off[e, d]
            if d == r:
                assert to_out == 1 and dest == recv_off[r] + seg_off[e, d] + local
                out_seen[dest:dest + r1 - r0, c0:c1] += 1
            else:
                assert to_out == 0 and dest == send_off[d] + seg_off[e, d] + local
                send_seen[dest:dest + r1 - r0, c0:c1] += 1
        assert (covered == 1).all()
        assert send_seen.max(initial=0) <= 1 and out_seen.max(initial=0) <= 1
        assert np.diff(t[:, GROUP]).min(initial=0) >= 0  # groups are contiguous step ranges
        assert plan.group_tile_counts.sum() == plan.num_tiles


@pytest.mark.parametrize("W,E,seed,bands", [(2, 2, 5, None), (3, 3, 6, None), (4, 2, 7, (2, 2)),
                                            (5, 1, 8, (1, 3, 1))])
def test_transfers_match_across_ranks(W, E, seed, bands):
    c = _global_counts(seed, W, E)
    N = 8
    cfg = PlanConfig(block_m=16, block_n=16, num_ctas=4, group_m=1, group_bands=bands)
    plans = _plans(c, N, cfg)
    G = plans[0].num_groups
    assert all(p.num_groups == G for p in plans)
    for g in range(G):
        for r in range(W):
            for peer, off, count in plans[r].group_collectives[g].sends:
                assert peer != r and count > 0
                match = [x for x in plans[peer].group_collectives[g].recvs if x[0] == r]
                assert len(match) == 1 and match[0][2] == count
                assert count == c[r, :, peer].sum() * N
    # the self block is never transferred; every other nonzero block once
    for r in range(W):
        sent = [x for coll in plans[r].group_collectives for x in coll.sends]
        assert sorted(x[0] for x in sent) == [d for d in range(W) if d != r and c[r, :, d].sum()]


def test_bad_problems_raise():
    with pytest.raises(ValueError, match="itself"):
        AllToAllProblem([[1, 2]], [5, 2], 4, 4, "float32", 0, 2)
    with pytest.raises(ValueError, match="entries"):
        AllToAllProblem([[1, 2]], [1], 4, 4, "float32", 0, 2)
    with pytest.raises(ValueError, match="non-negative"):
        AllToAllProblem([[1, -2]], [1, 0], 4, 4, "float32", 0, 2)
    p = AllToAllProblem([[1, 2]], [1, 3], 4, 4, "float32", 0, 2)
    with pytest.raises(ValueError, match="sum to the group size"):
        make_all_to_all_plan(p, PlanConfig(group_bands=(1, 2)))
    empty = make_all_to_all_plan(AllToAllProblem([[0, 0]], [0, 0], 4, 4, "float32", 0, 2),
                                 PlanConfig())
    assert empty.num_tiles == 0 and not empty.communicates
