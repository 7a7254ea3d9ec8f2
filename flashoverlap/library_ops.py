"""``torch.library`` custom ops: the overlapped GEMM+collective as graph nodes torch.compile keeps.

Registered ops (the process group travels by name, as in ``torch.distributed``'s functional
collectives, so a traced graph holds only strings)::

    flashoverlap::gemm_all_reduce(Tensor a, Tensor b, str group_name, str engine) -> Tensor
    flashoverlap::gemm_reduce_scatter(Tensor a, Tensor b, str group_name, str engine) -> Tensor
    flashoverlap::gemm_all_reduce_add(Tensor a, Tensor b, Tensor residual, str group_name, str engine) -> Tensor
    flashoverlap::gemm_reduce_scatter_add(Tensor a, Tensor b, Tensor residual, str group_name, str engine) -> Tensor

``engine`` is ``"overlap"``, ``"reference"``, ``"sequential"`` or ``""`` (the best available).
The ops mutate nothing and return a fresh tensor: ``[M, N]`` for AllReduce, rank ``r``'s rows
``[r*M/W, (r+1)*M/W)`` (``[M/W, N]``) for ReduceScatter, dtype of ``a``.  The ``_add`` forms
add ``residual`` (the result's shape) in the same pass as the overlap engine's restores (the
``residual=`` argument of :mod:`flashoverlap.ops`); a compiler cannot fuse an add into an
opaque op, so the fused form is its own op.

Why custom ops rather than calling :mod:`flashoverlap.ops` from Python: Dynamo cannot trace
through the engine (NCCL through ctypes, streams, Triton launches), so under
``torch.compile(fullgraph=True)`` the op must be opaque.  The fake (meta) implementations give
the output shapes without running anything; the group size comes from the live group named
``group_name``.

Autograd is registered on the ops themselves (``register_autograd``) so eager mode and compiled
graphs share one backward:

* AllReduce: ``grad_out`` is replicated, so ``grad_a = grad_out @ b.T`` and
  ``grad_b = a.T @ grad_out`` need no communication.
* ReduceScatter: each rank holds only its rows of ``grad_out``; they are all-gathered along
  dim 0 first (``_c10d_functional.all_gather_into_tensor``, traceable and identical on torch
  2.11 and 2.13), then the same two matmuls.
* ``residual`` of the ``_add`` forms: ``grad_residual = grad_out`` (same shape, this rank's).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from . import ops
from .checks import check_scatter

__all__ = ["all_gather_rows", "gemm_all_reduce", "gemm_all_reduce_add", "gemm_reduce_scatter",
           "gemm_reduce_scatter_add", "resolve_group_name"]


def resolve_group_name(group_name: str) -> ProcessGroup:
    """The live process group registered under ``group_name`` (``group.group_name``)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _row_major(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Accept whatever strides a compiler hands us; copies only layouts the GEMM can't read.

    ``a`` must have unit stride on K; ``b`` may be ``[K, N]`` row-major or a ``[N, K]``
    row-major weight's ``.t()`` (see :func:`flashoverlap.checks.check_gemm_operands`).
    """
    if a.dim() == 2 and a.size(0) > 1 and a.stride(1) != 1:
        a = a.contiguous()
    if b.dim() == 2 and b.stride(0) != 1 and b.stride(1) != 1:
        b = b.contiguous()
    return a, b


@torch.library.custom_op("flashoverlap::gemm_all_reduce", mutates_args=())
def gemm_all_reduce(a: Tensor, b: Tensor, group_name: str, engine: str) -> Tensor:
    """``a @ b`` summed over the group named ``group_name`` (see :func:`flashoverlap.gemm_all_reduce`)."""
    a, b = _row_major(a, b)
    return ops.gemm_all_reduce(a, b, resolve_group_name(group_name), engine=engine or None)


@gemm_all_reduce.register_fake
def _gemm_all_reduce_fake(a: Tensor, b: Tensor, group_name: str, engine: str) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.custom_op("flashoverlap::gemm_reduce_scatter", mutates_args=())
def gemm_reduce_scatter(a: Tensor, b: Tensor, group_name: str, engine: str) -> Tensor:
    """Rank ``r``'s rows of ``a @ b`` summed over the group (see :func:`flashoverlap.gemm_reduce_scatter`)."""
    a, b = _row_major(a, b)
    return ops.gemm_reduce_scatter(a, b, resolve_group_name(group_name), engine=engine or None)


@gemm_reduce_scatter.register_fake
def _gemm_reduce_scatter_fake(a: Tensor, b: Tensor, group_name: str, engine: str) -> Tensor:
    world_size = resolve_group_name(group_name).size()
    check_scatter(a.shape[0], world_size, 0)  # the same ValueError at trace time as eagerly
    return a.new_empty((a.shape[0] // world_size, b.shape[1]))


def _setup_context(ctx, inputs, output) -> None:
    a, b, group_name, _engine = inputs
    ctx.save_for_backward(a, b)
    ctx.group_name = group_name


def _matmul_grads(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
    """Gradients of ``a @ b`` for a replicated ``grad_out`` (no communication)."""
    a, b = ctx.saved_tensors
    grad_a = grad_out @ b.t() if ctx.needs_input_grad[0] else None
    grad_b = a.t() @ grad_out if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None, None


def all_gather_rows(t: Tensor, group_name: str) -> Tensor:
    """Concatenation along dim 0 of every rank's ``t`` (rank order), traceable by torch.compile."""
    world_size = resolve_group_name(group_name).size()
    gathered = torch.ops._c10d_functional.all_gather_into_tensor(t.contiguous(), world_size, group_name)
    return torch.ops._c10d_functional.wait_tensor(gathered)


def _reduce_scatter_backward(ctx, grad_out: Tensor):
    return _matmul_grads(ctx, all_gather_rows(grad_out, ctx.group_name))


gemm_all_reduce.register_autograd(_matmul_grads, setup_context=_setup_context)
gemm_reduce_scatter.register_autograd(_reduce_scatter_backward, setup_context=_setup_context)


# -- the fused residual forms -------------------------------------------------------------
@torch.library.custom_op("flashoverlap::gemm_all_reduce_add", mutates_args=())
def gemm_all_reduce_add(a: Tensor, b: Tensor, residual: Tensor, group_name: str,
                        engine: str) -> Tensor:
    """``residual + a @ b`` summed over the group, the add fused into the restores."""
    a, b = _row_major(a, b)
    return ops.gemm_all_reduce(a, b, resolve_group_name(group_name), residual=residual.contiguous(),
                               engine=engine or None)


@gemm_all_reduce_add.register_fake
def _gemm_all_reduce_add_fake(a: Tensor, b: Tensor, residual: Tensor, group_name: str,
                              engine: str) -> Tensor:
    return _gemm_all_reduce_fake(a, b, group_name, engine)


@torch.library.custom_op("flashoverlap::gemm_reduce_scatter_add", mutates_args=())
def gemm_reduce_scatter_add(a: Tensor, b: Tensor, residual: Tensor, group_name: str,
                            engine: str) -> Tensor:
    """``residual +`` rank ``r``'s rows of ``a @ b`` summed over the group, fused."""
    a, b = _row_major(a, b)
    return ops.gemm_reduce_scatter(a, b, resolve_group_name(group_name),
                                   residual=residual.contiguous(), engine=engine or None)


@gemm_reduce_scatter_add.register_fake
def _gemm_reduce_scatter_add_fake(a: Tensor, b: Tensor, residual: Tensor, group_name: str,
                                  engine: str) -> Tensor:
    return _gemm_reduce_scatter_fake(a, b, group_name, engine)


def _setup_context_add(ctx, inputs, output) -> None:
    a, b, _residual, group_name, _engine = inputs
    ctx.save_for_backward(a, b)
    ctx.group_name = group_name


def _all_reduce_add_backward(ctx, grad_out: Tensor):
    grad_a, grad_b, _, _ = _matmul_grads(ctx, grad_out)
    return grad_a, grad_b, grad_out if ctx.needs_input_grad[2] else None, None, None


def _reduce_scatter_add_backward(ctx, grad_out: Tensor):
    grad_a, grad_b, _, _ = _matmul_grads(ctx, all_gather_rows(grad_out, ctx.group_name))
    return grad_a, grad_b, grad_out if ctx.needs_input_grad[2] else None, None, None


gemm_all_reduce_add.register_autograd(_all_reduce_add_backward, setup_context=_setup_context_add)
gemm_reduce_scatter_add.register_autograd(_reduce_scatter_add_backward,
                                          setup_context=_setup_context_add)
