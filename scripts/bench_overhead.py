"""Mechanism overhead of the overlap engine on one GPU (world size 1).

At one rank the collectives move nothing, so an overlapped call costs what the mechanism
costs: events, the watcher stream, one wait + one (trivial) NCCL call per group, on top of
the signal GEMM.  For each problem ``collective(a[M, K] @ b[K, N])`` (bf16,
M in --m, K in --k, N = --n, both collectives) with a forced overlapped plan of --groups
groups (explicit ``config=``: at world size 1 the default call would run the plain GEMM):

* ``overhead_vs_gemm = T_op / T_signal_gemm``: the op against the signal GEMM alone with the
  same plan (same P, tiles, counters on) into the same destination (the result for an
  in-place collective, the workspace's send buffer otherwise); eager (``graph: false``) and
  CUDA-graph replay (``graph: true``);
* host time per eager call (the GPU idle before each call: ``torch.cuda.synchronize()``,
  then ``time.perf_counter_ns`` around the call's enqueue; median of --host-iters) for the op,
  the signal GEMM alone, and ``torch.matmul`` + the ``torch.distributed`` collective
  (``Collective.torch_group``: ``dist.all_reduce`` for AllReduce); target: op host time <=
  torch's + 8 us x groups (``host_ok``).  The issue's literal baseline, ``torch.matmul`` +
  ``dist.all_reduce``, for every op: ``host_gap_us_vs_all_reduce`` is the median over rounds
  of (op - baseline), both timed in the same round (the host's speed drifts by tens of
  percent within a run, and a difference of two medians mixes phases);
  ``host_ok_vs_all_reduce``: that gap <= 8 us x groups (``host_medians_ok_vs_all_reduce``:
  the same from the two medians).  The same again with the GPU busy (enqueue only);
* the world-size-1 default call (no config: the plain GEMM) against ``torch.matmul`` + the
  collective: rows ``bench=overlap, world_size=1, engine=flashoverlap`` with
  ``speedup_vs_sequential`` (and the ``engine=torch`` baseline rows).

GPU times: CUDA events around each call, median of --iters calls after --warmup, inputs
rotated over --rotate random sets.  Every result is checked against ``torch.matmul`` in
float32 (outputs poisoned with NaN first); a wrong result exits non-zero.  Prints a table
and writes the JSON rows to --out.

    python scripts/bench_overhead.py --out /tmp/overhead.json
    torchrun --nproc-per-node 1 scripts/bench_overhead.py --m 8192 --k 2048   # also works
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402  (imports no torch)

OPS = ("all_reduce", "reduce_scatter")
HOST_US_PER_GROUP = 8.0  # acceptance: op host time <= torch's + this x groups


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in bc.csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"want positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int_list, default=[4096, 8192, 16384], help="M values")
    p.add_argument("--k", type=int_list, default=[2048, 7168], help="K values")
    p.add_argument("--n", type=int, default=8192, help="N")
    p.add_argument("--ops", type=bc.csv_list, default=list(OPS),
                   help=f"comma list of collectives ({','.join(OPS)})")
    p.add_argument("--groups", type=int, default=4, help="groups of the forced plan (>= 2)")
    p.add_argument("--reserve", type=int, default=16, help="SMs left to NCCL: P = SMs - this")
    p.add_argument("--iters", type=int, default=30, help="timed calls per measurement (>= 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    p.add_argument("--rotate", type=int, default=3, help="random input sets rotated (>= 3)")
    p.add_argument("--host-iters", type=int, default=60, help="calls per host-time median (>= 50)")
    p.add_argument("--profile", action="store_true",
                   help="print a cProfile of the overlapped call's enqueue for one problem")
    p.add_argument("--profile-op", default="all_reduce")
    p.add_argument("--profile-m", type=int, default=8192)
    p.add_argument("--profile-k", type=int, default=2048)
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph rows")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file of the rows (default: results/<date>-<machine>/overhead.json)")
    p.add_argument("--machine", default=None, help="machine tag of the default folder")
    args = p.parse_args(argv)
    unknown = [op for op in args.ops if op not in OPS]
    if unknown:
        p.error(f"--ops: unknown {unknown}; choose from {OPS}")
    if args.groups < 2:
        p.error("--groups must be >= 2 (one group is not an overlapped plan)")
    if min(args.iters, args.rotate, args.host_iters, args.n) < 1 or args.warmup < 0:
        p.error("--iters, --rotate, --host-iters and --n must be positive")
    return args


def forced_config(M: int, N: int, op: str, *, sms: int, block: tuple[int, int], groups: int,
                  reserve: int):
    """A plan config of ``groups`` groups of whole bands (fewer only if the problem has fewer
    bands) on ``sms - reserve`` CTAs; the band height shrinks from 8 tile rows so that the
    plan has at least ``groups`` bands where it can.  Pure Python (testable on CPU)."""
    from flashoverlap.plan import PlanConfig, Problem, num_bands_for

    problem = Problem(M, N, 8, "bfloat16", 1, op)
    tiles_m = math.ceil(problem.rows_per_block / block[0])
    group_m = max(1, min(8, tiles_m // groups))
    base = PlanConfig(block_m=block[0], block_n=block[1], num_ctas=max(1, sms - reserve),
                      group_m=group_m)
    bands = num_bands_for(problem, base)
    g = min(groups, bands)
    sizes = tuple(bands // g + (1 if i < bands % g else 0) for i in range(g))
    return dataclasses.replace(base, group_bands=sizes)


def median_ns_to_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1e3


def summarize(rows: list[dict[str, Any]]) -> list[str]:
    """Table lines (median ms, ratios, host us) from the rows; pure Python."""
    lines = []
    head = (f"{'op':<15}{'M':>6}{'K':>6}{'G':>3}{'graph':>6}{'sgemm ms':>10}{'op ms':>9}"
            f"{'op/sgemm':>9}{'host op':>9}{'host sg':>9}{'host torch':>11}{'target':>8}"
            f"{'ok':>4}{'busy op':>9}{'busy sg':>9}{'busy torch':>11}{'ok':>4}")
    lines += [head, "-" * len(head)]
    for r in rows:
        if r["bench"] != "overhead":
            continue
        host = (f"{r['host_us']:>9.1f}{r['host_us_signal_gemm']:>9.1f}"
                f"{r['host_us_torch']:>11.1f}{r['host_target_us']:>8.1f}"
                f"{'yes' if r['host_ok'] else 'NO':>4}"
                f"{r.get('host_busy_us', float('nan')):>9.1f}"
                f"{r.get('host_busy_us_signal_gemm', float('nan')):>9.1f}"
                f"{r.get('host_busy_us_torch', float('nan')):>11.1f}"
                f"{'yes' if r.get('host_busy_ok') else 'NO':>4}") if not r["graph"] else ""
        lines.append(f"{r['op']:<15}{r['M']:>6}{r['K']:>6}{r['num_groups']:>3}"
                     f"{str(r['graph']).lower():>6}{r['signal_gemm_ms']:>10.3f}"
                     f"{r['median_ms']:>9.3f}{r['overhead_vs_gemm']:>9.3f}{host}")
    over = [r for r in rows if r["bench"] == "overlap" and r["engine"] == "flashoverlap"]
    if over:
        lines += ["", "world size 1, default call (plain GEMM) vs torch.matmul + collective:",
                  f"{'op':<15}{'M':>6}{'K':>6}{'default ms':>11}{'torch ms':>9}{'speedup':>8}"
                  f"{'host us':>8}{'torch host':>11}{'busy us':>8}{'torch busy':>11}"]
        for r in over:
            lines.append(f"{r['op']:<15}{r['M']:>6}{r['K']:>6}{r['median_ms']:>11.3f}"
                         f"{r['sequential_ms']:>9.3f}{r['speedup_vs_sequential']:>8.3f}"
                         f"{r['host_us']:>8.1f}{r['host_us_torch']:>11.1f}"
                         f"{r.get('host_busy_us', float('nan')):>8.1f}"
                         f"{r.get('host_busy_us_torch', float('nan')):>11.1f}")
    for graph in (False, True):
        ratios = [r["overhead_vs_gemm"] for r in rows
                  if r["bench"] == "overhead" and r["graph"] is graph]
        if ratios:
            lines.append(f"overhead_vs_gemm ({'graph' if graph else 'eager'}): median "
                         f"{statistics.median(ratios):.3f}, max {max(ratios):.3f} over "
                         f"{len(ratios)} problems")
    host = [r for r in rows if r["bench"] == "overhead" and not r["graph"]]
    for key, gap, label in (
            ("host_ok_vs_all_reduce", "host_gap_us_vs_all_reduce", "idle, paired"),
            ("host_busy_ok_vs_all_reduce", "host_busy_gap_us_vs_all_reduce", "GPU busy, paired"),
            ("host_medians_ok_vs_all_reduce", None, "idle, medians"),
            ("host_busy_medians_ok_vs_all_reduce", None, "GPU busy, medians")):
        marked = [r for r in host if key in r]
        if marked:
            miss = [f"{r['op']} {r['M']}x{r['K']}" for r in marked if not r[key]]
            gaps = (" op - baseline " + ", ".join(f"{r[gap]:.1f}" for r in marked)
                    + f" us (budget {marked[0]['host_budget_us']:g})") if gap else ""
            lines.append(f"host target vs torch.matmul + dist.all_reduce ({label}): "
                         f"{len(marked) - len(miss)}/{len(marked)} met"
                         + (f"; missed: {miss}" if miss else "") + gaps)
    if host:
        bad = [f"{r['op']} {r['M']}x{r['K']}" for r in host if not r["host_ok"]]
        lines.append(f"host target (op <= torch + {HOST_US_PER_GROUP:g} us x groups): "
                     f"{len(host) - len(bad)}/{len(host)} met" + (f"; missed: {bad}" if bad else ""))
        busy = [r for r in host if "host_busy_ok" in r]
        if busy:
            bad = [f"{r['op']} {r['M']}x{r['K']}" for r in busy if not r["host_busy_ok"]]
            lines.append(f"host target, GPU busy (enqueue only): {len(busy) - len(bad)}/"
                         f"{len(busy)} met" + (f"; missed: {bad}" if bad else ""))
    return lines


# --------------------------------------------------------------------------------------------
# GPU part
# --------------------------------------------------------------------------------------------
class Check:
    """Collects wrong results; the script exits non-zero if any."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def close(self, torch, got, want, what: str, tol: float = 1e-2) -> None:
        torch.cuda.synchronize()
        if bool(got.isnan().any()):
            self.failures.append(f"{what}: unwritten (NaN) elements")
            return
        err = float((got.float() - want).norm() / want.norm().clamp_min(1e-30))
        if not err <= tol:
            self.failures.append(f"{what}: relative error {err:.3g} > {tol}")


