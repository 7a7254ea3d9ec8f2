"""Soak test: many eager calls of mixed shapes on one GPU (world size 1): no hang, no leak,
right results.

``--calls`` calls (default 10,000) of ``gemm_collective`` with random problems: M from 1 to
16384 (half uniform, half log-uniform, so small M is common), N and K from small sets, both
collectives, B row-major or a weight's ``.t()``, with and without a residual (out of place or
in place, replicated or not), default configs (at world size 1: the plain GEMM) and forced
overlapped configs (2-6 groups, a few CTA reservations; every new M is a new plan, so the
workspace cache builds and evicts all the time).

* **hang**: a watchdog thread aborts the process (exit code 3) with a clear message, the
  stuck call and every thread's stack if no call completes for --watchdog seconds (every
  50th call synchronises, so a stuck GPU shows up as a stuck host);
* **memory**: ``torch.cuda.memory_allocated`` and ``memory_reserved`` sampled every 500
  calls; reported as the first sample after warm-up (call 500), the maximum and the last;
* **results**: every 50th call is checked against ``torch.matmul`` (+ residual) in float32
  (relative Frobenius error <= --tol, outputs poisoned with NaN first); any failure makes the
  exit code 1.

Writes a JSON summary to --out (also on a hang) and prints one progress line per 1000 calls.

    python scripts/soak.py --calls 10000 --out /tmp/soak.json
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402  (imports no torch)
from bench_overhead import forced_config  # noqa: E402

OPS = ("all_reduce", "reduce_scatter")
N_CHOICES = (1024, 2048, 4096, 8192)
K_CHOICES = (512, 1024, 2048, 4096)
CHECK_EVERY = 50
SAMPLE_EVERY = 500


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=10_000, help="eager calls in all")
    p.add_argument("--forced", type=float, default=0.3,
                   help="fraction of calls with a forced overlapped config")
    p.add_argument("--residual", type=float, default=0.3, help="fraction of calls with a residual")
    p.add_argument("--max-m", type=int, default=16384, help="largest M")
    p.add_argument("--tol", type=float, default=1e-2, help="relative Frobenius error bound")
    p.add_argument("--watchdog", type=float, default=120.0,
                   help="seconds without a completed call before aborting")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, default=None, help="JSON summary (default: none)")
    args = p.parse_args(argv)
    if args.calls < 1 or args.max_m < 1 or args.watchdog <= 0:
        p.error("--calls, --max-m and --watchdog must be positive")
    if not (0 <= args.forced <= 1 and 0 <= args.residual <= 1):
        p.error("--forced and --residual are fractions in [0, 1]")
    return args


def random_case(rng: random.Random, args: argparse.Namespace) -> dict[str, Any]:
    """One call's parameters (pure Python; the same sequence for the same seed)."""
    if rng.random() < 0.5:
        M = rng.randint(1, args.max_m)
    else:
        M = max(1, min(args.max_m, int(math.exp(rng.uniform(0, math.log(args.max_m))))))
    residual = rng.random() < args.residual
    return {
        "op": rng.choice(OPS),
        "M": M,
        "N": rng.choice(N_CHOICES),
        "K": rng.choice(K_CHOICES),
        "b_trans": rng.random() < 0.5,
        "residual": residual,
        "in_place": residual and rng.random() < 0.5,
        "replicated": residual and rng.random() < 0.5,
        "forced": rng.random() < args.forced,
        "groups": rng.randint(2, 6),
        "reserve": rng.choice((8, 16, 24)),
    }


