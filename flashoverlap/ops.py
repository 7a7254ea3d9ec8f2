"""Public functional ops: argument checks, engine choice, plan lookup, dispatch.

``gemm_all_reduce`` and ``gemm_reduce_scatter`` behave like ``torch.matmul`` followed by
``torch.distributed.all_reduce`` / ``reduce_scatter_tensor`` on the given group: the result is
ordered on the caller's current stream, every rank must call them in the same order with the
same shapes, and bad input raises before anything is launched.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, get_args

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .checks import (
    byte_extent,
    check_gemm_operands,
    check_group,
    check_out,
    check_out_aliasing,
    check_residual_aliasing,
    check_residual_meta,
    check_scatter,
    spans_intersect,
)
from .agreement import agreed_dispatch  # agreement hook (issue 12)
from .dist_utils import register_group_cache  # group-lifetime hook (issue 12)
from .plan import OverlapPlan, PlanConfig, Problem, make_plan
from .sequential import run_sequential

EngineName = Literal["overlap", "reference", "sequential"]
ENGINES: tuple[str, ...] = get_args(EngineName)


@functools.lru_cache(maxsize=256)
def get_plan(problem: Problem, config: PlanConfig) -> OverlapPlan:
    """Plans are pure functions of (problem, config): build each once per process."""
    return make_plan(problem, config)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_engine(engine: str | None, device: torch.device, group: ProcessGroup) -> str:
    """The engine to run: the requested one (checked), or the best available."""
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} or None, got {engine!r}")
    if engine in ("reference", "sequential"):
        return engine
    from .availability import overlap_unavailable_reason

    reason = overlap_unavailable_reason(device, group)
    if engine == "overlap" and reason is not None:
        raise ValueError(f"the overlap engine cannot run here: {reason}")
    return "overlap" if reason is None else "reference"


def plan_for(problem: Problem, device: torch.device, config: PlanConfig | None = None) -> OverlapPlan:
    """The plan an engine runs: ``config`` if given, else a tuned or analytic default."""
    if config is None:
        if device.type == "cuda":
            from .engine import choose_config

            config = choose_config(problem, device)
        else:
            from .defaults import cpu_plan_config

            config = cpu_plan_config(problem)
    return get_plan(problem, config)


@dataclasses.dataclass(frozen=True)
class _Dispatch:
    """What a validated call signature resolves to: engine, group, output shape, plan."""

    engine: str
    group: ProcessGroup
    out_shape: tuple[int, int]
    plan: OverlapPlan | None  # None for the sequential engine
    force_overlap: bool
    # Byte extents of a, b, out and residual (0 where absent): the per-call aliasing checks
    # are then pointer arithmetic.
    extents: tuple[int, int, int, int] = (0, 0, 0, 0)


# Validated call signatures -> dispatch.  The checks depend only on metadata (shapes,
# strides, dtypes, devices, the group, the engine and config, out's metadata), so a signature
# seen once needs no second check: this keeps the host cost of a call near that of
# torch.matmul + the collective, which matters for small M where the GPU work is ~20 us.
_DISPATCH: dict[tuple, _Dispatch] = {}
# group-lifetime hook (issue 12): _DISPATCH holds groups; let go of them at exit / new world.
register_group_cache(_DISPATCH.clear)


def _signature(op, a, b, group, out, engine, config, scatter_dim, residual) -> tuple | None:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return None  # let the checks raise
    out_meta = None if out is None else (
        (out.shape, out.dtype, out.device, out.is_contiguous()) if isinstance(out, torch.Tensor)
        else None)
    if out is not None and out_meta is None:
        return None
    res_meta = None if residual is None else (
        (residual.shape, residual.stride(), residual.dtype, residual.device)
        if isinstance(residual, torch.Tensor) else None)
    if residual is not None and res_meta is None:
        return None
    if not dist.is_initialized():
        return None
    if group is None:  # the current world: a new object after destroy + init_process_group
        group = dist.group.WORLD
    current = torch.cuda.current_device() if a.device.type == "cuda" else None
    key = (op, a.shape, a.stride(), a.dtype, a.device, b.shape, b.stride(), b.dtype,
           b.device, group, out_meta, res_meta, engine, config, scatter_dim, current)
    try:
        hash(key)
        return key
    except TypeError:  # an unhashable config or group: no memo, full checks every call
        return None


@agreed_dispatch  # agreement hook (issue 12): the ranks agree on each new call signature
def _dispatch(op, a, b, group, out, engine, config, scatter_dim, residual) -> _Dispatch:
    M, N, K = check_gemm_operands(a, b)
    info = check_group(group, a.device)
    W = info.world_size
    if op == "reduce_scatter":
        check_scatter(M, W, scatter_dim)
    out_shape = (M // W if op == "reduce_scatter" else M, N)
    check_out(out, out_shape, a)
    if residual is not None:
        check_residual_meta(residual, out_shape, a)
    if config is not None and not isinstance(config, PlanConfig):
        raise TypeError(f"config must be a PlanConfig or None, got {type(config).__name__}")
    name = resolve_engine(engine, a.device, info.group)
    plan = None
    if name != "sequential":
        problem = Problem(M=M, N=N, K=K, dtype=_dtype_name(a.dtype), world_size=W, op=op)
        plan = plan_for(problem, a.device, config)  # ValueError on an inconsistent config
    extents = (byte_extent(a), byte_extent(b), 0 if out is None else byte_extent(out),
               0 if residual is None else byte_extent(residual))
    # An explicit config is the caller's decision: run it even where the model sees no gain.
    return _Dispatch(name, info.group, out_shape, plan, force_overlap=config is not None,
                     extents=extents)


def _gemm_collective(
    op: str,
    a: torch.Tensor,
    b: torch.Tensor,
    group: ProcessGroup | None,
    out: torch.Tensor | None,
    engine: str | None,
    config: PlanConfig | None,
    scatter_dim: int = 0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    key = _signature(op, a, b, group, out, engine, config, scatter_dim, residual)
    d = _DISPATCH.get(key) if key is not None else None
    if d is None:
        d = _dispatch(op, a, b, group, out, engine, config, scatter_dim, residual)
        if key is not None:
            if len(_DISPATCH) > 4096:  # unbounded shape churn: start over
                _DISPATCH.clear()
            _DISPATCH[key] = d
    # Aliasing depends on addresses, not metadata: checked every call, by pointer arithmetic
    # on the memoised extents (the full checks only build the error message).
    ext_a, ext_b, ext_out, ext_res = d.extents
    in_place = False
    if out is None:
        out = torch.empty(d.out_shape, dtype=a.dtype, device=a.device)
    else:
        o = out.data_ptr()
        if (spans_intersect(o, ext_out, a.data_ptr(), ext_a)
                or spans_intersect(o, ext_out, b.data_ptr(), ext_b)):
            check_out_aliasing(out, a, b)
        if residual is not None and spans_intersect(o, ext_out, residual.data_ptr(), ext_res):
            check_residual_aliasing(residual, out)
            in_place = True
    if d.engine == "overlap":
        from . import engine

        if engine.decide_overlap(d.plan, a.device, d.group, d.force_overlap):
            # The residual add is fused into the restores.
            return engine.run_overlap(d.plan, a, b, d.group, out, force_overlap=True,
                                      residual=residual)
    # Unfused residual: the result first (into a scratch tensor when out *is* the residual),
    # then one add, rounded once like the fused restore (fp32 add of the two values).
    target = torch.empty_like(out) if in_place else out
    if d.engine == "sequential":
        run_sequential(op, a, b, d.group, target)
    elif d.engine == "reference":
        from .reference import run_reference

        run_reference(d.plan, a, b, d.group, target)
    else:
        from . import engine

        engine.run_sequential_nccl(d.plan, a, b, d.group, target)
    if residual is not None:
        torch.add(target, residual, out=out)
    return out


def gemm_all_reduce(
    a: torch.Tensor,
    b: torch.Tensor,
    group: ProcessGroup | None = None,
    *,
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    engine: EngineName | None = None,
    config: PlanConfig | None = None,
) -> torch.Tensor:
    """Sum over ``group`` of ``a @ b`` (plus ``residual``), overlapping the AllReduce with the GEMM.

    Args:
        a: ``[M, K]`` row-major, float16 / bfloat16 / float32.
        b: ``[K, N]`` row-major, or ``weight.t()`` of a row-major ``[N, K]`` weight (no copy).
        group: process group (default: the world).
        out: optional ``[M, N]`` contiguous output (not overlapping ``a`` or ``b``).
        residual: optional ``[M, N]`` row-major tensor added to the reduced result, fused
            into the overlap engine's restores (a transformer block's residual stream);
            ``out=residual`` updates it in place.
        engine: ``"overlap"`` (CUDA + NCCL), ``"reference"`` (plan executed with torch ops,
            any backend), ``"sequential"`` (GEMM then AllReduce); ``None`` picks overlap where
            it can run, else reference.
        config: an explicit :class:`PlanConfig` (tile, CTAs, groups); default: tuned or analytic.

    Returns:
        ``[M, N]`` tensor in the inputs' dtype, identical on every rank.
    """
    return _gemm_collective("all_reduce", a, b, group, out, engine, config, residual=residual)


def gemm_reduce_scatter(
    a: torch.Tensor,
    b: torch.Tensor,
    group: ProcessGroup | None = None,
    *,
    scatter_dim: int = 0,
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    engine: EngineName | None = None,
    config: PlanConfig | None = None,
) -> torch.Tensor:
    """Rank ``r``'s rows ``[r*M/W, (r+1)*M/W)`` of the sum over ``group`` of ``a @ b``.

    Same as ``torch.distributed.reduce_scatter_tensor(out, a @ b, group=group)``, with the
    ReduceScatter overlapped with the GEMM.  ``M`` must be divisible by the group size and
    ``scatter_dim`` must be 0.  ``residual`` (``[M / W, N]``, this rank's rows) is added to
    the shard.  Other arguments as in :func:`gemm_all_reduce`.

    Returns:
        ``[M / W, N]`` tensor in the inputs' dtype.
    """
    return _gemm_collective("reduce_scatter", a, b, group, out, engine, config, scatter_dim,
                            residual)
