"""The grouped signal GEMM: the signal GEMM with one weight matrix per tile (MoE experts).

A sibling of :mod:`flashoverlap.kernels.signal_gemm` for :mod:`flashoverlap.all_to_all_plan`
step tables (``int32 [T, 9]``: ``row_start, row_stop, col_start, col_stop, dest_row, group,
block, expert, to_out``).  Step ``s`` computes ``a[row_start:row_stop] @ w[expert]`` for one
``BLOCK_M x BLOCK_N`` tile and stores it at row ``dest_row`` of the send buffer, or of ``out``
when ``to_out`` (this rank's own block: no transfer, no copy).  Both destinations are
row-major with ``N`` columns; the kernel addresses ``out`` as ``send + out_delta`` (the
element distance between the two allocations, passed per call), so choosing the destination
is integer arithmetic, not a branch.  After the store: CTA barrier, then one release atomic
on the group counter -- the ordering protocol of the signal GEMM (see its module docstring).

``w`` is ``[E, K, N]`` row-major per expert or the transposed view of ``[E, N, K]``.  Rows past
a segment's end (a short last tile) are computed with the segment's expert and masked on the
store.  TMA path (sm_90): ``a`` as ``[M, K]``; ``w`` as the 2-D ``[E*K, N]`` (row-major; taken
only when ``K % BLOCK_K == 0``, so a K tile never reads the next expert's rows) or ``[E*N, K]``
(transposed: columns past ``N`` read the next expert's rows and are masked on the store).
Without TMA (sm_80, the interpreter, unaligned operands) pointer loads with masks.

On sm_90, bf16/fp16 launches that TMA can address run the warp-specialized Gluon kernel of
:mod:`flashoverlap.kernels.ws_grouped_signal_gemm` instead (same step table, same signal,
same results); ``GemmConfig.warp_specialized_kernel=False`` keeps this one.

:func:`grouped_signal_gemm_ref` is the torch definition (float64 on CPU).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from flashoverlap.kernels import (
    LAUNCH_OPTIONS,
    GemmConfig,
    default_config,
    ws_grouped_signal_gemm,
)
from flashoverlap.kernels.signal_gemm import _k_range_ptr, _release_tile, _tma_operands

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_COLS = 9
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit(do_not_specialize=["M", "N", "K", "E", "stride_am", "stride_we", "stride_w",
                               "stride_cm", "out_delta", "num_steps", "num_progs"])
def _grouped_signal_gemm_kernel(
    a_ptr, w_ptr, c_ptr, step_ptr, counter_ptr,
    M, N, K, E,
    stride_am, stride_we, stride_w,  # stride_w: of K (row-major w[e]) or of N (transposed)
    stride_cm, out_delta,  # out = c_ptr + out_delta (elements)
    num_steps, num_progs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    W_TRANS: tl.constexpr, HAS_COUNTERS: tl.constexpr, USE_TMA: tl.constexpr,
    FLATTEN: tl.constexpr, ACC_MULTIBUFFER: tl.constexpr, ALIGN: tl.constexpr,
    ASM_BARRIER: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    dtype = c_ptr.dtype.element_ty
    K = K // ALIGN * ALIGN
    N = N // ALIGN * ALIGN
    stride_am = stride_am // ALIGN * ALIGN
    stride_we = stride_we // ALIGN * ALIGN
    stride_w = stride_w // ALIGN * ALIGN
    stride_cm = stride_cm // ALIGN * ALIGN
    k_tiles = tl.cdiv(K, BLOCK_K)

    if USE_TMA:
        a_desc, w_desc = _tma_operands(a_ptr, w_ptr, M, N, K, E, stride_am, stride_w,
                                       BLOCK_M, BLOCK_N, BLOCK_K, W_TRANS)

    offs_i = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    step_c = pid - num_progs
    for step in tl.range(pid, num_steps, num_progs, flatten=FLATTEN,
                         disallow_acc_multi_buffer=not ACC_MULTIBUFFER):
        row_start = tl.load(step_ptr + step * 9 + 0)
        col_start = tl.multiple_of(tl.load(step_ptr + step * 9 + 2), BLOCK_N)
        expert = tl.load(step_ptr + step * 9 + 7)
        if USE_TMA:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                off_k = ki * BLOCK_K
                a = a_desc.load([row_start, off_k])
                if W_TRANS:
                    b = w_desc.load([expert * N + col_start, off_k]).T
                else:
                    b = w_desc.load([expert * K + off_k, col_start])
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        else:
            acc = _k_range_ptr(a_ptr, w_ptr + expert.to(tl.int64) * stride_we, row_start,
                               col_start, 0, k_tiles, M, N, K, stride_am, stride_w, offs_i,
                               offs_j, offs_k, BLOCK_M, BLOCK_N, BLOCK_K, W_TRANS, DOT_FP32,
                               INPUT_PRECISION)

        # ---- epilogue: store the tile at its destination, then signal its group ----------
        step_c += num_progs
        row = step_ptr + step_c * 9
        c_row_start = tl.load(row + 0)
        c_rows = tl.load(row + 1) - c_row_start
        c_col_start = tl.multiple_of(tl.load(row + 2), BLOCK_N)
        c_cols = tl.multiple_of(tl.load(row + 3) - c_col_start, ALIGN)
        dest_row = tl.load(row + 4)
        to_out = tl.load(row + 8)
        c_base = c_ptr + (dest_row.to(tl.int64) * stride_cm + c_col_start
                          + to_out.to(tl.int64) * out_delta)
        c_ptrs = c_base + (offs_i[:, None] * stride_cm + offs_j[None, :])
        mask_c = (offs_i < c_rows)[:, None] & (offs_j < c_cols)[None, :]
        tl.store(c_ptrs, acc.to(dtype), mask=mask_c)
        if HAS_COUNTERS:
            _release_tile(counter_ptr, row, ASM_BARRIER)


def _ensure_tma_allocator() -> None:
    from flashoverlap.kernels.signal_gemm import _ensure_tma_allocator as ensure

    ensure()


def _weight_layout(w: torch.Tensor) -> tuple[bool, int, int]:
    """``(w_trans, stride_we, stride_w)``."""
    E, K, N = w.shape
    row_major = w.stride(2) == 1 or N == 1
    if row_major:
        return False, w.stride(0) if E > 1 else K * N, w.stride(1) if K > 1 else N
    return True, w.stride(0) if E > 1 else K * N, w.stride(2) if N > 1 else K


def _validate(a, w, send, out, step_table, counters) -> None:
    for name, t in (("a", a), ("w", w), ("send", send), ("out", out), ("step_table", step_table)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor")
    if a.dtype not in _DTYPES or w.dtype != a.dtype or send.dtype != a.dtype \
            or out.dtype != a.dtype:
        raise TypeError("a, w, send and out must share a dtype (bf16, fp16, fp32)")
    if a.dim() != 2 or w.dim() != 3 or w.shape[1] != a.shape[1]:
        raise ValueError(f"a [M, K] and w [E, K, N] expected, got {tuple(a.shape)}, "
                         f"{tuple(w.shape)}")
    if a.device.type != "cuda" and not _INTERPRET:
        raise ValueError("grouped_signal_gemm needs CUDA tensors (or TRITON_INTERPRET=1)")
    if a.shape[0] > 1 and a.stride(1) != 1:
        raise ValueError("a must be row-major")
    if not (w.stride(2) == 1 or w.stride(1) == 1):
        raise ValueError("w must be [E, K, N] row-major per expert or [E, N, K].transpose(1, 2)")
    N = w.shape[2]
    for name, t in (("send", send), ("out", out)):
        if t.dim() != 2 or t.shape[1] != N or (t.shape[0] > 1 and t.stride(0) != N) \
                or t.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous [rows, {N}]")
    if step_table.dtype != torch.int32 or step_table.dim() != 2 or step_table.shape[1] != _COLS \
            or not step_table.is_contiguous() or step_table.shape[0] < 1:
        raise ValueError(f"step_table must be contiguous int32 [T, {_COLS}], T >= 1")
    if (out.data_ptr() - send.data_ptr()) % a.element_size():
        raise ValueError("out and send must be element-aligned relative to each other")
    if counters is not None and (counters.dtype != torch.int32 or not counters.is_contiguous()):
        raise ValueError("counters must be contiguous int32")


def _resolve_config(a, block_m, block_n, config):
    if config is None:
        config = dataclasses.replace(default_config(a.device, a.dtype), block_m=block_m,
                                     block_n=block_n)
    return config


def _launch(a, w, send, out, step_table, block_m, block_n, num_ctas, counters, config,
            ws: bool | None = None) -> None:
    """Run the warp-specialized grouped kernel where :func:`ws_grouped_signal_gemm.eligible`
    allows it (``ws``: that answer, known already), else the pipelined one.  Checks are
    :func:`_validate`'s, done before."""
    config = _resolve_config(a, block_m, block_n, config)
    w_layout = _weight_layout(w)
    if ws is None:
        ws = ws_grouped_signal_gemm.eligible(a, w, w_layout, send, out, block_m, block_n,
                                             config)
    if ws:
        grid, args, meta = ws_grouped_signal_gemm.launch_args(
            a, w, w_layout, send, out, step_table, block_m, block_n, num_ctas, counters,
            config)
        _ensure_tma_allocator()  # (device-side descriptors)
        ws_grouped_signal_gemm.launch(grid, args, meta)
        return
    grid, args, meta = _launch_args(a, w, send, out, step_table, block_m, block_n, num_ctas,
                                    counters, config)
    if meta["USE_TMA"]:
        _ensure_tma_allocator()
    _grouped_signal_gemm_kernel[grid](*args, **meta)