def _init_world(torch, dist) -> None:
    if dist.is_initialized():
        return
    if os.environ.get("WORLD_SIZE"):  # torchrun / mpirun
        from flashoverlap.dist_utils import init_from_env

        init_from_env("nccl")
    else:
        torch.cuda.set_device(0)
        store = os.path.join(tempfile.mkdtemp(prefix="fo-overhead-"), "store")
        dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1,
                                device_id=torch.device("cuda", torch.cuda.current_device()))
    if dist.get_world_size() != 1:
        raise SystemExit("bench_overhead.py measures one GPU: run it with world size 1")


def _cuda_ms(torch, fn, sets: int, warmup: int, iters: int) -> float:
    """Median ms of ``fn(i)`` (CUDA events around each call; calls back to back)."""
    return _paired_ms(torch, [fn], sets, warmup, iters)[0]


def _paired_ms(torch, fns, sets: int, warmup: int, iters: int) -> list[float]:
    """Median ms of each ``fns[j](i)``, the functions interleaved call by call (A B A B ...)
    so that clock and thermal drift during the run hit all of them alike; CUDA events
    around each call."""
    for n in range(warmup):
        for fn in fns:
            fn(n % sets)
    torch.cuda.synchronize()
    stamps: list[list] = [[] for _ in fns]
    for n in range(iters):
        for j, fn in enumerate(fns):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(n % sets)
            end.record()
            stamps[j].append((start, end))
    torch.cuda.synchronize()
    return [statistics.median(s.elapsed_time(e) for s, e in st) for st in stamps]


