"""Restore: copy comm-buffer slots back to their tiles of a row-major output (un-reorder).

After a group's collective, slots ``[slot_start, slot_stop)`` of the received buffer
``[R, BLOCK_M, BLOCK_N]`` hold finished tiles; slot ``s`` goes to output tile
``(tile_m[s], tile_n[s])``, i.e. rows ``tile_m[s]*BLOCK_M ...`` and columns
``tile_n[s]*BLOCK_N ...`` of ``out[rows, N]``, cut at ``rows`` and ``N`` (edge tiles; the
padding of a slot is never read).  ``tile_m``/``tile_n`` are the plan's
``restore_tile_m``/``restore_tile_n`` on the device.  With a ``residual`` (``out``'s shape),
each element becomes ``slot value + residual`` (fp32 add, one rounding to the output dtype:
the same bits as ``torch.add`` of the two), the fused epilogue of a transformer block's
residual stream; ``residual`` may be ``out`` itself.

The grid is (slots x row chunks): each program moves ``BLOCK_R x BLOCK_N`` elements, a few
KiB, with 16-byte accesses when ``N`` and the output row stride are multiples of 16
elements (Triton specializes those arguments, so the column mask stays vectorizable).
:func:`restore_tiles` launches on the current stream; the engine's hot loop uses
:class:`RestoreLauncher`, which takes the stream explicitly and skips the JIT dispatch.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from flashoverlap.kernels import direct_launch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Elements one program moves (16 KiB of bf16): enough bytes in flight per SM, and many
# programs for a group of a few hundred tiles.
_CHUNK_ELEMS = 8192
_NUM_WARPS = 4


@triton.jit(do_not_specialize=["slot_start", "rows"])
def _restore_kernel(
    src_ptr, out_ptr, tile_m_ptr, tile_n_ptr, res_ptr,
    slot_start, rows, N, stride_om, stride_rm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    slot = slot_start + tl.program_id(0)
    chunk = tl.program_id(1)
    tile_m = tl.load(tile_m_ptr + slot).to(tl.int64)
    tile_n = tl.load(tile_n_ptr + slot).to(tl.int64)
    offs_i = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_j = tl.arange(0, BLOCK_N)
    out_rows = tile_m * BLOCK_M + offs_i
    out_cols = tile_n * BLOCK_N + offs_j
    mask = (out_rows < rows)[:, None] & (out_cols < N)[None, :]
    src = src_ptr + slot.to(tl.int64) * (BLOCK_M * BLOCK_N) + offs_i[:, None] * BLOCK_N \
        + offs_j[None, :]
    vals = tl.load(src, mask=mask)
    if HAS_RESIDUAL:
        # Fused residual add, in fp32 like torch's.  Each element is read and written by the
        # same thread, so ``res_ptr`` may be ``out_ptr`` itself (in-place h += ...).
        res = tl.load(res_ptr + out_rows[:, None] * stride_rm + out_cols[None, :], mask=mask)
        vals = (vals.to(tl.float32) + res.to(tl.float32)).to(vals.dtype)
    dst = out_ptr + out_rows[:, None] * stride_om + out_cols[None, :]
    tl.store(dst, vals, mask=mask)


def _check_index(name: str, t: torch.Tensor, stop: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D int32/int64 tensor, got {t.dtype} "
                         f"{tuple(t.shape)}")
    if t.numel() < stop:
        raise ValueError(f"{name} has {t.numel()} entries, slot_stop is {stop}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _validate(src, out, tile_m, tile_n, slot_start, slot_stop, block_m, block_n):
    for name, t in (("src", src), ("out", out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if src.dtype != out.dtype:
        raise TypeError(f"src and out dtypes differ: {src.dtype} vs {out.dtype}")
    for name, v in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a positive power of two, got {v!r}")
    for name, v in (("slot_start", slot_start), ("slot_stop", slot_stop)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if slot_stop < slot_start:
        raise ValueError(f"slot_stop {slot_stop} < slot_start {slot_start}")
    if out.dim() != 2 or out.numel() == 0 or (out.shape[1] > 1 and out.stride(1) != 1):
        raise ValueError(f"out must be a non-empty row-major 2-D tensor, got shape "
                         f"{tuple(out.shape)} strides {out.stride()}")
    device = out.device
    if device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"restore_tiles needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    if src.device != device:
        raise ValueError(f"src is on {src.device}, expected {device}")
    if not src.is_contiguous() or src.numel() < slot_stop * block_m * block_n:
        raise ValueError(f"src must be a contiguous buffer of at least slot_stop*BM*BN = "
                         f"{slot_stop}*{block_m}*{block_n} elements, got {tuple(src.shape)}")
    _check_index("tile_m", tile_m, slot_stop, device)
    _check_index("tile_n", tile_n, slot_stop, device)


def _validate_residual(residual: torch.Tensor | None, out: torch.Tensor) -> None:
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.shape != out.shape or residual.dtype != out.dtype or residual.device != out.device:
        raise ValueError(f"residual must match out ({tuple(out.shape)}, {out.dtype}, {out.device}), "
                         f"got {tuple(residual.shape)}, {residual.dtype}, {residual.device}")
    if residual.shape[1] > 1 and residual.stride(1) != 1:
        raise ValueError(f"residual must be row-major, got strides {residual.stride()}")


def restore_tiles(
    src: torch.Tensor,
    out: torch.Tensor,
    tile_m: torch.Tensor,
    tile_n: torch.Tensor,
    slot_start: int,
    slot_stop: int,
    block_m: int,
    block_n: int,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy slots ``[slot_start, slot_stop)`` of ``src`` (``[R, BM, BN]``) into ``out``.

    With ``residual`` (``out``'s shape and dtype; may be ``out`` itself), each restored tile
    is ``src tile + residual tile``, added in fp32.  Launches on the current stream; returns
    ``out``.  Tile coordinates must lie inside ``out``'s tile grid (the plan guarantees it;
    they are not checked on the host, which would need a device sync).
    """
    _validate(src, out, tile_m, tile_n, slot_start, slot_stop, block_m, block_n)
    _validate_residual(residual, out)
    if out.device.type == "cuda" and out.device.index != torch.cuda.current_device():
        with torch.cuda.device(out.device):
            launch_restore(src, out, tile_m, tile_n, slot_start, slot_stop - slot_start,
                           block_m, block_n, residual)
    else:
        launch_restore(src, out, tile_m, tile_n, slot_start, slot_stop - slot_start,
                       block_m, block_n, residual)
    return out