def uses_warp_specialized(a, w, send, out, block_m, block_n, config=None) -> bool:
    """Whether a launch with these operands runs the warp-specialized grouped kernel (for
    benchmark rows and tests; no device work)."""
    return ws_grouped_signal_gemm.eligible(a, w, _weight_layout(w), send, out, block_m,
                                           block_n, _resolve_config(a, block_m, block_n, config))


def _launch_args(a, w, send, out, step_table, block_m, block_n, num_ctas, counters, config):
    M, K = a.shape
    E, _, N = w.shape
    w_trans, stride_we, stride_w = _weight_layout(w)
    stride_am = a.stride(0) if M > 1 else K
    tma_ok = (config.use_tma and not _INTERPRET and a.data_ptr() % 16 == 0
              and w.data_ptr() % 16 == 0 and (stride_am * a.element_size()) % 16 == 0
              and (stride_w * a.element_size()) % 16 == 0
              and (w_trans or K % config.block_k == 0)
              and stride_we == (N * stride_w if w_trans else K * stride_w))
    align = 8 if all(v % 8 == 0 for v in (K, N, stride_am, stride_we, stride_w, N)) else 1
    T = step_table.shape[0]
    delta = (out.data_ptr() - send.data_ptr()) // a.element_size()
    args = [a, w, send, step_table, counters if counters is not None else step_table,
            M, N, K, E, stride_am, stride_we, stride_w, N, delta, T, num_ctas]
    meta = {
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": config.block_k,
        "W_TRANS": w_trans, "HAS_COUNTERS": counters is not None, "USE_TMA": tma_ok,
        "FLATTEN": config.flatten, "ACC_MULTIBUFFER": config.acc_multibuffer, "ALIGN": align,
        "ASM_BARRIER": not _INTERPRET,
        "INPUT_PRECISION": "ieee" if a.dtype == torch.float32 or _INTERPRET else None,
        "DOT_FP32": _INTERPRET and a.dtype == torch.bfloat16,
        "num_warps": config.num_warps, "num_stages": config.num_stages, **LAUNCH_OPTIONS,
    }
    return (min(num_ctas, T),), args, meta