def memory_report(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """First sample (after warm-up), max and last of the allocated/reserved MiB."""
    if not samples:
        return {}
    report = {}
    for key in ("allocated_mib", "reserved_mib"):
        values = [s[key] for s in samples]
        report[key] = {"first": values[0], "max": max(values), "last": values[-1]}
    return report


class Watchdog:
    """Aborts the process if :meth:`beat` is not called for ``timeout`` seconds."""

    def __init__(self, timeout: float, on_hang) -> None:
        self.timeout, self.on_hang = timeout, on_hang
        self.last = time.monotonic()
        self.what = "start-up"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-watchdog", daemon=True)
        self._thread.start()

    def beat(self, what: str) -> None:
        self.last, self.what = time.monotonic(), what

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                print(f"\nSOAK HANG: no call completed for {idle:.0f} s (limit {self.timeout:g} s); "
                      f"last progress: {self.what}.  Stacks of every thread follow; aborting.",
                      file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                try:
                    self.on_hang(self.what)
                finally:
                    # A detected hang, not an exit path: the main thread is stuck inside a
                    # CUDA/NCCL wait that no exception can interrupt, so the watchdog ends the
                    # process itself (status 3 = hang) after dumping every thread's stack.
                    os._exit(3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bc.load_torch()
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        print("soak.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from bench_overhead import _init_world

    _init_world(torch, dist)
    import flashoverlap as fo
    from flashoverlap.kernels import default_block_shape

    dev = torch.device("cuda", torch.cuda.current_device())
    prov = bc.provenance(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    block = default_block_shape(dev)
    group = dist.group.WORLD
    rng = random.Random(args.seed)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    # Weights once per (K, N), in both layouts; activations are new every call.
    weights = {(K, N): torch.randn(N, K, device=dev, generator=gen).to(torch.bfloat16) / K**0.5
               for K in K_CHOICES for N in N_CHOICES}
    weights_kn = {key: w.t().contiguous() for key, w in weights.items()}
    summary: dict[str, Any] = {
        "bench": "soak", "world_size": 1, "dtype": "bfloat16", "calls_requested": args.calls,
        "calls_done": 0, "checks": 0, "failures": [], "status": "running",
        "counts": {"forced": 0, "default": 0, "residual": 0, "in_place": 0, "b_trans": 0,
                   **{op: 0 for op in OPS}},
        "memory_samples": [], **prov, "p2p": None,
    }

    def write_summary() -> None:
        summary["memory"] = memory_report(summary["memory_samples"])
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(summary, indent=1) + "\n")

    def on_hang(what: str) -> None:
        summary.update(status="hang", hang_at=what)
        write_summary()

    print(f"# soak: {args.calls} calls on {prov['gpu']} (torch {prov['torch']}, Triton "
          f"{prov['triton']}, NCCL {prov['nccl_flashoverlap']}, flashoverlap @ {prov['commit']})",
          flush=True)
    dog = Watchdog(args.watchdog, on_hang)
    t0 = time.monotonic()
    try:
        for i in range(args.calls):
            case = random_case(rng, args)
            op, M, N, K = case["op"], case["M"], case["N"], case["K"]
            coll = fo.collectives.get(op)
            rows = coll.result_rows(M, 1)
            a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            b = weights[(K, N)].t() if case["b_trans"] else weights_kn[(K, N)]
            config = (forced_config(M, N, op, sms=sms, block=block, groups=case["groups"],
                                    reserve=case["reserve"]) if case["forced"] else None)
            check = i % CHECK_EVERY == 0
            residual = (torch.randn(rows, N, device=dev, dtype=torch.bfloat16)
                        if case["residual"] else None)
            want = None
            if check:
                want = a.float() @ b.float()
                if residual is not None:
                    want += residual.float()
            if case["in_place"]:
                out = residual
            else:
                out = torch.full((rows, N), float("nan"), device=dev, dtype=torch.bfloat16)
            dog.beat(f"call {i} {case}")
            got = fo.gemm_collective(a, b, coll, group, out=out, residual=residual,
                                     residual_replicated=case["replicated"], config=config)
            counts = summary["counts"]
            counts["forced" if case["forced"] else "default"] += 1
            counts[op] += 1
            for key in ("residual", "in_place", "b_trans"):
                counts[key] += bool(case[key])
            if check:
                torch.cuda.synchronize()
                summary["checks"] += 1
                if bool(got.isnan().any()):
                    err = float("nan")
                else:
                    err = float((got.float() - want).norm() / want.norm().clamp_min(1e-30))
                if not err <= args.tol:
                    summary["failures"].append({"call": i, **case, "rel_error": err})
                    print(f"WRONG RESULT at call {i}: {case} relative error {err:.3g}",
                          file=sys.stderr, flush=True)
            if (i + 1) % SAMPLE_EVERY == 0:
                torch.cuda.synchronize()
                summary["memory_samples"].append({
                    "call": i + 1,
                    "allocated_mib": torch.cuda.memory_allocated(dev) / 2**20,
                    "reserved_mib": torch.cuda.memory_reserved(dev) / 2**20})
            summary["calls_done"] = i + 1
            if (i + 1) % 1000 == 0:
                s = summary["memory_samples"][-1]
                print(f"  {i + 1} calls, {time.monotonic() - t0:.0f} s, {summary['checks']} "
                      f"checks, {len(summary['failures'])} wrong; allocated "
                      f"{s['allocated_mib']:.0f} MiB, reserved {s['reserved_mib']:.0f} MiB",
                      flush=True)
        torch.cuda.synchronize()
        dog.beat("done")
    finally:
        dog.stop()
        summary["elapsed_s"] = time.monotonic() - t0
        if summary["status"] == "running":
            summary["status"] = "wrong results" if summary["failures"] else (
                "ok" if summary["calls_done"] == args.calls else "error")
        from flashoverlap.comm import destroy_communicators
        from flashoverlap.engine import clear_workspaces

        clear_workspaces()
        destroy_communicators()
        if dist.is_initialized():
            dist.destroy_process_group()
        write_summary()
    mem = summary["memory"]
    if mem:
        print("memory MiB (first after warm-up / max / last): allocated "
              f"{mem['allocated_mib']['first']:.0f} / {mem['allocated_mib']['max']:.0f} / "
              f"{mem['allocated_mib']['last']:.0f}; reserved {mem['reserved_mib']['first']:.0f} / "
              f"{mem['reserved_mib']['max']:.0f} / {mem['reserved_mib']['last']:.0f}")
    print(f"soak: {summary['status']}: {summary['calls_done']} calls in "
          f"{summary['elapsed_s']:.0f} s, {summary['checks']} checked, "
          f"{len(summary['failures'])} wrong; counts {summary['counts']}"
          + (f"; wrote {args.out}" if args.out else ""), flush=True)
    return 0 if summary["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
