"""Benchmark the signal GEMM (row-major stores + per-group signals) against torch.matmul.

For each shape ``M x K @ K x N`` (bf16 by default) it times torch.matmul and the signal GEMM
with ``P`` = all SMs, SMs-8 and SMs-16 CTAs (AllReduce plans at world size 1: every tile
stored at its own row of the ``[M, N]`` result, one group -- one counter -- per band of
``--group-m`` tile rows, the engine's finest grouping; counters on), using ``triton.testing.do_bench`` (CUDA events, median) over several
input sets in rotation so the L2 cache does not hold the operands.  torch.matmul is timed
before and after each signal-GEMM timing; a row's efficiency is the median, over
``--repeats`` repetitions of the whole measurement, of ``mean(T_torch before, after) /
T_signal_gemm`` (GPU clocks drift under sustained load, so neighbours are compared).
Each timing is a 300-ms window, each shape first runs torch.matmul for 200 ms (timed and
discarded; ``--rep``, ``--settle-ms``; README "How noisy a row is"), and every timing is kept
in the JSON rows (``samples_ms``, ``efficiency_samples``; ``summarize_gemm.py --noise``).

``--torch-sm-target`` adds the reference a reduced ``P`` should be held to: torch.matmul
through cuBLASLt told to use ``P`` SMs (``CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET``, which torch
sets from ``torch._C._set_sm_carveout_experimental(SMs - P)`` -- the way torch's own
async tensor parallelism leaves SMs to NCCL), timed after each signal-GEMM timing of that
``P``.  Its rows are ``engine="torch-sm-target"`` (``efficiency_vs_torch``: its own time
against torch.matmul on all SMs; ``num_ctas=None`` is cuBLASLt on all SMs, the control), and
the signal GEMM rows of that ``P`` gain ``efficiency_vs_torch_sm_target`` (its time ratio to
that reference, same repeat).  Why: on one H200 these GEMMs run at the 700 W power cap
(nvidia-smi's clock-event reason "SW power cap", 1.45-1.86 GHz), so idle SMs give the others
only a little more clock; what cuBLAS itself does on ``P`` SMs is the measure of how much of
the loss at reduced ``P`` is the kernel's.

Prints a table and writes ``results/<YYYY-MM-DD>-<machine>/gemm.json`` (docs/design.md "Result
files").  ``--sweep`` first times a few kernel variants on three shapes (tuning aid).

    python scripts/bench_gemm.py --repeats 3
    python scripts/bench_gemm.py --repeats 1 --m 8192 --kn 2048x8192,7168x8192 --rep 50  # quick
    python scripts/bench_gemm.py --repeats 3 --cta-offsets 0,16 --torch-sm-target
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import re
import statistics
import sys
from pathlib import Path

SHAPES_M = (4096, 8192, 16384)
SHAPES_KN = ((2048, 8192), (7168, 8192), (8192, 8192))
CTA_OFFSETS = (0, 8, 16)
DEFAULT_SWEEP = ";".join(f"num_stages={st},flatten={fl},epilogue_subtile={sub}"
                         for st in (3, 4) for fl in (1, 0) for sub in (0, 1))


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: results/<date>-<machine>)")
    p.add_argument("--machine", default=None, help="machine tag of the default folder name")
    p.add_argument("--name", default="gemm", help="result file name (without .json)")
    p.add_argument("--repeats", type=int, default=3, help="whole-measurement repeats")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--b-layout", default="kn", choices=["kn", "nk"],
                   help="B as row-major [K,N] (kn) or the transposed view of [N,K] (nk)")
    p.add_argument("--sets", type=int, default=4, help="input sets rotated per call (>= 4)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=300,
                   help="do_bench measuring time (ms); 300 since window-run56: two torch "
                        "timings of one shape differ by 0.8-1.0 %% (robust sd) against 1.4 %% "
                        "with 100 ms")
    p.add_argument("--settle-ms", type=int, default=200,
                   help="after setting up a shape, run torch.matmul this long and discard "
                        "the timing before the first measured one (0: none).  valid-run55: "
                        "a shape's first torch.matmul timing ran 0.4 %% faster than its later "
                        "ones (median of 130; mean 1 %%) -- the board clocks up while the "
                        "previous shape is torn down and this one set up -- and it is half "
                        "of the P = all-SMs efficiency's torch reference")
    p.add_argument("--m", type=int, nargs="*", default=list(SHAPES_M), help="M values")
    p.add_argument("--kn", default=",".join(f"{k}x{n}" for k, n in SHAPES_KN),
                   help="comma-separated KxN pairs")
    p.add_argument("--cta-offsets", default=",".join(map(str, CTA_OFFSETS)),
                   help="P = SMs - offset, comma-separated (a negative offset runs more "
                        "programs than SMs: -132 on 132 SMs is two per SM)")
    p.add_argument("--group-m", type=int, default=None,
                   help="plan swizzle width (default: the product's choice per shape, "
                        "flashoverlap.kernels.gemm_config_for)")
    p.add_argument("--pipelined", action="store_true",
                   help="never the warp-specialized kernel (GemmConfig."
                        "warp_specialized_kernel=False): the pipelined Triton kernel")
    # Kernel overrides (default: flashoverlap.kernels.default_config for the device).
    p.add_argument("--block-m", type=int)
    p.add_argument("--block-n", type=int)
    p.add_argument("--block-k", type=int)
    p.add_argument("--num-warps", type=int)
    p.add_argument("--num-stages", type=int)
    p.add_argument("--flatten", type=int, choices=[0, 1])
    p.add_argument("--subtile", type=int, choices=[0, 1])
    p.add_argument("--no-tma", action="store_true")
    p.add_argument("--split-tail", type=int, choices=[0, 1],
                   help="split a partial last wave along K (GemmConfig.split_tail)")
    p.add_argument("--max-registers", type=int,
                   help="cap on registers per thread (GemmConfig.max_registers)")
    p.add_argument("--cluster-ctas", type=int, choices=[0, 2, 4],
                   help="run the CUDA C cluster GEMM in clusters of this many CTAs where it "
                        "can run, 0 never (GemmConfig.cluster_ctas; default: the table's "
                        "choice -- clusters of 4 at P in [112, 121) on sm_90)")
    p.add_argument("--torch-sm-target", action="store_true",
                   help="also time torch.matmul via cuBLASLt with an SM count target of P "
                        "(the same-SM reference for reduced P)")
    p.add_argument("--sweep", nargs="?", const=DEFAULT_SWEEP, default=None, metavar="SPEC",
                   help="first time kernel variants (';'-separated 'key=value,...' over "
                        "GemmConfig fields, group_m and num_ctas (programs; default all SMs); "
                        "default: a small grid) and print them")
    p.add_argument("--sweep-shapes", default="8192x8192x2048,8192x8192x7168,16384x8192x8192",
                   help="MxNxK shapes of the sweep, comma-separated")
    p.add_argument("--sweep-only", action="store_true", help="stop after the sweep")
    args = p.parse_args(argv)
    if args.sets < 1 or args.repeats < 1:
        p.error("--sets and --repeats must be positive")
    return args


def _machine_tag(gpu_name: str) -> str:
    for tag in ("h200", "h100", "b200", "a100", "l40s", "gh200"):
        if tag in gpu_name.lower().replace(" ", ""):
            return tag
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"


def _nccl_version(torch) -> str | None:
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - CPU-only or NCCL-less builds
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


class _Bench:
    """Input sets, plans and timing helpers for one shape."""

    def __init__(self, torch, triton, sg, M, N, K, dtype, b_layout, sets):
        self.torch, self.triton, self.sg = torch, triton, sg
        self.M, self.N, self.K = M, N, K
        dev = torch.device("cuda")
        gen = torch.Generator(device=dev).manual_seed(M * 131 + N * 7 + K)
        self.sets = []
        for _ in range(sets):
            a = torch.randn(M, K, device=dev, dtype=dtype, generator=gen)
            if b_layout == "nk":
                b = torch.randn(N, K, device=dev, dtype=dtype, generator=gen).T
            else:
                b = torch.randn(K, N, device=dev, dtype=dtype, generator=gen)
            self.sets.append((a, b))
        self.c = [torch.empty(M, N, device=dev, dtype=dtype) for _ in range(sets)]
        self.comm = None

    def time(self, run, warmup, rep) -> float:
        return self.triton.testing.do_bench(self._rotating(run), warmup=warmup, rep=rep,
                                            return_mode="median")

    def torch_ms(self, warmup, rep) -> float:
        return self.time(self._torch_run, warmup, rep)

    def _torch_run(self, i):
        a, b = self.sets[i]
        self.torch.matmul(a, b, out=self.c[i])

    def _rotating(self, run):
        """``run(i)`` as a no-argument call that takes the input sets in turn."""
        turn = itertools.cycle(range(len(self.sets)))
        return lambda: run(next(turn))

    @contextlib.contextmanager
    def _sm_target(self, carveout: int):
        """torch.matmul through cuBLASLt with ``SMs - carveout`` as its SM count target
        (``carveout == 0``: cuBLASLt on all SMs); torch's settings are restored after."""
        torch = self.torch
        library = torch.backends.cuda.preferred_blas_library()
        previous = torch._C._get_sm_carveout_experimental()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        torch._C._set_sm_carveout_experimental(carveout or None)
        try:
            yield
        finally:
            torch._C._set_sm_carveout_experimental(previous)
            torch.backends.cuda.preferred_blas_library(library)

    def torch_sm_target_ms(self, carveout: int, warmup, rep) -> float:
        with self._sm_target(carveout):
            return self.torch_ms(warmup, rep)

    def torch_sm_target_fn(self, carveout: int):
        """One rotating torch.matmul call under :meth:`_sm_target` per call of the result."""
        run = self._rotating(self._torch_run)

        def call():
            with self._sm_target(carveout):
                run()

        return call

    def signal_ms(self, plan, config, warmup, rep) -> float:
        """The signal GEMM into the same destinations as torch.matmul (``self.c``)."""
        return self.time(self._signal_run(plan, config), warmup, rep)

    def signal_fn(self, plan, config):
        """One rotating signal-GEMM call per call of the result."""
        return self._rotating(self._signal_run(plan, config))

    def _signal_run(self, plan, config):
        torch = self.torch
        BM, BN = plan.config.block_m, plan.config.block_n
        table = torch.from_numpy(plan.step_table.copy()).to("cuda")
        counters = torch.zeros(plan.num_groups, device="cuda", dtype=torch.int32)
        P = plan.config.num_ctas
        launcher = self.sg.SignalGemmLauncher(table, counters, block_m=BM, block_n=BN,
                                              num_ctas=P, config=config,
                                              rows_per_block=plan.problem.rows_per_block,
                                              full_tiles=plan.full_tiles)
        stream = torch.cuda.current_stream()

        def run(i):
            a, b = self.sets[i]
            # Counters only grow here (no watcher); int32 wraps after ~1e5 calls of 8k tiles.
            launcher(a, b, self.c[i], stream=stream)

        return run


