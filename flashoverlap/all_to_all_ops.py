"""GEMM + AllToAll ops: the plain form and the grouped (MoE expert-parallel) form.

``gemm_all_to_all(a, b, output_split_sizes, input_split_sizes, group, out)`` equals
``torch.distributed.all_to_all_single(out, a @ b, output_split_sizes, input_split_sizes,
group)``; ``grouped_gemm_all_to_all(a, w, counts, output_split_sizes, group, out)`` computes
``a_e @ w[e]`` for every local expert ``e`` (``a`` ordered by expert, then destination) and
exchanges the rows, reordered to (destination, expert), with input splits
``sum_e counts[e][d]``.  The plain form is the grouped one with one expert (``w = b[None]``).
The plan and its layout are in :mod:`flashoverlap.all_to_all_plan`, the engines in
:mod:`flashoverlap.engine.all_to_all`.

Validation, once per call signature (shapes, strides, dtypes, devices, counts, splits,
group, engine, config, ``out``'s metadata): splits that do not add up raise ``ValueError``
before anything is launched.  At world size > 1 the first call of a signature all-gathers one
small int64 vector per rank -- a hash of (N, K, dtype, engine, path, config) and the rank's
input and output splits -- and every rank checks the whole split matrix (rank ``s``'s input
split for ``d`` must equal ``d``'s output split for ``s``): a mismatch raises ``ValueError``
on every rank instead of leaving NCCL hanging.  MoE counts change from step to step, so this
is one small blocking exchange per step (the dispatch that produced the counts synchronised
the host already).

Autograd and ``torch.compile``: inputs that require grad (or a call inside a compiled region)
go through the ``torch.library`` op ``flashoverlap::grouped_gemm_all_to_all`` (fake: the
result shape from the output splits; backward: the reverse AllToAll, then the GEMM's
backward per expert).  ``out=`` cannot be differentiated and raises in that case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from .all_to_all_plan import AllToAllPlan, AllToAllProblem, make_all_to_all_plan
from .checks import check_group, group_info, group_name
from .dist_utils import register_group_cache, retire_cpu_tensors
from .collectives.all_to_all import reverse_all_to_all
from .kernels import GemmConfig
from .ops import config_from_json, config_to_json
from .plan import PlanConfig
from .policy import resolve_engine, signature_hash

__all__ = ["gemm_all_to_all", "grouped_gemm_all_to_all", "grouped_gemm_all_to_all_op"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass(frozen=True)
class A2ACall:
    engine: str
    plan: AllToAllPlan
    group: ProcessGroup
    nccl_sequential: bool = False
    gemm_config: GemmConfig | None = None  # the grouped GEMM's options (None: the default)


_CALLS: dict[tuple, A2ACall] = {}
_FALLBACK_COMMS: dict = {}
# Both hold process groups: released at exit and when a new world replaces a destroyed one,
# so no gloo worker thread outlives interpreter shutdown (dist_utils module docstring).
register_group_cache(_CALLS.clear)
register_group_cache(_FALLBACK_COMMS.clear)


# -- argument normalisation ------------------------------------------------------------------
def _int_list(name: str, value, length: int | None = None) -> tuple[int, ...]:
    if isinstance(value, Tensor):
        if value.device.type != "cpu":
            raise ValueError(f"{name} must be host integers (a list or a CPU tensor); got a "
                             f"tensor on {value.device} (device-side counts are not supported)")
        value = value.tolist()
    try:
        out = tuple(int(x) for x in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}") from None
    if any(x < 0 for x in out):
        raise ValueError(f"{name} must be non-negative, got {list(out)}")
    if length is not None and len(out) != length:
        raise ValueError(f"{name} must have {length} entries (one per rank), got {len(out)}")
    return out


def _counts(counts, E: int, W: int) -> tuple[tuple[int, ...], ...]:
    if isinstance(counts, Tensor):
        if counts.device.type != "cpu":
            raise ValueError("counts must be host integers (a nested list or a CPU tensor); "
                             f"got a tensor on {counts.device}")
        counts = counts.tolist()
    try:
        rows = [_int_list("counts", row, W) for row in counts]
    except TypeError:
        raise TypeError(f"counts must be [E][W] integers, got {counts!r}") from None
    if len(rows) != E:
        raise ValueError(f"counts must have one row per local expert ({E}), got {len(rows)}")
    return tuple(rows)


def _check_operands(a: object, w: object) -> None:
    if not isinstance(a, Tensor) or not isinstance(w, Tensor):
        raise TypeError("a and w must be tensors")
    if a.dim() != 2 or w.dim() != 3:
        raise ValueError(f"a must be [M, K] and w [E, K, N]; got {tuple(a.shape)}, "
                         f"{tuple(w.shape)}")
    if a.dtype not in _DTYPES or w.dtype != a.dtype:
        raise TypeError(f"a and w must share a dtype in {_DTYPES}; got {a.dtype}, {w.dtype}")
    if a.device != w.device:
        raise ValueError(f"a is on {a.device}, w on {w.device}")
    if w.shape[1] != a.shape[1]:
        raise ValueError(f"inner dimensions differ: a {tuple(a.shape)}, w {tuple(w.shape)}")
    if w.shape[0] < 1 or w.shape[1] < 1 or w.shape[2] < 1:
        raise ValueError(f"w must be non-empty, got {tuple(w.shape)}")
    if a.shape[0] > 1 and a.stride(1) != 1:
        raise ValueError(f"a must be row-major (stride(1) == 1), got strides {a.stride()}")
    if not (w.stride(2) == 1 or w.shape[2] == 1 or w.stride(1) == 1 or w.shape[1] == 1):
        raise ValueError("w must be [E, K, N] with rows of N contiguous, or the transposed view "
                         f"of a contiguous [E, N, K] (w.transpose(1, 2)); got strides {w.stride()}")


def _default_config(device: torch.device, W: int,
                    gemm: GemmConfig | None = None) -> PlanConfig:
    """The plan configuration without a user's: ``gemm``'s tile (the grouped GEMM's rule for
    the problem), all SMs but the ones NCCL gets while the GEMM runs."""
    if device.type != "cuda":
        return PlanConfig(block_m=32, block_n=32, num_ctas=4, group_m=1)
    from .kernels import default_block_shape

    bm, bn = (gemm.block_m, gemm.block_n) if gemm is not None else default_block_shape(device)
    return PlanConfig(block_m=bm, block_n=bn, num_ctas=_default_ctas(device, W), group_m=8)


def _default_ctas(device: torch.device, W: int) -> int:
    """The GEMM's CTAs: all SMs but the 16 NCCL gets while it runs (none at one rank)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return sms - (16 if W > 1 else 0)


