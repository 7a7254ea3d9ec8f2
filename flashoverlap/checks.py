"""Argument checks of the public ops, run before anything is launched.

Every problem gets a ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (shape,
device, layout, group) whose message names the argument and what was expected, so a bad call
never launches a kernel, never half-writes ``out`` and never enters a collective that the other
ranks would wait on forever.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .dist_utils import register_group_cache, release_process_groups, resolve_group

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_matrix(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}"
        )
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    return t


def check_gemm_operands(a: object, b: object) -> tuple[int, int, int]:
    """Check ``a [M, K] @ b [K, N]``; returns ``(M, N, K)``.

    Layouts: ``a`` row-major (unit stride on K); ``b`` row-major ``[K, N]`` or the transposed
    view of a row-major ``[N, K]`` (an ``nn.Linear`` weight's ``.t()``), both without copies.
    """
    a = _check_matrix("a", a)
    b = _check_matrix("b", b)
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")
    M, K = a.shape
    K_b, N = b.shape
    if K != K_b:
        raise ValueError(f"mismatched K: a is {tuple(a.shape)} but b is {tuple(b.shape)}")
    if a.stride(1) != 1 and M > 1:
        raise ValueError(
            f"a must be row-major (stride(1) == 1), got strides {a.stride()}; "
            "call a.contiguous()"
        )
    if not (b.stride(1) == 1 or b.stride(0) == 1):
        raise ValueError(
            f"b must be row-major [K, N] or a transposed view of a row-major [N, K] tensor, "
            f"got strides {b.stride()}; call b.contiguous()"
        )
    return M, N, K


def _check_result_like(name: str, t: object, shape: tuple[int, int], like: torch.Tensor) -> None:
    """``t`` (``out`` or ``residual``): a tensor of the result's shape, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {like.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, expected {like.device}")


def check_out(out: object, shape: tuple[int, int], like: torch.Tensor) -> None:
    if out is None:
        return
    _check_result_like("out", out, shape, like)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def byte_extent(t: torch.Tensor) -> int:
    """Bytes from ``t.data_ptr()`` to one past the last element it can touch (strides >= 0).

    A function of shape, strides and dtype alone, so the ops compute it once per validated
    call signature and per call add it to ``data_ptr()``: two tensors overlap in memory iff
    ``[ptr, ptr + extent)`` intervals intersect (distinct allocations never do).
    """
    return (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))) * t.element_size()


def spans_intersect(p: int, extent_p: int, q: int, extent_q: int) -> bool:
    return p < q + extent_q and q < p + extent_p