def _config_from_args(args, base):
    overrides = {}
    for field, value in (("block_m", args.block_m), ("block_n", args.block_n),
                         ("block_k", args.block_k), ("num_warps", args.num_warps),
                         ("num_stages", args.num_stages)):
        if value is not None:
            overrides[field] = value
    if args.flatten is not None:
        overrides["flatten"] = bool(args.flatten)
    if args.subtile is not None:
        overrides["epilogue_subtile"] = bool(args.subtile)
    if args.no_tma:
        overrides["use_tma"] = False
    if args.split_tail is not None:
        overrides["split_tail"] = bool(args.split_tail)
    if args.max_registers is not None:
        overrides["max_registers"] = args.max_registers
    if args.pipelined:
        overrides["warp_specialized_kernel"] = False
    if args.cluster_ctas is not None:
        overrides["cluster_ctas"] = args.cluster_ctas
    return dataclasses.replace(base, **overrides)


def _parse_variant(text: str) -> dict:
    variant = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, _, value = item.partition("=")
        variant[key.strip()] = int(value)
    return variant


def _sweep(torch, triton, sg, make_plan, Problem, PlanConfig, base, args, dtype, sms):
    from flashoverlap.kernels import DEFAULT_GROUP_M

    variants = [_parse_variant(v) for v in args.sweep.split(";") if v.strip()]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.sweep_shapes.split(",") if s]
    bool_fields = {f.name for f in dataclasses.fields(base) if f.type in (bool, "bool")}
    print(f"\nsweep (P = all SMs, B layout {args.b_layout}): ms, efficiency vs torch.matmul")
    for M, N, K in shapes:
        bench = _Bench(torch, triton, sg, M, N, K, dtype, args.b_layout, args.sets)
        t_torch = bench.torch_ms(args.warmup, args.rep)
        print(f"  M={M} N={N} K={K}: torch {t_torch:.3f} ms")
        for variant in variants:
            fields = {k: (bool(v) if k in bool_fields else v) for k, v in variant.items()
                      if k not in ("group_m", "num_ctas")}
            label = ",".join(f"{k}={v}" for k, v in variant.items()) or "default"
            try:
                cfg = dataclasses.replace(base, **fields)
                plan = make_plan(Problem(M, N, K, args.dtype, 1, "all_reduce"),
                                 PlanConfig(block_m=cfg.block_m, block_n=cfg.block_n,
                                            num_ctas=variant.get("num_ctas", sms),
                                            group_m=variant.get(
                                                "group_m", args.group_m or DEFAULT_GROUP_M)))
                t = bench.signal_ms(plan, cfg, args.warmup, args.rep)
                t2 = bench.torch_ms(args.warmup, args.rep)  # torch again: clock drift
                kernel = _compiled(torch, sg, bench, plan, cfg)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                print(f"    {label}: failed ({type(exc).__name__}: {str(exc)[:120]})")
                continue
            regs = getattr(kernel, "n_regs", "?"), getattr(kernel, "n_spills", "?")
            regs = f"regs {regs[0]} spills {regs[1]}"
            print(f"    {label}: {t:.3f} ms  eff {t_torch / t:.3f} (torch now {t2:.3f}, "
                  f"eff {t2 / t:.3f})  {regs}")
        del bench
        torch.cuda.empty_cache()


