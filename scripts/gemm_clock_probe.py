"""SM clock and board power while a GEMM runs: where a reduced-P GEMM's time goes (issue 14).

Role
----
``bench_gemm.py --torch-sm-target`` showed that on one H200 cuBLASLt told to use 116 of 132
SMs loses only 3-7 % of its time against all SMs, while the signal GEMM at ``P = 116`` loses
5-10 %; the SM ratio alone would cost 12 %.  The difference is clock: the board runs these
GEMMs at its 700 W cap, and 16 idle SMs leave power for a higher clock on the others.  This
probe measures that directly: for each shape it runs, back to back for ``--seconds`` each,
the signal GEMM at each ``P`` and torch.matmul through cuBLASLt with an SM count target of
each ``P``, while ``nvidia-smi`` samples the SM clock and board power every 100 ms; each
phase reports ms per call, mean clock, mean power and the clock-event reasons seen.  It
also names the cuBLASLt kernels (torch.profiler) at each SM target: a different kernel at a
reduced target (tile, cluster, stream-K) is part of the answer.

Why a wall-clock phase and not CUDA events: the clock settles over hundreds of milliseconds
(power management), so only a sustained run shows the clock a GEMM gets; ms per call comes
from the same phase (calls / elapsed after a synchronize).  The first 0.3 s of each phase's
samples are dropped (the previous phase's clock).

    python scripts/gemm_clock_probe.py --out DIR [--shapes 8192x8192x2048,...] [--seconds 2]
    python scripts/gemm_clock_probe.py --out DIR --ctas 116 --group-m 8,32 --rounds 2
    python scripts/gemm_clock_probe.py --summarize DIR/gemm-clock.json   # the ratio table again

``--group-m`` adds signal-GEMM phases with other band heights (the L2 swizzle): under a power
cap, DRAM bytes are power too, so a band height that reads the operands fewer times from
HBM could buy clock even where it changes no instruction.

Writes ``DIR/<--name>.json`` (default ``gemm-clock``; ``bench="gemm_clock"`` rows) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

SHAPES = "4096x8192x2048,8192x8192x2048,8192x8192x8192,6144x5120x4096,16384x8192x8192"


class _Sampler:
    """``nvidia-smi`` in the background: (host time, SM MHz, W, reasons) every 100 ms."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float, str]] = []
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw,clocks_event_reasons.active",
             "--format=csv,noheader,nounits", "-lms", "100"],
            stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            parts = [x.strip() for x in line.split(",")]
            try:
                self.samples.append((time.time(), float(parts[0]), float(parts[1]), parts[2]))
            except (ValueError, IndexError):
                continue

    def window(self, t0: float, t1: float):
        return [s for s in self.samples if t0 <= s[0] <= t1]

    def stop(self) -> None:
        self.proc.terminate()