def _grouped_gemm_config(a: Tensor, M: int, N: int, K: int, E: int, W: int,
                         config: PlanConfig | None) -> GemmConfig | None:
    """The grouped GEMM's options for the problem (:data:`kernels.GROUPED_GEMM_RULES`); None
    off CUDA, or where the user's tile differs from the rule's (the kernel's default options
    for that tile then)."""
    if a.device.type != "cuda":
        return None
    from .kernels import grouped_gemm_config_for

    ctas = config.num_ctas if config is not None else _default_ctas(a.device, W)
    gemm = grouped_gemm_config_for(max(M, 1), N, K, E, a.dtype, max(ctas, 1),
                                   torch.cuda.get_device_capability(a.device))
    if config is not None and (config.block_m, config.block_n) != (gemm.block_m, gemm.block_n):
        return None
    return gemm


def _agree(group: ProcessGroup, backend: str, rank: int, W: int, common: int,
           send: Sequence[int], recv: Sequence[int], timeout_s: float = 60.0) -> None:
    """All-gather (hash, send splits, recv splits); raise on every rank unless the hashes
    agree and the split matrix is consistent."""
    device = (torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend
              else torch.device("cpu"))
    mine = torch.tensor([common, *send, *recv], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(W)]
    work = dist.all_gather(gathered, mine, group=group, async_op=True)
    try:
        work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise ValueError(f"all_to_all plan check: not every rank joined within {timeout_s:g} s "
                         f"({exc})") from exc
    del work
    retire_cpu_tensors([mine, *gathered])  # (a gloo worker must not free them)
    table = [t.cpu().tolist() for t in gathered]
    hashes = {row[0] for row in table}
    if len(hashes) != 1:
        raise ValueError(f"all_to_all: the call (N, K, dtype, engine, config) differs across "
                         f"ranks (rank {rank}); every rank must make the same call")
    sends = [row[1:1 + W] for row in table]
    recvs = [row[1 + W:] for row in table]
    bad = [(s, d) for s in range(W) for d in range(W) if sends[s][d] != recvs[d][s]]
    if bad:
        s, d = bad[0]
        raise ValueError(
            f"all_to_all splits are inconsistent across ranks: rank {s} sends {sends[s][d]} rows "
            f"to rank {d}, which expects {recvs[d][s]} (input split matrix {sends}, output "
            f"split matrix {recvs})")


