"""The warp-specialized grouped signal GEMM: MoE experts on the sm_90 Gluon kernel.

Same contract as :func:`flashoverlap.kernels.grouped_signal_gemm.grouped_signal_gemm` (its
pure-torch definition is :func:`~flashoverlap.kernels.grouped_signal_gemm.grouped_signal_gemm_ref`):
program ``p`` of ``P`` runs steps ``p, p+P, ...`` of an :mod:`flashoverlap.all_to_all_plan` step
table (``int32 [T, 9]``: ``row_start, row_stop, col_start, col_stop, dest_row, group, block,
expert, to_out``), computes ``a[row_start:row_stop] @ w[expert]`` for one ``BLOCK_M x
BLOCK_N`` tile, stores it at row ``dest_row`` of ``send`` (or of ``out`` when ``to_out``) and
then adds one to its group's counter.  It runs instead of the pipelined grouped kernel when
:func:`eligible` says so.

What it shares with :mod:`flashoverlap.kernels.ws_signal_gemm`, and what differs
---------------------------------------------------------------------------------
The partitions are that kernel's: a 1-warp **loader** (TMA loads into ``STAGES`` stages), the
8-warp **MMA** partition (two warpgroups of ``64 x BLOCK_N``, the accumulator handed to the
storer through one shared-memory C buffer; its code is ``ws_signal_gemm._mma``, without the
split last wave) and a 1-warp **storer**.  Differences:

* **Per-tile expert.**  ``w`` is read through one 2-D descriptor over all experts --
  ``[E * N, K]`` for the transposed view of ``[E, N, K]`` (a tile's columns past ``N`` read the
  next expert's rows: garbage in columns the store clips), ``[E * K, N]`` for row-major
  ``[E, K, N]`` (taken only when ``K % BLOCK_K == 0``, so a K step never reads the next
  expert's rows) -- and the loader offsets B's row coordinate by ``expert * N`` (or ``*
  K``).  A's rows past a segment's end belong to the next segment (or are zero-filled past
  ``M``): computed, never stored.
* **Two destinations.**  One TMA descriptor each for ``send`` and ``out``; the storer picks
  by ``to_out``.  (The pipelined kernel's single pointer plus ``out_delta`` does not work for
  a descriptor: its bounds are one tensor's.)
* **Short tiles.**  A tile whose segment ends inside it (``row_stop - row_start < BLOCK_M``)
  must not touch the rows after it: they are the next segment's, written by another program.
  A bulk tensor store writes its whole box (clipped only at the tensor's bounds), so the
  storer copies such a tile with masked generic stores instead: 8 x 64 chunks of the C
  buffer (``ld.shared`` into registers, 16-byte ``st.global`` of the rows before ``row_stop``
  and the columns before ``N``), then gives the buffer back.  One warp copies a 64 KB tile in
  a few microseconds while the MMA partition computes the next tile (about 20 us at K =
  4096), so the copy is hidden unless two short tiles come back to back on one program.  The
  copy is unrolled (a shared-memory slice needs a constant start) and spilled in the
  workers' usual 48 registers (176 B, ptxas for sm_90); the workers get 96, which leaves the
  MMA partition 200 -- no spills at 128 x 256, 12 B of spill stores left at 128 x 128 (not
  traced to a partition).  Rejected:
  storing short tiles from the MMA partition's registers (the tensor cores would idle for the
  store and the signal would need the split tail's per-warp tickets), and building a
  descriptor per segment on the device (``tensormap.replace`` plus a proxy fence per tile).
* **Column edge.**  Full-height tiles at the right edge (``N % BLOCK_N != 0``) take the bulk
  store: the descriptors' ``N`` bound clips them.

Signal: as in ``ws_signal_gemm`` (``_release_group``): ``cp.async.bulk.wait_group 0``,
``fence.proxy.async.global``, ``bar.warp.sync`` -- which also orders the lanes' generic stores
of a short tile before what follows -- and lane 0's ``red.release.gpu``.  The consumer side
is unchanged.

The tile: ``128 x 256 x 64`` (3 stages beside a 64 KB C buffer) or ``128 x 128 x 64`` (up to 6
stages beside 32 KB); the plan's ``block_m`` / ``block_n`` decide.

Measured (one H200, Triton 3.6, bf16, ``scripts/bench_all_to_all.py --sweep``: E in {8, 16,
64} x K = N in {2048, 4096, 7168}, 16384 tokens split unevenly, both weight layouts, each
variant paired with ``torch._grouped_mm``; ``results/2026-12-02-h200/grouped-run2/``):
efficiency against ``torch._grouped_mm``, median over the 9 problems, ``[E, K, N]`` /
``w.transpose(1, 2)``: pipelined 128 x 128 (5 stages, the grouped rule before) 0.974 / 1.045;
this kernel 128 x 128 with 5 stages 1.089 / 1.109, 6 stages 1.125 / 1.116, 128 x 256 1.102 /
1.096 -- ahead of the pipelined kernel on 17 of 18 rows (the 18th: 1.213 against 1.218).  The grouped
rule's 128 x 128 x 5 stages stays (the three variants are within the run's noise).
"""

