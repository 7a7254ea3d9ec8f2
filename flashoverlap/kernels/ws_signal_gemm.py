"""The warp-specialized signal GEMM: sm_90, written in Gluon, for plans of whole tiles.

Same contract as :func:`flashoverlap.kernels.signal_gemm.signal_gemm` (its pure-torch
definition is :func:`~flashoverlap.kernels.signal_gemm.signal_gemm_ref`): program ``p`` of
``P`` runs steps ``p, p+P, ...`` of the plan's step table, stores each ``BLOCK_M x BLOCK_N``
tile at row ``dest_row`` of a row-major destination and then adds one to its group's
counter.  It runs instead of the pipelined kernel when :func:`eligible` says so: an sm_90 GPU,
bf16/fp16, operands and destination that TMA can address, no residual, a 128 x 256 x 64 or
128 x 128 x 64 tile (:data:`~flashoverlap.kernels.WARP_SPECIALIZED_TILES`),
``GemmConfig.warp_specialized_kernel`` and ``use_tma`` on and no ``max_registers`` cap, and a
plan whose every step is a whole tile
(``Plan.full_tiles``: a TMA store writes the whole box, so a tile cut short by a row block
would spill into the next block's rows).  Its last wave splits along K like the pipelined
kernel's (below).

Why a second kernel
-------------------
The pipelined Triton kernel runs every warp through the same loop, so each tile ends with
all warps draining the last MMA, converting, shuffling the tile through shared memory,
storing it and -- for the signal -- waiting behind ``bar.sync`` while one thread's release
fence waits for the stores; the tensor cores idle meanwhile, and the main loop itself carries
four CTA barriers per K step.  Triton 3.6's own warp specialization (``tl.range(...,
warp_specialize=True)``) drops the release atomic (``GemmConfig.warp_specialize``).  Gluon
(Triton's explicit-layout dialect) lets the kernel name its partitions:

* **loader** (1 warp): for each K step waits for a free stage (``empty[s]``), then issues the
  A and B TMA loads that complete ``ready[s]``.
* **MMA** (the default partition, 8 warps = two warpgroups of ``64 x BLOCK_N``): waits for
  ``ready[s]``, issues the wgmma asynchronously, keeps one group in flight, and gives stage
  ``s - 1`` back once its wgmma has retired.  At the end of a tile it converts the
  accumulator into the shared-memory C buffer (after ``c_empty``), fences the generic proxy
  against the async one (``fence.proxy.async.shared::cta``) and arrives on ``c_ready``, then
  starts the next tile: its loads were issued by the loader meanwhile.
* **storer** (1 warp): waits for ``c_ready``, TMA-stores the tile at ``(dest_row,
  col_start)``, waits until the bulk store has *read* shared memory (``c_empty`` for the MMA
  partition), then signals.

Ordering protocol of the signal (storer; one inline-PTX block, every lane):
``cp.async.bulk.wait_group 0`` -- the tile's bulk stores are complete, their writes performed
(``.read`` would only cover the shared-memory reads); ``fence.proxy.async.global`` -- the
async-proxy writes are ordered before the generic-proxy operations that follow;
``bar.warp.sync`` -- lane 0 continues only after every lane's wait; lane 0 then does
``red.release.gpu.global.add``.  The lane that issued the bulk stores is the elected lane
(``elect.sync``: the lowest active lane, lane 0), so the thread that waited is also the one
that releases.  The consumer side is unchanged (acquire at GPU or system scope).  The GPU
stress test (``tests/gpu/test_signal_gemm.py``) runs this kernel on a third of its calls.

Gather form (``WAIT_FLAGS``)
----------------------------
The AllGather GEMM (:mod:`flashoverlap.kernels.gather_gemm`) runs this kernel too, for plans
of whole tiles: no counters (``HAS_COUNTERS`` off), and before the loader issues a tile's
loads it waits for the tile's chunk -- column 5 of the step table is the chunk's slot, the
index of its flag.  Every lane of the loader warp spins on ``ld.global.acquire.gpu`` of the
flag (``nanosleep`` between polls) until it is >= 1, the lanes reconverge (``bar.warp.sync``)
and ``fence.proxy.async.global`` orders the async-proxy TMA loads after the acquire; a
program's slots never decrease along its steps, so it waits once per chunk (the split tail's
piece included).  Only the loader reads A, so only it waits: the MMA warps consume what its
loads delivered (the stage mbarriers), and the storer writes the output, which no flag
guards.

Split last wave
---------------
Same schedule as the pipelined kernel (:func:`flashoverlap.kernels.tail_split`,
``GemmConfig.split_tail``): the tiles of a last wave at most half full are split along K into
``parts`` pieces, piece ``v = t * parts + q`` (part ``q`` of tail tile ``t``) on program ``v``,
at most one per program.  The loader loads the piece's K range, the MMA partition computes it
and -- not the storer: an fp32 partial does not fit the C buffer -- stores the fp32 partial
from registers into its own slot (``st.global``).  A CTA barrier is not available inside a
partition (the other partitions never reach it), so the protocol runs per warp: each MMA warp
holds the same 16 rows of the tile in every part (one layout, one kernel), and after storing
them it does ``bar.warp.sync`` and lane 0 takes a ticket from that warp's counter
(``atom.acq_rel.gpu``: release of the warp's stores, acquire of the other parts' same rows),
broadcast with ``shfl.sync`` and followed by another ``bar.warp.sync``.  The warp that draws the
last ticket reads its rows of every part (``ld.global.cg``) and sums them in part order -- the
same bits whichever part finished last --, stores them (bf16/fp16, ``st.global``), then
``bar.warp.sync``; lane 0 re-arms the warp's ticket and counts the warp on the tile's ninth
counter (``atom.acq_rel.gpu``); the eighth warp to arrive re-arms that count and releases the
group counter (``red.release.gpu``): the acq_rel chain over the tile's eight count updates makes
every warp's stores visible to a reader that acquires the group counter.  Nobody waits for
another program, so no co-residency is assumed.  Tickets: :data:`TICKETS_PER_TILE` per split
tile (the pipelined kernel uses the first); both kernels leave them zero.  The tail runs once
per program, as straight-line code: in a loop, the compiler hoisted the 128 per-thread
addresses of the tile out of it and spilled (608 B per thread, ptxas for sm_90).

Measured (one H200 at its 700 W power cap -- clocks 1455-1725 MHz while a GEMM runs, so
single rows move by 2-5 % between runs --, Triton 3.6, bf16, ``results/2026-12-02-h200/``,
``bench_gemm.py --sweep`` with ``split_tail=0,1,0,1`` and torch.matmul timed between): on
6144 x 3072 x 8192 at P = 132 (4.4 waves, 2 parts) the split takes 4.5 % off the time in both
B layouts; elsewhere it is within about +-1.5 % (16384 x 8192 x 2048 at P = 116, 3 parts of
10-11 K steps, 1.3 % slower in all four pairs).  A piece gains less than ``1 - 1/parts`` of a
tile: alone at the end it no longer shares its A and B K steps with the other CTAs of its
band through L2 (the same cost that made a stream-K tail slower in the pipelined kernel).

Measured (one H200, Triton 3.6, bf16, issue 14's 13 shapes x 2 B layouts, 3 repeats, paired
with torch.matmul, ``scripts/bench_gemm.py``; ``results/2026-12-02-h200/ws-run3, -5, -6``,
before the split last wave): efficiency against torch.matmul with all 132 SMs median
0.997-1.006 (min 0.942-0.960), with 116 CTAs 0.941-0.953 (min 0.885-0.903); in the same run as
the pipelined kernel (ws-run5) its efficiency was 1.006-1.027x the pipelined one's in the
medians and up to 1.12x on short K at P = 116.  Shared memory: 3 stages x 48 KB + a 64 KB C
buffer = 208 KB, so one CTA per SM.

128 x 128 tiles (the same code with ``BLOCK_N = 128``: two warpgroups of 64 x 128, 5 stages x
32 KB + a 32 KB C buffer): where both tiles fill the same number of waves they take 1 / 0.925
of 128 x 256's time (median of 12 rows at P = 132, ``tiles-run17``: smaller tiles read more
operand bytes per FLOP), so they pay only where 128 x 256 leaves a poor last wave --
:func:`flashoverlap.kernels.wave_tile` picks them there (on 60 rows with each tile forced,
``results/2026-12-03-h200/rule-run23``: none of the 25 it switches slower, 1.22x less time in
the median on the 23 where it differs from the first rule).  Before this kernel took the tile,
the pipelined one ran it, at 3-6 % lower efficiency on the same rows in an earlier run
(``splitcost-run14``; not paired).

``GemmConfig.epilogue_subtile`` gives a half-width C buffer (two stores a tile), which makes
room for a fourth stage: measured slower on 20 of 26 rows (ws-run4), so off by default.
Rejected, measured: running this kernel on tiles cut by the destination's last row or column
too (commit ``a7b5ee3``, reverted): the bulk store clips at the tensor's bounds and TMA loads
zero-fill, so any AllReduce M and N would qualify, and it passed its GPU tests (a NaN guard
band around the destination stayed NaN).  Against the pipelined kernel on four such shapes
(M in {5000, 7000} x (K, N) in {(5120, 5120), (14336, 4096)}, B = ``w.t()``, P = 132 / 116,
two pairs each, ``results/2026-12-02-h200/wssplit-run5/ragged-*``) its time ratio was
geometric mean 1.012, median 1.007: no gain, so those plans keep the pipelined kernel.
Rejected, measured: staggered epilogues (commit ``cdbf373``, reverted): the two MMA
warpgroups as two 4-warp partitions, each on its 64-row half of every tile, the second
writing its half of the C buffer after the first (an mbarrier between them), so that each
one's epilogue would run beside the other's MMAs.  Correct on the GPU, but 0.1-0.8 % slower
in the geometric mean over the 13 shapes x P = 132 / 116 x 2 pairs per B layout, 1.1-1.8 %
slower at K = 2048 (``results/2026-12-02-h200/staggered-run1/``).  What an overlapped
epilogue could gain at most: fitted over K in {2048, 7168, 8192}, a round of tiles takes
about 1 us plus 11.4-12.3 us per 1,024 of K (wssplit-run3/4, grouped-run3), so at most ~4 %
at K = 2048 and ~1 % at K >= 7168 -- and only with a schedule where one warpgroup's MMAs
really fill the tensor cores while the other stores (CUTLASS's ping-pong: whole tiles per
warpgroup, which reads 1.33x more operand bytes per FLOP at 128 x 128 per warpgroup).
Rejected, measured: two pipelined CTAs per SM with 128 x 128 tiles (the schedulers interleaving
one CTA's epilogue with the other's MMAs): 17 % faster than one such CTA per SM, but 0.92-0.94
of torch.matmul in the medians against 0.99-1.00 for one 128 x 256 CTA (ws-run1): smaller
tiles read more from L2 per FLOP than the overlap gains.
"""

