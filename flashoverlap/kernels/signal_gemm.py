"""The signal GEMM: a persistent Triton matmul that follows an overlap plan and signals per tile.

``C = A @ B`` where program ``p`` of a grid of ``P`` programs runs steps ``p, p+P, p+2P, ...``
of the plan's step table (``flashoverlap.plan``: ``row_start, row_stop, col_start, col_stop,
dest_row, group, block`` per step).  Each step computes one ``BLOCK_M x BLOCK_N`` tile of ``C``
and stores it at row ``dest_row`` of a row-major destination with ``N`` columns: the result
itself for an in-place collective (``dest_row == row_start``), or a send buffer packed by
destination (ReduceScatter).  Rows are masked by ``row_stop`` (a row block may end inside a
tile), columns by ``col_stop``.  After a tile is stored, the program bumps the counter of the
tile's group by one, so group ``g`` is complete once ``counters[g]`` reaches its tile count; a
watcher stream waits for that and hands the group's rows to NCCL.

Two kernels implement this contract.  On sm_90, a launch whose plan is made of whole tiles
(``full_tiles``, ``Plan.full_tiles``), without a residual, in bf16/fp16 with TMA-addressable
operands runs the warp-specialized Gluon kernel of :mod:`flashoverlap.kernels.ws_signal_gemm`
(a loader warp, two MMA warpgroups, a TMA-store + signal warp: 1.006-1.027x this kernel's
efficiency in the medians on one H200, up to 1.12x on short K with 116 CTAs).  Everything else
runs the pipelined kernel below, which handles partial tiles, the residual epilogue,
unaligned operands (pointer loads) and sm_80/sm_89.  Both split the last wave alike.  A third,
where ``GemmConfig.cluster_ctas`` asks (the table, ``kernels.GEMM_RULES``, does at P in [112,
121) on sm_90): :class:`SignalGemmLauncher` runs the CUDA C cluster GEMM of
:mod:`flashoverlap.kernels.cluster_gemm` (thread-block clusters sharing each B tile through TMA
multicast) where that module's ``eligible`` and the device's cluster capacity allow --
measured at 1.012x the Gluon kernel's efficiency on the rows it took at P = 116
(``results/2026-12-03-h200/ab-run47``); under a stream capture only a variant loaded before
(loading synchronizes the stream).  :func:`signal_gemm` never takes it (it would need the step
table on the host: a sync per call).  :func:`signal_gemm` and
:class:`SignalGemmLauncher` choose once per argument signature; the choice depends on the
plan, the tensors' layout, the device and whether this launch adds a residual.  Ranks of one
collective therefore choose alike, except for an AllReduce with a replicated residual, where
rank 0 alone adds it and runs the pipelined kernel (correct either way; that rank's GEMM is
the slower one).

Residual epilogue: with ``HAS_RESIDUAL`` the tiles of row block ``res_block`` get
``residual[row - res_block * rows_per_block, col]`` added to the fp32 accumulator before the
store (one rounding), which is how a ReduceScatter's owning rank (or rank 0 of an AllReduce
whose residual is replicated) adds the residual without a pass of its own.  Other blocks load
nothing (the load is masked off).

Ordering protocol of the pipelined kernel (why a reader that sees the count sees the data)
-----------------------------------------------------------------------------------------
(The warp-specialized kernel's protocol, with TMA stores, is in its own module.)

1. Every thread of the program stores its part of the tile with ordinary ``st.global``
   (pointer stores, not TMA stores: ``cp.async.bulk.wait_group.read`` only waits until a
   bulk store has *read* shared memory, so a release after it would not cover its writes).
2. A CTA barrier (``bar.sync 0``) orders all threads' prior memory accesses before
   anything any participating thread does after it.  Compiled, it is emitted as
   side-effecting inline PTX: ``tl.debug_barrier()`` is the same instruction but keeps
   Triton from software-pipelining the flattened persistent loop (no multi-buffering at
   all).  The interpreter uses ``tl.debug_barrier()``.
3. One thread does ``atom.add.release.gpu`` on the group counter (Triton issues a scalar
   atomic from a single thread).  Release semantics are cumulative in the PTX memory model:
   the stores of the other threads, ordered before the release by the barrier, become
   visible at GPU scope no later than the counter update.
4. The consumer observes the count with an acquire at GPU (or system, for the stream
   memory operations) scope, then synchronizes its own threads before reading the data.
Without step 2 the release would cover only thread 0's own stores; without step 1's pointer
stores it would cover none.  The GPU stress test (tests/gpu/test_signal_gemm.py) snapshots
each group the moment its counter completes and compares with the final buffer.

Main loop
---------
On sm_90 the operands are read through TMA descriptors built on the device
(``tl.make_tensor_descriptor``; Triton needs ``triton.set_allocator`` for their workspace,
:func:`_ensure_tma_allocator` installs a torch one if none is set).  ``B`` may be row-major
``[K, N]`` or the transposed view of a row-major ``[N, K]`` tensor (a ``nn.Linear`` weight);
the latter is read as ``[BLOCK_N, BLOCK_K]`` boxes of the ``[N, K]`` tensor and transposed in
registers, so neither layout is copied.  TMA needs 16-byte aligned bases and row strides;
other inputs (and sm_80, and the interpreter) take the pointer-load path (``USE_TMA=False``).
The persistent loop is the ``flatten`` form of Triton's persistent-matmul tutorial: the
epilogue re-reads its step's table row (``step_c``) so that the software pipeline can start
the next tile's loads before this tile's epilogue.

Split last wave
---------------
A persistent GEMM of ``T`` tiles on ``P`` programs ends with a wave of ``r = T mod P``
tiles, during which ``P - r`` SMs idle for a whole tile's time (4 of 132 busy for 16384 x 8192
with 128 x 256 tiles).  When ``r <= P / 2`` (:func:`flashoverlap.kernels.tail_split`) those
tiles are split along K into up to 4 parts, one program each.  A part stores its fp32 partial
sum in its own slot, barriers and takes a ticket (``atom.add.acq_rel.gpu``); the part that
draws the last ticket reads the tile's slots back (``ld.global.cg``, after a barrier) and sums
them in part order -- the same result whichever part finishes last -- re-arms the ticket,
and stores and signals the tile exactly like the main loop's epilogue (pointer stores,
``bar.sync 0``, release atomic).  No part waits for another, so nothing assumes the programs
are co-resident (NCCL may hold SMs).  Rejected: fp32 atomics into one slot (the result
would depend on timing), more than 4 parts (the last part reads every slot: 128 KB each),
a stream-K tail (below).  The slots (``parts x BLOCK_M x BLOCK_N`` fp32 per split tile) and
tickets are allocated with the launch arguments and reused by every launch of a launcher.

Rejected, measured: a stream-K tail for last waves more than half full (which the split
leaves whole: 4096 and 8192 rows x 8192 leave 100 and 68 of 132 tiles).  The K steps of the
last full wave and the partial one were cut into ``P`` equal ranges, one per program, the
ranges sharing a tile following the split's protocol with a variable number of parts;
expected ``(P + r) / P`` tile times for the last two waves instead of 2 (2-3 %).  On one
H200 (Triton 3.6, bf16, paired with torch.matmul, two runs of each) it was *slower* on every
shape it applied to: 4096 x 8192 x 2048 0.194-0.209 -> 0.218-0.224 ms, 4096 x 8192 x 8192
0.79 -> 0.90-0.92 ms, 11008 x 3072 x 8192 0.82-0.83 -> 0.88-0.91 ms -- about one tile time
more, not 0.24 less (``results/2026-12-02-h200/sk-run1/``).  Its inner K loop is pipelined
like the main loop's (checked in the TTGIR), so the likely cost is memory: the data-parallel
waves run their CTAs in step along K, so the A and B slices of one K step are read once from
HBM and then hit in L2 for the other CTAs of the band, while equal ranges start every program
at a different K offset and that sharing is lost.  The code is in the history (commit
``9a238f4``); the split last wave kept the helpers it shared with it.
Rejected, measured: a *filled* last wave in the warp-specialized kernel, which keeps that
sharing (commit ``f4996f0``, reverted): each tile of a last wave of ``r > P / 2`` tiles cut at
one K step, the long parts on the tiles' own programs (all starting at K step 0 together), the
short parts back to back on the ``P - r`` idle programs (all starting at the cut), the part
finishing second adding the other's fp32 partial (two terms: the same bits either way). Right
on the GPU (its tests and 104 filled calls in the stress test), but paired against the same
kernel without it (one H200, bf16, both B layouts, 3 alternations,
``results/2026-12-03-h200/fill-run32/``): 0.975-0.998 of the time at P = 132 with K >= 7168 on
4096 and 8192 x 8192, 1.006-1.024x on 11008 x 3072 x 8192, 0.99-1.04x at P = 116 and 1.01-1.17x
at K = 2048 (medians of the pairs per shape and layout). Under the power cap the partly idle
last wave already runs at a higher clock (as in the rejected P-fit,
:mod:`flashoverlap.kernels`), so the nominal fifth to third of a tile it saves is mostly not
there to take, and the partials cost the rest.
Rejected, measured: TMA stores signalled one tile later (commit ``79d75d7``, reverted).  Whole
tiles left as two ``BLOCK_M x BLOCK_N/2`` bulk stores and were released at the program's next
epilogue after ``cp.async.bulk.wait_group 0``, ``fence.proxy.async.global`` and ``bar.sync``,
so the warps did not wait for a tile to drain.  On one H200 (P = 132, 13 shapes x 2 B
layouts, two pairs each, ``results/2026-12-02-h200/tma-store-run4/``) the time ratio to the
pointer stores was median 0.994 / 0.991, geometric mean 0.997 / 1.000 -- noise -- while
Triton 3.6 failed to compile the variant without counters (its nested-loop fusion) and the
stress run did not finish within its limit (not diagnosed).
The split last wave shares its K loop, part protocol and epilogue through ``_k_range_tma`` /
``_k_range_ptr``, ``_add_part`` and ``_store_and_signal``.  The main loop keeps its inline
copies: passing its epilogue through the helper reorders a few table loads in the PTX, which
would need a GPU run to judge.

Numbers (``scripts/bench_gemm.py``; ``results/2026-11-25-h100/gemm.json``): H100 SXM, Triton
3.6, bf16, M in {4096, 8192, 16384} x (K, N) in {(2048|7168|8192, 8192)}, tile-slotted
stores + signals (the previous layout), one group per wave: with all 132 SMs 0.95-1.03x torch.matmul (median 1.00); with 124 and
116 CTAs medians 0.95 and 0.93.  Tuning notes: ``epilogue_subtile``, 4 stages, BLOCK_K=128,
``group_m`` 4/16 and no accumulator multi-buffering were no better within the run-to-run
noise (``gemm_sweep_*.txt``); a non-flattened loop was not faster (up to 8% slower).
Per-shape choices: :func:`flashoverlap.kernels.gemm_config_for`, measured with
``scripts/gemm_sweep.py``.  ``GemmConfig.warp_specialize`` passes ``warp_specialize`` to the
persistent ``tl.range``; Triton 3.6's sm_90 pass drops the release atomic (and the inline
barrier) of such a loop, so the compiled PTX is checked before the first launch and a kernel
that lost the atomic, or that Triton split into warp partitions (``bar.sync 0`` would wait
for the producer warps forever), raises ``NotImplementedError`` (``_check_warp_specialized``).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading

import torch
import triton
import triton.language as tl

from flashoverlap.kernels import (
    LAUNCH_OPTIONS,
    TICKETS_PER_TILE,
    GemmConfig,
    cluster_gemm,
    config_for_tile,
    default_config,
    direct_launch,
    tail_programs,
    tail_split,
    ws_signal_gemm,
)

# Same column order as flashoverlap.plan.STEP_TABLE_COLUMNS (kept literal so the kernel
# module does not depend on the planner).
_ROW_START, _ROW_STOP, _COL_START, _COL_STOP, _DEST_ROW, _GROUP, _BLOCK = range(7)
_STEP_COLUMNS = 7

# Decided when the kernels are decorated: interpreted kernels run on CPU tensors.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_STRIDE = 2**31 // 512  # elements; BLOCK * stride must fit in int32


# --------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["M", "N", "K", "stride_am", "stride_b", "stride_cm",
                               "stride_rm", "res_block", "rows_per_block",
                               "num_steps", "num_progs", "num_main", "tail_parts"])
def _signal_gemm_kernel(
    a_ptr, b_ptr, c_ptr, step_ptr, counter_ptr, res_ptr,
    M, N, K,
    stride_am, stride_b, stride_cm,  # stride_b: of K for row-major B, of N for B = W.T
    stride_rm, res_block, rows_per_block,  # residual: row stride, its block, block height
    num_steps, num_progs,
    part_ptr, ticket_ptr,  # split tail: fp32 [pieces, BM * BN] parts, int32 [tail] tickets
    num_main, tail_parts,  # steps run whole; K parts of each later step (SPLIT_TAIL)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    B_TRANS: tl.constexpr,  # B is the transposed view of a row-major [N, K] tensor
    HAS_COUNTERS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    USE_TMA: tl.constexpr, FLATTEN: tl.constexpr, EPILOGUE_SUBTILE: tl.constexpr,
    ACC_MULTIBUFFER: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,  # tl.range(warp_specialize=...): Triton's automatic WS
    ALIGN: tl.constexpr,  # K, N and every stride are multiples of ALIGN elements
    ASM_BARRIER: tl.constexpr,  # CTA barrier as inline PTX (compiled) or tl.debug_barrier
    INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,  # interpreter only: its tl.dot multiplies bf16 bit patterns
    SPLIT_TAIL: tl.constexpr,  # steps [num_main, num_steps) split along K (tail_split)
):
    pid = tl.program_id(0)
    dtype = c_ptr.dtype.element_ty

    # Shapes and strides are not specialized (they vary with every problem; specializing
    # would recompile), so state the divisibility the host checked, or masks and addresses
    # could not be vectorized (2-byte loads and stores).  x // ALIGN * ALIGN == x here;
    # unlike tl.multiple_of it also reaches the compiler for kernel arguments.
    K = K // ALIGN * ALIGN
    N = N // ALIGN * ALIGN
    stride_am = stride_am // ALIGN * ALIGN
    stride_b = stride_b // ALIGN * ALIGN
    stride_cm = stride_cm // ALIGN * ALIGN
    stride_rm = stride_rm // ALIGN * ALIGN
    k_tiles = tl.cdiv(K, BLOCK_K)

    if USE_TMA:
        a_desc, b_desc = _tma_operands(a_ptr, b_ptr, M, N, K, 1, stride_am, stride_b,
                                       BLOCK_M, BLOCK_N, BLOCK_K, B_TRANS)

    offs_i = tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    # The epilogue tracks its own step (step_c) and re-reads the table: with a flattened
    # loop this keeps the main loop's prologue independent of the previous epilogue.
    step_c = pid - num_progs
    for step in tl.range(pid, num_main, num_progs, flatten=FLATTEN,
                         disallow_acc_multi_buffer=not ACC_MULTIBUFFER,
                         warp_specialize=WARP_SPECIALIZE):
        row_start = tl.load(step_ptr + step * 7 + 0)
        col_start = tl.multiple_of(tl.load(step_ptr + step * 7 + 2), BLOCK_N)  # tn * BN
        if USE_TMA:
            acc = _k_range_tma(a_desc, b_desc, row_start, col_start, 0, k_tiles, BLOCK_M,
                               BLOCK_N, BLOCK_K, B_TRANS, DOT_FP32, INPUT_PRECISION)
        else:
            acc = _k_range_ptr(a_ptr, b_ptr, row_start, col_start, 0, k_tiles, M, N, K,
                               stride_am, stride_b, offs_i, offs_j, offs_k, BLOCK_M, BLOCK_N,
                               BLOCK_K, B_TRANS, DOT_FP32, INPUT_PRECISION)

        # ---- epilogue: store the tile, then signal its group --------------------------
        step_c += num_progs
        row = step_ptr + step_c * 7
        c_row_start = tl.load(row + 0)
        c_rows = tl.load(row + 1) - c_row_start
        c_col_start = tl.multiple_of(tl.load(row + 2), BLOCK_N)
        c_cols = tl.multiple_of(tl.load(row + 3) - c_col_start, ALIGN)  # min(BN, N - col)
        dest_row = tl.load(row + 4)
        c_base = c_ptr + dest_row.to(tl.int64) * stride_cm + c_col_start
        stride_ci = stride_cm
        if HAS_RESIDUAL:
            # Only block res_block's tiles add the residual: elsewhere the mask is all false
            # and nothing is read.  Added in fp32 before the one rounding of the store.
            c_block = tl.load(row + 6)
            r_row = c_row_start - c_block * rows_per_block
            r_ptrs = res_ptr + r_row.to(tl.int64) * stride_rm + c_col_start \
                + (offs_i[:, None] * stride_rm + offs_j[None, :])
            r_rows = tl.where(c_block == res_block, c_rows, 0)  # other blocks: no rows
            r_mask = (offs_i < r_rows)[:, None] & (offs_j < c_cols)[None, :]
            acc += tl.load(r_ptrs, mask=r_mask, other=0.0).to(tl.float32)
        if EPILOGUE_SUBTILE:
            HALF_N: tl.constexpr = BLOCK_N // 2
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF_N)), (0, 2, 1))
            acc0, acc1 = tl.split(halves)
            offs_h = tl.arange(0, HALF_N)
            mask_i = (offs_i < c_rows)[:, None]
            c_ptrs = c_base + (offs_i[:, None] * stride_ci + offs_h[None, :])
            tl.store(c_ptrs, acc0.to(dtype), mask=mask_i & (offs_h < c_cols)[None, :])
            tl.store(c_ptrs + HALF_N, acc1.to(dtype),
                     mask=mask_i & ((offs_h + HALF_N) < c_cols)[None, :])
        else:
            c_ptrs = c_base + (offs_i[:, None] * stride_ci + offs_j[None, :])
            mask_c = (offs_i < c_rows)[:, None] & (offs_j < c_cols)[None, :]
            tl.store(c_ptrs, acc.to(dtype), mask=mask_c)
        if HAS_COUNTERS:
            _release_tile(counter_ptr, row, ASM_BARRIER)

    if SPLIT_TAIL:
        # ---- the last wave's tiles, each split into tail_parts K ranges ---------------
        # Part q of tail tile t is piece v = t * tail_parts + q, run by program v (at most
        # one piece per program: pieces <= num_progs).  A piece stores its fp32 partial sum
        # in its own slot, then (CTA barrier, one acq_rel atomic) takes a ticket; the piece
        # that draws the last ticket sums the tile's slots in part order -- the same sum
        # whichever piece finishes last -- re-arms the ticket and stores and signals the
        # tile like the main loop's epilogue.  Nobody waits, so no co-residency is assumed.
        offs_tile = offs_i[:, None] * BLOCK_N + offs_j[None, :]  # a slot, row-major
        num_pieces = (num_steps - num_main) * tail_parts
        for v in range(pid, num_pieces, num_progs):
            t = v // tail_parts
            q = v - t * tail_parts
            row = step_ptr + (num_main + t) * 7
            row_start = tl.load(row + 0)
            col_start = tl.multiple_of(tl.load(row + 2), BLOCK_N)
            k_lo = q * k_tiles // tail_parts
            k_hi = (q + 1) * k_tiles // tail_parts
            if USE_TMA:
                acc = _k_range_tma(a_desc, b_desc, row_start, col_start, k_lo, k_hi, BLOCK_M,
                                   BLOCK_N, BLOCK_K, B_TRANS, DOT_FP32, INPUT_PRECISION)
            else:
                acc = _k_range_ptr(a_ptr, b_ptr, row_start, col_start, k_lo, k_hi, M, N, K,
                                   stride_am, stride_b, offs_i, offs_j, offs_k, BLOCK_M,
                                   BLOCK_N, BLOCK_K, B_TRANS, DOT_FP32, INPUT_PRECISION)
            _add_part(acc, v, t, tail_parts, part_ptr, ticket_ptr, offs_tile, row,
                      col_start, c_ptr, res_ptr, counter_ptr, stride_cm, stride_rm, res_block,
                      rows_per_block, offs_i, offs_j, BLOCK_M, BLOCK_N, ALIGN, HAS_RESIDUAL,
                      HAS_COUNTERS, ASM_BARRIER)


@triton.jit
def _add_part(acc, own_slot, t, parts, part_ptr, ticket_ptr, offs_tile, row,
              col_start, c_ptr, res_ptr, counter_ptr, stride_cm, stride_rm, res_block,
              rows_per_block, offs_i, offs_j, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              ALIGN: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_COUNTERS: tl.constexpr,
              ASM_BARRIER: tl.constexpr):
    """One K range's fp32 partial of tail tile ``t`` (one of ``parts``): into ``own_slot``;
    CTA barrier; an ``acq_rel`` ticket (release of every thread's slot stores, acquire of the
    other parts' for the last one).  The part that draws the last ticket barriers again (the
    acquiring thread's view -> the CTA's), sums the tile's slots in order from
    ``t * parts`` (``.cg``: past L1) -- the same sum whichever part finishes last --,
    re-arms the ticket for the next launch and stores and signals the tile."""
    TILE: tl.constexpr = BLOCK_M * BLOCK_N
    tl.store(part_ptr + tl.cast(own_slot, tl.int64) * TILE + offs_tile, acc)
    t = _cta_barrier(t, ASM_BARRIER)
    ticket = tl.atomic_add(ticket_ptr + t, 1, sem="acq_rel", scope="gpu")
    if ticket == parts - 1:
        t = _cta_barrier(t, ASM_BARRIER)
        slots = part_ptr + tl.cast(t * parts, tl.int64) * TILE + offs_tile
        total = tl.load(slots, cache_modifier=".cg")
        for q in range(1, parts):
            total += tl.load(slots + q * TILE, cache_modifier=".cg")
        tl.atomic_xchg(ticket_ptr + t, 0, sem="relaxed", scope="gpu")
        _store_and_signal(total, row, col_start, c_ptr, res_ptr, counter_ptr, stride_cm,
                          stride_rm, res_block, rows_per_block, offs_i, offs_j, ALIGN,
                          HAS_RESIDUAL, HAS_COUNTERS, ASM_BARRIER)


@triton.jit
def _release_tile(counter_ptr, row, ASM_BARRIER: tl.constexpr):
    """The tile's release (module doc, steps 2-3): after every thread's stores, a CTA barrier,
    then one ``atom.add.release.gpu`` on the counter of the step's group (column 5 of its
    table ``row``).  The atomic's address depends on the barrier's result, so the compiler
    cannot move it above the barrier.  The signal and grouped kernels' one copy of it."""
    group = _cta_barrier(tl.load(row + 5), ASM_BARRIER)
    tl.atomic_add(counter_ptr + group, 1, sem="release", scope="gpu")


