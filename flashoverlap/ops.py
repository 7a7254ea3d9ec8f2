"""Public functional ops: validate once into a call record, then run it.

``gemm_collective(a, b, collective)`` behaves like ``torch.matmul`` followed by the
``torch.distributed`` call the collective replaces (``gemm_all_reduce`` and
``gemm_reduce_scatter`` are the built-in forms): the result is ordered on the caller's current
stream, every rank must call it in the same order with the same shapes, and bad input raises
``TypeError``/``ValueError`` before anything is launched.

Validation happens once per call *signature* (shapes, strides, dtypes, devices, group, engine,
config, the metadata of ``out`` and ``residual``): the checks, the policy's decision
(:mod:`flashoverlap.policy`) and the cross-rank agreement are memoised into a frozen
:class:`Call` that the engines trust.  A later call with the same signature pays a dictionary
lookup and the aliasing check (pointer arithmetic on memoised byte extents): host time per
call stays near ``torch.matmul`` + the collective's, which matters for small ``M``.

Autograd: when an input requires grad and grad mode is on, the call goes through the
``torch.library`` op ``flashoverlap::gemm_collective`` (:mod:`flashoverlap.library_ops`), whose
backward follows tensor-parallel conventions (the collective's
:meth:`~flashoverlap.collectives.Collective.backward`, then the GEMM's); the functional op and
``torch.ops.flashoverlap`` therefore share one path on every engine.  ``out=`` cannot be
differentiated (as for ``torch.matmul(out=...)``) and raises.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import torch
from torch.distributed import ProcessGroup
from torch.distributed import distributed_c10d as _c10d

from . import collectives
from . import engine as engines
from .checks import (
    byte_extent,
    check_gemm_operands,
    check_group,
    check_out,
    check_out_aliasing,
    check_residual_aliasing,
    check_residual_meta,
    spans_intersect,
)
from .collectives import Collective
from .dist_utils import register_group_cache
from .plan import OverlapPlan, PlanConfig
from .policy import ENGINES, Decision, agree, decide, resolve_engine  # noqa: F401 (re-export)

EngineName = Literal["overlap", "reference", "sequential"]

__all__ = ["ENGINES", "Call", "EngineName", "gemm_all_reduce", "gemm_collective",
           "gemm_reduce_scatter"]


@dataclasses.dataclass(frozen=True)
class Call:
    """A validated call signature and what it resolves to (lower layers trust it)."""

    collective: Collective
    decision: Decision
    group: ProcessGroup
    rank: int
    world_size: int
    out_shape: tuple[int, int]
    # Byte extents of a, b, out and residual (0 where absent): the per-call aliasing checks
    # are then pointer arithmetic.
    extents: tuple[int, int, int, int]

    @property
    def plan(self) -> OverlapPlan | None:
        return self.decision.plan


_CALLS: dict[tuple, Call] = {}
_FALLBACK_COMMS: dict[tuple[ProcessGroup, int], object] = {}
# Both hold process groups: released at exit and when a new world replaces a destroyed one,
# so no gloo worker thread outlives interpreter shutdown (dist_utils module docstring).
register_group_cache(_CALLS.clear)
register_group_cache(_FALLBACK_COMMS.clear)


def _meta(t: torch.Tensor) -> tuple:
    # (shape, strides, dtype, device index): contiguity follows from shape and strides;
    # get_device() is an int where .device builds a torch.device per call.
    return (t.shape, t.stride(), t.dtype, t.get_device())


def _world() -> ProcessGroup | None:
    # What ``dist.group.WORLD`` returns (None before init_process_group), without the
    # property machinery: this runs on every call.
    return _c10d._world.default_pg


def _signature(collective, a, b, group, out, residual, replicated, engine, config) -> tuple | None:
    """The memo key of a call (hashed once, by the lookup), or None where it has none.

    Built inline, every call: each piece is one C call or attribute load (1-2 us in all on
    the H200 host).  A non-tensor has no memo (the checks raise on it).
    """
    if group is None:  # the current world: a new object after destroy + init_process_group
        group = _world()
        if group is None:
            return None
    try:
        if type(a) is not torch.Tensor and not isinstance(a, torch.Tensor):
            return None
        device = a.get_device()
        return (collective, group, a.shape, a.stride(), a.dtype, device, b.shape, b.stride(),
                b.dtype, b.get_device(), None if out is None else _meta(out),
                None if residual is None else _meta(residual), bool(replicated), engine,
                config, torch._C._cuda_getDevice() if device >= 0 else -1)
    except (AttributeError, TypeError):
        return None  # b, out or residual is not a tensor: let the checks raise


def _validate(collective, a, b, group, out, residual, replicated, engine, config) -> Call:
    """Checks, decision and cross-rank agreement of a new call signature.

    A rank whose own checks fail still joins the agreement exchange with its error (its peers
    are waiting in it) and then raises: every rank learns why at once instead of one of them
    waiting for a collective that will never come (:mod:`flashoverlap.agreement`).
    """
    if not isinstance(collective, Collective):
        raise TypeError(f"collective must be a flashoverlap Collective, got "
                        f"{type(collective).__name__}")
    try:
        return _validate_checked(collective, a, b, group, out, residual, replicated, engine,
                                 config)
    except (TypeError, ValueError) as exc:
        from .agreement import RankMismatchError, join_after_local_error

        if not isinstance(exc, RankMismatchError):
            join_after_local_error(collective.name, a, b, group, exc)
        raise


def _validate_checked(collective, a, b, group, out, residual, replicated, engine,
                      config) -> Call:
    collectives.register(collective)  # a name stands for one collective on every rank
    M, N, K = check_gemm_operands(a, b)
    info = check_group(group, a.device)
    W = info.world_size
    collective.check_problem(M, N, W)
    out_shape = (collective.result_rows(M, W), N)
    check_out(out, out_shape, a)
    if residual is not None:
        check_residual_meta(residual, out_shape, a)
    decision = decide(collective, M, N, K, a.dtype, W, a.device, info.group, engine, config)
    if W > 1:
        agree(info.group, decision, ("collective", collective.name), ("M", M), ("N", N),
              ("K", K), ("dtype", str(a.dtype).removeprefix("torch.")), ("engine", engine),
              ("config", None if config is None else dataclasses.astuple(config)), ("out", out is not None), ("residual", residual is not None),
              ("residual_replicated", bool(replicated)))
    extents = (byte_extent(a), byte_extent(b), 0 if out is None else byte_extent(out),
               0 if residual is None else byte_extent(residual))
    return Call(collective, decision, info.group, info.rank, W, out_shape, extents)


def _fallback_comm(group: ProcessGroup, device: torch.device):
    comm = _FALLBACK_COMMS.get((group, device.index))
    if comm is None or comm.handle is None:  # first use, or destroy_communicators() since
        from .comm import get_communicator

        comm = _FALLBACK_COMMS[(group, device.index)] = get_communicator(group, device=device)
    return comm


def _run(collective, a, b, group, out, residual, replicated, engine, config) -> torch.Tensor:
    key = _signature(collective, a, b, group, out, residual, replicated, engine, config)
    try:
        call = _CALLS.get(key) if key is not None else None
    except TypeError:  # an unhashable config or group: no memo, full checks every call
        key = call = None
    if call is None:
        call = _validate(collective, a, b, group, out, residual, replicated, engine, config)
        if key is not None:
            if len(_CALLS) > 4096:  # unbounded shape churn: start over
                _CALLS.clear()
            _CALLS[key] = call
    # Aliasing depends on addresses, not metadata: checked every call by pointer arithmetic.
    ext_a, ext_b, ext_out, ext_res = call.extents
    if out is None:
        out = torch.empty(call.out_shape, dtype=a.dtype, device=a.device)
    else:
        o = out.data_ptr()
        if (spans_intersect(o, ext_out, a.data_ptr(), ext_a)
                or spans_intersect(o, ext_out, b.data_ptr(), ext_b)):
            check_out_aliasing(out, a, b)
        if residual is not None and spans_intersect(o, ext_out, residual.data_ptr(), ext_res):
            check_residual_aliasing(residual, out)
    d = call.decision
    if d.path == "overlap":
        return engines.run_overlap(d.plan, a, b, call.group, out, rank=call.rank,
                                  residual=residual, residual_replicated=replicated)
    if d.path == "reference":
        return engines.run_reference(d.plan, a, b, call.group, out, rank=call.rank,
                                    residual=residual, residual_replicated=replicated)
    comm = _fallback_comm(call.group, a.device) if d.nccl else None
    return engines.run_sequential(collective, a, b, call.group, out, world_size=call.world_size,
                          residual=residual, comm=comm)


def _needs_grad(a: object, b: object, residual: object) -> bool:
    # (Spelled out: this runs on every call, and a generator costs a microsecond.)
    if not torch.is_grad_enabled():
        return False
    return ((isinstance(a, torch.Tensor) and a.requires_grad)
            or (isinstance(b, torch.Tensor) and b.requires_grad)
            or (isinstance(residual, torch.Tensor) and residual.requires_grad))


def config_to_json(config: PlanConfig | None) -> str:
    """``config`` as the string the custom op carries ("" for None)."""
    return "" if config is None else json.dumps(dataclasses.asdict(config))


def config_from_json(text: str) -> PlanConfig | None:
    if not text:
        return None
    fields = json.loads(text)
    if fields.get("group_bands") is not None:
        fields["group_bands"] = tuple(fields["group_bands"])
    return PlanConfig(**fields)


def gemm_collective(
    a: torch.Tensor,
    b: torch.Tensor,
    collective: Collective,
    group: ProcessGroup | None = None,
    *,
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_replicated: bool = False,
    engine: EngineName | None = None,
    config: PlanConfig | None = None,
) -> torch.Tensor:
    """``collective(a @ b)`` over ``group`` (+ ``residual``), the collective overlapped with the GEMM.

    Args:
        a: ``[M, K]`` row-major, float16 / bfloat16 / float32.
        b: ``[K, N]`` row-major, or ``weight.t()`` of a row-major ``[N, K]`` weight (no copy).
        collective: a :class:`flashoverlap.collectives.Collective` (built in:
            ``collectives.ALL_REDUCE``, ``collectives.REDUCE_SCATTER``; or your own).
        group: process group (default: the world).
        out: optional contiguous result (not overlapping ``a`` or ``b``).
        residual: optional row-major tensor of the result's shape added to it (a transformer
            block's residual stream); ``out=residual`` updates it in place.
        residual_replicated: the caller guarantees ``residual`` is the same on every rank
            (lets an AllReduce add it once, in one rank's GEMM epilogue).
        engine: ``"overlap"`` (CUDA + NCCL), ``"reference"`` (the plan with torch ops, any
            backend), ``"sequential"`` (GEMM then collective); ``None``: overlap where it can
            run, else reference.
        config: an explicit :class:`PlanConfig` (tile, CTAs, groups); default: tuned or
            analytic.  An explicit config always overlaps.
    """
    if _needs_grad(a, b, residual):
        if out is not None:
            raise ValueError("out= does not support automatic differentiation (an input "
                             "requires grad); drop out= or run under torch.no_grad()")
        from .checks import group_name
        from .library_ops import gemm_collective_op

        collectives.register(collective)
        name = group_name(group)
        return gemm_collective_op(a, b, residual, collective.name, name, engine or "",
                                  config_to_json(config), bool(residual_replicated))
    return _run(collective, a, b, group, out, residual, residual_replicated, engine, config)


def gemm_all_reduce(
    a: torch.Tensor,
    b: torch.Tensor,
    group: ProcessGroup | None = None,
    *,
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_replicated: bool = False,
    engine: EngineName | None = None,
    config: PlanConfig | None = None,
) -> torch.Tensor:
    """Sum over ``group`` of ``a @ b`` (plus ``residual``): ``all_reduce(a @ b)`` overlapped.

    Returns ``[M, N]`` in the inputs' dtype, identical on every rank.  Backward: the result
    gradient is replicated, so it is every rank's partial-product gradient (no communication).
    Arguments as in :func:`gemm_collective`.
    """
    return gemm_collective(a, b, collectives.ALL_REDUCE, group, out=out, residual=residual,
                           residual_replicated=residual_replicated, engine=engine,
                           config=config)


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

    Same as ``torch.distributed.reduce_scatter_tensor(out, a @ b, group=group)``, overlapped.
    ``M`` must be divisible by the group size and ``scatter_dim`` must be 0.  ``residual``
    (``[M / W, N]``, this rank's rows) is added to the shard.  Backward: the result gradients
    are all-gathered along rows.  Other arguments as in :func:`gemm_collective`.
    """
    if scatter_dim != 0:
        raise ValueError(f"only scatter_dim=0 is supported, got {scatter_dim}")
    return gemm_collective(a, b, collectives.REDUCE_SCATTER, group, out=out, residual=residual,
                           engine=engine, config=config)
