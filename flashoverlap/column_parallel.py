"""Column-parallel linear layer on the overlapped ops: :class:`ColumnParallelLinear` and its
functional form :func:`column_parallel_linear`.

A column-parallel linear (Megatron's ``ColumnParallelLinear``, torch's ``ColwiseParallel``)
holds the rows ``[r*N/W, (r+1)*N/W)`` of a full ``[N, K]`` weight (and of the bias) on rank
``r``; its output is sharded on the last dim, which is what a following
:class:`~flashoverlap.nn.RowParallelLinear` takes.

* ``sequence_parallel=False``: the input ``[..., K]`` is replicated; forward is the local GEMM
  ``x @ w_r.T + b_r`` (no communication).  Backward: every rank's input gradient is a partial
  sum, so ``grad_x = all_reduce(grad_y @ w_r)`` -- one overlapped GEMM + AllReduce
  (``flashoverlap::gemm_collective``), ``grad_w_r = grad_y.T @ x``.
* ``sequence_parallel=True`` (Megatron's sequence parallelism, sequence-first): the input
  ``[S/W, *rest, K]`` holds this rank's sequence positions; its rows (in memory order) are
  all-gathered and multiplied, overlapped: :func:`flashoverlap.all_gather_gemm`, output
  ``[S, *rest, N/W]``.  Backward: ``grad_x`` is the ReduceScatter of ``grad_y @ w_r`` (one
  overlapped GEMM + ReduceScatter); ``grad_w_r = x_full.T @ grad_y`` from the gathered input
  the forward kept.

Both forms are ``torch.library`` ops with fakes and autograd (``torch.compile(fullgraph=True)``
traces them as single nodes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from . import library_ops
from .collectives import ALL_REDUCE
from .dist_utils import resolve_group
from .gather_ops import all_gather_gemm_op
from .nn import ShardedLinear, check_engine

__all__ = ["ColumnParallelLinear", "column_parallel_linear", "column_parallel_matmul_op"]


@torch.library.custom_op("flashoverlap::column_parallel_matmul", mutates_args=())
def column_parallel_matmul_op(x: Tensor, weight: Tensor, group_name: str, engine: str) -> Tensor:
    """``x @ weight.T`` whose input gradient is all-reduced over the group (overlapped)."""
    return x @ weight.t()


@column_parallel_matmul_op.register_fake
def _column_parallel_matmul_fake(x: Tensor, weight: Tensor, group_name: str,
                                 engine: str) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


def _cp_setup(ctx, inputs, output) -> None:
    x, weight, group_name, engine = inputs
    ctx.save_for_backward(x, weight)
    ctx.group_name, ctx.engine = group_name, engine


def _cp_backward(ctx, grad_y: Tensor):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        # grad_y [T, N/W] @ weight [N/W, K]: a row-major [K', N'] operand, all-reduced
        grad_x = library_ops.gemm_collective_op(grad_y.contiguous(), weight, None, ALL_REDUCE.name,
                                                ctx.group_name, ctx.engine, "", False)
    if ctx.needs_input_grad[1]:
        grad_w = grad_y.t() @ x
    return grad_x, grad_w, None, None


column_parallel_matmul_op.register_autograd(_cp_backward, setup_context=_cp_setup)


def column_parallel_linear(x: Tensor, weight: Tensor, bias: Tensor | None, group_name: str,
                           world_size: int, *, sequence_parallel: bool = False,
                           engine: str | None = None) -> Tensor:
    """``x @ weight.T + bias`` with ``weight`` ``[N/W, K]`` and ``bias`` ``[N/W]`` this rank's
    rows (module docstring).  ``sequence_parallel``: ``x`` ``[S/W, *rest, K]`` is
    all-gathered along dim 0 (in memory order) first; output ``[S, *rest, N/W]``."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features on its last dim but the weight "
                         f"shard {tuple(weight.shape)} expects {weight.shape[1]}")
    if sequence_parallel and x.dim() < 2:
        raise ValueError("the sequence-parallel form needs an input with a sequence dim "
                         f"(dim 0) and a feature dim, got shape {tuple(x.shape)}")
    n_local, K = weight.shape
    x2 = x.reshape(-1, K)
    if sequence_parallel:
        y, _ = all_gather_gemm_op(x2, weight.t(), group_name, engine or "", "")
        y = y.view(x.shape[0] * world_size, *x.shape[1:-1], n_local)
    else:
        y = column_parallel_matmul_op(x2, weight, group_name, engine or "")
        y = y.view(*x.shape[:-1], n_local)
    if bias is not None:
        y = y + bias
    return y