def _validate(a, w, counts, out_splits, group, out, engine, config) -> A2ACall:
    _check_operands(a, w)
    info = check_group(group, a.device)
    W, rank = info.world_size, info.rank
    E, N, K = w.shape[0], w.shape[2], w.shape[1]
    counts = _counts(counts, E, W)
    out_splits = _int_list("output_split_sizes", out_splits, W)
    M = sum(map(sum, counts))
    if M != a.shape[0]:
        raise ValueError(f"the split sizes (counts) add up to {M} rows but a has {a.shape[0]}")
    R = sum(out_splits)
    if out is not None:
        if not isinstance(out, Tensor):
            raise TypeError(f"out must be a tensor, got {type(out).__name__}")
        if tuple(out.shape) != (R, N) or out.dtype != a.dtype or out.device != a.device \
                or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous [{R}, {N}] {a.dtype} tensor on "
                             f"{a.device}; got {tuple(out.shape)} {out.dtype} on {out.device}")
    if config is not None and not isinstance(config, PlanConfig):
        raise TypeError(f"config must be a PlanConfig or None, got {type(config).__name__}")
    name = resolve_engine(engine, a.device, info.group)
    problem = AllToAllProblem(counts, out_splits, N, K, str(a.dtype).removeprefix("torch."),
                              rank, W)
    gemm = _grouped_gemm_config(a, M, N, K, E, W, config)
    plan = make_all_to_all_plan(problem, config or _default_config(a.device, W, gemm))
    nccl_seq = name == "sequential" and a.device.type == "cuda" and "nccl" in info.backend \
        and engine is None
    if W > 1:
        common = signature_hash("all_to_all", N, K, problem.dtype, name, config)
        _agree(info.group, info.backend, rank, W, common, problem.send_splits, out_splits)
    return A2ACall(name, plan, info.group, nccl_seq, gemm)


def _fallback_comm(group: ProcessGroup, device: torch.device):
    comm = _FALLBACK_COMMS.get((group, device.index))
    if comm is None or comm.handle is None:
        from .comm import get_communicator

        comm = _FALLBACK_COMMS[(group, device.index)] = get_communicator(group, device=device)
    return comm


def _run(a: Tensor, w: Tensor, counts, out_splits, group, out, engine, config) -> Tensor:
    key = None
    host = all(not isinstance(x, Tensor) or x.device.type == "cpu" for x in (counts, out_splits))
    if isinstance(a, Tensor) and isinstance(w, Tensor) and dist.is_initialized() and host:
        try:
            ckey = (tuple(map(tuple, counts.tolist())) if isinstance(counts, Tensor)
                    and counts.device.type == "cpu" else
                    tuple(tuple(int(x) for x in row) for row in counts))
            skey = (tuple(out_splits.tolist()) if isinstance(out_splits, Tensor)
                    and out_splits.device.type == "cpu" else tuple(int(x) for x in out_splits))
            g = group if group is not None else dist.group.WORLD
            okey = None if out is None else (out.shape, out.stride(), out.dtype, out.device)
            key = (a.shape, a.stride(), a.dtype, a.device, w.shape, w.stride(), w.dtype, ckey,
                   skey, g, okey, engine, config)
            hash(key)
        except (TypeError, ValueError, AttributeError):
            key = None
    call = _CALLS.get(key) if key is not None else None
    if call is None:
        call = _validate(a, w, counts, out_splits, group, out, engine, config)
        if key is not None:
            if len(_CALLS) > 1024:
                _CALLS.clear()
            _CALLS[key] = call
    plan = call.plan
    if out is None:
        out = torch.empty((plan.problem.recv_rows, plan.problem.N), dtype=a.dtype,
                          device=a.device)
    elif out.numel() and (_overlaps(out, a) or _overlaps(out, w)):
        raise ValueError("out overlaps an input in memory")
    from .engine import all_to_all as eng

    if call.engine == "overlap":
        return eng.run_a2a_overlap(plan, a, w, call.group, out, gemm_config=call.gemm_config)
    if call.engine == "reference":
        return eng.run_a2a_reference(plan, a, w, call.group, out)
    comm = _fallback_comm(call.group, a.device) if call.nccl_sequential else None
    return eng.run_a2a_sequential(plan, a, w, call.group, out, comm=comm)


