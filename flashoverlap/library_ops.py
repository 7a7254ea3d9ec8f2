"""``torch.library`` custom op: the overlapped GEMM + collective as one graph node.

Registered when ``flashoverlap`` is imported::

    flashoverlap::gemm_collective(Tensor a, Tensor b, Tensor? residual, str collective,
                                  str group_name, str engine, str config,
                                  bool residual_replicated) -> Tensor

``collective`` names a registered :class:`flashoverlap.collectives.Collective` (``"all_reduce"``,
``"reduce_scatter"``, or one of yours after :func:`flashoverlap.collectives.register`); the
process group travels by name, as in ``torch.distributed``'s functional collectives, and the
plan config as JSON (``""``: tuned or analytic), so a traced graph holds only strings.
``engine`` is ``"overlap"``, ``"reference"``, ``"sequential"`` or ``""`` (the best available).
The op mutates nothing and returns a fresh tensor of the collective's result shape.

Why a custom op: Dynamo cannot trace through the engine (NCCL through ctypes, streams, Triton
launches), so under ``torch.compile(fullgraph=True)`` the op must be opaque; the fake
implementation gives the output shape without running anything (the group size comes from
the live group named ``group_name``).  A compiler cannot fuse an add into an opaque op, which
is why ``residual`` is an argument (added in the GEMM epilogue or right after each group).

Autograd is registered on the op (``register_autograd``), so eager calls -- the functional
ops route inputs that require grad here -- and compiled graphs share one backward, under
tensor-parallel conventions (DTensor / Megatron): the collective's
:meth:`~flashoverlap.collectives.Collective.backward` turns the result gradient into the
gradient of this rank's partial product (AllReduce: identity on the replicated gradient;
ReduceScatter: all-gather along rows), then ``grad_a = g @ b.T`` and ``grad_b = a.T @ g``
(:meth:`~flashoverlap.collectives.Collective.backward_gemms`; ReduceScatter runs the gather and
``g @ b.T`` as one overlapped ``flashoverlap::all_gather_gemm``); ``grad_residual`` is the
result gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from . import collectives, ops

__all__ = ["gemm_collective_op", "resolve_group_name"]


def resolve_group_name(group_name: str) -> ProcessGroup:
    """The live process group registered under ``group_name`` (``group.group_name``)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _row_major(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Accept whatever strides a compiler hands us; copies only layouts the GEMM can't read
    (``a`` with unit stride on K; ``b`` row-major ``[K, N]`` or a row-major ``[N, K]``'s
    ``.t()``)."""
    if a.dim() == 2 and a.size(0) > 1 and a.stride(1) != 1:
        a = a.contiguous()
    if b.dim() == 2 and b.stride(0) != 1 and b.stride(1) != 1:
        b = b.contiguous()
    return a, b


@torch.library.custom_op("flashoverlap::gemm_collective", mutates_args=())
def gemm_collective_op(a: Tensor, b: Tensor, residual: Tensor | None, collective: str,
                       group_name: str, engine: str, config: str,
                       residual_replicated: bool) -> Tensor:
    """``collective(a @ b)`` (+ ``residual``) over the group named ``group_name``."""
    a, b = _row_major(a, b)
    if residual is not None and residual.dim() == 2 and residual.size(1) > 1 \
            and residual.stride(1) != 1:
        residual = residual.contiguous()
    return ops._run(collectives.get(collective), a, b, resolve_group_name(group_name), None,
                    residual, residual_replicated, engine or None, ops.config_from_json(config))


@gemm_collective_op.register_fake
def _gemm_collective_fake(a: Tensor, b: Tensor, residual: Tensor | None, collective: str,
                          group_name: str, engine: str, config: str,
                          residual_replicated: bool) -> Tensor:
    coll = collectives.get(collective)
    world_size = resolve_group_name(group_name).size()
    M, N = a.shape[0], b.shape[1]
    coll.check_problem(M, N, world_size)  # the same ValueError at trace time as eagerly
    return a.new_empty((coll.result_rows(M, world_size), N))


def _setup_context(ctx, inputs, output) -> None:
    a, b, residual, collective, group_name, engine, _config, _replicated = inputs
    ctx.save_for_backward(a, b)
    ctx.collective = collective
    ctx.group_name = group_name
    ctx.engine = engine


def _backward(ctx, grad_out: Tensor):
    a, b = ctx.saved_tensors
    world_size = resolve_group_name(ctx.group_name).size()
    grad_a, grad_b = collectives.get(ctx.collective).backward_gemms(
        grad_out, a, b, ctx.group_name, world_size, ctx.engine,
        (ctx.needs_input_grad[0], ctx.needs_input_grad[1]))
    grad_residual = grad_out if ctx.needs_input_grad[2] else None
    return grad_a, grad_b, grad_residual, None, None, None, None, None


gemm_collective_op.register_autograd(_backward, setup_context=_setup_context)