from __future__ import annotations

import os

import torch

from flashoverlap.kernels import (
    LAUNCH_OPTIONS,
    TICKETS_PER_TILE,
    WARP_SPECIALIZED_TILES,
    GemmConfig,
    _capability,
    b_transposed,
    tail_programs,
    tma_addressable,
)

try:  # Gluon ships with Triton >= 3.5; the pipelined kernel covers everything without it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    HAVE_GLUON = True
    _MMA_WARPS = gl.constexpr(8)
    _TICKETS = gl.constexpr(TICKETS_PER_TILE)  # per split tile: 8 warps' tickets, 1 count
    # Triton 3.6 names the TMA copies async_copy_*; later versions renamed them async_load /
    # async_store (same arguments) and made the old names raise.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
except ImportError:  # pragma: no cover - old Triton
    HAVE_GLUON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Shared memory of one CTA (sm_90: 227 KB per block) bounds the stages: the C buffer takes
# BLOCK_M x BLOCK_N elements beside STAGES x (A + B) boxes.
SMEM_LIMIT = 227 * 1024
NUM_MMA_WARPS = 8  # two warpgroups of 64 rows: BLOCK_M = 128 (_MMA_WARPS in the kernel)
# The split tail's PTX hard-codes these: warp index = (tid.x >> 5) & 7, the finished-warp
# count at ticket 8 (byte offset 32), the tile done when that count reaches 7 before the add.
assert NUM_MMA_WARPS == 8 and TICKETS_PER_TILE >= NUM_MMA_WARPS + 1