def _kernel_names(torch, fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    return sorted({e.key for e in prof.key_averages()
                   if getattr(e.device_type, "name", "") == "CUDA"})


def _phase(torch, fn, sampler: _Sampler, seconds: float) -> dict:
    """``fn`` back to back for ``seconds`` (after 20 warm-up calls): ms per call and the
    mean clock / power / the clock-event reasons nvidia-smi saw after the first 0.3 s."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    calls, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        for _ in range(10):
            fn()
        calls += 10
        torch.cuda.synchronize()
    t1 = time.time()
    window = sampler.window(t0 + 0.3, t1)
    return {"median_ms": (t1 - t0) * 1e3 / calls,
            "sm_clock_mhz": statistics.mean(s[1] for s in window) if window else None,
            "power_w": statistics.mean(s[2] for s in window) if window else None,
            "clock_reasons": sorted({s[3] for s in window}), "samples": len(window)}


def chosen_variants(parser: argparse.ArgumentParser, text: str, known) -> list[str]:
    """The comma-separated ``--variants`` of a probe, each one of ``known`` (else a usage
    error): the multicast and cluster-GEMM probes share it."""
    variants = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in variants if v not in known]
    if bad:
        parser.error(f"unknown variants {bad}; choose from {list(known)}")
    return variants


def print_summaries(files: list[Path], summarize: Callable[[list[dict]], list[str]]) -> int:
    """A probe's ``--summarize``: each result file's table (no GPU needed); returns 0."""
    for f in files:
        print(f"{f}:\n" + "\n".join(summarize(json.loads(f.read_text()))))
    return 0


def write_rows(out: Path, name: str, rows: list[dict],
               summarize: Callable[[list[dict]], list[str]], heading: str) -> None:
    """Write ``out/<name>.json`` (the folder made if missing), then print ``heading`` and
    ``summarize(rows)``, then the file's path (the end of both clock probes)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\n{heading}")
    print("\n".join(summarize(rows)))
    print(f"wrote {path}")


def summarize(rows: list[dict]) -> list[str]:
    """Per B layout, shape and ``P``: the tuner's signal-GEMM variant (the first signal phase
    of each round) in ms and MHz, then every other variant's -- band heights, cuBLASLt on ``P``
    SMs -- time and clock as ratios to it, each a mean over the rounds."""
    groups: dict[tuple, dict[tuple, list[dict]]] = {}
    first: dict[tuple, int] = {}
    for r in rows:
        where = (r["b_layout"], r["M"], r["N"], r["K"], r["num_ctas"])
        if r["engine"] == "flashoverlap":
            gm = r.get("group_m")  # rows before --group-m existed: the tuner's choice only
            first.setdefault(where + (r.get("round", 0),), gm)
            variant = ("tuned" if first[where + (r.get("round", 0),)] == gm else "gm", gm)
        else:
            variant = ("cublaslt", None)
        groups.setdefault(where, {}).setdefault(variant, []).append(r)
    lines = []
    for (layout, M, N, K, P), variants in sorted(groups.items()):
        base = variants.get(next((v for v in variants if v[0] == "tuned"), None))
        if not base:
            continue
        t0 = statistics.mean(r["median_ms"] for r in base)
        c0 = statistics.mean(r["sm_clock_mhz"] or 0 for r in base)
        gm0 = base[0].get("group_m")
        cells = [f"{layout} {M}x{N}x{K} P={P}: {f'gm{gm0}' if gm0 else 'tuned'} {t0:.4f} ms "
                 f"{c0:.0f} MHz"]
        for (kind, gm), rs in sorted(variants.items(), key=lambda kv: (kv[0][0] == "cublaslt",
                                                                      kv[0][1] or 0)):
            if kind == "tuned":
                continue
            t = statistics.mean(r["median_ms"] for r in rs) / t0
            c = statistics.mean(r["sm_clock_mhz"] or 0 for r in rs) / c0 if c0 else float("nan")
            name = "cuBLASLt" if kind == "cublaslt" else f"gm{gm}"
            cells.append(f"{name} {t:.3f} (clock {c:.3f})")
        lines.append(" | ".join(cells))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for the JSON (required unless --summarize)")
    p.add_argument("--summarize", nargs="+", type=Path, metavar="JSON",
                   help="only print the ratio table of result files (no GPU needed)")
    p.add_argument("--name", default="gemm-clock", help="result file name (without .json)")
    p.add_argument("--shapes", default=SHAPES, help="MxNxK,...")
    p.add_argument("--b-layout", default="kn", choices=["kn", "nk"],
                   help="B row-major [K, N] (kn) or w.t() of an [N, K] weight (nk)")
    p.add_argument("--ctas", default="132,116", help="P values (SM targets for cuBLASLt)")
    p.add_argument("--seconds", type=float, default=2.0, help="length of each phase")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--group-m", default="",
                   help="extra signal-GEMM phases with these band heights (e.g. 16,32; the "
                        "tuner's own choice always runs)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every shape's phases this many times, interleaved")
    args = p.parse_args(argv)
    if args.summarize:
        for f in args.summarize:  # one table per file: runs are not mixed
            print(f"{f}:\n" + "\n".join(summarize(json.loads(f.read_text()))))
        return 0
    if args.out is None:
        p.error("--out is required")
    import torch
    import triton

    if not torch.cuda.is_available():
        print("gemm_clock_probe.py needs a CUDA GPU", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import _git_commit
    from bench_gemm import _Bench
    from flashoverlap.kernels import gemm_config_for
    from flashoverlap.kernels import signal_gemm as sg
    from flashoverlap.plan import PlanConfig, Problem, make_plan

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    dtype = getattr(torch, args.dtype)
    ctas = [int(x) for x in args.ctas.split(",")]
    sampler = _Sampler()
    rows = []
    common = {"bench": "gemm_clock", "dtype": args.dtype, "b_layout": args.b_layout,
              "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "triton": triton.__version__, "commit": _git_commit(),
              "date": time.strftime("%Y-%m-%d")}
    group_ms = [None] + [int(x) for x in args.group_m.split(",") if x]
    for shape in args.shapes.split(","):
        M, N, K = (int(x) for x in shape.split("x"))
        bench = _Bench(torch, triton, sg, M, N, K, dtype, args.b_layout, 4)
        names = {P: _kernel_names(torch, bench.torch_sm_target_fn(sms - P)) for P in ctas}
        for rnd in range(args.rounds):
            for P in ctas:
                for engine, gm in [("cublaslt", None)] + [("flashoverlap", g) for g in group_ms]:
                    if engine == "flashoverlap":
                        choice = gemm_config_for(M, N, K, args.dtype, P,
                                                 torch.cuda.get_device_capability(dev))
                        gm = gm or choice.group_m
                        plan = make_plan(Problem(M, N, K, args.dtype, 1, "all_reduce"),
                                         PlanConfig(block_m=choice.config.block_m,
                                                    block_n=choice.config.block_n,
                                                    num_ctas=P, group_m=gm))
                        fn = bench.signal_fn(plan, choice.config)
                    else:
                        fn = bench.torch_sm_target_fn(sms - P)
                    row = _phase(torch, fn, sampler, args.seconds)
                    flops = 2.0 * M * N * K
                    rows.append(dict(common, M=M, N=N, K=K, engine=engine, num_ctas=P, sms=sms,
                                     group_m=gm, round=rnd, **row,
                                     tflops=flops / row["median_ms"] / 1e9,
                                     kernels=names[P] if engine == "cublaslt" else []))
                    clock, power = row["sm_clock_mhz"], row["power_w"]
                    print(f"{M:>6} {N:>6} {K:>6} {engine:>12} {P:>4} {gm or '':>3} "
                          f"{row['median_ms']:8.3f} {flops / row['median_ms'] / 1e9:8.1f} "
                          f"{clock if clock is None else round(clock):>6} "
                          f"{power if power is None else round(power):>5} "
                          f"{','.join(row['clock_reasons'])}"
                          + (f"  {names[P]}" if engine == "cublaslt" and rnd == 0 else ""),
                          flush=True)
        del bench
        torch.cuda.empty_cache()
    sampler.stop()
    write_rows(args.out, args.name, rows, summarize,
               "time and clock against the tuner's variant, mean of the rounds:")
    return 0


if __name__ == "__main__":
    sys.exit(main())
