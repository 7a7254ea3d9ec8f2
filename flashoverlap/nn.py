"""Tensor-parallel layers on the overlapped ops: :class:`RowParallelLinear` and its functional form.

A row-parallel linear (Megatron's ``RowParallelLinear``, torch's ``RowwiseParallel``) holds the
columns ``[r*K/W, (r+1)*K/W)`` of a full ``[N, K]`` weight on rank ``r`` and receives its input
already sharded on the last dim (the output of a column-parallel layer).  Every rank computes a
partial ``x_r @ w_r.T``; the sum over ranks is the layer's output.  That sum is the collective
:func:`flashoverlap.gemm_all_reduce` overlaps with the GEMM.

Two output forms:

* ``sequence_parallel=False`` (AllReduce): the output ``[..., N]`` is replicated on every rank.
* ``sequence_parallel=True`` (ReduceScatter, Megatron sequence parallelism with the
  *sequence-first* layout): the input ``[S, *rest, K/W]`` is flattened to rows ``[S*prod(rest),
  K/W]`` in memory order; rank ``r`` receives the rows of the sequence positions
  ``[r*S/W, (r+1)*S/W)`` and the output is ``[S/W, *rest, N]``.  For ``[S, B, H]`` inputs that
  is exactly ``torch.chunk(full_output, W, dim=0)[r]``; ``S`` (dim 0) must be divisible by ``W``.
  Batch-first ``[B, S, H]`` inputs are scattered along the batch dim; use
  :func:`row_parallel_linear` with ``scatter_dim=1`` to scatter the sequence instead (a copy
  moves dim 1 to the front first).

The bias is replicated and added once, after the reduction.  With ``sequence_parallel`` its
gradient on each rank covers that rank's rows only: sum it over the group (as Megatron does
for sequence-parallel parameters) before the optimizer step.  Backward (registered on the
custom op in :mod:`flashoverlap.library_ops`): AllReduce form ``grad_x = grad_out @ w_r``,
``grad_w_r = grad_out.T @ x_r`` (no communication, ``grad_out`` is replicated); ReduceScatter
form all-gathers ``grad_out`` along dim 0 first.  The input gradient stays sharded on the last
dim; the weight gradient is the local shard's.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from . import library_ops
from .collectives import ALL_REDUCE, REDUCE_SCATTER
from .dist_utils import resolve_group
from .ops import ENGINES, EngineName

__all__ = ["RowParallelLinear", "row_parallel_linear"]


def check_engine(engine: str | None) -> None:
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} or None, got {engine!r}")


class ShardedLinear(nn.Module):
    """What :class:`RowParallelLinear` and :class:`~flashoverlap.ColumnParallelLinear` share:
    the process group kept by name, the engine, the sharded weight and bias parameters and
    ``nn.Linear``'s initialization of the full layer (bound ``1/sqrt(in_features)``).

    The group is kept as its name, not the object: what the custom ops take, what Dynamo
    traces freely, and what deepcopy / pickle of the module survive.  ``ZERO_BIAS``: the bias
    starts at zero (a replicated bias added after a reduction: every rank starts with the
    same one, as Megatron does) instead of nn.Linear's distribution."""

    ZERO_BIAS = False
    in_features: int

    def _make_parameters(self, group: ProcessGroup, sequence_parallel: bool, engine: str | None,
                         weight_shape: tuple[int, int], bias: bool,
                         device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        self.sequence_parallel = sequence_parallel
        self.engine = engine
        self.group_name: str = group.group_name
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(*weight_shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(weight_shape[0], **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def group(self) -> ProcessGroup:
        """The tensor-parallel process group."""
        return library_ops.resolve_group_name(self.group_name)

    def reset_parameters(self) -> None:
        """nn.Linear's distribution for the full layer; the bias too, or zero (``ZERO_BIAS``)."""
        if self.weight.is_meta:
            return
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            if self.ZERO_BIAS:
                nn.init.zeros_(self.bias)
            else:
                nn.init.uniform_(self.bias, -bound, bound)


def row_parallel_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    group_name: str,
    world_size: int,
    *,
    scatter_dim: int | None = None,
    engine: EngineName | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """``sum_r x_r @ weight_r.T + bias (+ residual)`` over the group named ``group_name``.

    Args:
        x: ``[..., K_local]``, this rank's slice of the input's last dim.
        weight: ``[N, K_local]`` local shard (``nn.Linear`` layout).
        bias: ``[N]`` replicated, or ``None``; added once after the reduction.
        group_name: ``group.group_name`` of the tensor-parallel group (traceable as a string).
        world_size: the group's size (a Python int, so compiled code needs no group lookup).
        scatter_dim: ``None`` for the AllReduce form (output ``[..., N]`` on every rank); a dim
            ``d`` of the output other than the last for the ReduceScatter form: rank ``r`` gets
            ``torch.chunk(output, world_size, dim=d)[r]``; ``x.shape[d]`` must be divisible by
            ``world_size``.  ``d = 0`` needs no copy.
        engine: as in :func:`flashoverlap.gemm_all_reduce` (``None``: best available).
        residual: a tensor of the output's shape added to it (a transformer block's residual
            stream), added without a pass of its own (the AllReduce form treats it as
            replicated, as a tensor-parallel block's residual stream is); a fresh tensor is
            returned.
    """
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input has {x.shape[-1]} features on its last dim but the weight shard "
            f"{tuple(weight.shape)} expects {weight.shape[1]} (in_features / world size)"
        )
    N, K = weight.shape
    op = library_ops.gemm_collective_op
    op_engine = engine or ""
    if scatter_dim is None:
        res = None
        if residual is not None:
            _check_residual_shape(residual, (*x.shape[:-1], N))
            res = residual.reshape(-1, N)
        # The residual stream of a tensor-parallel block is replicated: rank 0 adds it in
        # its GEMM epilogue and the AllReduce carries it (no pass of its own).
        y = op(x.reshape(-1, K), weight.t(), res, ALL_REDUCE.name, group_name, op_engine, "",
               True)
        y = y.view(*x.shape[:-1], N)
    else:
        d = scatter_dim + x.dim() if scatter_dim < 0 else scatter_dim
        if not 0 <= d < x.dim() - 1:
            raise ValueError(
                f"scatter_dim={scatter_dim} must name a leading dim of the {x.dim()}-D input "
                f"{tuple(x.shape)} (not the feature dim)"
            )
        if x.shape[d] % world_size:
            raise ValueError(
                f"the ReduceScatter form (sequence parallel) splits dim {d} of the input "
                f"{tuple(x.shape)} over {world_size} ranks: {x.shape[d]} is not divisible by "
                f"{world_size}"
            )
        rows_first = x.movedim(d, 0) if d else x  # reshape below copies only when d != 0
        out_shape = (rows_first.shape[0] // world_size, *rows_first.shape[1:-1], N)
        res = None
        if residual is not None:
            expected = list(out_shape)
            if d:
                expected.insert(d, expected.pop(0))
            _check_residual_shape(residual, tuple(expected))
            res = (residual.movedim(d, 0) if d else residual).reshape(-1, N)
        y = op(rows_first.reshape(-1, K), weight.t(), res, REDUCE_SCATTER.name, group_name,
               op_engine, "", False)
        y = y.view(out_shape)
        if d:
            y = y.movedim(0, d)
    if bias is not None:
        y = y + bias
    return y


def _check_residual_shape(residual: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(residual.shape) != tuple(shape):
        raise ValueError(f"residual has shape {tuple(residual.shape)}; the layer's output is "
                         f"{tuple(shape)}")


class RowParallelLinear(ShardedLinear):
    """``nn.Linear`` whose input features are sharded over ``group``; GEMM and collective overlap.

    Args:
        in_features: the *full* input size ``K``; this rank holds ``K / W`` of it.
        out_features: ``N``.
        bias: add a replicated ``[N]`` bias once after the reduction (zero-initialised so that
            every rank starts with the same bias, as Megatron does).
        group: tensor-parallel process group (default: the world).
        sequence_parallel: ReduceScatter along dim 0 instead of AllReduce (module docstring).
        engine: ``"overlap"``, ``"reference"``, ``"sequential"`` or ``None`` (best available).

    Shapes: input ``[..., K/W]``; weight ``[N, K/W]``; output ``[..., N]``, or with
    ``sequence_parallel`` ``[S/W, ..., N]`` for an input ``[S, ..., K/W]``.
    """

    ZERO_BIAS = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group: ProcessGroup | None = None,
        sequence_parallel: bool = False,
        engine: EngineName | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_engine(engine)
        group = resolve_group(group)
        self.world_size = dist.get_world_size(group)
        if in_features % self.world_size:
            raise ValueError(
                f"in_features={in_features} is not divisible by the group size {self.world_size}"
            )
        self.in_features = in_features
        self.in_features_per_rank = in_features // self.world_size
        self.out_features = out_features
        self._make_parameters(group, sequence_parallel, engine,
                              (out_features, self.in_features_per_rank), bias, device, dtype)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The layer's output, plus ``residual`` (output-shaped) when given, fused."""
        return row_parallel_linear(
            x, self.weight, self.bias, self.group_name, self.world_size,
            scatter_dim=0 if self.sequence_parallel else None, engine=self.engine,
            residual=residual,
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group: ProcessGroup | None = None,
        *,
        sequence_parallel: bool = False,
        engine: EngineName | None = None,
    ) -> RowParallelLinear:
        """Wrap an ``nn.Linear`` whose weight is *already* this rank's shard ``[N, K/W]``.

        The new module shares ``linear``'s Parameter objects (optimizer state stays valid).
        """
        world_size = dist.get_world_size(resolve_group(group))
        layer = cls(
            linear.in_features * world_size, linear.out_features, bias=False, group=group,
            sequence_parallel=sequence_parallel, engine=engine, device="meta",
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    @classmethod
    def shard_from_full(
        cls,
        full_linear: nn.Linear,
        group: ProcessGroup | None = None,
        *,
        sequence_parallel: bool = False,
        engine: EngineName | None = None,
    ) -> RowParallelLinear:
        """A new layer holding this rank's columns of ``full_linear``'s ``[N, K]`` weight (copied)."""
        group = resolve_group(group)
        rank = dist.get_rank(group)
        layer = cls(
            full_linear.in_features, full_linear.out_features, bias=full_linear.bias is not None,
            group=group, sequence_parallel=sequence_parallel, engine=engine, device="meta",
        )  # raises if in_features does not divide over the group
        K_per_rank = layer.in_features_per_rank
        with torch.no_grad():
            shard = full_linear.weight[:, rank * K_per_rank : (rank + 1) * K_per_rank]
            layer.weight = nn.Parameter(shard.clone(memory_format=torch.contiguous_format),
                                        requires_grad=full_linear.weight.requires_grad)
            if full_linear.bias is not None:
                layer.bias = nn.Parameter(full_linear.bias.detach().clone(),
                                          requires_grad=full_linear.bias.requires_grad)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (per rank {self.in_features_per_rank}), "
            f"out_features={self.out_features}, bias={self.bias is not None}, "
            f"world_size={self.world_size}, sequence_parallel={self.sequence_parallel}, "
            f"engine={self.engine or 'auto'}"
        )