if HAVE_GLUON:

    @gluon.jit
    def _pipeline_buffers(dtype: gl.constexpr, STAGES: gl.constexpr, BLOCK_M: gl.constexpr,
                          BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, C_N: gl.constexpr,
                          a_layout: gl.constexpr, b_layout: gl.constexpr,
                          c_layout: gl.constexpr, B_TRANS: gl.constexpr):
        """Shared memory of both warp-specialized kernels: ``STAGES`` A and B boxes, the
        ``BLOCK_M x C_N`` C buffer and the pipeline's mbarriers, initialized (one arrival
        each: the loader's expect, one MMA partition, the storer)."""
        a_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], a_layout)
        if B_TRANS:
            b_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], b_layout)
        else:
            b_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, BLOCK_N], b_layout)
        c_buf = gl.allocate_shared_memory(dtype, [BLOCK_M, C_N], c_layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        c_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        c_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        mbarrier.init(c_ready, count=1)
        mbarrier.init(c_empty, count=1)
        return a_bufs, b_bufs, c_buf, ready, empty, c_ready, c_empty

    @gluon.jit
    def _load_range(a_desc, b_desc, a_bufs, b_bufs, ready, empty, row_start, col_start, b_off,
                    k_lo, k_hi, it, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                    B_TRANS: gl.constexpr):
        """The loader's K steps ``[k_lo, k_hi)`` of one tile; returns the stage count.
        ``b_off``: rows of B's 2-D descriptor before this tile's matrix (0, or an expert's
        first row in the grouped kernel's ``[E * N, K]`` / ``[E * K, N]`` view)."""
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        for ki in range(k_lo, k_hi):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)  # fresh: passes
            mbarrier.expect(ready.index(s), nbytes)
            _tma_load(a_desc, [row_start, ki * BLOCK_K], ready.index(s), a_bufs.index(s))
            if B_TRANS:
                _tma_load(b_desc, [b_off + col_start, ki * BLOCK_K], ready.index(s),
                          b_bufs.index(s))
            else:
                _tma_load(b_desc, [b_off + ki * BLOCK_K, col_start], ready.index(s),
                          b_bufs.index(s))
            it += 1
        return it

    @gluon.jit
    def _wait_flag(flag):
        """The loader warp's wait for a gathered chunk (every lane): spin on
        ``ld.global.acquire.gpu`` of the chunk's flag (``nanosleep`` between polls, so the
        pollers leave L2 to NCCL) until it is >= 1; ``bar.warp.sync`` (the lanes reconverge);
        ``fence.proxy.async.global``: the TMA loads that follow, issued by the async proxy,
        are ordered after each lane's acquire."""
        return gl.inline_asm_elementwise(
            "{\n\t.reg .pred p;\n\t.reg .b32 v;\n\tFLAG_POLL:\n\t"
            "ld.global.acquire.gpu.b32 v, [$1];\n\tsetp.ge.s32 p, v, 1;\n\t"
            "@p bra FLAG_SEEN;\n\tnanosleep.u32 200;\n\tbra FLAG_POLL;\n\tFLAG_SEEN:\n\t"
            "bar.warp.sync -1;\n\tfence.proxy.async.global;\n\tmov.u32 $0, v;\n\t}",
            "=r,l", [flag], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _await_chunk(row, flag_ptr, seen):
        """The gather form's wait before a tile's loads: its chunk's slot is column 5 of the
        step-table ``row``; a program's slots never decrease (gather_plan), so it waits only
        for a slot above ``seen``, the highest it has seen arrive.  Returns the new ``seen``."""
        slot = gl.load(row + 5)
        if slot > seen:
            _wait_flag(flag_ptr + slot)
        return gl.maximum(seen, slot)

    @gluon.jit
    def _loader(a_desc, b_desc, step_ptr, flag_ptr, a_bufs, b_bufs, ready, empty, num_steps,
                num_progs, k_tiles, num_main, tail_parts, BLOCK_K: gl.constexpr,
                STAGES: gl.constexpr, B_TRANS: gl.constexpr, SPLIT_TAIL: gl.constexpr,
                WAIT_FLAGS: gl.constexpr):
        pid = gl.program_id(0)
        it = 0
        seen = pid * 0 - 1  # WAIT_FLAGS: the highest chunk slot this program has seen arrive
        for step in range(pid, num_main, num_progs):
            row_start = gl.load(step_ptr + step * 7 + 0)
            col_start = gl.load(step_ptr + step * 7 + 2)
            if WAIT_FLAGS:
                seen = _await_chunk(step_ptr + step * 7, flag_ptr, seen)
            it = _load_range(a_desc, b_desc, a_bufs, b_bufs, ready, empty, row_start,
                             col_start, 0, 0, k_tiles, it, BLOCK_K, STAGES, B_TRANS)
        if SPLIT_TAIL:  # piece v = pid: part q of tail tile t (at most one per program)
            v = pid
            if v < (num_steps - num_main) * tail_parts:
                t = v // tail_parts
                q = v - t * tail_parts
                row_start = gl.load(step_ptr + (num_main + t) * 7 + 0)
                col_start = gl.load(step_ptr + (num_main + t) * 7 + 2)
                if WAIT_FLAGS:
                    seen = _await_chunk(step_ptr + (num_main + t) * 7, flag_ptr, seen)
                it = _load_range(a_desc, b_desc, a_bufs, b_bufs, ready, empty, row_start,
                                 col_start, 0, q * k_tiles // tail_parts,
                                 (q + 1) * k_tiles // tail_parts, it, BLOCK_K, STAGES, B_TRANS)

    @gluon.jit
    def _release_group(counter):
        """The storer warp's signal after a tile's stores (every lane): ``cp.async.bulk.wait_group
        0`` (its bulk stores complete, their writes performed), ``fence.proxy.async.global``
        (those async-proxy writes before the generic operations that follow),
        ``bar.warp.sync`` (every lane's wait -- and any generic stores the lanes made -- before
        lane 0 goes on), then lane 0's ``red.release.gpu`` on the group counter."""
        gl.inline_asm_elementwise(
            "{\n\t.reg .pred p;\n\t.reg .b32 l;\n\tcp.async.bulk.wait_group 0;\n\t"
            "fence.proxy.async.global;\n\tbar.warp.sync -1;\n\tmov.u32 l, %laneid;\n\t"
            "setp.eq.u32 p, l, 0;\n\t@p red.release.gpu.global.add.s32 [$1], 1;\n\t"
            "mov.u32 $0, 0;\n\t}", "=r,l", [counter], dtype=gl.int32, is_pure=False, pack=1)

    # (A worker partition receives its arguments as values: constexprs among them are no
    # longer constexpr inside -- shapes that must be come from descriptor and buffer types.)
    @gluon.jit
    def _storer(c_desc, step_ptr, counter_ptr, c_buf, c_ready, c_empty, num_progs, num_main,
                c_parts, HAS_COUNTERS: gl.constexpr):
        pid = gl.program_id(0)
        part_n: gl.constexpr = c_desc.block_type.shape[1]  # BLOCK_N / c_parts
        u = 0
        for step in range(pid, num_main, num_progs):  # (split tail tiles: the MMA partition)
            col_start = gl.load(step_ptr + step * 7 + 2)
            dest_row = gl.load(step_ptr + step * 7 + 4)
            for h in range(c_parts):
                mbarrier.wait(c_ready, u & 1)
                _tma_store(c_desc, [dest_row, col_start + h * part_n], c_buf)
                tma.store_wait(0)  # shared memory read: the MMA partition may refill c_buf
                mbarrier.arrive(c_empty)
                u += 1
            if HAS_COUNTERS:
                _release_group(counter_ptr + gl.load(step_ptr + step * 7 + 5))
        tma.store_wait(0)

    @gluon.jit
    def _mma_range(a_bufs, b_bufs, ready, empty, k_lo, k_hi, it, acc_layout: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   B_TRANS: gl.constexpr):
        """fp32 sum over K steps ``[k_lo, k_hi)`` of one tile (at least one step), every
        stage given back; returns ``(acc, stage count)``."""
        acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, acc_layout)
        for ki in range(k_lo, k_hi):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            if B_TRANS:
                b = b_bufs.index(s).permute((1, 0))
            else:
                b = b_bufs.index(s)
            acc = warpgroup_mma(a_bufs.index(s), b, acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=[acc])
            # the previous step's wgmma has retired: its stage goes back to the loader
            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=ki > k_lo)
            it += 1
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
        return acc, it

    @gluon.jit
    def _warp_ticket(tickets):
        """Split tail, after a warp stored its share of a part's fp32 partial: the warp's
        lanes synchronize (``bar.warp.sync``: their stores are ordered before what follows),
        lane 0 takes a ticket from ``tickets[warp]`` with ``atom.acq_rel.gpu`` (releases
        the warp's stores; acquires the other parts' same-warp stores for the last one),
        broadcasts it, and the lanes synchronize again (lane 0's acquire -> every lane)."""
        return gl.inline_asm_elementwise(
            "{\n\t.reg .pred p;\n\t.reg .b32 l, w, k;\n\t.reg .b64 o, a;\n\t"
            "bar.warp.sync -1;\n\tmov.u32 l, %laneid;\n\tsetp.eq.u32 p, l, 0;\n\t"
            "mov.u32 w, %tid.x;\n\tshr.u32 w, w, 5;\n\tand.b32 w, w, 7;\n\t"
            "mul.wide.u32 o, w, 4;\n\tadd.s64 a, $1, o;\n\tmov.u32 k, 0;\n\t"
            "@p atom.acq_rel.gpu.global.add.u32 k, [a], 1;\n\t"
            "shfl.sync.idx.b32 k, k, 0, 31, -1;\n\tbar.warp.sync -1;\n\t"
            "mov.u32 $0, k;\n\t}", "=r,l", [tickets], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _warp_finish(tickets, counter, HAS_COUNTERS: gl.constexpr):
        """Split tail, the last part's warp after storing its rows of the summed tile:
        ``bar.warp.sync`` (the lanes' stores first), lane 0 re-arms the warp's ticket and,
        with counters, counts the warp on the tile's ``tickets[8]`` (``atom.acq_rel.gpu``);
        the tile's eighth warp re-arms that count and releases the group counter
        (``red.release.gpu``: cumulative over the seven warps it acquired)."""
        if HAS_COUNTERS:
            return gl.inline_asm_elementwise(
                "{\n\t.reg .pred p, q;\n\t.reg .b32 l, w, d;\n\t.reg .b64 o, a;\n\t"
                "bar.warp.sync -1;\n\tmov.u32 l, %laneid;\n\tsetp.eq.u32 p, l, 0;\n\t"
                "mov.u32 w, %tid.x;\n\tshr.u32 w, w, 5;\n\tand.b32 w, w, 7;\n\t"
                "mul.wide.u32 o, w, 4;\n\tadd.s64 a, $1, o;\n\t"
                "@p st.relaxed.gpu.global.u32 [a], 0;\n\tmov.u32 d, 0;\n\t"
                "@p atom.acq_rel.gpu.global.add.u32 d, [$1+32], 1;\n\t"
                "setp.eq.and.u32 q, d, 7, p;\n\t@q st.relaxed.gpu.global.u32 [$1+32], 0;\n\t"
                "@q red.release.gpu.global.add.s32 [$2], 1;\n\tmov.u32 $0, 0;\n\t}",
                "=r,l,l", [tickets, counter], dtype=gl.int32, is_pure=False, pack=1)
        else:
            return gl.inline_asm_elementwise(
                "{\n\t.reg .pred p;\n\t.reg .b32 l, w;\n\t.reg .b64 o, a;\n\t"
                "mov.u32 l, %laneid;\n\tsetp.eq.u32 p, l, 0;\n\t"
                "mov.u32 w, %tid.x;\n\tshr.u32 w, w, 5;\n\tand.b32 w, w, 7;\n\t"
                "mul.wide.u32 o, w, 4;\n\tadd.s64 a, $1, o;\n\t"
                "@p st.relaxed.gpu.global.u32 [a], 0;\n\tmov.u32 $0, 0;\n\t}",
                "=r,l", [tickets], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _mma(a_bufs, b_bufs, ready, empty, c_buf, c_ready, c_empty, step_ptr, counter_ptr,
             c_ptr, stride_cm, part_ptr, ticket_ptr, num_steps, num_progs, k_tiles, num_main,
             tail_parts, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
             B_TRANS: gl.constexpr, C_PARTS: gl.constexpr, HAS_COUNTERS: gl.constexpr,
             SPLIT_TAIL: gl.constexpr):
        pid = gl.program_id(0)
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[_MMA_WARPS, 1], instr_shape=[16, BLOCK_N, 16])
        it = 0
        u = 0  # C buffer uses (C_PARTS per tile)
        for step in range(pid, num_main, num_progs):
            acc, it = _mma_range(a_bufs, b_bufs, ready, empty, 0, k_tiles, it, acc_layout,
                                 BLOCK_M, BLOCK_N, STAGES, B_TRANS)
            if C_PARTS == 1:
                mbarrier.wait(c_empty, (u & 1) ^ 1)  # the storer has read the last tile
                c_buf.store(acc.to(c_buf.dtype))
                fence_async_shared()
                mbarrier.arrive(c_ready)
                u += 1
            else:  # two column halves through one half-width buffer
                HALF: gl.constexpr = BLOCK_N // 2
                acc0, acc1 = gl.split(gl.permute(gl.reshape(acc, (BLOCK_M, 2, HALF)),
                                                 (0, 2, 1)))
                mbarrier.wait(c_empty, (u & 1) ^ 1)
                c_buf.store(acc0.to(c_buf.dtype))
                fence_async_shared()
                mbarrier.arrive(c_ready)
                mbarrier.wait(c_empty, u & 1)  # (u + 1) & 1 ^ 1
                c_buf.store(acc1.to(c_buf.dtype))
                fence_async_shared()
                mbarrier.arrive(c_ready)
                u += 2
        if SPLIT_TAIL:
            # Piece v = t * tail_parts + q: part q of tail tile t, run by program v (at most
            # one piece per program: tail_split keeps pieces <= programs; straight-line code
            # also keeps the compiler from hoisting 128 addresses out of a loop, which
            # spilled).  Each warp owns the same 16 rows of every part of a tile (one layout,
            # one kernel), so it takes its own ticket and the warp drawing the last one sums
            # those rows: no partition-wide barrier, no wait on another program.
            TILE: gl.constexpr = BLOCK_M * BLOCK_N
            v = pid
            if v < (num_steps - num_main) * tail_parts:
                t = v // tail_parts
                q = v - t * tail_parts
                acc, it = _mma_range(a_bufs, b_bufs, ready, empty, q * k_tiles // tail_parts,
                                     (q + 1) * k_tiles // tail_parts, it, acc_layout,
                                     BLOCK_M, BLOCK_N, STAGES, B_TRANS)
                offs_i = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
                offs_j = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
                offs_tile = offs_i[:, None] * BLOCK_N + offs_j[None, :]
                gl.store(part_ptr + v.to(gl.int64) * TILE + offs_tile, acc)
                tickets = ticket_ptr + t * _TICKETS
                if _warp_ticket(tickets) == tail_parts - 1:
                    slots = part_ptr + (t * tail_parts).to(gl.int64) * TILE + offs_tile
                    total = gl.load(slots, cache_modifier=".cg")  # in part order
                    for p in range(1, tail_parts):
                        total += gl.load(slots + p * TILE, cache_modifier=".cg")
                    row = step_ptr + (num_main + t) * 7
                    col_start = gl.multiple_of(gl.load(row + 2), BLOCK_N)
                    dest_row = gl.load(row + 4)
                    # TMA-aligned rows (eligible): stride_cm is a multiple of 8 elements
                    stride_c = stride_cm // 8 * 8
                    gl.store(c_ptr + dest_row.to(gl.int64) * stride_c + col_start
                             + (offs_i[:, None] * stride_c + offs_j[None, :]),
                             total.to(c_ptr.dtype.element_ty))
                    if HAS_COUNTERS:
                        _warp_finish(tickets, counter_ptr + gl.load(row + 5), HAS_COUNTERS)
                    else:
                        _warp_finish(tickets, counter_ptr, HAS_COUNTERS)

    @gluon.jit(do_not_specialize=["M", "N", "K", "stride_am", "stride_b", "stride_cm",
                                  "num_steps", "num_progs", "num_main", "tail_parts"])
    def _ws_signal_gemm_kernel(
        a_ptr, b_ptr, c_ptr, step_ptr, counter_ptr,
        part_ptr, ticket_ptr,  # split tail: fp32 [pieces, BM * BN] parts, int32 tickets
        flag_ptr,  # WAIT_FLAGS: int32 chunk flags, indexed by the step table's column 5
        M, N, K, stride_am, stride_b, stride_cm, num_steps, num_progs,
        num_main, tail_parts,  # steps run whole; K parts of each later step (SPLIT_TAIL)
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
        STAGES: gl.constexpr, B_TRANS: gl.constexpr, HAS_COUNTERS: gl.constexpr,
        PART_N: gl.constexpr,  # C buffer width: BLOCK_N, or BLOCK_N / 2 (two stores a tile)
        SPLIT_TAIL: gl.constexpr,  # steps [num_main, num_steps) split along K (tail_split)
        WAIT_FLAGS: gl.constexpr,  # the gather GEMM: a tile's loads wait for its chunk's flag
    ):
        dtype: gl.constexpr = c_ptr.dtype.element_ty
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], dtype)
        c_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, PART_N], dtype)
        a_desc = tma.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                            block_shape=[BLOCK_M, BLOCK_K], layout=a_layout)
        if B_TRANS:  # B = W.T: boxes of the row-major [N, K] tensor, transposed in smem
            b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K],
                                                                          dtype)
            b_desc = tma.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1],
                                                block_shape=[BLOCK_N, BLOCK_K], layout=b_layout)
        else:
            b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_N],
                                                                          dtype)
            b_desc = tma.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1],
                                                block_shape=[BLOCK_K, BLOCK_N], layout=b_layout)
        c_desc = tma.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                            block_shape=[BLOCK_M, PART_N], layout=c_layout)
        k_tiles = gl.cdiv(K, BLOCK_K)

        a_bufs, b_bufs, c_buf, ready, empty, c_ready, c_empty = _pipeline_buffers(
            dtype, STAGES, BLOCK_M, BLOCK_N, BLOCK_K, PART_N, a_layout, b_layout, c_layout,
            B_TRANS)
        gl.warp_specialize([
            (_mma, (a_bufs, b_bufs, ready, empty, c_buf, c_ready, c_empty, step_ptr,
                    counter_ptr, c_ptr, stride_cm, part_ptr, ticket_ptr, num_steps, num_progs,
                    k_tiles, num_main, tail_parts, BLOCK_M, BLOCK_N, STAGES, B_TRANS,
                    BLOCK_N // PART_N, HAS_COUNTERS, SPLIT_TAIL)),
            (_loader, (a_desc, b_desc, step_ptr, flag_ptr, a_bufs, b_bufs, ready, empty,
                       num_steps, num_progs, k_tiles, num_main, tail_parts, BLOCK_K, STAGES,
                       B_TRANS, SPLIT_TAIL, WAIT_FLAGS)),
            (_storer, (c_desc, step_ptr, counter_ptr, c_buf, c_ready, c_empty, num_progs,
                       num_main, BLOCK_N // PART_N, HAS_COUNTERS)),
        ], [1, 1], [48, 48])  # one warpgroup holds both workers: the larger budget wins


def c_parts(config: GemmConfig) -> int:
    """Column parts the tile leaves shared memory in: 2 (a half-width C buffer, which frees
    room for a stage) with ``epilogue_subtile``, else 1."""
    return 2 if config.epilogue_subtile else 1


def stages_for(config: GemmConfig, element_size: int) -> int:
    """Pipeline stages that fit beside the C buffer (0: none)."""
    stage = (config.block_m + config.block_n) * config.block_k * element_size
    c = config.block_m * config.block_n // c_parts(config) * element_size
    fit = (SMEM_LIMIT - c - 1024) // stage  # 1 KB: barriers and descriptors' slack
    return max(0, min(config.num_stages, fit))


def eligible(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, config: GemmConfig,
             residual: torch.Tensor | None, full_tiles: bool) -> bool:
    """Whether this launch can run the warp-specialized kernel (no device work, no sync).

    Assumes the operands already passed the pipelined kernel's checks (shapes, devices,
    row-major ``a`` and ``out``, ``b`` row-major or the transposed view of a row-major
    tensor): it adds what this kernel needs on top.
    """
    if (not HAVE_GLUON or _INTERPRET or not config.warp_specialized_kernel or not full_tiles
            or residual is not None or not config.use_tma
            or config.max_registers is not None):  # a cap asks for room beside the GEMM
        return False
    if a.dtype not in (torch.bfloat16, torch.float16):
        return False
    if _capability(a.device) != (9, 0):
        return False
    # The tiles it was built and measured for; other tiles take the pipelined kernel.
    if (config.block_m, config.block_n, config.block_k) not in WARP_SPECIALIZED_TILES:
        return False
    if stages_for(config, a.element_size()) < 2:
        return False
    return tma_addressable(a, b, out)


# Position of the split tail's part slots in the kernel's parameters (the tickets follow).
PARTS_ARG = 5


def launch_args(a, b, out, step_table, block_m, block_n, num_ctas, counters, config, tail,
                flags=None):
    """``(grid, args, meta)`` of one launch (after :func:`eligible`); ``tail``: ``(num_main,
    parts, part slots, tickets)`` of the split last wave (``signal_gemm._tail_args``);
    ``flags``: the gather GEMM's chunk flags (each tile's loads wait for ``flags[slot] >=
    1``), or None."""
    M, K = a.shape
    N = b.shape[1]
    b_trans = b_transposed(b)
    stride_b = b.stride(1) if b_trans else b.stride(0)
    T = step_table.shape[0]
    num_main, parts, part_arg, ticket_arg = tail
    programs = tail_programs(T, num_ctas, num_main, parts)
    counter_arg = counters if counters is not None else step_table  # never touched
    flag_arg = flags if flags is not None else step_table  # never touched
    args = (a, b, out, step_table, counter_arg, part_arg, ticket_arg, flag_arg, M, N, K,
            a.stride(0), stride_b, out.stride(0), T, programs, num_main, parts)
    meta = {
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": config.block_k,
        "STAGES": stages_for(config, a.element_size()), "B_TRANS": b_trans,
        "HAS_COUNTERS": counters is not None, "PART_N": block_n // c_parts(config),
        "SPLIT_TAIL": parts > 1, "WAIT_FLAGS": flags is not None, "num_warps": NUM_MMA_WARPS,
        **LAUNCH_OPTIONS,
    }
    return (programs, 1, 1), args, meta


def kernel():
    """The Gluon kernel (its parameters in order: ``direct_launch.ordered_args``)."""
    return _ws_signal_gemm_kernel


def jit_launch(grid, args, meta):
    """Launch through the JIT on the current stream; returns the compiled kernel."""
    return _ws_signal_gemm_kernel[grid[:1]](*args, **meta)
