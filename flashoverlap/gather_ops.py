"""``all_gather_gemm``: AllGather + GEMM, the gather overlapped with the GEMM that consumes it.

``all_gather_gemm(a_shard, b, group=None, out=None, gathered=None)`` equals
``torch.distributed.all_gather_into_tensor(a_full, a_shard)`` followed by ``a_full @ b``:
``a_shard`` ``[m, K]`` on every rank, result ``[m*W, N]`` (identical on every rank), and
``gathered`` (optional, ``[m*W, K]``) receives ``a_full``.

Policy (the gather direction's hooks; :mod:`flashoverlap.policy` holds the output side):

* world size 1 without an explicit ``config``: the plain GEMM (nothing to gather);
* CUDA tensors on an NCCL group with the overlap engine available: the overlap engine
  (:mod:`flashoverlap.engine.gather`), unless :func:`~flashoverlap.engine.gather.overlap_refusal`
  names a reason, then the sequential path through flashoverlap's NCCL communicator;
* otherwise the reference engine (CPU, gloo), or what ``engine=`` asks for.

Validation is memoised per call signature, and the first call of a signature on ``W > 1``
ranks agrees on (shapes, dtype, engine, decision, plan) across the group (a mismatch raises
``ValueError`` on every rank instead of hanging).

Autograd: with an input that requires grad the call goes through the ``torch.library`` op
``flashoverlap::all_gather_gemm`` (fake + autograd, traceable by ``torch.compile``), which
returns ``(out, a_full)``.  Backward: ``grad(a_full) = grad_out @ b.T`` and the shard's
gradient is its ReduceScatter -- one overlapped GEMM + ReduceScatter
(``flashoverlap::gemm_collective`` with ``reduce_scatter``); ``grad_b = a_full.T @ grad_out``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from .checks import byte_extent, check_gemm_operands, check_group, spans_intersect
from .collectives import REDUCE_SCATTER
from .collectives.all_gather import ALL_GATHER
from .dist_utils import register_group_cache
from .gather_plan import GatherPlan, GatherProblem, default_gather_config, make_gather_plan
from .ops import config_from_json, config_to_json
from .plan import PlanConfig

__all__ = ["all_gather_gemm", "all_gather_gemm_op"]


@dataclasses.dataclass(frozen=True)
class GatherCall:
    path: str  # "overlap" | "reference" | "sequential" | "gemm"
    engine: str
    plan: GatherPlan | None
    group: ProcessGroup
    rank: int
    world_size: int
    M: int
    N: int
    K: int
    nccl: bool = False


_CALLS: dict[tuple, GatherCall] = {}
_FALLBACK_COMMS: dict[tuple, Any] = {}
# Both hold process groups: released at exit and when a new world replaces a destroyed one,
# so no gloo worker thread outlives interpreter shutdown (dist_utils module docstring).
register_group_cache(_CALLS.clear)
register_group_cache(_FALLBACK_COMMS.clear)


def _check_buffer(name: str, t: object, shape: tuple[int, int], like: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {like.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, expected {like.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _decide(m: int, N: int, K: int, dtype: torch.dtype, W: int, device: torch.device,
            group: ProcessGroup, engine: str | None, config: PlanConfig | None):
    from .policy import resolve_engine

    if config is not None and not isinstance(config, PlanConfig):
        raise TypeError(f"config must be a PlanConfig or None, got {type(config).__name__}")
    name = resolve_engine(engine, device, group)
    problem = GatherProblem(m=m, N=N, K=K, dtype=str(dtype).removeprefix("torch."),
                            world_size=W)
    if name == "sequential":
        return name, "sequential", None, False
    if name == "reference":
        return name, "reference", make_gather_plan(
            problem, config or default_gather_config(problem)), False
    if config is None and W == 1:
        return name, "gemm", None, False
    from .engine.gather import overlap_refusal

    if config is None and overlap_refusal() is not None:
        return name, "sequential", None, True
    if config is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        config = default_gather_config(problem, sms, torch.cuda.get_device_capability(device))
    return name, "overlap", make_gather_plan(problem, config), False


def _validate(a, b, group, out, gathered, engine, config) -> GatherCall:
    m, N, K = check_gemm_operands(a, b)
    info = check_group(group, a.device)
    W = info.world_size
    _check_buffer("out", out, (m * W, N), a)
    _check_buffer("gathered", gathered, (m * W, K), a)
    name, path, plan, nccl = _decide(m, N, K, a.dtype, W, a.device, info.group, engine,
                                     config)
    if W > 1:
        from .agreement import agree_on_call

        cfg = None if config is None else dataclasses.astuple(config)
        agree_on_call(info.group, (ALL_GATHER.name, m, N, K, str(a.dtype), engine, cfg,
                                   name, path, nccl, plan.hash if plan is not None else ""),
                      "all_gather_gemm call (shapes, dtype, engine, overlap decision, plan)")
    return GatherCall(path, name, plan, info.group, info.rank, W, m * W, N, K, nccl)


def _signature(a, b, group, out, gathered, engine, config):
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or not dist.is_initialized():
        return None
    metas = []
    for t in (out, gathered):
        if t is None:
            metas.append(None)
        elif not isinstance(t, Tensor):
            return None
        else:
            metas.append((t.shape, t.stride(), t.dtype, t.device))
    group = group if group is not None else dist.group.WORLD
    current = torch.cuda.current_device() if a.device.type == "cuda" else None
    key = (a.shape, a.stride(), a.dtype, a.device, b.shape, b.stride(), b.dtype, b.device,
           group, *metas, engine, config, current)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _check_aliasing(a: Tensor, b: Tensor, out: Tensor | None, gathered: Tensor | None) -> None:
    spans = [("a_shard", a), ("b", b)]
    for name, t in (("out", out), ("gathered", gathered)):
        if t is None:
            continue
        p, e = t.data_ptr(), byte_extent(t)
        for other, u in spans:
            if spans_intersect(p, e, u.data_ptr(), byte_extent(u)):
                raise ValueError(f"{name} overlaps {other} in memory; pass a separate tensor")
        spans.append((name, t))


def _fallback_comm(group: ProcessGroup, device: torch.device):
    comm = _FALLBACK_COMMS.get((group, device.index))
    if comm is None or comm.handle is None:
        from .comm import get_communicator

        comm = _FALLBACK_COMMS[(group, device.index)] = get_communicator(group, device=device)
    return comm


def _run(a: Tensor, b: Tensor, group, out, gathered, engine, config) -> tuple[Tensor, Tensor]:
    key = _signature(a, b, group, out, gathered, engine, config)
    call = _CALLS.get(key) if key is not None else None
    if call is None:
        call = _validate(a, b, group, out, gathered, engine, config)
        if key is not None:
            if len(_CALLS) > 4096:
                _CALLS.clear()
            _CALLS[key] = call
    if out is not None or gathered is not None:
        _check_aliasing(a, b, out, gathered)
    if out is None:
        out = torch.empty(call.M, call.N, dtype=a.dtype, device=a.device)
    if call.path == "gemm":
        torch.matmul(a, b, out=out)
        if gathered is not None:
            gathered.copy_(a)
        return out, (gathered if gathered is not None else a)
    if call.path == "overlap":
        from .engine.gather import run_gather_overlap

        a = a.contiguous()
        run_gather_overlap(call.plan, a, b, call.group, out, gathered, rank=call.rank)
        return out, gathered
    full = gathered if gathered is not None else torch.empty(call.M, call.K, dtype=a.dtype,
                                                             device=a.device)
    if call.path == "reference":
        from .engine.gather import run_gather_reference

        run_gather_reference(call.plan, a.contiguous(), b, call.group, out, full,
                             rank=call.rank)
    else:
        from .engine.gather import run_gather_sequential

        comm = _fallback_comm(call.group, a.device) if call.nccl else None
        run_gather_sequential(a.contiguous(), b, call.group, out, full,
                              world_size=call.world_size, comm=comm)
    return out, full


def all_gather_gemm(
    a_shard: Tensor,
    b: Tensor,
    group: ProcessGroup | None = None,
    out: Tensor | None = None,
    gathered: Tensor | None = None,
    *,
    engine: str | None = None,
    config: PlanConfig | None = None,
) -> Tensor:
    """``all_gather_into_tensor(a_full, a_shard)`` then ``a_full @ b``, overlapped.

    Args:
        a_shard: ``[m, K]`` row-major, this rank's rows (float16 / bfloat16 / float32).
        b: ``[K, N]`` row-major, or ``w.t()`` of a row-major ``[N, K]`` weight (no copy).
        group: process group (default: the world).
        out: optional contiguous ``[m*W, N]`` result.
        gathered: optional contiguous ``[m*W, K]`` that receives ``a_full`` (rank ``s``'s
            shard at rows ``[s*m, (s+1)*m)``).
        engine: ``"overlap"``, ``"reference"``, ``"sequential"`` or None (best available).
        config: an explicit :class:`PlanConfig` (``group_bands=None``); always overlaps.

    Returns ``[m*W, N]``, the same on every rank.  Differentiable in ``a_shard`` and ``b``
    (without ``out=``/``gathered=``).
    """
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                       for t in (a_shard, b)):
        if out is not None or gathered is not None:
            raise ValueError("out= and gathered= do not support automatic differentiation "
                             "(an input requires grad); drop them or run under torch.no_grad()")
        from .checks import group_name

        name = group_name(group)
        result, _ = all_gather_gemm_op(a_shard, b, name, engine or "", config_to_json(config))
        return result
    result, _ = _run(a_shard, b, group, out, gathered, engine, config)
    return result


# -- torch.library op ----------------------------------------------------------------------
def _row_major(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if a.dim() == 2 and a.size(0) > 1 and a.stride(1) != 1:
        a = a.contiguous()
    if b.dim() == 2 and b.stride(0) != 1 and b.stride(1) != 1:
        b = b.contiguous()
    return a, b


@torch.library.custom_op("flashoverlap::all_gather_gemm", mutates_args=())
def all_gather_gemm_op(a_shard: Tensor, b: Tensor, group_name: str, engine: str,
                       config: str) -> tuple[Tensor, Tensor]:
    """``(all_gather(a_shard) @ b, all_gather(a_shard))`` over the group named ``group_name``."""
    from .library_ops import resolve_group_name

    a_shard, b = _row_major(a_shard, b)
    group = resolve_group_name(group_name)
    W = group.size()
    gathered = torch.empty(a_shard.shape[0] * W, a_shard.shape[1], dtype=a_shard.dtype,
                           device=a_shard.device)
    out, _ = _run(a_shard, b, group, None, gathered, engine or None, config_from_json(config))
    return out, gathered


@all_gather_gemm_op.register_fake
def _all_gather_gemm_fake(a_shard: Tensor, b: Tensor, group_name: str, engine: str,
                          config: str) -> tuple[Tensor, Tensor]:
    from .library_ops import resolve_group_name

    W = resolve_group_name(group_name).size()
    M = a_shard.shape[0] * W
    return a_shard.new_empty((M, b.shape[1])), a_shard.new_empty((M, a_shard.shape[1]))


def _setup_context(ctx, inputs, output) -> None:
    _a, b, group_name, engine, _config = inputs
    ctx.save_for_backward(b, output[1])
    ctx.group_name = group_name
    ctx.engine = engine


def _backward(ctx, grad_out: Tensor, grad_gathered: Tensor | None):
    b, gathered = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        from .library_ops import gemm_collective_op

        # grad(a_full) = grad_out @ b.T, reduce-scattered along rows: one overlapped op
        grad_a = gemm_collective_op(grad_out.contiguous(), b.t(), None, REDUCE_SCATTER.name,
                                    ctx.group_name, ctx.engine, "", False)
        if grad_gathered is not None:
            from .library_ops import resolve_group_name

            W = resolve_group_name(ctx.group_name).size()
            grad_a = grad_a + ALL_GATHER.backward(grad_gathered, ctx.group_name, W)
    if ctx.needs_input_grad[1]:
        grad_b = gathered.t() @ grad_out
    return grad_a, grad_b, None, None, None


all_gather_gemm_op.register_autograd(_backward, setup_context=_setup_context)