def _overlaps(x: Tensor, y: Tensor) -> bool:
    if not y.numel():
        return False
    from .checks import byte_extent, spans_intersect

    return spans_intersect(x.data_ptr(), byte_extent(x), y.data_ptr(), byte_extent(y))


# -- the custom op ---------------------------------------------------------------------------
def _unflatten(counts: Sequence[int], E: int) -> list[list[int]]:
    if E < 1 or len(counts) % E:
        raise ValueError(f"{len(counts)} counts do not split into {E} experts")
    W = len(counts) // E
    return [list(counts[e * W:(e + 1) * W]) for e in range(E)]


def _resolve_group_name(name: str) -> ProcessGroup:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


@torch.library.custom_op("flashoverlap::grouped_gemm_all_to_all", mutates_args=())
def grouped_gemm_all_to_all_op(a: Tensor, w: Tensor, counts: list[int],
                               output_splits: list[int], group_name: str, engine: str,
                               config: str) -> Tensor:
    """The grouped GEMM + AllToAll; ``counts`` flattened row-major from ``[E][W]``."""
    if a.dim() == 2 and a.size(0) > 1 and a.stride(1) != 1:
        a = a.contiguous()
    if w.dim() == 3 and w.stride(2) != 1 and w.stride(1) != 1:
        w = w.contiguous()
    return _run(a, w, _unflatten(counts, w.shape[0]), list(output_splits),
                _resolve_group_name(group_name), None, engine or None,
                config_from_json(config))


@grouped_gemm_all_to_all_op.register_fake
def _fake(a, w, counts, output_splits, group_name, engine, config):
    return a.new_empty((sum(output_splits), w.shape[2]))


def _setup_context(ctx, inputs, output) -> None:
    a, w, counts, output_splits, group_name, _engine, _config = inputs
    ctx.save_for_backward(a, w)
    ctx.counts = list(counts)
    ctx.output_splits = list(output_splits)
    ctx.group_name = group_name


def _backward(ctx, grad_out: Tensor):
    a, w = ctx.saved_tensors
    E = w.shape[0]
    counts = _unflatten(ctx.counts, E)
    W = len(counts[0])
    send_splits = [sum(counts[e][d] for e in range(E)) for d in range(W)]
    world = _resolve_group_name(ctx.group_name).size() if W > 1 else 1
    grad_send = reverse_all_to_all(grad_out, send_splits, ctx.output_splits, ctx.group_name,
                                   world)  # [M, N] in (destination, expert) order
    # (destination, expert) -> (expert, destination): a's order
    send_off, pieces = [], []
    off = 0
    for d in range(W):
        send_off.append(off)
        off += send_splits[d]
    seg = [[0] * W for _ in range(E)]
    for d in range(W):
        acc = send_off[d]
        for e in range(E):
            seg[e][d] = acc
            acc += counts[e][d]
    grad_a = torch.empty_like(a) if ctx.needs_input_grad[0] else None
    grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
    a_lo = 0
    for e in range(E):
        pieces = [grad_send[seg[e][d]:seg[e][d] + counts[e][d]] for d in range(W)
                  if counts[e][d]]
        rows = sum(counts[e])
        if not rows:
            continue
        g_e = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if grad_a is not None:
            grad_a[a_lo:a_lo + rows] = g_e @ w[e].transpose(0, 1)
        if grad_w is not None:
            grad_w[e] = a[a_lo:a_lo + rows].transpose(0, 1) @ g_e
        a_lo += rows
    return grad_a, grad_w, None, None, None, None, None