def launch_restore(src: torch.Tensor, out: torch.Tensor, tile_m: torch.Tensor,
                   tile_n: torch.Tensor, slot_start: int, slots: int, block_m: int,
                   block_n: int, residual: torch.Tensor | None = None):
    """The launch alone, on the current stream and device: no checks.

    Returns the compiled kernel (what Triton's launch returns), or None for no slots.
    """
    if slots == 0:
        return None
    rows, N = out.shape
    block_r = _block_r(block_m, block_n)
    stride_om = out.stride(0) if rows > 1 else N
    res, stride_rm = _residual_args(residual, out)
    return _restore_kernel[(slots, triton.cdiv(block_m, block_r))](
        src, out, tile_m, tile_n, res, slot_start, rows, N, stride_om, stride_rm,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, HAS_RESIDUAL=residual is not None,
        num_warps=_NUM_WARPS)


def _residual_args(residual: torch.Tensor | None, out: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(pointer argument, row stride); without a residual, ``out`` stands in (never read)."""
    if residual is None:
        return out, 0
    rows, N = residual.shape
    return residual, (residual.stride(0) if rows > 1 else N)


def _block_r(block_m: int, block_n: int) -> int:
    return max(1, min(block_m, _CHUNK_ELEMS // block_n))


class RestoreLauncher:
    """:func:`launch_restore` from one source buffer with one restore map, for a hot loop.

    The engine restores every group of every call from its workspace's receive buffer; host
    time per group matters there (it can exceed a small group's GPU time), so the arguments
    are checked once per output signature (:func:`restore_tiles`' checks; later slot ranges
    are the plan's and are not re-checked) and the compiled kernel is launched directly
    (:mod:`flashoverlap.kernels.direct_launch`), keyed on what varies: ``out``'s shape,
    stride, dtype and 16-byte alignment, and whether a residual is added (its row stride and
    alignment).  The residual's shape and dtype are the caller's to check (the ops do).
    """

    def __init__(self, src: torch.Tensor, tile_m: torch.Tensor, tile_n: torch.Tensor,
                 block_m: int, block_n: int) -> None:
        self.src, self.tile_m, self.tile_n = src, tile_m, tile_n
        self.block_m, self.block_n = block_m, block_n
        self.block_r = _block_r(block_m, block_n)
        self.chunks = triton.cdiv(block_m, self.block_r)
        self._kernels = direct_launch.KernelCache()

    def __call__(self, out: torch.Tensor, slot_start: int, slots: int,
                 stream: torch.cuda.Stream | None = None,
                 residual: torch.Tensor | None = None) -> None:
        """Restore slots ``[slot_start, slot_start + slots)`` into ``out`` on ``stream``
        (None: the current stream), adding ``residual`` when given."""
        if slots == 0:
            return
        rows, N = out.shape
        stride_om = out.stride(0) if rows > 1 else N
        res, stride_rm = _residual_args(residual, out)
        key = (rows, N, stride_om, out.dtype, out.data_ptr() % 16 == 0, residual is not None,
               stride_rm, res.data_ptr() % 16 == 0)
        kernel = self._kernels.get(key)
        if kernel is None:
            _validate(self.src, out, self.tile_m, self.tile_n, slot_start, slot_start + slots,
                      self.block_m, self.block_n)
            _validate_residual(residual, out)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                compiled = launch_restore(self.src, out, self.tile_m, self.tile_n, slot_start,
                                          slots, self.block_m, self.block_n, residual)
            self._kernels.remember(key, compiled)
            return
        handle = (stream if stream is not None
                  else torch.cuda.current_stream(out.device)).cuda_stream
        direct_launch.launch(
            kernel, (slots, self.chunks, 1), handle,
            (self.src, out, self.tile_m, self.tile_n, res, slot_start, rows, N, stride_om,
             stride_rm, self.block_m, self.block_n, self.block_r, residual is not None))


def restore_tiles_ref(
    src: torch.Tensor,
    out: torch.Tensor,
    tile_m: torch.Tensor,
    tile_n: torch.Tensor,
    slot_start: int,
    slot_stop: int,
    block_m: int,
    block_n: int,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch :func:`restore_tiles` (a Python loop over slots)."""
    rows, N = out.shape
    tiles = src.reshape(-1)[: slot_stop * block_m * block_n].view(-1, block_m, block_n)
    tm_list = tile_m.detach().cpu().tolist()
    tn_list = tile_n.detach().cpu().tolist()
    for slot in range(slot_start, slot_stop):
        r0, c0 = tm_list[slot] * block_m, tn_list[slot] * block_n
        r1, c1 = min(r0 + block_m, rows), min(c0 + block_n, N)
        if r1 > r0 and c1 > c0:
            tile = tiles[slot, : r1 - r0, : c1 - c0]
            if residual is not None:
                tile = (tile.float() + residual[r0:r1, c0:c1].float()).to(out.dtype)
            out[r0:r1, c0:c1] = tile
    return out