@triton.jit
def _cta_barrier(x, ASM_BARRIER: tl.constexpr):
    """``bar.sync 0`` (inline PTX, returning ``x`` so later code depends on it) or
    ``tl.debug_barrier()`` in the interpreter.  As side-effecting inline asm it is the same
    barrier as ``tl.debug_barrier()``, which however stops Triton from software-pipelining
    the flattened persistent loop."""
    if ASM_BARRIER:
        x = tl.inline_asm_elementwise("bar.sync 0;\n\tmov.u32 $0, $1;", "=r,r", [x],
                                      dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.debug_barrier()
    return x


@triton.jit
def _tma_operands(a_ptr, b_ptr, M, N, K, E, stride_am, stride_b, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, B_TRANS: tl.constexpr):
    """TMA descriptors of the row-major ``A [M, K]`` and of B, ``E`` matrices stacked (1: one
    weight; the grouped kernel's experts): with ``B_TRANS`` the row-major ``[E * N, K]``,
    else the row-major ``[E * K, N]``.  The signal, grouped and gather kernels' common
    prologue; inlined, their PTX is the same as with it written out in each (compiled for
    sm_90 and diffed, Triton 3.6 and 3.9, up to debug labels)."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    if B_TRANS:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * N, K], strides=[stride_b, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * K, N], strides=[stride_b, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    return a_desc, b_desc


@triton.jit
def _k_range_tma(a_desc, b_desc, row_start, col_start, k_lo, k_hi, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, B_TRANS: tl.constexpr,
                 DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """fp32 ``A[rows, k] @ B[k, cols]`` over K steps ``[k_lo, k_hi)`` (TMA loads): a whole
    tile's K loop (``0, k_tiles``) and a split part's.  Inlined: the PTX is the same as with
    the loop written out in the kernel (compiled for sm_90 and diffed, Triton 3.6 and 3.9)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in range(k_lo, k_hi):
        off_k = ki * BLOCK_K
        a = a_desc.load([row_start, off_k])
        if B_TRANS:
            b = b_desc.load([col_start, off_k]).T
        else:
            b = b_desc.load([off_k, col_start])
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _k_range_ptr(a_ptr, b_ptr, row_start, col_start, k_lo, k_hi, M, N, K, stride_am, stride_b,
                 offs_i, offs_j, offs_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, B_TRANS: tl.constexpr, DOT_FP32: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):
    """fp32 ``A[rows, k] @ B[k, cols]`` over K steps ``[k_lo, k_hi)`` (masked pointer loads:
    rows past ``M`` and columns past ``N`` load zeros).  A 64-bit tile base and 32-bit offsets
    inside the tile (strides are bounded on the host): fewer 64-bit registers per element."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    mask_am = (row_start + offs_i) < M
    mask_bn = (col_start + offs_j) < N
    a_ptrs = a_ptr + row_start.to(tl.int64) * stride_am + k_lo * BLOCK_K \
        + (offs_i[:, None] * stride_am + offs_k[None, :])
    if B_TRANS:
        b_ptrs = b_ptr + col_start.to(tl.int64) * stride_b + k_lo * BLOCK_K \
            + (offs_j[None, :] * stride_b + offs_k[:, None])
    else:
        b_ptrs = b_ptr + col_start + tl.cast(k_lo * BLOCK_K, tl.int64) * stride_b \
            + (offs_k[:, None] * stride_b + offs_j[None, :])
    for ki in range(k_lo, k_hi):
        k_left = K - ki * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_am[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_bn[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K
        if B_TRANS:
            b_ptrs += BLOCK_K
        else:
            b_ptrs += BLOCK_K * stride_b
    return acc


@triton.jit
def _store_and_signal(acc, row, col_start, c_ptr, res_ptr, counter_ptr, stride_cm, stride_rm,
                      res_block, rows_per_block, offs_i, offs_j, ALIGN: tl.constexpr,
                      HAS_RESIDUAL: tl.constexpr, HAS_COUNTERS: tl.constexpr,
                      ASM_BARRIER: tl.constexpr):
    """The epilogue of the tile of step-table ``row``: residual (fp32), one rounding, pointer
    stores, CTA barrier, release atomic on the tile's group counter (module docstring)."""
    dtype = c_ptr.dtype.element_ty
    c_row_start = tl.load(row + 0)
    c_rows = tl.load(row + 1) - c_row_start
    c_cols = tl.multiple_of(tl.load(row + 3) - col_start, ALIGN)
    dest_row = tl.load(row + 4)
    if HAS_RESIDUAL:
        c_block = tl.load(row + 6)
        r_row = c_row_start - c_block * rows_per_block
        r_ptrs = res_ptr + r_row.to(tl.int64) * stride_rm + col_start \
            + (offs_i[:, None] * stride_rm + offs_j[None, :])
        r_rows = tl.where(c_block == res_block, c_rows, 0)
        r_mask = (offs_i < r_rows)[:, None] & (offs_j < c_cols)[None, :]
        acc += tl.load(r_ptrs, mask=r_mask, other=0.0).to(tl.float32)
    c_ptrs = c_ptr + dest_row.to(tl.int64) * stride_cm + col_start \
        + (offs_i[:, None] * stride_cm + offs_j[None, :])
    mask_c = (offs_i < c_rows)[:, None] & (offs_j < c_cols)[None, :]
    tl.store(c_ptrs, acc.to(dtype), mask=mask_c)
    if HAS_COUNTERS:
        _release_tile(counter_ptr, row, ASM_BARRIER)


# --------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------


# The device-side TMA descriptors' scratch.  Triton asks the allocator for it on every launch;
# a fresh torch.empty costs ~4 us of host time on the H200 host (host_breakdown.py), a tenth of
# the launch.  Launches of the signal GEMMs reuse one buffer per (device, stream, size): the
# descriptors are written at the kernel's start and read only during it, and two launches on
# one stream do not overlap (these kernels use no programmatic dependent launch).  Other
# Triton kernels that find this allocator installed (and may use PDL), and launches during
# CUDA-graph capture (whose buffers belong to the graph's pool), get a fresh buffer.
_SCRATCH: dict[tuple[int, int, int], torch.Tensor] = {}
_REUSE = threading.local()  # .on: a signal-GEMM launch of this thread is asking


def _torch_allocator(size: int, alignment: int, stream) -> torch.Tensor:
    if getattr(_REUSE, "on", False):  # (set only outside capture)
        key = (torch._C._cuda_getDevice(), int(stream or 0), size)
        buf = _SCRATCH.get(key)
        if buf is None:
            if len(_SCRATCH) >= 64:  # many streams: start over (frees are stream-ordered)
                _SCRATCH.clear()
            buf = _SCRATCH[key] = torch.empty(size, dtype=torch.int8, device="cuda")
        return buf
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_tma_allocator() -> None:
    """Install a torch-backed allocator for device-side TMA descriptors if none is set.

    Triton keeps the allocator in a ContextVar, so a new thread starts without one: check
    on every TMA launch (cheap), and never replace an allocator the user installed.
    """
    var = _ALLOCATOR_VAR[0]
    if var is not None:
        current = var.get()
        if current is _torch_allocator or not isinstance(current, _NULL_ALLOCATOR[0]):
            return
    elif var is False:  # the layout of a future Triton: just set ours
        triton.set_allocator(_torch_allocator)
        return
    else:
        try:
            from triton.runtime import _allocation

            _ALLOCATOR_VAR[0], _NULL_ALLOCATOR[0] = _allocation._allocator, _allocation.NullAllocator
        except (ImportError, AttributeError):
            _ALLOCATOR_VAR[0] = False
        _ensure_tma_allocator()
        return
    triton.set_allocator(_torch_allocator)


# Triton's allocator ContextVar and its "none set" class, looked up at the first TMA launch.
_ALLOCATOR_VAR: list = [None]
_NULL_ALLOCATOR: list = [type(None)]


def _is_row_major(t: torch.Tensor) -> bool:
    return t.shape[1] == 1 or t.stride(1) == 1


def _is_col_major(t: torch.Tensor) -> bool:
    return t.shape[0] == 1 or t.stride(0) == 1


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _tma_ok(t: torch.Tensor, stride: int) -> bool:
    """TMA needs a 16-byte aligned base and row stride."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and (stride * size) % 16 == 0


def _common_align(*values: int) -> int:
    """8 if every value is a multiple of 8 elements (16 bytes of bf16), else 1.

    Only two values, so that random shapes compile at most twice per path.
    """
    return 8 if all(v % 8 == 0 for v in values) else 1


def _operand_strides(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, int, int]:
    """``(b_trans, stride_am, stride_b)``; strides of size-1 dimensions normalized."""
    M, K = a.shape
    N = b.shape[1]
    b_trans = not _is_row_major(b)
    stride_am = a.stride(0) if M > 1 else K
    if b_trans:
        stride_b = b.stride(1) if N > 1 else K
    else:
        stride_b = b.stride(0) if K > 1 else N
    return b_trans, stride_am, stride_b


def uses_tma(a: torch.Tensor, b: torch.Tensor, config: GemmConfig) -> bool:
    """Whether :func:`signal_gemm` takes the TMA path for these operands."""
    _, stride_am, stride_b = _operand_strides(a, b)
    return config.use_tma and _tma_ok(a, stride_am) and _tma_ok(b, stride_b)


def _validate(a, b, out, step_table, block_m, block_n, num_ctas, counters, residual,
              rows_per_block):
    for name, t in (("a", a), ("b", b), ("out", out), ("step_table", step_table)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("counters", counters), ("residual", residual)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if a.dtype not in _DTYPES:
        raise TypeError(f"a must be bfloat16, float16 or float32, got {a.dtype}")
    if b.dtype != a.dtype or out.dtype != a.dtype:
        raise TypeError(f"dtypes differ: a {a.dtype}, b {b.dtype}, out {out.dtype}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"a and b must be 2-D, got shapes {tuple(a.shape)}, {tuple(b.shape)}")
    M, K = a.shape
    if b.shape[0] != K:
        raise ValueError(f"inner dimensions differ: a {tuple(a.shape)}, b {tuple(b.shape)}")
    N = b.shape[1]
    if min(M, N, K) < 1:
        raise ValueError(f"empty problem: M={M}, N={N}, K={K}")
    device = a.device
    if device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"signal_gemm needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    for name, t in (("b", b), ("out", out), ("step_table", step_table)):
        _check_device(name, t, device)
    if not _is_row_major(a):
        raise ValueError(f"a must be row-major (stride(1) == 1), got strides {a.stride()}")
    if not (_is_row_major(b) or _is_col_major(b)):
        raise ValueError(
            f"b must be row-major [K, N] or the transposed view of a row-major [N, K] tensor, "
            f"got strides {b.stride()}")
    if step_table.dtype != torch.int32 or step_table.dim() != 2 or step_table.shape[1] != 7:
        raise ValueError(f"step_table must be int32 [T, 7], got {step_table.dtype} "
                         f"{tuple(step_table.shape)}")
    if not step_table.is_contiguous() or step_table.shape[0] < 1:
        raise ValueError("step_table must be contiguous with at least one row")
    for name, v in (("block_m", block_m), ("block_n", block_n), ("num_ctas", num_ctas)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if tuple(out.shape) != (M, N) or not _is_row_major(out):
        raise ValueError(f"out must be row-major [{M}, {N}] (the destination of every dest_row), "
                         f"got shape {tuple(out.shape)} strides {out.stride()}")
    if residual is not None:
        _check_device("residual", residual, device)
        if residual.dtype != a.dtype or residual.dim() != 2 or residual.shape[1] != N \
                or not _is_row_major(residual):
            raise ValueError(f"residual must be row-major [rows, {N}] of {a.dtype}, got "
                             f"{residual.dtype} {tuple(residual.shape)} strides {residual.stride()}")
        if rows_per_block is None or residual.shape[0] != rows_per_block:
            raise ValueError(f"residual must have rows_per_block={rows_per_block} rows, got "
                             f"{residual.shape[0]}")
    # Offsets inside a tile are 32-bit in the kernel.
    strides = [("a", a.stride(0)), ("b", max(b.stride())), ("out", out.stride(0))]
    if residual is not None:
        strides.append(("residual", residual.stride(0)))
    for name, stride in strides:
        if stride >= _MAX_STRIDE:
            raise ValueError(f"{name} row stride {stride} too large (limit {_MAX_STRIDE})")
    if counters is not None:
        _check_device("counters", counters, device)
        if counters.dtype != torch.int32 or not counters.is_contiguous():
            raise ValueError(f"counters must be contiguous int32, got {counters.dtype}")


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def tail_scratch_for(num_steps: int, num_ctas: int, K: int, block_m: int, block_n: int,
                     config: GemmConfig, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fp32 part slots and int32 tickets a launch of this shape needs to split its last
    wave (None: no split).  Launches of one launcher reuse them (every launch leaves the
    tickets zero); the overlap engine allocates them once per workspace and counts them in its
    memory budget.  Both kernels split alike and can share them."""
    k_tiles = triton.cdiv(K, config.block_k)
    num_main, parts = _tail_schedule(num_steps, num_ctas, k_tiles, config)
    if parts == 1:
        return None
    tail = num_steps - num_main
    slots = tail * parts
    return (torch.empty(slots * block_m * block_n, dtype=torch.float32, device=device),
            torch.zeros(tail * TICKETS_PER_TILE, dtype=torch.int32, device=device))


def _tail_schedule(num_steps: int, num_ctas: int, k_tiles: int,
                   config: GemmConfig) -> tuple[int, int]:
    """``(num_main, parts)``: the split last wave where enabled and it applies, else
    ``(num_steps, 1)``."""
    if config.split_tail:
        return tail_split(num_steps, num_ctas, k_tiles, config.split_min_saved_k_tiles)
    return num_steps, 1


def _tail_args(step_table, num_ctas, K, block_m, block_n, config, device, tail_scratch):
    """``(num_main, parts, part slots, tickets)`` of a launch: the split last wave's schedule
    and scratch (``tail_scratch`` where given and large enough, else allocated; the step
    table stands in for both, never touched, without a split)."""
    T = step_table.shape[0]
    num_main, parts = _tail_schedule(T, num_ctas, triton.cdiv(K, config.block_k), config)
    if parts == 1:
        return num_main, parts, step_table, step_table
    # fp32 parts of the split tiles and their tickets: zero, and left zero by every launch
    # (the last piece of a tile re-arms its tickets; slots are overwritten).
    tail = T - num_main
    if (tail_scratch is None or tail_scratch[0].numel() < tail * parts * block_m * block_n
            or tail_scratch[1].numel() < tail * TICKETS_PER_TILE):
        tail_scratch = tail_scratch_for(T, num_ctas, K, block_m, block_n, config, device)
    return num_main, parts, tail_scratch[0], tail_scratch[1]


def _launch_args(a, b, out, step_table, block_m, block_n, num_ctas, counters, residual,
                 residual_block, rows_per_block, config, tail_scratch=None):
    """``(grid, args, meta)`` of one launch of the kernel (no checks: :func:`_validate`);
    ``tail_scratch``: :func:`tail_scratch_for`'s buffers to use (allocated here if None or
    too small)."""
    config = _resolve_config(a, block_m, block_n, config)
    M, K = a.shape
    N = b.shape[1]
    b_trans, stride_am, stride_b = _operand_strides(a, b)
    stride_cm = _row_stride(out)
    stride_rm = _row_stride(residual) if residual is not None else N
    use_tma = uses_tma(a, b, config)
    T = step_table.shape[0]
    num_main, parts, part_arg, ticket_arg = _tail_args(step_table, num_ctas, K, block_m,
                                                       block_n, config, a.device, tail_scratch)
    programs = tail_programs(T, num_ctas, num_main, parts)
    counter_arg = counters if counters is not None else step_table  # never touched
    res_arg = residual if residual is not None else out  # never touched
    args = (a, b, out, step_table, counter_arg, res_arg, M, N, K, stride_am, stride_b,
            stride_cm, stride_rm, residual_block, rows_per_block or M, T, num_ctas,
            part_arg, ticket_arg, num_main, parts)
    meta = {
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": config.block_k,
        "B_TRANS": b_trans, "HAS_COUNTERS": counters is not None,
        "HAS_RESIDUAL": residual is not None,
        "USE_TMA": use_tma, "FLATTEN": config.flatten,
        "ACC_MULTIBUFFER": config.acc_multibuffer,
        "WARP_SPECIALIZE": config.warp_specialize,
        "EPILOGUE_SUBTILE": config.epilogue_subtile and block_n >= 32,
        "ALIGN": _common_align(K, N, stride_am, stride_b, stride_cm, stride_rm),
        "ASM_BARRIER": not _INTERPRET,
        "INPUT_PRECISION": "ieee" if a.dtype == torch.float32 or _INTERPRET else None,
        # Triton's interpreter (3.6-3.9) runs tl.dot on bf16 as raw uint16 numbers; bf16
        # products are exact in fp32, so upcasting gives the tensor-core result.
        "DOT_FP32": _INTERPRET and a.dtype == torch.bfloat16,
        "SPLIT_TAIL": parts > 1,
        "num_warps": config.num_warps, "num_stages": config.num_stages, **LAUNCH_OPTIONS,
    }
    if config.max_registers is not None and not _INTERPRET:
        meta["maxnreg"] = config.max_registers
    return (programs, 1, 1), args, meta


def _resolve_config(a, block_m, block_n, config):
    """``config``, or the device's default with the plan's tile (and that tile's measured
    stages, :func:`~flashoverlap.kernels.config_for_tile`); a config whose tile is not the
    plan's is refused."""
    if config is None:
        config = config_for_tile(default_config(a.device, a.dtype), block_m, block_n)
    elif (config.block_m, config.block_n) != (block_m, block_n):
        raise ValueError(f"config tile {config.block_m}x{config.block_n} differs from the "
                         f"plan's {block_m}x{block_n}")
    return config


def _choose_launch(a, b, out, step_table, block_m, block_n, num_ctas, counters, residual,
                   residual_block, rows_per_block, config, full_tiles, tail_scratch=None):
    """The kernel this launch runs and how: ``(kernel, jit_launch, grid, args, meta)`` -- the
    warp-specialized kernel where :func:`ws_signal_gemm.eligible` allows it, else the
    pipelined one (:func:`_launch_args`).  Checks are :func:`_validate`'s, done before."""
    config = _resolve_config(a, block_m, block_n, config)
    if ws_signal_gemm.eligible(a, b, out, config, residual, full_tiles):
        tail = _tail_args(step_table, num_ctas, a.shape[1], block_m, block_n, config,
                          a.device, tail_scratch)
        return (ws_signal_gemm.kernel(), _ws_jit_launch,
                *ws_signal_gemm.launch_args(a, b, out, step_table, block_m, block_n, num_ctas,
                                            counters, config, tail))
    return (_signal_gemm_kernel, _jit_launch,
            *_launch_args(a, b, out, step_table, block_m, block_n, num_ctas, counters,
                          residual, residual_block, rows_per_block, config, tail_scratch))


def _ws_jit_launch(grid, args, meta):
    """The warp-specialized kernel through the JIT (device-side TMA descriptors: the
    allocator must be installed, as for the pipelined kernel's)."""
    _ensure_tma_allocator()
    return ws_signal_gemm.jit_launch(grid, args, meta)


def _jit_launch(grid, args, meta):
    """Launch through the JIT on the current stream; returns the compiled kernel."""
    if meta["USE_TMA"] and not _INTERPRET:
        _ensure_tma_allocator()
    if meta["WARP_SPECIALIZE"] and not _INTERPRET:
        _check_warp_specialized(_signal_gemm_kernel.warmup(*args, grid=grid[:1], **meta), meta)
    return _signal_gemm_kernel[grid[:1]](*args, **meta)


_RELEASE_ATOMIC = re.compile(r"\b(?:atom|red)\.[a-z0-9.]*release[a-z0-9.]*\.add\b"
                             r"|\b(?:atom|red)\.[a-z0-9.]*\.add[a-z0-9.]*release")


def _check_warp_specialized(compiled, meta) -> None:
    """Refuse a ``warp_specialize`` kernel that would break the ordering protocol.

    Checked on the compiled PTX before the first launch (``warp_specialize`` only):
    the release atomic must still be there (Triton 3.6's sm_90 warp-specialization pass drops
    it, and the inline ``bar.sync 0`` with it), and a kernel Triton actually partitioned
    (more warps than asked for) is refused outright: ``bar.sync 0`` counts every warp of the
    CTA, and the producer partition never reaches it (deadlock).  A loop Triton left whole is
    the ordinary kernel and runs.
    """
    if not meta["HAS_COUNTERS"]:
        return
    ptx = compiled.asm.get("ptx", "") if hasattr(compiled, "asm") else ""
    if not _RELEASE_ATOMIC.search(ptx):
        raise NotImplementedError(
            f"warp_specialize: Triton {triton.__version__} dropped the signal's release atomic "
            "from the compiled kernel; the signal GEMM cannot use warp specialization here")
    warps = getattr(getattr(compiled, "metadata", None), "num_warps", meta["num_warps"])
    if warps != meta["num_warps"]:
        raise NotImplementedError(
            f"warp_specialize: Triton {triton.__version__} partitioned the loop ({warps} warps "
            f"for num_warps={meta['num_warps']}); the CTA barrier of the signal protocol "
            "(bar.sync 0) is not valid across warp partitions")


def signal_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    *,
    step_table: torch.Tensor,
    block_m: int,
    block_n: int,
    num_ctas: int,
    counters: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_block: int = 0,
    rows_per_block: int | None = None,
    config: GemmConfig | None = None,
    full_tiles: bool = False,
) -> torch.Tensor:
    """``out[dest rows] <- a @ b`` tile by tile in plan order, bumping ``counters[group]``.

    Args:
        a: ``[M, K]`` row-major (``stride(1) == 1``), bf16/fp16 (fp32 for tests).
        b: ``[K, N]`` row-major, or ``w.T`` for a row-major ``w`` of shape ``[N, K]``.
        out: row-major ``[M, N]`` destination; tile ``s`` lands at row ``dest_row[s]``.
        step_table: ``torch.from_numpy(plan.step_table)`` on ``a``'s device (int32 ``[T, 7]``).
        block_m, block_n, num_ctas: the plan's ``BM``, ``BN`` and ``P``.
        counters: int32 ``[G]`` group counters, incremented (not reset) by the tiles; the
            caller arms them.  ``None`` skips the signals.
        residual: optional row-major ``[rows_per_block, N]`` added (fp32) to the tiles of row
            block ``residual_block`` before they are stored.
        config: kernel options; defaults to :func:`default_config` for the device.
        full_tiles: every step of ``step_table`` is a whole ``block_m x block_n`` tile
            (``Plan.full_tiles``); lets sm_90 run the warp-specialized kernel
            (:mod:`flashoverlap.kernels.ws_signal_gemm`), whose TMA store writes whole tiles.

    Returns ``out``.  The launch goes to the current stream of ``a``'s device.
    """
    _validate(a, b, out, step_table, block_m, block_n, num_ctas, counters, residual,
              rows_per_block)
    _, jit, *launch = _choose_launch(a, b, out, step_table, block_m, block_n, num_ctas,
                                     counters, residual, residual_block, rows_per_block, config,
                                     full_tiles)
    if a.device.type == "cuda" and a.device.index != torch.cuda.current_device():
        with torch.cuda.device(a.device):
            jit(*launch)
    else:
        jit(*launch)
    return out


