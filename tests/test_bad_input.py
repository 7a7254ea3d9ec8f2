"""Every bad input raises TypeError/ValueError naming the problem, before anything runs."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

import flashoverlap as fo


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    init = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _ab(M=8, K=4, N=6, dtype=torch.float32):
    return torch.randn(M, K, dtype=dtype), torch.randn(K, N, dtype=dtype)


def test_not_initialized_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    a, b = _ab()
    with pytest.raises(ValueError, match="not initialized"):
        fo.gemm_all_reduce(a, b)


BAD = [
    ("mismatched K", lambda: (torch.randn(8, 4), torch.randn(5, 6)), {}, ValueError, "mismatched K"),
    ("1-D a", lambda: (torch.randn(8), torch.randn(8, 6)), {}, ValueError, "a must be 2-D"),
    ("3-D b", lambda: (torch.randn(8, 4), torch.randn(2, 4, 6)), {}, ValueError, "b must be 2-D"),
    ("int dtype", lambda: (torch.ones(8, 4, dtype=torch.int32), torch.ones(4, 6, dtype=torch.int32)), {},
     TypeError, "dtype torch.int32"),
    ("mixed dtypes", lambda: (torch.randn(8, 4), torch.randn(4, 6, dtype=torch.bfloat16)), {},
     TypeError, "same dtype"),
    ("mixed devices", lambda: (torch.randn(8, 4), torch.randn(4, 6, device="meta")), {},
     ValueError, "same device"),
    ("empty", lambda: (torch.randn(0, 4), torch.randn(4, 6)), {}, ValueError, "empty"),
    ("not a tensor", lambda: ([[1.0]], torch.randn(1, 6)), {}, TypeError, "torch.Tensor"),
    ("column-major a", lambda: (torch.randn(4, 8).t(), torch.randn(4, 6)), {}, ValueError, "row-major"),
    ("strided b", lambda: (torch.randn(8, 4), torch.randn(8, 12)[::2, ::2]), {}, ValueError, "b must be row-major"),
    ("out shape", lambda: _ab(), {"out": torch.empty(8, 5)}, ValueError, "out has shape"),
    ("out dtype", lambda: _ab(), {"out": torch.empty(8, 6, dtype=torch.float16)}, TypeError, "out has dtype"),
    ("out not tensor", lambda: _ab(), {"out": 3}, TypeError, "out must be"),
    ("unknown engine", lambda: _ab(), {"engine": "magic"}, ValueError, "engine must be one of"),
    ("residual shape", lambda: _ab(), {"residual": torch.randn(8, 5)}, ValueError, "residual has shape"),
    ("residual dtype", lambda: _ab(), {"residual": torch.randn(8, 6).double()}, TypeError,
     "residual has dtype"),
    ("residual not tensor", lambda: _ab(), {"residual": 1.0}, TypeError, "residual must be"),
    ("residual column-major", lambda: _ab(), {"residual": torch.randn(6, 8).t()}, ValueError,
     "residual must be row-major"),
    ("bad config", lambda: _ab(), {"config": {"block_m": 64}}, TypeError, "config must be a PlanConfig"),
    ("config bands", lambda: _ab(), {"config": fo.PlanConfig(block_m=4, block_n=4, num_ctas=1, group_bands=(1, 1))},
     ValueError, "group_bands"),
    ("engine not str", lambda: _ab(), {"engine": 3}, ValueError, "engine must be one of"),
]


@pytest.mark.parametrize("name, make, kwargs, exc, message", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("op", [fo.gemm_all_reduce, fo.gemm_reduce_scatter])
def test_bad_input(world, name, make, kwargs, exc, message, op):
    a, b = make()
    with pytest.raises(exc, match=message):
        op(a, b, **kwargs)


def test_out_untouched_on_error(world):
    a, b = _ab()
    out = torch.full((8, 6), 7.0)
    with pytest.raises(ValueError):
        fo.gemm_all_reduce(a, b, out=out, engine="magic")
    assert (out == 7.0).all()


def test_reduce_scatter_specific(world):
    a, b = _ab()
    with pytest.raises(ValueError, match="scatter_dim"):
        fo.gemm_reduce_scatter(a, b, scatter_dim=1)
    group = dist.new_group([0])
    # W=1 divides everything; the divisibility message is tested with W=3 in a spawned group.
    # With one rank the result is a @ b itself, for every engine and multi-group plans too.
    a, b = torch.randn(100, 20), torch.randn(20, 70)
    config = fo.PlanConfig(block_m=16, block_n=16, num_ctas=7, group_m=2, group_bands=(1, 2, 1))
    for engine, cfg in (("reference", config), ("reference", None), ("sequential", None)):
        for op in (fo.gemm_reduce_scatter, fo.gemm_all_reduce):
            out = torch.full((100, 70), float("nan"))
            op(a, b, group, out=out, engine=engine, config=cfg)
            torch.testing.assert_close(out, a @ b)


def _rs_not_divisible(rank, W):
    a, b = torch.randn(10, 4), torch.randn(4, 6)
    with pytest.raises(ValueError, match="M divisible by the group size"):
        fo.gemm_reduce_scatter(a, b)
    # a group this rank is not part of
    sub = dist.new_group([0])
    if rank != 0:
        with pytest.raises(ValueError, match="not a member"):
            fo.gemm_all_reduce(a, b, sub)


@pytest.mark.parametrize("op", [fo.gemm_all_reduce, fo.gemm_reduce_scatter])
def test_out_overlapping_an_operand_raises(world, op):
    store = torch.randn(8, 12)
    a = store[:, :6]  # [8, 6] row-major view, K = 6
    b = torch.randn(6, 6)
    before = store.clone()
    with pytest.raises(ValueError, match="out overlaps a"):
        op(a, b, out=store.view(-1)[6:54].view(8, 6))
    assert torch.equal(store, before), "out was written before the error"
    flat = torch.randn(48)
    b_view = flat[:36].view(6, 6)
    with pytest.raises(ValueError, match="out overlaps b"):
        op(torch.randn(8, 6), b_view, out=flat.view(8, 6))
    # disjoint parts of one storage are fine
    big = torch.randn(96)
    a2, out2 = big[:48].view(8, 6), big[48:].view(8, 6)
    op(a2, b, out=out2)
    torch.testing.assert_close(out2.double(), a2.double() @ b.double(), rtol=1e-5, atol=1e-5)


def test_residual_partly_overlapping_out_raises(world):
    a, b = _ab()
    flat = torch.randn(8 * 6 + 6)
    before = flat.clone()
    with pytest.raises(ValueError, match="residual partly overlaps out"):
        fo.gemm_all_reduce(a, b, out=flat[:48].view(8, 6), residual=flat[6:54].view(8, 6))
    assert torch.equal(flat, before)


def test_rs_not_divisible_and_foreign_group():
    from dist_harness import run_distributed

    run_distributed(_rs_not_divisible, 3)


def test_checks_still_run_after_a_valid_call(world):
    """Validated call signatures are memoised; any change of metadata is checked afresh."""
    a, b = _ab()
    fo.gemm_all_reduce(a, b)
    fo.gemm_all_reduce(a, b, out=torch.empty(8, 6))
    with pytest.raises(ValueError, match="out has shape"):
        fo.gemm_all_reduce(a, b, out=torch.empty(8, 5))
    with pytest.raises(TypeError, match="same dtype"):
        fo.gemm_all_reduce(a, b.double().float().to(torch.bfloat16))
    with pytest.raises(ValueError, match="mismatched K"):
        fo.gemm_all_reduce(a, torch.randn(5, 6))
    with pytest.raises(ValueError, match="row-major"):
        fo.gemm_all_reduce(torch.randn(4, 8).t(), b)


def test_collective_argument_must_be_a_collective(world):
    a, b = _ab()
    for bad in ("all_reduce", None, object()):
        with pytest.raises(TypeError, match="Collective"):
            fo.gemm_collective(a, b, bad)


@pytest.mark.parametrize("op", [fo.gemm_all_reduce, fo.gemm_reduce_scatter])
def test_out_with_autograd_is_refused(world, op):
    a, b = _ab()
    out = torch.full((8, 6), 7.0)
    with pytest.raises(ValueError, match="out= does not support automatic differentiation"):
        op(a.requires_grad_(), b, out=out)
    assert (out == 7.0).all()
    with torch.no_grad():  # no graph to build: out= is fine
        op(a, b, out=out)
    torch.testing.assert_close(out, a.detach() @ b)