from __future__ import annotations

import dataclasses

import torch

from flashoverlap.kernels import LAUNCH_OPTIONS, WARP_SPECIALIZED_TILES, GemmConfig, _capability
from flashoverlap.kernels import ws_signal_gemm as _ws

HAVE_GLUON = _ws.HAVE_GLUON
_COLS = 9
TILES = WARP_SPECIALIZED_TILES  # (block_m, block_n, block_k) it runs: the dense kernel's

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

    from flashoverlap.kernels.ws_signal_gemm import (
        _load_range,
        _mma,
        _pipeline_buffers,
        _release_group,
        _tma_store,
    )

    _CHUNK_M = gl.constexpr(8)  # rows of one generic-copy chunk (8 x 64: 8 regs a lane)
    _CHUNK_N = gl.constexpr(64)

    @gluon.jit
    def _grouped_loader(a_desc, b_desc, step_ptr, a_bufs, b_bufs, ready, empty, N, K,
                        num_steps, num_progs, k_tiles, BLOCK_K: gl.constexpr,
                        STAGES: gl.constexpr, B_TRANS: gl.constexpr):
        pid = gl.program_id(0)
        it = 0
        for step in range(pid, num_steps, num_progs):
            row = step_ptr + step * 9
            expert = gl.load(row + 7)
            if B_TRANS:
                b_off = expert * N
            else:
                b_off = expert * K
            it = _load_range(a_desc, b_desc, a_bufs, b_bufs, ready, empty, gl.load(row + 0),
                             gl.load(row + 2), b_off, 0, k_tiles, it, BLOCK_K, STAGES, B_TRANS)

    @gluon.jit
    def _copy_short_tile(c_buf, c_ptr, dest_row, col_start, rows, N, stride_cm):
        """The storer warp's masked copy of the C buffer's first ``rows`` rows and its columns
        before ``N`` to ``c_ptr[dest_row:, col_start:]``, in 8 x 64 chunks (chunks past
        ``rows`` skipped).  (The tile's shape comes from the buffer: a worker partition receives the
        kernel's constexpr arguments as values.)"""
        BLOCK_M: gl.constexpr = c_buf.shape[0]
        BLOCK_N: gl.constexpr = c_buf.shape[1]
        col_start = gl.multiple_of(col_start, BLOCK_N)
        # a multiple of 8 (eligible), restated: the mask is then constant over 16-byte stores
        cols = (N - col_start) // 8 * 8
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [1, 1], [1, 0])
        offs_i = gl.arange(0, _CHUNK_M, layout=gl.SliceLayout(1, layout))
        offs_j = gl.arange(0, _CHUNK_N, layout=gl.SliceLayout(0, layout))
        # (a partition's arguments lose the kernel's alignment facts: restate the base's 16
        # bytes, or every element is stored alone)
        base = gl.multiple_of(c_ptr + dest_row.to(gl.int64) * stride_cm + col_start, 16)
        for r in gl.static_range(0, BLOCK_M, _CHUNK_M):
            if r < rows:
                mask_i = (r + offs_i) < rows
                ptr_i = base + (r + offs_i).to(gl.int64)[:, None] * stride_cm
                for c in gl.static_range(0, BLOCK_N, _CHUNK_N):
                    vals = c_buf.slice(r, _CHUNK_M, 0).slice(c, _CHUNK_N, 1).load(layout)
                    mask = mask_i[:, None] & ((c + offs_j) < cols)[None, :]
                    gl.store(ptr_i + (c + offs_j)[None, :], vals, mask=mask)

    @gluon.jit
    def _grouped_storer(send_desc, out_desc, send_ptr, step_ptr, counter_ptr, c_buf, c_ready,
                        c_empty, N, stride_cm, out_delta, num_steps, num_progs,
                        HAS_COUNTERS: gl.constexpr):
        BLOCK_M: gl.constexpr = c_buf.shape[0]
        pid = gl.program_id(0)
        u = 0
        for step in range(pid, num_steps, num_progs):
            row = step_ptr + step * 9
            row_start = gl.load(row + 0)
            rows = gl.load(row + 1) - row_start
            col_start = gl.load(row + 2)
            dest_row = gl.load(row + 4)
            to_out = gl.load(row + 8)
            mbarrier.wait(c_ready, u & 1)
            if rows == BLOCK_M:  # whole height: one bulk store (clipped at N by the box)
                if to_out != 0:
                    _tma_store(out_desc, [dest_row, col_start], c_buf)
                else:
                    _tma_store(send_desc, [dest_row, col_start], c_buf)
                tma.store_wait(0)  # shared memory read: the MMA partition may refill c_buf
            else:  # the segment ends inside the tile: never write the rows after it
                # (eligible: N, the row stride and out_delta are multiples of 8 elements --
                # said so, the copy stores 16 bytes at a time)
                _copy_short_tile(c_buf, send_ptr + to_out.to(gl.int64) * (out_delta // 8 * 8),
                                 dest_row, col_start,
                                 rows, N // 8 * 8, stride_cm // 8 * 8)
            mbarrier.arrive(c_empty)
            u += 1
            if HAS_COUNTERS:
                _release_group(counter_ptr + gl.load(row + 5))
        tma.store_wait(0)

    @gluon.jit(do_not_specialize=["M", "N", "K", "E", "send_rows", "out_rows", "stride_am",
                                  "stride_w", "stride_cm", "out_delta", "num_steps",
                                  "num_progs"])
    def _ws_grouped_signal_gemm_kernel(
        a_ptr, w_ptr, send_ptr, out_ptr, step_ptr, counter_ptr,
        M, N, K, E, send_rows, out_rows,
        stride_am, stride_w,  # stride_w: of the 2-D view [E * N, K] or [E * K, N]
        stride_cm, out_delta,  # out = send + out_delta (elements), for the generic copy
        num_steps, num_progs,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
        STAGES: gl.constexpr, B_TRANS: gl.constexpr, HAS_COUNTERS: gl.constexpr,
    ):
        dtype: gl.constexpr = send_ptr.dtype.element_ty
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], dtype)
        c_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype)
        a_desc = tma.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                            block_shape=[BLOCK_M, BLOCK_K], layout=a_layout)
        if B_TRANS:  # w[e] = W_e.T: boxes of the row-major [E * N, K] view, transposed in smem
            b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K],
                                                                          dtype)
            b_desc = tma.make_tensor_descriptor(w_ptr, shape=[E * N, K], strides=[stride_w, 1],
                                                block_shape=[BLOCK_N, BLOCK_K], layout=b_layout)
        else:
            b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_N],
                                                                          dtype)
            b_desc = tma.make_tensor_descriptor(w_ptr, shape=[E * K, N], strides=[stride_w, 1],
                                                block_shape=[BLOCK_K, BLOCK_N], layout=b_layout)
        send_desc = tma.make_tensor_descriptor(send_ptr, shape=[send_rows, N],
                                               strides=[stride_cm, 1],
                                               block_shape=[BLOCK_M, BLOCK_N], layout=c_layout)
        out_desc = tma.make_tensor_descriptor(out_ptr, shape=[out_rows, N],
                                              strides=[stride_cm, 1],
                                              block_shape=[BLOCK_M, BLOCK_N], layout=c_layout)
        k_tiles = gl.cdiv(K, BLOCK_K)
        a_bufs, b_bufs, c_buf, ready, empty, c_ready, c_empty = _pipeline_buffers(
            dtype, STAGES, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_N, a_layout, b_layout, c_layout,
            B_TRANS)
        # The MMA partition is the dense kernel's, every step whole (num_main = num_steps, no
        # split tail: its step-table, C-pointer and scratch arguments are never read).
        gl.warp_specialize([
            (_mma, (a_bufs, b_bufs, ready, empty, c_buf, c_ready, c_empty, step_ptr,
                    counter_ptr, send_ptr, stride_cm, send_ptr, step_ptr, num_steps, num_progs,
                    k_tiles, num_steps, 1, BLOCK_M, BLOCK_N, STAGES, B_TRANS, 1, HAS_COUNTERS,
                    False)),
            (_grouped_loader, (a_desc, b_desc, step_ptr, a_bufs, b_bufs, ready, empty, N, K,
                               num_steps, num_progs, k_tiles, BLOCK_K, STAGES, B_TRANS)),
            (_grouped_storer, (send_desc, out_desc, send_ptr, step_ptr, counter_ptr, c_buf,
                               c_ready, c_empty, N, stride_cm, out_delta, num_steps, num_progs,
                               HAS_COUNTERS)),
        ], [1, 1], [96, 96])  # the storer's short-tile copy spills below 96


