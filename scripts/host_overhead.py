"""Host (CPU) time to enqueue one overlapped call: is the engine GPU-bound?

Single process, a world of one NCCL rank.  For each shape and collective it runs the overlap
engine with a forced plan of one group per band (``--group-m`` tile rows) on ``SMs - 16`` CTAs
(many groups, so much host work per call) and reports, as medians over ``--iters`` calls:

* host us/call: from entering ``gemm_collective`` to its return, the GPU idle before each call
  (synchronised), so nothing waits on a full launch queue;
* host us/group: the same divided by the number of groups;
* GPU us/call: CUDA-event time of back-to-back calls, divided by their number;
* the same two figures for ``torch.matmul`` + the ``torch.distributed`` collective
  (``Collective.torch_group``), for scale.

``scripts/bench_overhead.py`` is the fuller measurement (graphs, the signal GEMM alone, the
acceptance targets); this script is the quick per-group host cost.

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

SHAPES = ((4096, 8192, 2048), (8192, 8192, 2048), (8192, 8192, 7168))


torch = dist = fo = None  # imported in main(): `--help` needs no torch


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
    p.add_argument("--group-m", type=int, default=4, help="band height in tile rows")
    p.add_argument("--op", choices=["all_reduce", "reduce_scatter", "both"], default="both")
    args = p.parse_args()
    global torch, dist, fo
    import torch
    import torch.distributed as dist

    import flashoverlap as fo
    from flashoverlap.kernels import default_block_shape, direct_launch

    torch.cuda.set_device(0)
    init = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("nccl", init_method=f"file://{init}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    import triton

    env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "triton": triton.__version__, "direct_launch": direct_launch.ENABLED}
    print(" | ".join(f"{k} {v}" for k, v in env.items()))
    head = (f"{'op':>14} {'M':>6} {'N':>6} {'K':>6} {'groups':>6} {'host us/call':>13} {'us/group':>9} "
            f"{'GPU us/call':>12} {'torch host':>11} {'torch GPU':>10}")
    print(head)
    rows = []
    ops = ["all_reduce", "reduce_scatter"] if args.op == "both" else [args.op]
    for op, (M, N, K) in [(op, shape) for op in ops for shape in SHAPES]:
        coll = fo.collectives.get(op)
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(coll.result_rows(M, 1), N, device="cuda", dtype=torch.bfloat16)
        full = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        bm, bn = default_block_shape(torch.device("cuda", 0))
        config = fo.PlanConfig(block_m=bm, block_n=bn, num_ctas=sms - 16, group_m=args.group_m)
        groups = fo.make_plan(fo.Problem(M, N, K, "bfloat16", 1, op), config).num_groups

        def ours(a=a, b=b, out=out, config=config, coll=coll):
            fo.gemm_collective(a, b, coll, out=out, config=config)

        def seq(a=a, b=b, out=out, full=full, coll=coll):
            torch.matmul(a, b, out=full)
            coll.torch_group(full, full if coll.in_place else out, dist.group.WORLD)()

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
        print(f"{op:>14} {M:>6} {N:>6} {K:>6} {groups:>6} {host:>13.1f} {host / groups:>9.1f} "
              f"{gpu:>12.1f} {host_seq:>11.1f} {gpu_seq:>10.1f}")
        rows.append({"bench": "host_overhead", "op": op, "M": M, "N": N, "K": K, "groups": groups,
                     "host_us_per_call": host, "host_us_per_group": host / groups,
                     "gpu_us_per_call": gpu, "torch_host_us_per_call": host_seq,
                     "torch_gpu_us_per_call": gpu_seq, **env,
                     "date": time.strftime("%Y-%m-%d")})
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print("wrote", args.json)
    from flashoverlap.comm import destroy_communicators
    from flashoverlap.engine import clear_workspaces

    clear_workspaces()
    destroy_communicators()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