# Positions of the per-call arguments in the kernel's parameter list.
_A, _B, _OUT, _CNT, _RES = 0, 1, 2, 4, 5


class SignalGemmLauncher:
    """:func:`signal_gemm` with one step table, counter array and residual placement.

    For the overlap engine's hot path, where the step table and counters belong to a
    workspace and only the operands, the destination and the residual change from call to
    call: the checks run once per argument signature (shapes, strides, dtypes, devices,
    16-byte alignment -- everything the compiled kernel is specialized on; the kernel's
    integers are all ``do_not_specialize``), and later calls launch the compiled kernel
    directly (:mod:`flashoverlap.kernels.direct_launch`): ~100 us of host time down to ~15 on
    an H100 host.  Launches go to ``stream``, which must be the current stream of the current
    device (Triton allocates the TMA descriptors' scratch through torch, on the current
    stream).
    """

    def __init__(self, step_table: torch.Tensor, counters: torch.Tensor | None, *,
                 block_m: int, block_n: int, num_ctas: int, residual_block: int = 0,
                 rows_per_block: int | None = None, config: GemmConfig | None = None,
                 tail_scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
                 full_tiles: bool = False) -> None:
        self.step_table, self.counters = step_table, counters
        self.full_tiles = full_tiles  # signal_gemm's full_tiles: sm_90 may run the WS kernel
        # The split last wave's slots and tickets (tail_scratch_for), shared by the launches
        # of every key; allocated at the first launch that needs them when not given.
        self.tail_scratch = tail_scratch
        self.block_m, self.block_n, self.num_ctas = block_m, block_n, num_ctas
        self.residual_block, self.rows_per_block = residual_block, rows_per_block
        self.config = config
        # key -> (compiled kernel, grid, all arguments, uses TMA, residual's position or None);
        # (cluster kernel, None, ...) where GemmConfig.cluster_ctas runs cluster_gemm's
        self._entries = direct_launch.KernelCache()
        self._host_table = None  # the step table on the host, for cluster_gemm.eligible

    def __call__(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                 residual: torch.Tensor | None = None,
                 stream: torch.cuda.Stream | int | None = None, *,
                 counters: torch.Tensor | None = None,
                 capturing: bool | None = None) -> None:
        """``out <- a @ b`` (+ residual) at the plan's rows, counters bumped, on ``stream``
        (a stream, the raw handle of the *current* stream, or None: the current one).

        ``counters``: bump these instead of the launcher's own (same length and 16-byte
        alignment: the compiled kernel is shared).  ``capturing``: whether the current stream
        is being captured, where the caller knows (else it is asked).
        """
        # Every property the compiled kernel is specialized on, and the devices (checked by
        # the first launch of a key); 16-byte alignment of the three pointers in one test.
        pa, pb, po = a.data_ptr(), b.data_ptr(), out.data_ptr()
        aligned = (pa | pb | po) & 15 == 0
        key = (a.shape, a.stride(), a.dtype, a.get_device(), b.shape, b.stride(), b.dtype,
               out.shape, out.stride(), out.dtype, out.get_device(),
               True if aligned else (pa % 16 == 0, pb % 16 == 0, po % 16 == 0),
               None if residual is None else (residual.shape, residual.stride(), residual.dtype,
                                              residual.data_ptr() % 16 == 0),
               counters is not None or self.counters is not None)  # HAS_COUNTERS
        entry = self._entries.get(key)
        if entry is None:
            self._first(key, a, b, out, residual, stream, counters)
            return
        kernel, grid, args, use_tma, res_slot = entry
        if grid is None:  # the CUDA C cluster kernel (cluster_gemm)
            kernel(a, b, out, self.step_table, counters if counters is not None
                   else self.counters, self.num_ctas, stream=_stream_handle(stream, a))
            return
        if use_tma:
            _ensure_tma_allocator()  # per thread: Triton keeps the allocator in a ContextVar
        handle = _stream_handle(stream, a)
        args[_A], args[_B], args[_OUT] = a, b, out
        if res_slot is not None:
            args[res_slot] = residual if residual is not None else out
        if counters is not None:
            args[_CNT] = counters
        if capturing is None:
            capturing = torch._C._cuda_isCurrentStreamCapturing()
        _REUSE.on = use_tma and not capturing
        try:
            direct_launch.launch(kernel, grid, handle, tuple(args))
        finally:
            _REUSE.on = False
            # The cache must not keep the caller's tensors alive (soak on an H200: 10-18 GB
            # held by cached entries before this).
            args[_A] = args[_B] = args[_OUT] = None
            if res_slot is not None:
                args[res_slot] = None
            if counters is not None:
                args[_CNT] = self.counters

    def _first(self, key, a, b, out, residual, stream, counters) -> None:
        bumped = self.counters if counters is None else counters
        _validate(a, b, out, self.step_table, self.block_m, self.block_n, self.num_ctas,
                  bumped, residual, self.rows_per_block)
        config = _resolve_config(a, self.block_m, self.block_n, self.config)
        capturing = a.is_cuda and torch.cuda.is_current_stream_capturing()
        if config.cluster_ctas and self._host_table is None and a.is_cuda and not capturing:
            self._host_table = self.step_table.cpu().numpy()  # once per launcher
        # under capture only a variant loaded before (loading synchronizes the stream)
        kernel = (cluster_gemm.kernel_for(a, b, config, self.num_ctas, may_load=not capturing)
                  if cluster_gemm.eligible(a, b, out, config, residual, self.full_tiles,
                                           self._host_table, self.num_ctas) else None)
        if kernel is not None:
            kernel(a, b, out, self.step_table, bumped, self.num_ctas,
                   stream=_stream_handle(stream, a))
            self._entries.remember(key, kernel, (kernel, None, None, False, None))
            return
        fn, jit, grid, args, meta = _choose_launch(
            a, b, out, self.step_table, self.block_m, self.block_n, self.num_ctas, bumped,
            residual, self.residual_block, self.rows_per_block, config, self.full_tiles,
            self.tail_scratch)
        if fn is _signal_gemm_kernel:
            if meta["SPLIT_TAIL"]:
                self.tail_scratch = (args[17], args[18])
            use_tma, res_slot = bool(meta["USE_TMA"]), _RES
        else:  # the warp-specialized kernel: TMA descriptors, no residual
            if meta["SPLIT_TAIL"]:
                self.tail_scratch = (args[ws_signal_gemm.PARTS_ARG],
                                     args[ws_signal_gemm.PARTS_ARG + 1])
            use_tma, res_slot = True, None
        switch = stream is not None and not isinstance(stream, int)  # int: the current one
        with torch.cuda.stream(stream) if switch else contextlib.nullcontext():
            compiled = jit(grid, args, meta)
        # Both kernels take a, b, out, the step table and the counters first (_A.._CNT).
        every = list(direct_launch.ordered_args(fn, args, meta))
        every[_A] = every[_B] = every[_OUT] = None  # filled per call
        if res_slot is not None:
            every[res_slot] = None
        every[_CNT] = self.counters if self.counters is not None else self.step_table
        self._entries.remember(key, compiled, (compiled, grid, every, use_tma, res_slot))


