"""The consumer side of the signal-ordering stress tests (dense and grouped signal GEMM).

One CTA on another stream: for each group ``g`` it spins with acquire atomics on the group's
counter until the count is complete (or ``max_spins`` pass: recorded as -1), then copies the
group's rows ``[lo[g], hi[g])`` of the destination into a snapshot.  Any difference between a
snapshot and the final destination is an element read before it was final -- a torn read,
i.e. a broken release/acquire protocol.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_groups", "row_elems", "max_spins"])
def wait_and_snapshot(counter_ptr, target_ptr, lo_ptr, hi_ptr, src_ptr, dst_ptr, spins_ptr,
                      num_groups, row_elems, max_spins, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for g in range(num_groups):
        target = tl.load(target_ptr + g)
        seen = tl.atomic_add(counter_ptr + g, 0, sem="acquire", scope="gpu")
        spins = 0
        while (seen < target) & (spins < max_spins):
            seen = tl.atomic_add(counter_ptr + g, 0, sem="acquire", scope="gpu")
            spins += 1
        tl.store(spins_ptr + g, tl.where(seen < target, -1, spins))  # -1: timed out
        tl.debug_barrier()  # the acquiring thread's view -> every thread of the CTA
        start = tl.load(lo_ptr + g) * row_elems
        stop = tl.load(hi_ptr + g) * row_elems
        for off in range(start, stop, BLOCK):
            idx = off + offs
            mask = idx < stop
            tl.store(dst_ptr + idx, tl.load(src_ptr + idx, mask=mask), mask=mask)