def _host_us_interleaved(torch, fns, sets: int, iters: int,
                         busy: bool = False) -> tuple[list[float], list[list[int]]]:
    """Median us of CPU time to enqueue each ``fns[j](i)``: with the GPU idle before each call,
    or (``busy``) behind a ~1 ms sleep kernel so that only the enqueue is timed.  The
    functions are sampled in turn (A B C A B C ...): the VM host's speed drifts by tens of
    percent within a run, which separate medians would turn into differences between them."""
    samples: list[list[int]] = [[] for _ in fns]
    for n in range(iters):
        for j, fn in enumerate(fns):
            torch.cuda.synchronize()
            if busy:
                torch.cuda._sleep(2_000_000)
            t0 = time.perf_counter_ns()
            fn(n % sets)
            samples[j].append(time.perf_counter_ns() - t0)
    torch.cuda.synchronize()
    return [median_ns_to_us(s) for s in samples], samples


def paired_gap_us(samples_a: list[int], samples_b: list[int]) -> float:
    """Median over rounds of ``a - b`` (us), the two sampled in the same round: a slow phase
    of the host then slows both sides of a difference instead of one median's samples."""
    return statistics.median(x - y for x, y in zip(samples_a, samples_b)) / 1000.0


def _host_profile(torch, fn, sets: int, calls: int = 200, top: int = 12) -> str:
    """cProfile of ``calls`` enqueues (GPU kept busy), the top functions by own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    for n in range(calls):
        if n % 20 == 0:
            torch.cuda.synchronize()
            torch.cuda._sleep(50_000_000)
        prof.enable()
        fn(n % sets)
        prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def _graphs(torch, fn, sets: int) -> list[Any]:
    """One captured graph per input set (warmed up eagerly before)."""
    graphs = []
    for i in range(sets):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(i)
        graphs.append(g)
    torch.cuda.synchronize()
    return graphs


def measure_problem(torch, dist, args, op: str, M: int, K: int, sms: int, block, prov,
                    check: Check) -> list[dict[str, Any]]:
    import flashoverlap as fo
    from flashoverlap.engine import get_workspace
    from flashoverlap.kernels.signal_gemm import SignalGemmLauncher
    from flashoverlap.policy import get_plan

    N, dev, dtype = args.n, torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    coll = fo.collectives.get(op)
    group = dist.group.WORLD
    rows_out = coll.result_rows(M, 1)
    config = forced_config(M, N, op, sms=sms, block=block, groups=args.groups,
                           reserve=args.reserve)
    plan = get_plan(fo.Problem(M, N, K, "bfloat16", 1, op), config)
    gen = torch.Generator(device=dev).manual_seed(args.seed + M + K)
    A = [torch.randn(M, K, device=dev, dtype=dtype, generator=gen) for _ in range(args.rotate)]
    B = [torch.randn(K, N, device=dev, dtype=dtype, generator=gen) / K**0.5
         for _ in range(args.rotate)]
    out = torch.full((rows_out, N), float("nan"), device=dev, dtype=dtype)
    full = torch.empty(M, N, device=dev, dtype=dtype)

    def op_call(i):
        fo.gemm_collective(A[i], B[i], coll, group, out=out, config=config)

    def default_call(i):
        fo.gemm_collective(A[i], B[i], coll, group, out=out)

    def torch_call(i):
        torch.matmul(A[i], B[i], out=full)
        coll.torch_group(full, full if coll.in_place else out, group)()

    # First calls: compile, communicator, workspace; and the results are checked.
    op_call(0)
    check.close(torch, out, A[0].float() @ B[0].float(), f"{op} {M}x{N}x{K} overlapped")
    ws = get_workspace(plan, dev, group, 0)
    dest = out if ws.send is None else ws.send
    counters = torch.zeros(plan.num_groups, device=dev, dtype=torch.int32)
    launcher = SignalGemmLauncher(ws.step_table, counters, block_m=config.block_m,
                                  block_n=config.block_n, num_ctas=config.num_ctas,
                                  rows_per_block=plan.problem.rows_per_block,
                                  config=ws.gemm(None).config,  # the engine's kernel options
                                  full_tiles=plan.full_tiles)

    def sgemm_call(i):
        launcher(A[i], B[i], dest, stream=torch.cuda.current_stream())

    dest.fill_(float("nan"))
    sgemm_call(1 % args.rotate)
    check.close(torch, dest, A[1 % args.rotate].float() @ B[1 % args.rotate].float(),
                f"{op} {M}x{N}x{K} signal GEMM alone")
    out.fill_(float("nan"))
    default_call(0)
    check.close(torch, out, A[0].float() @ B[0].float(), f"{op} {M}x{N}x{K} default call")
    torch_call(0)

    sets, it, wu = args.rotate, args.iters, args.warmup
    t_op, t_sg = _paired_ms(torch, [op_call, sgemm_call], sets, wu, it)
    t_default, t_torch = _paired_ms(torch, [default_call, torch_call], sets, wu, it)
    def torch_ar_call(i):  # the literal baseline for every op: matmul + all_reduce
        torch.matmul(A[i], B[i], out=full)
        dist.all_reduce(full, group=group)

    calls = [op_call, sgemm_call, default_call, torch_call, torch_ar_call]
    (h_op, h_sg, h_default, h_torch, h_ar), idle = _host_us_interleaved(
        torch, calls, sets, args.host_iters)
    (hb_op, hb_sg, hb_default, hb_torch, hb_ar), busy = _host_us_interleaved(
        torch, calls, sets, args.host_iters, busy=True)
    gap_ar, gap_ar_busy = paired_gap_us(idle[0], idle[4]), paired_gap_us(busy[0], busy[4])
    if args.profile and (op, M, K) == (args.profile_op, M, args.profile_k) \
            and M == args.profile_m:
        print(f"-- host profile of the {op} {M}x{N}x{K} overlapped call (GPU busy):\n"
              + _host_profile(torch, op_call, sets), flush=True)
    out.fill_(float("nan"))
    op_call(2 % sets)  # still right after the timed calls
    check.close(torch, out, A[2 % sets].float() @ B[2 % sets].float(),
                f"{op} {M}x{N}x{K} overlapped, after timing")

    common = {"op": op, "M": M, "N": N, "K": K, "dtype": "bfloat16", "world_size": 1,
              "num_ctas": config.num_ctas, "num_groups": plan.num_groups,
              "plan": {**dataclasses.asdict(config), "num_waves": plan.num_waves}, **prov,
              "p2p": None, "timer": "cuda_events", "iters": it, "warmup": wu, "input_sets": sets,
              "host_iters": args.host_iters}
    target = h_torch + HOST_US_PER_GROUP * plan.num_groups
    rows = [dict(common, bench="overhead", engine="flashoverlap", variant="forced plan",
                 graph=False, median_ms=t_op, signal_gemm_ms=t_sg, overhead_vs_gemm=t_op / t_sg,
                 host_us=h_op, host_us_signal_gemm=h_sg, host_us_torch=h_torch,
                 host_busy_us=hb_op, host_busy_us_signal_gemm=hb_sg,
                 host_busy_us_torch=hb_torch,
                 host_target_us=target, host_ok=h_op <= target,
                 host_busy_ok=hb_op <= hb_torch + HOST_US_PER_GROUP * plan.num_groups,
                 host_us_torch_all_reduce=h_ar, host_busy_us_torch_all_reduce=hb_ar,
                 host_gap_us_vs_all_reduce=gap_ar, host_busy_gap_us_vs_all_reduce=gap_ar_busy,
                 host_budget_us=HOST_US_PER_GROUP * plan.num_groups,
                 host_ok_vs_all_reduce=gap_ar <= HOST_US_PER_GROUP * plan.num_groups,
                 host_busy_ok_vs_all_reduce=gap_ar_busy <= HOST_US_PER_GROUP * plan.num_groups,
                 host_medians_ok_vs_all_reduce=(
                     h_op <= h_ar + HOST_US_PER_GROUP * plan.num_groups),
                 host_busy_medians_ok_vs_all_reduce=(
                     hb_op <= hb_ar + HOST_US_PER_GROUP * plan.num_groups))]
    if not args.no_graph:
        op_graphs = _graphs(torch, op_call, sets)
        sg_graphs = _graphs(torch, sgemm_call, sets)
        out.fill_(float("nan"))
        op_graphs[0].replay()
        check.close(torch, out, A[0].float() @ B[0].float(), f"{op} {M}x{N}x{K} graph replay")
        g_op, g_sg = _paired_ms(torch, [lambda i: op_graphs[i].replay(),
                                        lambda i: sg_graphs[i].replay()], sets, wu, it)
        rows.append(dict(common, bench="overhead", engine="flashoverlap", variant="forced plan",
                         graph=True, median_ms=g_op, signal_gemm_ms=g_sg,
                         overhead_vs_gemm=g_op / g_sg))
        del op_graphs, sg_graphs
    base = dict(common, bench="overlap", graph=False)
    base.pop("plan")
    base.update(num_ctas=None, num_groups=None)
    rows.append(dict(base, engine="flashoverlap", variant="default (W=1: plain GEMM)",
                     median_ms=t_default, sequential_ms=t_torch,
                     speedup_vs_sequential=t_torch / t_default, host_us=h_default,
                     host_us_torch=h_torch, host_busy_us=hb_default,
                     host_busy_us_torch=hb_torch))
    rows.append(dict(base, engine="torch", variant="torch.matmul + torch.distributed",
                     median_ms=t_torch, sequential_ms=t_torch, speedup_vs_sequential=1.0,
                     host_us=h_torch, host_busy_us=hb_torch))
    return rows  # the caller frees the buffers and workspaces (see main)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bc.load_torch()
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        print("bench_overhead.py needs a CUDA GPU", file=sys.stderr)
        return 2
    _init_world(torch, dist)
    from flashoverlap.engine import clear_workspaces
    from flashoverlap.kernels import default_block_shape

    dev = torch.device("cuda", torch.cuda.current_device())
    prov = bc.provenance(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    block = default_block_shape(dev)
    print(f"# flashoverlap mechanism overhead at world size 1\n"
          f"GPU: {prov['gpu']} ({sms} SMs) | torch {prov['torch']} (CUDA {prov['cuda']}) | "
          f"NCCL {prov['nccl']} (flashoverlap: {prov['nccl_flashoverlap']}) | Triton "
          f"{prov['triton']} | flashoverlap @ {prov['commit']} | {prov['date']}\n"
          f"bf16, N={args.n}, forced plans of {args.groups} groups on P = SMs - {args.reserve}; "
          f"CUDA events, median of {args.iters} after {args.warmup} warm-up, {args.rotate} "
          f"input sets; host: median of {args.host_iters} synchronised calls", flush=True)
    check = Check()
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        for op in args.ops:
            for M in args.m:
                for K in args.k:
                    rows += measure_problem(torch, dist, args, op, M, K, sms, block, prov, check)
                    clear_workspaces()  # this problem's buffers go before the next one's
                    torch.cuda.empty_cache()
                    r = next(r for r in reversed(rows) if r["bench"] == "overhead"
                             and not r["graph"])
                    print(f"  {op} M={M} K={K}: op/sgemm {r['overhead_vs_gemm']:.3f} "
                          f"({time.monotonic() - t0:.0f} s)", flush=True)
    finally:
        from flashoverlap.comm import destroy_communicators

        destroy_communicators()
        if dist.is_initialized():
            dist.destroy_process_group()
    print("\n" + "\n".join(summarize(rows)))
    out = args.out or (Path("results") / f"{prov['date']}-{args.machine or bc.machine_tag(prov['gpu'])}"
                       / "overhead.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out} ({len(rows)} rows)")
    if check.failures:
        print("WRONG RESULTS:\n  " + "\n  ".join(check.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
