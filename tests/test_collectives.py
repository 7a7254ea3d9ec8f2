"""A user-defined collective through ``fo.gemm_collective`` (gloo, W = 2 and 3), and the
collective registry.

``ShiftToNext`` is written the way a user would write one (``examples/pipeline_send.py``
does the same for a pipeline send): a frozen dataclass implementing the protocol, result on
rank ``r`` = ``a_{r-1} @ b_{r-1}`` (the GEMM output of the previous rank), not in place, one
``batch_isend_irecv`` per group of rows.  Nothing in flashoverlap knows about it: the plan,
the policy, the agreement and the engines must take it by name and protocol alone.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

import flashoverlap as fo
from flashoverlap import collectives
from flashoverlap.collectives import Collective
from dist_harness import run_distributed


@dataclasses.dataclass(frozen=True)
class ShiftToNext(Collective):
    """Rank r's result is rank (r - offset)'s GEMM output ([M, N] on every rank)."""

    name = "test_shift_to_next"
    in_place = False
    offset: int = 1

    def launch_group(self, nccl, send_ptr, recv_ptr, send_count, recv_count) -> None:
        raise NotImplementedError("CPU test collective: no NCCL path")

    def torch_group(self, send, recv, group):
        W = dist.get_world_size(group)
        rank = dist.get_rank(group)
        if W == 1:
            recv.copy_(send)
            return lambda: None
        to = dist.get_global_rank(group, (rank + self.offset) % W)
        frm = dist.get_global_rank(group, (rank - self.offset) % W)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, to, group),
                                        dist.P2POp(dist.irecv, recv, frm, group)])

        def finish() -> None:
            for work in works:
                work.wait()
        return finish


SHIFT = ShiftToNext()


def _inputs(rank: int, case: int, M: int, N: int, K: int, transposed: bool):
    g = torch.Generator().manual_seed(1000 * case + rank)
    a = torch.randn(M, K, generator=g)
    b = torch.randn(N, K, generator=g).t() if transposed else torch.randn(K, N, generator=g)
    return a, b


def _check_shift(rank: int, W: int) -> None:
    assert SHIFT.name not in collectives.registered()  # a fresh process: registered on use
    cases = [  # (M, N, K, config)
        (37, 19, 11, None),  # the default plan
        (37, 19, 11, fo.PlanConfig(block_m=8, block_n=16, num_ctas=2, group_m=1)),  # 5 groups
        (37, 19, 11, fo.PlanConfig(block_m=8, block_n=16, num_ctas=3, group_m=1,
                                   group_bands=(2, 3))),
        (64, 33, 8, fo.PlanConfig(block_m=16, block_n=16, num_ctas=4, group_m=2,
                                  group_bands=(1, 1))),
        (5, 3, 2, None),
    ]
    prev = (rank - 1) % W
    for case, (M, N, K, config) in enumerate(cases):
        transposed = case % 2 == 1
        a, b = _inputs(rank, case, M, N, K, transposed)
        pa, pb = _inputs(prev, case, M, N, K, transposed)
        want = pa.double() @ pb.double()
        engines = ("reference", "sequential") if config is None else ("reference",)
        for engine in engines:
            what = f"case {case} M={M} N={N} K={K} {engine} config={config}"
            out = torch.full((M, N), float("nan"))
            got = fo.gemm_collective(a, b, SHIFT, out=out, engine=engine, config=config)
            assert got is out
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5, msg=what)
            fresh = fo.gemm_collective(a, b, SHIFT, engine=engine, config=config)
            assert torch.equal(fresh, out), what
            # residual: the default rule adds this rank's residual after each group
            residual = torch.randn(M, N, generator=torch.Generator().manual_seed(rank + 7))
            got = fo.gemm_collective(a, b, SHIFT, residual=residual, engine=engine,
                                     config=config)
            torch.testing.assert_close(got.double(), want + residual.double(), rtol=1e-5,
                                       atol=1e-5, msg=what)
            inplace = residual.clone()
            fo.gemm_collective(a, b, SHIFT, out=inplace, residual=inplace, engine=engine,
                               config=config)
            torch.testing.assert_close(inplace, got, rtol=0, atol=0, msg=what)
    assert collectives.get(SHIFT.name) is SHIFT
    plan = fo.make_plan(fo.Problem(37, 19, 11, "float32", W, SHIFT.name),
                        fo.PlanConfig(block_m=8, block_n=16, num_ctas=2, group_m=1))
    assert plan.collective is SHIFT and plan.problem.row_blocks == 1 and plan.num_groups == 5

    # through the custom op, by name
    a, b = _inputs(rank, 0, 8, 4, 3, False)
    pa, pb = _inputs(prev, 0, 8, 4, 3, False)
    got = torch.ops.flashoverlap.gemm_collective(a, b, None, SHIFT.name,
                                                 dist.group.WORLD.group_name, "reference", "",
                                                 False)
    torch.testing.assert_close(got, pa @ pb)

    # no backward rule: the forward runs, the backward refuses clearly
    a.requires_grad_()
    y = fo.gemm_collective(a, b, SHIFT, engine="reference")
    torch.testing.assert_close(y.detach(), pa @ pb)
    with pytest.raises(NotImplementedError, match="defines no backward"):
        y.sum().backward()

    # a different collective under the same name is refused on use, before any collective
    with pytest.raises(ValueError, match="already registered"):
        fo.gemm_collective(a.detach(), b, ShiftToNext(offset=2), engine="reference")


@pytest.mark.parametrize("W", [2, 3])
def test_user_defined_collective(W):
    run_distributed(_check_shift, W)


# ------------------------------------------------------------------ registry (no processes)
@dataclasses.dataclass(frozen=True)
class _Named(Collective):
    name = "test_registry_named"
    tag: int = 0

    def launch_group(self, *args) -> None:
        raise NotImplementedError

    def torch_group(self, send, recv, group):
        raise NotImplementedError


def test_builtins_are_registered():
    assert {"all_reduce", "reduce_scatter"} <= set(collectives.registered())
    assert collectives.get("all_reduce") is collectives.ALL_REDUCE is fo.collectives.ALL_REDUCE
    assert collectives.get("reduce_scatter") is collectives.REDUCE_SCATTER
    assert collectives.ALL_REDUCE.in_place and not collectives.REDUCE_SCATTER.in_place
    assert collectives.REDUCE_SCATTER.row_blocks(4) == 4 and collectives.ALL_REDUCE.row_blocks(4) == 1
    assert collectives.REDUCE_SCATTER.result_rows(12, 4) == 3
    with pytest.raises(ValueError, match="unknown collective 'nope'"):
        collectives.get("nope")


def test_register_is_idempotent_for_equal_objects():
    first = collectives.register(_Named(tag=1))
    assert collectives.register(_Named(tag=1)) is first  # equal: the registered object
    assert collectives.get(_Named.name) is first
    assert collectives.register(collectives.ALL_REDUCE) is collectives.ALL_REDUCE


def test_register_refuses_a_different_object_under_a_taken_name():
    collectives.register(_Named(tag=1))
    with pytest.raises(ValueError, match="already registered as 'test_registry_named'"):
        collectives.register(_Named(tag=2))

    @dataclasses.dataclass(frozen=True)
    class Impostor(_Named):
        name = "all_reduce"

    with pytest.raises(ValueError, match="already registered as 'all_reduce'"):
        collectives.register(Impostor())
    assert collectives.get("all_reduce") is collectives.ALL_REDUCE


def test_register_type_errors():
    for bad in ("all_reduce", None, 3, object()):
        with pytest.raises(TypeError, match="Collective"):
            collectives.register(bad)

    @dataclasses.dataclass(frozen=True)
    class Nameless(_Named):
        name = ""

    with pytest.raises(TypeError, match="non-empty string"):
        collectives.register(Nameless())

    @dataclasses.dataclass  # eq without frozen: __hash__ is None
    class Mutable(Collective):
        name = "test_registry_mutable"
        tag: int = 0
        launch_group = _Named.launch_group
        torch_group = _Named.torch_group

    with pytest.raises(TypeError, match="hashable"):
        collectives.register(Mutable())
    assert "test_registry_mutable" not in collectives.registered()


def test_the_protocol_is_abstract():
    class Incomplete(Collective):
        name = "test_incomplete"

    with pytest.raises(TypeError):
        Incomplete()
