"""Where the host time of one overlapped call goes: each piece's enqueue cost, on one GPU.

``scripts/bench_overhead.py`` reports the host time of a whole call against torch's; this
script splits it.  World size 1 (one NCCL rank), a forced plan of ``--groups`` groups on
``SMs - 16`` CTAs, bf16.  Every figure is the median over ``--samples`` samples of the mean
enqueue time of ``--batch`` back-to-back calls, with the GPU kept busy by a sleep kernel so
that only the CPU side is timed (the launch queue never fills: at most a few hundred entries).
Pieces, each called exactly as the hot loop calls it:

* ``torch.matmul`` (into ``out``) and the ``torch.distributed`` collective: the baseline;
* the ops layer up to the engine (signature key, memo lookup, aliasing check): the op with
  ``run_overlap`` replaced by a no-op;
* the workspace lookup, the raw stream handle, the capture query;
* the driver bookkeeping (``cuMemsetD32Async``, ``cuEventRecord``, ``cuStreamWaitEvent``);
* the signal-GEMM launcher (direct launch, raw stream handle);
* per group: the counter wait (``cuStreamWaitValue32``; on a counter already past its target,
  on a side stream) and the collective's NCCL call (the engine's binding: nccl4py or ctypes);
* the whole op, and a cProfile of it (own time, top functions).

    python scripts/host_breakdown.py --out results/<date>-<machine>/host-breakdown.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _enqueue_us(torch, fn, samples: int, batch: int) -> float:
    """Median over samples of the mean enqueue time (us) of ``batch`` calls of ``fn``."""
    per = []
    for _ in range(samples):
        torch.cuda.synchronize()
        torch.cuda._sleep(20_000_000)
        t0 = time.perf_counter_ns()
        for _ in range(batch):
            fn()
        per.append((time.perf_counter_ns() - t0) / batch / 1e3)
    torch.cuda.synchronize()
    return statistics.median(per)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x2048,8192x7168,16384x2048", help="MxK list, N fixed")
    p.add_argument("-n", type=int, default=8192)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--samples", type=int, default=60)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--profile-calls", type=int, default=300)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        print("host_breakdown: needs a CUDA GPU")
        return 1
    import flashoverlap as fo
    from bench_overhead import forced_config
    import flashoverlap.engine as engine_mod
    from flashoverlap.engine import get_workspace
    from flashoverlap.policy import get_plan

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    store = tempfile.mktemp(prefix="fo-hb-")
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1,
                            device_id=dev)
    group = dist.group.WORLD
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rows = []
    for op in ("all_reduce", "reduce_scatter"):
        coll = fo.collectives.get(op)
        for shape in args.shapes.split(","):
            M, K = (int(x) for x in shape.split("x"))
            N = args.n
            config = forced_config(M, N, op, sms=sms, block=(128, 256), groups=args.groups,
                                   reserve=16)
            plan = get_plan(fo.Problem(M, N, K, "bfloat16", 1, op), config)
            a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            b = torch.randn(K, N, device=dev, dtype=torch.bfloat16) / K**0.5
            out = torch.empty(coll.result_rows(M, 1), N, device=dev, dtype=torch.bfloat16)
            full = torch.empty(M, N, device=dev, dtype=torch.bfloat16)

            def op_call():
                fo.gemm_collective(a, b, coll, group, out=out, config=config)

            op_call()
            torch.cuda.synchronize()
            ws = get_workspace(plan, dev, group, 0)
            dest = out if ws.send is None else ws.send
            launcher = ws.gemm(None)
            handle = torch._C._cuda_getCurrentRawStream(0)
            caller_h = ws.sync.bind_current(handle, dev)
            step = ws.steps[0]
            # Counter waits on a counter that is already past its target, on a side stream
            # (the workspace's own counters are zero between calls: a wait there would stall
            # the watcher for good).
            from flashoverlap.engine.workspace import GroupStep, _wait_enqueuer

            done_counter = torch.full((1,), 1 << 30, dtype=torch.int32, device=dev)
            side = torch.cuda.Stream(device=dev)
            side_step = GroupStep(0, done_counter.data_ptr(), 1, 0, 0, 0, 0, 0, 0)
            wait_side = _wait_enqueuer("driver", done_counter, side)
            torch_coll = coll.torch_group(full, full if coll.in_place else out, group)
            real_run = engine_mod.run_overlap

            def ops_only():
                fo.gemm_collective(a, b, coll, group, out=out, config=config)

            pieces = {
                "python_call_floor": lambda: None,
                "torch_matmul": lambda: torch.matmul(a, b, out=full),
                "torch_collective": torch_coll,
                "torch_matmul_plus_collective": lambda: (torch.matmul(a, b, out=full),
                                                         torch_coll()),
                "raw_stream_handle": lambda: torch._C._cuda_getCurrentRawStream(0),
                "is_capturing": torch.cuda.is_current_stream_capturing,
                "get_workspace": lambda: get_workspace(plan, dev, group, 0),
                "zero_counters": lambda: ws.sync.zero_counters(caller_h),
                "event_record": lambda: ws.sync.record(ws.armed_h, caller_h),
                "stream_wait_event": lambda: ws.sync.wait(ws.watcher_h, ws.armed_h),
                "signal_gemm_launch": lambda: launcher(a, b, dest, None, handle),
                "counter_wait_per_group": lambda: wait_side(side_step),
                "nccl_call_per_group": lambda: coll.launch_group(
                    ws.nccl, dest.data_ptr() + step.send_offset,
                    out.data_ptr() + step.recv_offset, step.send_count, step.recv_count),
                "op": op_call,
            }
            res = {name: _enqueue_us(torch, fn, args.samples, args.batch)
                   for name, fn in pieces.items()}
            engine_mod.run_overlap = lambda *x, **k: None
            try:
                res["ops_layer_only"] = _enqueue_us(torch, ops_only, args.samples, args.batch)
            finally:
                engine_mod.run_overlap = real_run
            G = plan.num_groups
            # An eager call from the stream of the previous one: GEMM; per group one wait and
            # one NCCL call; record `done` on the watcher, the caller waits `done` (no re-arm:
            # epoch targets; `zero_counters` is what a captured call adds).
            parts = (res["ops_layer_only"] + res["raw_stream_handle"] + res["is_capturing"]
                     + res["get_workspace"] + res["event_record"]
                     + res["stream_wait_event"] + res["signal_gemm_launch"]
                     + G * (res["counter_wait_per_group"] + res["nccl_call_per_group"]))
            row = dict(bench="host_breakdown", op=op, M=M, N=N, K=K, num_groups=G,
                       gpu=torch.cuda.get_device_name(dev), torch=torch.__version__,
                       date=time.strftime("%Y-%m-%d"), sum_of_pieces_us=round(parts, 2),
                       target_us=round(res["torch_matmul_plus_collective"] + 8 * G, 2),
                       **{f"{k}_us": round(v, 2) for k, v in res.items()})
            rows.append(row)
            print(f"== {op} {M}x{N}x{K}, {G} groups (enqueue us, GPU busy):", flush=True)
            for k, v in res.items():
                print(f"   {k:<30}{v:9.2f}")
            print(f"   {'sum of pieces':<30}{parts:9.2f}   target (torch + 8/group) "
                  f"{row['target_us']:.2f}", flush=True)

            if shape == args.shapes.split(",")[0]:
                import cProfile
                import io
                import pstats

                prof = cProfile.Profile()
                for n in range(args.profile_calls):
                    if n % 50 == 0:
                        torch.cuda.synchronize()
                        torch.cuda._sleep(100_000_000)
                    prof.enable()
                    op_call()
                    prof.disable()
                torch.cuda.synchronize()
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
                print(text.getvalue(), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    dist.destroy_process_group()
    if os.path.exists(store):
        os.unlink(store)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
