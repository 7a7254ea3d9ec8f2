"""Host (CPU) time to enqueue one overlapped call, per group: is the engine GPU-bound?

Single process, world of one; prints host microseconds per call and per group beside the GPU
time per call.  Usage: ``python scripts/host_overhead.py`` on a GPU machine.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.distributed as dist

import flashoverlap as fo


def main() -> None:
    import sys

    profile = "--profile" in sys.argv
    torch.cuda.set_device(0)
    init = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("nccl", init_method=f"file://{init}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{'M':>6} {'N':>6} {'K':>6} {'groups':>6} {'host us/call':>13} {'host us/group':>14} {'gpu us/call':>12}")
    for M, N, K in ((4096, 8192, 2048), (8192, 8192, 7168)):
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        config = fo.PlanConfig(block_m=128, block_n=256, num_ctas=sms - 16)
        groups = fo.make_plan(fo.Problem(M, N, K, "bfloat16", 1, "all_reduce"), config).num_groups
        for _ in range(3):
            fo.gemm_all_reduce(a, b, out=out, config=config)
        torch.cuda.synchronize()
        n = 50
        if profile:  # where the host time of the steady-state loop goes
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                fo.gemm_all_reduce(a, b, out=out, config=config)
            prof.disable()
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(22)
        t0 = time.perf_counter()
        for _ in range(n):
            fo.gemm_all_reduce(a, b, out=out, config=config)
        host = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        gpu = (time.perf_counter() - t0) / n * 1e6
        print(f"{M:>6} {N:>6} {K:>6} {groups:>6} {host:>13.1f} {host / groups:>14.1f} {gpu:>12.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