class ColumnParallelLinear(ShardedLinear):
    """``nn.Linear`` whose output features are sharded over ``group``.

    Args:
        in_features: ``K`` (replicated input features).
        out_features: the *full* ``N``; this rank holds ``N / W`` of it.
        bias: a sharded ``[N/W]`` bias.
        group: tensor-parallel process group (default: the world).
        sequence_parallel: the input is sharded along dim 0 and all-gathered (overlapped with
            the GEMM); see the module docstring.
        engine: ``"overlap"``, ``"reference"``, ``"sequential"`` or ``None`` (best available).

    Shapes: weight ``[N/W, K]``; input ``[..., K]`` -> ``[..., N/W]``, or with
    ``sequence_parallel`` ``[S/W, ..., K]`` -> ``[S, ..., N/W]``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group: ProcessGroup | None = None, sequence_parallel: bool = False,
                 engine: str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_engine(engine)
        group = resolve_group(group)
        self.world_size = dist.get_world_size(group)
        if out_features % self.world_size:
            raise ValueError(f"out_features={out_features} is not divisible by the group size "
                             f"{self.world_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.out_features_per_rank = out_features // self.world_size
        self._make_parameters(group, sequence_parallel, engine,
                              (self.out_features_per_rank, in_features), bias, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return column_parallel_linear(x, self.weight, self.bias, self.group_name,
                                      self.world_size, sequence_parallel=self.sequence_parallel,
                                      engine=self.engine)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: ProcessGroup | None = None, *,
                    sequence_parallel: bool = False,
                    engine: str | None = None) -> ColumnParallelLinear:
        """Wrap an ``nn.Linear`` whose weight is *already* this rank's shard ``[N/W, K]``
        (its Parameter objects are shared)."""
        world_size = dist.get_world_size(resolve_group(group))
        layer = cls(linear.in_features, linear.out_features * world_size, bias=False,
                    group=group, sequence_parallel=sequence_parallel, engine=engine,
                    device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    @classmethod
    def shard_from_full(cls, full_linear: nn.Linear, group: ProcessGroup | None = None, *,
                        sequence_parallel: bool = False,
                        engine: str | None = None) -> ColumnParallelLinear:
        """A new layer holding this rank's rows of ``full_linear``'s weight and bias (copied)."""
        group = resolve_group(group)
        rank = dist.get_rank(group)
        layer = cls(full_linear.in_features, full_linear.out_features,
                    bias=full_linear.bias is not None, group=group,
                    sequence_parallel=sequence_parallel, engine=engine, device="meta")
        n = layer.out_features_per_rank
        rows = slice(rank * n, (rank + 1) * n)
        with torch.no_grad():
            layer.weight = nn.Parameter(full_linear.weight[rows].clone(),
                                        requires_grad=full_linear.weight.requires_grad)
            if full_linear.bias is not None:
                layer.bias = nn.Parameter(full_linear.bias[rows].clone(),
                                          requires_grad=full_linear.bias.requires_grad)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(per rank {self.out_features_per_rank}), bias={self.bias is not None}, "
                f"world_size={self.world_size}, sequence_parallel={self.sequence_parallel}, "
                f"engine={self.engine or 'auto'}")
