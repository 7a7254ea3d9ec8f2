"""The overlap engine's cross-rank agreement, on a 2-process gloo group (no GPU needed).

``engine.decide_overlap`` all-gathers ``plan hash ^ decision`` once per (plan, group): equal
plans pass and mark the plan as checked (so building its workspace needs no second blocking
collective), and plans that differ between ranks raise on every rank instead of leaving
NCCL to hang in mismatched collectives.
"""

from __future__ import annotations

import pytest
import torch

import flashoverlap as fo
from dist_harness import run_distributed

CPU = torch.device("cpu")


def _plan(num_ctas: int):
    return fo.make_plan(fo.Problem(1024, 2048, 512, "bfloat16", 2, "all_reduce"),
                        fo.PlanConfig(block_m=128, block_n=256, num_ctas=num_ctas))


def _agree(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    from flashoverlap import engine

    engine.clear_workspaces()
    plan = _plan(96)
    assert engine.decide_overlap(plan, CPU, dist.group.WORLD, force=True) is True
    assert (plan, dist.group.WORLD) in engine._VERIFIED
    # memoised: a second call issues no collective (the other rank does not join one)
    assert engine.decide_overlap(plan, CPU, dist.group.WORLD, force=True) is True


def _disagree(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    from flashoverlap import engine

    engine.clear_workspaces()
    plan = _plan(96 if rank == 0 else 88)  # e.g. a per-machine tuning cache that differs
    with pytest.raises(RuntimeError, match="differs across ranks") as info:
        engine.decide_overlap(plan, CPU, dist.group.WORLD, force=True)
    assert "on group ranks [0]" in str(info.value) and "on group ranks [1]" in str(info.value)
    assert (plan, dist.group.WORLD) not in engine._VERIFIED


def test_equal_plans_agree_once():
    run_distributed(_agree, 2)


def test_different_plans_raise_on_every_rank():
    run_distributed(_disagree, 2)