def _compiled(torch, sg, bench, plan, cfg):
    """The compiled kernel of this configuration (for register and spill counts)."""
    a, b = bench.sets[0]
    table = torch.from_numpy(plan.step_table.copy()).to("cuda")
    counters = torch.zeros(plan.num_groups, device="cuda", dtype=torch.int32)
    _, jit, *launch = sg._choose_launch(a, b, bench.c[0], table, cfg.block_m, cfg.block_n,
                                        plan.config.num_ctas, counters, None, 0, None, cfg,
                                        plan.full_tiles)
    return jit(*launch)


def main(argv=None) -> int:
    args = _parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_gemm.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import _git_commit
    from flashoverlap.kernels import default_config, gemm_config_for
    from flashoverlap.kernels import signal_gemm as sg
    from flashoverlap.plan import PlanConfig, Problem, make_plan

    dtype = getattr(torch, args.dtype)
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sms = props.multi_processor_count
    config = _config_from_args(args, default_config(dev, dtype))
    kn = [tuple(int(x) for x in pair.split("x")) for pair in args.kn.split(",") if pair]
    offsets = [int(x) for x in args.cta_offsets.split(",") if x != ""]
    today = datetime.date.today().isoformat()
    provenance = {"gpu": props.name, "torch": torch.__version__, "triton": triton.__version__,
                  "nccl": _nccl_version(torch), "date": today, "commit": _git_commit(),
                  "p2p": None}
    print(f"{props.name}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}, "
          f"nccl {provenance['nccl']}; base {config} (each row: gemm_config_for's choice "
          f"for its shape, then the overrides; kernel and group_m printed per row); "
          f"B layout {args.b_layout}")

    if args.sweep:
        _sweep(torch, triton, sg, make_plan, Problem, PlanConfig, config, args, dtype, sms)
        if args.sweep_only:
            return 0

    # measurements[(M, N, K)] = {"torch": [ms], P: [ms per repeat], ("eff", P): [...]}
    # torch.matmul is timed before and after every signal-GEMM timing, and the efficiency
    # uses the mean of the two neighbours: clocks drift by 10-15% within seconds on a hot
    # H100 (power capping), which a single torch timing per shape would turn into bias.
    measurements: dict[tuple[int, int, int], dict] = {}
    for repeat in range(args.repeats):
        for M in args.m:
            for K, N in kn:
                bench = _Bench(torch, triton, sg, M, N, K, dtype, args.b_layout, args.sets)
                row = measurements.setdefault((M, N, K), {"torch": []})
                if args.settle_ms:
                    bench.torch_ms(0, args.settle_ms)
                t_before = bench.torch_ms(args.warmup, args.rep)
                row["torch"].append(t_before)
                if args.torch_sm_target:
                    row.setdefault(("target", sms), []).append(
                        bench.torch_sm_target_ms(0, args.warmup, args.rep))
                for off in offsets:
                    P = sms - off
                    # AllReduce at W = 1: dest_row = row, the plain layout
                    # The product's choice for this shape (gemm_config_for), then the
                    # command line's overrides.
                    choice = gemm_config_for(M, N, K, args.dtype, P,
                                             torch.cuda.get_device_capability(dev))
                    cfg = _config_from_args(args, choice.config)
                    group_m = args.group_m or choice.group_m
                    plan = make_plan(Problem(M, N, K, args.dtype, 1, "all_reduce"),
                                     PlanConfig(block_m=cfg.block_m, block_n=cfg.block_n,
                                                num_ctas=P, group_m=group_m))
                    t = bench.signal_ms(plan, cfg, args.warmup, args.rep)
                    t_after = bench.torch_ms(args.warmup, args.rep)
                    row["torch"].append(t_after)
                    row.setdefault(P, []).append(t)
                    row.setdefault(("eff", P), []).append(0.5 * (t_before + t_after) / t)
                    if args.torch_sm_target and off:
                        t_target = bench.torch_sm_target_ms(off, args.warmup, args.rep)
                        row.setdefault(("target", P), []).append(t_target)
                        row.setdefault(("eff_target", P), []).append(t_target / t)
                    a0, b0 = bench.sets[0]
                    on_cluster = sg.cluster_gemm.eligible(
                        a0, b0, bench.c[0], cfg, None, plan.full_tiles, plan.step_table, P) \
                        and sg.cluster_gemm.kernel_for(a0, b0, cfg, P) is not None
                    row[("kernel", P)] = (
                        f"cluster{cfg.cluster_ctas}" if on_cluster
                        else "warp_specialized" if sg.ws_signal_gemm.eligible(
                            a0, b0, bench.c[0], cfg, None, plan.full_tiles) else "pipelined")
                    row[("config", P)] = (cfg, group_m)
                    t_before = t_after
                del bench
                torch.cuda.empty_cache()
        print(f"repeat {repeat + 1}/{args.repeats} done")

    rows = []
    header = f"{'M':>6} {'N':>6} {'K':>6} {'engine':>12} {'P':>4} {'ms':>8} {'TFLOP/s':>8} " \
             f"{'eff':>6}"
    print("\n" + header + "\n" + "-" * len(header))
    common = {"bench": "gemm", "op": "matmul", "dtype": args.dtype, "world_size": 1,
              "b_layout": args.b_layout, "repeats": args.repeats, **provenance}
    for (M, N, K), row in measurements.items():
        flops = 2.0 * M * N * K
        t_torch = statistics.median(row["torch"])
        print(f"{M:>6} {N:>6} {K:>6} {'torch':>12} {'':>4} {t_torch:8.3f} "
              f"{flops / t_torch / 1e9:8.1f} {1.0:6.3f}")
        # samples_ms: every torch.matmul timing of the shape in order -- per repeat the one
        # before the first signal-GEMM timing, then one after each P (so offline analysis can
        # see clock drift, e.g. whether a shape's first timing runs faster)
        rows.append(dict(common, M=M, N=N, K=K, engine="torch", num_ctas=None,
                         median_ms=t_torch, tflops=flops / t_torch / 1e9,
                         efficiency_vs_torch=1.0, samples_ms=list(row["torch"])))
        for key, times in row.items():
            if isinstance(key, tuple) and key[0] == "target":
                P, t = key[1], statistics.median(times)
                label = "cublaslt" if P == sms else "cublaslt@P"
                print(f"{M:>6} {N:>6} {K:>6} {label:>12} {P:>4} {t:8.3f} "
                      f"{flops / t / 1e9:8.1f} {t_torch / t:6.3f}")
                rows.append(dict(common, M=M, N=N, K=K, engine="torch-sm-target",
                                 num_ctas=None if P == sms else P, sms=sms, median_ms=t,
                                 tflops=flops / t / 1e9, efficiency_vs_torch=t_torch / t,
                                 samples_ms=list(times)))
        for P, times in row.items():
            if not isinstance(P, int):
                continue
            eff = statistics.median(row[("eff", P)])
            t = statistics.median(times)
            kernel = row[("kernel", P)]
            cfg, group_m = row[("config", P)]
            same = row.get(("eff_target", P))
            extra = {} if same is None else {
                "efficiency_vs_torch_sm_target": statistics.median(same)}
            print(f"{M:>6} {N:>6} {K:>6} {'flashoverlap':>12} {P:>4} {t:8.3f} "
                  f"{flops / t / 1e9:8.1f} {eff:6.3f}  {kernel} gm{group_m}"
                  + (f"  vs cublaslt@P {extra['efficiency_vs_torch_sm_target']:.3f}"
                     if extra else ""))
            rows.append(dict(common, M=M, N=N, K=K, engine="flashoverlap", num_ctas=P,
                             median_ms=t, tflops=flops / t / 1e9, efficiency_vs_torch=eff,
                             sms=sms, group_m=group_m, kernel=kernel,
                             config=dataclasses.asdict(cfg), samples_ms=list(times),
                             efficiency_samples=list(row[("eff", P)]), **extra))

    for off in offsets:
        effs = [r["efficiency_vs_torch"] for r in rows
                if r["engine"] == "flashoverlap" and r["num_ctas"] == sms - off]
        if effs:
            print(f"P = SMs-{off}: efficiency median {statistics.median(effs):.3f}, "
                  f"min {min(effs):.3f}, max {max(effs):.3f}")
        same = [r["efficiency_vs_torch_sm_target"] for r in rows
                if r["engine"] == "flashoverlap" and r["num_ctas"] == sms - off
                and "efficiency_vs_torch_sm_target" in r]
        ref = [r["efficiency_vs_torch"] for r in rows
               if r["engine"] == "torch-sm-target" and r["num_ctas"] == sms - off]
        if same:
            print(f"P = SMs-{off}: cuBLASLt on P SMs against torch.matmul: median "
                  f"{statistics.median(ref):.3f}, min {min(ref):.3f}; the signal GEMM against "
                  f"it: median {statistics.median(same):.3f}, min {min(same):.3f}")

    out_dir = args.out or Path("results") / f"{today}-{args.machine or _machine_tag(props.name)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name}.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