def grouped_signal_gemm(a: torch.Tensor, w: torch.Tensor, send: torch.Tensor,
                        out: torch.Tensor, *, step_table: torch.Tensor, block_m: int,
                        block_n: int, num_ctas: int, counters: torch.Tensor | None = None,
                        config: GemmConfig | None = None) -> None:
    """Run the plan's steps: tile ``s`` of ``a @ w[expert]`` to ``send`` (or ``out`` when
    ``to_out``) at ``dest_row``; ``counters[group]`` bumped per tile (None: no signals)."""
    _validate(a, w, send, out, step_table, counters)
    _launch(a, w, send, out, step_table, block_m, block_n, num_ctas, counters, config)


class GroupedSignalGemmLauncher:
    """:func:`grouped_signal_gemm` bound to one step table and counter array (a workspace's);
    checks and chooses the kernel once per argument signature, then launches through the
    JIT."""

    def __init__(self, step_table, counters, *, block_m, block_n, num_ctas, config=None):
        self.step_table, self.counters = step_table, counters
        self.block_m, self.block_n, self.num_ctas, self.config = block_m, block_n, num_ctas, config
        self._seen: dict = {}  # argument signature -> runs the warp-specialized kernel

    def __call__(self, a, w, send, out, stream_handle=None) -> None:
        key = (a.shape, a.stride(), a.dtype, a.device, a.data_ptr() % 16, w.shape, w.stride(),
               w.data_ptr() % 16, send.shape, out.shape, send.data_ptr() % 16,
               out.data_ptr() % 16)
        ws = self._seen.get(key)
        if ws is None:
            _validate(a, w, send, out, self.step_table, self.counters)
            ws = self._seen[key] = uses_warp_specialized(a, w, send, out, self.block_m,
                                                         self.block_n, self.config)
        _launch(a, w, send, out, self.step_table, self.block_m, self.block_n, self.num_ctas,
                self.counters, self.config, ws)


def grouped_signal_gemm_ref(a: torch.Tensor, w: torch.Tensor, send: torch.Tensor,
                            out: torch.Tensor, step_table: torch.Tensor,
                            counters: torch.Tensor | None = None) -> None:
    """Pure-torch definition of :func:`grouped_signal_gemm`: the same elements written (float64
    products on CPU, float32 elsewhere, one rounding), the same counter increments."""
    acc = torch.float64 if a.device.type == "cpu" else torch.float32
    for row_start, row_stop, c0, c1, dest, _g, _blk, e, to_out in step_table.cpu().tolist():
        tile = a[row_start:row_stop].to(acc) @ w[e, :, c0:c1].to(acc)
        target = out if to_out else send
        target[dest:dest + row_stop - row_start, c0:c1] = tile.to(target.dtype)
    if counters is not None:
        groups = step_table[:, 5].to(device=counters.device, dtype=torch.int64)
        counters += torch.bincount(groups, minlength=counters.numel())[:counters.numel()].to(
            counters.dtype)
