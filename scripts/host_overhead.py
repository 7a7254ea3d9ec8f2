"""Host (CPU) time to enqueue one overlapped call: is the engine GPU-bound?

Single process, a world of one NCCL rank.  For each shape it runs the overlap engine with a
forced plan of one group per wave on ``SMs - 16`` CTAs (the most groups, so the most host work
per call) and reports, as medians over ``--iters`` calls:

* host us/call: from entering ``gemm_all_reduce`` to its return, the GPU idle before each call
  (synchronised), so nothing waits on a full launch queue;
* host us/group: the same divided by the number of groups;
* GPU us/call: CUDA-event time of back-to-back calls, divided by their number;
* the same two figures for ``torch.matmul`` + ``torch.distributed.all_reduce``, for scale.

``FLASHOVERLAP_DIRECT_LAUNCH=0`` turns off the engine's direct kernel launches (every launch
then goes through Triton's JIT dispatch), so running the script twice compares the two.

    python scripts/host_overhead.py [--json results/<date>-<machine>/host-overhead.json] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import flashoverlap as fo

SHAPES = ((4096, 8192, 2048), (8192, 8192, 2048), (8192, 8192, 7168))


def _host_us(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def _gpu_us(fn, iters: int) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(5):
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1e3 / iters)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--profile", action="store_true", help="cProfile the steady-state loop")
    args = p.parse_args()
    from flashoverlap.kernels import direct_launch

    torch.cuda.set_device(0)
    init = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("nccl", init_method=f"file://{init}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    import triton

    env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "triton": triton.__version__, "direct_launch": direct_launch.ENABLED}
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    head = (f"{'M':>6} {'N':>6} {'K':>6} {'groups':>6} {'host us/call':>13} {'us/group':>9} "
            f"{'GPU us/call':>12} {'torch host':>11} {'torch GPU':>10}")
    print(head)
    rows = []
    for M, N, K in SHAPES:
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        config = fo.PlanConfig(block_m=128, block_n=256, num_ctas=sms - 16)
        groups = fo.make_plan(fo.Problem(M, N, K, "bfloat16", 1, "all_reduce"), config).num_groups

        def ours(a=a, b=b, out=out, config=config):
            fo.gemm_all_reduce(a, b, out=out, config=config)

        def seq(a=a, b=b, out=out):
            torch.matmul(a, b, out=out)
            dist.all_reduce(out)

        for _ in range(3):
            ours()
            seq()
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(20):
                ours()
            prof.disable()
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        host, host_seq = _host_us(ours, args.iters), _host_us(seq, args.iters)
        gpu, gpu_seq = _gpu_us(ours, 20), _gpu_us(seq, 20)
        print(f"{M:>6} {N:>6} {K:>6} {groups:>6} {host:>13.1f} {host / groups:>9.1f} "
              f"{gpu:>12.1f} {host_seq:>11.1f} {gpu_seq:>10.1f}")
        rows.append({"bench": "host_overhead", "M": M, "N": N, "K": K, "groups": groups,
                     "host_us_per_call": host, "host_us_per_group": host / groups,
                     "gpu_us_per_call": gpu, "torch_host_us_per_call": host_seq,
                     "torch_gpu_us_per_call": gpu_seq, **env,
                     "date": time.strftime("%Y-%m-%d")})
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print("wrote", args.json)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