def eligible(a: torch.Tensor, w: torch.Tensor, w_layout: tuple[bool, int, int],
             send: torch.Tensor, out: torch.Tensor, block_m: int, block_n: int,
             config: GemmConfig) -> bool:
    """Whether this launch can run the warp-specialized grouped kernel (no device work).

    ``w_layout``: ``(w_trans, stride_we, stride_w)`` of ``w`` (``grouped_signal_gemm``'s
    ``_weight_layout``).  Assumes the operands passed ``grouped_signal_gemm._validate``; adds
    what TMA and this
    kernel need: an sm_90 GPU, bf16/fp16, ``GemmConfig.warp_specialized_kernel`` and
    ``use_tma`` on and no ``max_registers`` cap, a tile of :data:`TILES`, 16-byte aligned
    bases and row strides, experts packed back to back and, for row-major ``[E, K, N]``
    weights, ``K % block_k == 0``.
    """
    if (not HAVE_GLUON or _ws._INTERPRET or not config.warp_specialized_kernel
            or not config.use_tma or config.max_registers is not None):
        return False
    if a.dtype not in (torch.bfloat16, torch.float16) or a.device.type != "cuda":
        return False
    if _capability(a.device) != (9, 0):
        return False
    if (block_m, block_n, config.block_k) not in TILES:
        return False
    if stages_for(block_n, config, a.element_size()) < 2:
        return False
    w_trans, stride_we, stride_w = w_layout
    E, K, N = w.shape
    if stride_we != (N if w_trans else K) * stride_w or (not w_trans and K % config.block_k):
        return False  # experts not back to back, or a K step would cross into the next one
    es = a.element_size()
    stride_am = a.stride(0) if a.shape[0] > 1 else K
    for ptr, stride in ((a.data_ptr(), stride_am), (w.data_ptr(), stride_w),
                        (send.data_ptr(), N), (out.data_ptr(), N)):
        if ptr % 16 or (stride * es) % 16:
            return False
    return True