def _stream_handle(stream: torch.cuda.Stream | int | None, a: torch.Tensor) -> int:
    """The raw handle of a launcher call's ``stream`` (None: the current stream)."""
    if isinstance(stream, int):
        return stream
    return (stream if stream is not None else torch.cuda.current_stream(a.device)).cuda_stream


def signal_gemm_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    step_table: torch.Tensor,
    counters: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_block: int = 0,
    rows_per_block: int | None = None,
) -> torch.Tensor:
    """Pure-torch definition of :func:`signal_gemm`: same elements written, same counters.

    Products are taken in float64 on CPU and float32 elsewhere (the residual added before the
    one rounding), then cast to ``out.dtype``.  Rows no step writes are left untouched;
    ``counters[g]`` grows by the number of steps of group ``g``.
    """
    acc_dtype = torch.float64 if a.device.type == "cpu" else torch.float32
    full = torch.matmul(a.to(acc_dtype), b.to(acc_dtype))
    table = step_table.detach().cpu().tolist()
    for row_start, row_stop, col_start, col_stop, dest, _group, block in table:
        tile = full[row_start:row_stop, col_start:col_stop]
        if residual is not None and block == residual_block:
            r0 = row_start - block * rows_per_block
            tile = tile + residual[r0:r0 + row_stop - row_start, col_start:col_stop].to(acc_dtype)
        out[dest:dest + row_stop - row_start, col_start:col_stop] = tile.to(out.dtype)
    if counters is not None:
        groups = step_table[:, _GROUP].to(device=counters.device, dtype=torch.int64)
        counters += torch.bincount(groups, minlength=counters.numel())[: counters.numel()].to(
            counters.dtype)
    return out
