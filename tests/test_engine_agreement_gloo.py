"""Cross-rank agreement on a call, on 2-process gloo groups (no GPU needed).

The first call of each validated signature all-gathers one 63-bit hash of (collective,
shapes, dtype, engine, decision, plan) over the group (``agreement.agree_on_call`` through
``policy.agree``): equal calls pass once and are memoised (no second blocking collective),
and calls that differ between ranks raise ``ValueError`` on every rank instead of leaving the
collectives to hang mismatched.  (Rank mismatches of the engines themselves are tested
elsewhere.)
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import flashoverlap as fo
from dist_harness import run_distributed


def _plan(num_ctas: int):
    return fo.make_plan(fo.Problem(1024, 2048, 512, "bfloat16", 2, "all_reduce"),
                        fo.PlanConfig(block_m=128, block_n=256, num_ctas=num_ctas))


def _agree(rank: int, world_size: int) -> None:
    from flashoverlap import agreement

    group = dist.group.WORLD
    agreement.agree_on_call(group, ("all_reduce", 8, 6, 4, _plan(96).hash), "call")
    with pytest.raises(ValueError, match="differs across ranks") as info:
        # e.g. a per-machine tuning cache that differs: another plan on rank 1
        agreement.agree_on_call(group, ("all_reduce", 8, 6, 4, _plan(96 - 8 * rank).hash),
                                "call")
    message = str(info.value)
    assert "on group ranks [0]" in message and "on group ranks [1]" in message
    assert f"this is group rank {rank}" in message
    # the group is still usable after the refusal
    agreement.agree_on_call(group, ("again",), "call")


def test_agree_on_call_passes_or_raises_on_every_rank():
    run_distributed(_agree, 2)


def _ops_agree_once_per_signature(rank: int, world_size: int) -> None:
    from flashoverlap import agreement

    calls = []
    original = agreement.agree_on_call

    def counted(group, signature, what, *args, **kwargs):
        calls.append(signature)
        return original(group, signature, what, *args, **kwargs)

    agreement.agree_on_call = counted
    try:
        a, b = torch.randn(8, 4), torch.randn(4, 6)
        for engine in ("reference", "sequential"):
            calls.clear()
            fo.gemm_all_reduce(a, b, engine=engine)
            fo.gemm_all_reduce(torch.randn(8, 4), torch.randn(4, 6), engine=engine)
            assert len(calls) == 1, "the second call of a signature is memoised"
            fo.gemm_reduce_scatter(a, b, engine=engine)  # another signature: checked
            assert len(calls) == 2

        # different configs on the two ranks: ValueError on both, before any collective
        config = fo.PlanConfig(block_m=4, block_n=4, num_ctas=2 + rank)
        out = torch.full((8, 6), 7.0)
        with pytest.raises(ValueError, match="differs across ranks"):
            fo.gemm_all_reduce(a, b, out=out, engine="reference", config=config)
        assert (out == 7.0).all()
        # the same config everywhere then works (and the group is in a consistent state)
        config = fo.PlanConfig(block_m=4, block_n=4, num_ctas=2)
        got = fo.gemm_all_reduce(a, b, engine="reference", config=config)
        want = a @ b
        dist.all_reduce(want)
        torch.testing.assert_close(got, want)
        # the engine is part of the agreement: reference here, sequential there (a signature
        # not seen before on either rank)
        with pytest.raises(ValueError, match="differs across ranks"):
            fo.gemm_all_reduce(torch.randn(5, 4), b, engine=("reference", "sequential")[rank])
    finally:
        agreement.agree_on_call = original


def test_ops_agree_once_per_signature_and_refuse_mismatches():
    run_distributed(_ops_agree_once_per_signature, 2)