def stages_for(block_n: int, config: GemmConfig, element_size: int) -> int:
    """Pipeline stages that fit beside the ``block_m x block_n`` C buffer (0: none)."""
    return _ws.stages_for(dataclasses.replace(config, block_n=block_n, epilogue_subtile=False),
                          element_size)


def launch_args(a, w, w_layout, send, out, step_table, block_m, block_n, num_ctas, counters,
                config):
    """``(grid, args, meta)`` of one launch (after :func:`eligible`)."""
    M, K = a.shape
    E, _, N = w.shape
    w_trans, _, stride_w = w_layout
    T = step_table.shape[0]
    # A descriptor needs a non-empty tensor: an empty send (every row this rank's) is
    # described by out, and no step targets it.
    send_arg = send if send.shape[0] > 0 else out
    delta = (out.data_ptr() - send_arg.data_ptr()) // a.element_size()
    args = (a, w, send_arg, out, step_table,
            counters if counters is not None else step_table,  # (never touched without)
            M, N, K, E, send_arg.shape[0], out.shape[0],
            a.stride(0) if M > 1 else K, stride_w, N, delta, T, min(num_ctas, T))
    meta = {
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": config.block_k,
        "STAGES": stages_for(block_n, config, a.element_size()), "B_TRANS": w_trans,
        "HAS_COUNTERS": counters is not None, "num_warps": _ws.NUM_MMA_WARPS,
        **LAUNCH_OPTIONS,
    }
    return (min(num_ctas, T),), args, meta


def launch(grid, args, meta) -> None:
    """Launch through the JIT on the current stream."""
    _ws_grouped_signal_gemm_kernel[grid](*args, **meta)


def kernel():
    """The Gluon kernel."""
    return _ws_grouped_signal_gemm_kernel