grouped_gemm_all_to_all_op.register_autograd(_backward, setup_context=_setup_context)


# -- public functions ------------------------------------------------------------------------
def _needs_op(*tensors) -> bool:
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    return compiling or (torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in tensors))


def grouped_gemm_all_to_all(
    a: Tensor,
    w: Tensor,
    counts,
    output_split_sizes,
    group: ProcessGroup | None = None,
    out: Tensor | None = None,
    *,
    engine: str | None = None,
    config: PlanConfig | None = None,
) -> Tensor:
    """The expert outputs ``a_e @ w[e]`` returned to their owners by one AllToAll, overlapped.

    Args:
        a: ``[M, K]`` row-major, ordered by local expert, then destination rank (what a
            dispatch AllToAll followed by a stable sort by expert gives).
        w: ``[E, K, N]``, or ``w_nk.transpose(1, 2)`` of a contiguous ``[E, N, K]`` (no copy).
        counts: ``[E][W]`` host integers (nested list or CPU tensor): ``counts[e][d]`` rows of
            ``a`` for expert ``e`` that go back to group rank ``d``.
        output_split_sizes: ``[W]`` rows this rank receives from each rank.
        group, out: as in ``torch.distributed.all_to_all_single``.
        engine: ``"overlap"`` (CUDA + NCCL), ``"reference"`` (the plan with torch ops),
            ``"sequential"`` (grouped GEMM, then one AllToAll); None: overlap where it can run.
        config: a :class:`PlanConfig` (``group_bands``: ring offsets per group, summing to W).

    Returns ``[sum(output_split_sizes), N]``: rows by source rank, then that rank's expert
    order, then that rank's row order.
    """
    if _needs_op(a, w):
        if out is not None and torch.is_grad_enabled() and (a.requires_grad or w.requires_grad):
            raise ValueError("out= does not support automatic differentiation (an input "
                             "requires grad); drop out= or run under torch.no_grad()")
        if isinstance(counts, Tensor):
            counts = counts.tolist()
        if isinstance(output_split_sizes, Tensor):
            output_split_sizes = output_split_sizes.tolist()
        flat = [int(x) for row in counts for x in row]
        name = group_name(group)
        result = grouped_gemm_all_to_all_op(a, w, flat, [int(x) for x in output_split_sizes],
                                            name, engine or "", config_to_json(config))
        if out is not None:
            out.copy_(result)
            return out
        return result
    return _run(a, w, counts, output_split_sizes, group, out, engine, config)


def gemm_all_to_all(
    a: Tensor,
    b: Tensor,
    output_split_sizes=None,
    input_split_sizes=None,
    group: ProcessGroup | None = None,
    out: Tensor | None = None,
    *,
    engine: str | None = None,
    config: PlanConfig | None = None,
) -> Tensor:
    """``torch.distributed.all_to_all_single(out, a @ b, output_split_sizes,
    input_split_sizes, group)``, the exchange overlapped with the GEMM.

    ``a`` ``[M, K]`` row-major with its rows grouped by destination rank; ``b`` ``[K, N]`` or
    ``weight.t()`` of a row-major ``[N, K]`` weight.  ``None`` splits mean equal splits (of
    ``M``, and of ``out``'s rows or else ``M``), as in torch.  Other arguments as in
    :func:`grouped_gemm_all_to_all`.
    """
    if not isinstance(b, Tensor) or b.dim() != 2:
        raise ValueError("b must be a 2-D tensor [K, N]")
    W = group_info(group).world_size
    M = a.shape[0]
    if input_split_sizes is None:
        if M % W:
            raise ValueError(f"equal input splits need M divisible by the group size: M={M}, "
                             f"W={W}")
        input_split_sizes = [M // W] * W
    if output_split_sizes is None:
        rows = out.shape[0] if isinstance(out, Tensor) else M
        if rows % W:
            raise ValueError(f"equal output splits need {rows} rows divisible by the group "
                             f"size {W}")
        output_split_sizes = [rows // W] * W
    if isinstance(input_split_sizes, Tensor):
        input_split_sizes = input_split_sizes.tolist()
    return grouped_gemm_all_to_all(a, b.unsqueeze(0), [list(input_split_sizes)],
                                   output_split_sizes, group, out, engine=engine, config=config)