def check_out_aliasing(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out`` must not share memory with the operands.

    The engines write ``out`` (GEMM tiles, collectives) while the GEMM may still read ``a`` and
    ``b``: an overlapping ``out`` would be corrupted silently.  Byte spans are compared, so a
    contiguous ``out`` lying wholly in the gaps of a strided operand is refused too
    (conservative; no supported layout needs that).  The ops run the same arithmetic per call
    with memoised extents (:func:`byte_extent`) and call this for the message.
    """
    o, eo = out.data_ptr(), byte_extent(out)
    for name, t in (("a", a), ("b", b)):
        if spans_intersect(o, eo, t.data_ptr(), byte_extent(t)):
            raise ValueError(f"out overlaps {name} in memory; pass a separate output tensor")


def check_residual_meta(residual: object, shape: tuple[int, int], like: torch.Tensor) -> None:
    """``residual``: the result's shape, dtype and device, row-major."""
    _check_result_like("residual", residual, shape, like)
    if shape[1] > 1 and residual.stride(1) != 1:
        raise ValueError(f"residual must be row-major (stride(1) == 1), got strides "
                         f"{residual.stride()}")


def residual_is_out(residual: torch.Tensor, out: torch.Tensor) -> bool:
    """Exactly the same view (the in-place form ``out=residual``)."""
    return residual.data_ptr() == out.data_ptr() and residual.stride() == out.stride()


def check_residual_aliasing(residual: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` may be the residual itself but must not partly overlap it."""
    if residual_is_out(residual, out):
        return
    if spans_intersect(out.data_ptr(), byte_extent(out), residual.data_ptr(),
                       byte_extent(residual)):
        raise ValueError("residual partly overlaps out; pass out=residual for an in-place "
                         "update, or tensors that do not share memory")


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    group: ProcessGroup
    backend: str
    rank: int
    world_size: int


# A process group's backend, rank and size never change; asking torch.distributed each call
# cost ~30 us of host time, a third of a small op's budget.  Keyed by the group object
# itself: groups live as long as the process (or until destroy_process_group, whose new
# groups are new objects).  Released at exit and when the world changes (dist_utils).
_GROUP_INFO: dict[ProcessGroup, GroupInfo] = {}
register_group_cache(_GROUP_INFO.clear)
# The default group the caches were filled under (weakly: it must not outlive its destroy).
_WORLD_SEEN: weakref.ref | None = None


def _note_world() -> None:
    """On the first sight of a new default group, drop every cache entry of the old world."""
    global _WORLD_SEEN
    world = dist.group.WORLD if dist.is_initialized() else None
    seen = _WORLD_SEEN() if _WORLD_SEEN is not None else None
    if world is None or world is seen:
        return
    if _WORLD_SEEN is not None:  # destroy_process_group + init_process_group since
        release_process_groups()
    _WORLD_SEEN = weakref.ref(world)


def group_info(group: ProcessGroup | None) -> GroupInfo:
    """Resolved group with its backend, this process's rank and the size (cached)."""
    key = group if group is not None else (dist.group.WORLD if dist.is_initialized() else None)
    info = _GROUP_INFO.get(key) if key is not None else None
    if info is not None and not dist.is_initialized():
        info = None  # destroyed since: let resolve_group raise
    if info is None:
        _note_world()
        resolved = resolve_group(group)
        info = GroupInfo(resolved, str(dist.get_backend(resolved)).lower(),
                         dist.get_rank(resolved), dist.get_world_size(resolved))
        _GROUP_INFO[resolved] = info
    return info


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` when
    flashoverlap is imported: the public decorator imports it (1.3 s on the CI machine, ten
    times the library's own import) only to set the marker Dynamo reads; the marker is the
    same on torch 2.1 to 2.13 and a test compiles through it."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def group_name(group: ProcessGroup | None) -> str:
    """The registered name of ``group`` (None: the default group), which the
    ``torch.ops.flashoverlap`` ops take instead of the group.

    Under ``torch.compile`` the name is a constant of the graph: Dynamo calls this at trace
    time instead of tracing it.  Traced, the lookup of the default group made the
    ``ProcessGroup`` itself a graph input, kept by the compiled function's cache for the life
    of the process: past ``destroy_process_group`` and the library's release at exit, so its
    gloo worker threads still ran during interpreter finalisation -- the exit abort of the
    :mod:`flashoverlap.dist_utils` docstring (seen as a CI failure of a test that compiles
    ``all_gather_gemm``).  The compiled call resolves the name at run time, as torch's
    functional collectives do.

    Dynamo calls it with a ``FakeScriptObject`` standing in for an explicit group (one that
    passes ``isinstance(..., ProcessGroup)`` and compares equal to the group): its real group
    is used, or the stand-in would be cached as the group and reach the engines at run time.
    """
    group = getattr(group, "real_obj", group)
    return group_info(group).group.group_name


def check_group(group: ProcessGroup | None, device: torch.device) -> GroupInfo:
    """Resolve the group and check it can carry tensors on ``device``."""
    info = group_info(group)
    backend = info.backend
    if device.type == "cuda" and "nccl" not in backend and "gloo" not in backend:
        raise ValueError(f"group backend {backend!r} cannot reduce CUDA tensors")
    if device.type == "cpu" and "gloo" not in backend and "mpi" not in backend:
        raise ValueError(
            f"tensors are on the CPU but the group's backend is {backend!r}; "
            "use a gloo group for CPU tensors"
        )
    if device.type == "cuda" and "nccl" in backend and device.index is not None:
        if device.index != torch.cuda.current_device():
            raise ValueError(
                f"tensors are on {device} but the current CUDA device is "
                f"cuda:{torch.cuda.current_device()}; call torch.cuda.set_device({device.index})"
            )
    return info
