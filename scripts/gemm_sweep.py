"""Sweep signal-GEMM kernel configurations per shape on one GPU (issue 14).

For each shape ``[M, K] @ [K, N]``, each B layout (``kn``: row-major ``[K, N]``; ``nk``: the
transposed view of a row-major ``[N, K]`` weight) and each ``P`` (CTAs of the persistent
GEMM; default all SMs and SMs - 16), it times a small, ordered set of kernel candidates
(:data:`CANDIDATES`: tile shape, stages, warps, epilogue subtiling, ``group_m`` through the
plan, ``warp_specialize``) against ``torch.matmul`` in the same process.

Measurement: one AllReduce-shaped plan (``make_plan``, one group per band) per candidate and
``P``; signals on (group counters re-zeroed before every call, outside the timed window);
three or more input sets rotated so that the L2 does not hold the operands between calls;
the GPU queue pre-filled (``torch.cuda._sleep``) so that host launch time is not measured;
CUDA events around each call; median over ``--iters`` calls after ``--warmup`` calls.  The
signal GEMM is launched through ``SignalGemmLauncher`` (the engine's hot path, same kernel
as ``signal_gemm``); ``torch.matmul`` is timed before and after the candidates of a shape
and the mean is the row's ``torch_ms``.  Every candidate is checked once per shape and
layout with ``signal_gemm`` against ``torch.matmul`` (NaN-poisoned destination, counters
equal to the plan's group tile counts); one that fails to compile or is wrong is skipped and
recorded (``bench="gemm_sweep_failure"``).

Budget: all kernels are compiled first (on a tiny problem; in candidate order; at most
``--compile-frac`` of the budget), then every (shape, layout, dtype) gets a slice of what is
left in proportion to its candidate count; the default candidate always runs, the others in
order while the slice lasts; nothing starts after ``--budget-s``.  Rows are written to
``--out`` after every shape, so an interrupted run keeps what it measured.

    python scripts/gemm_sweep.py --out gemm_sweep.json --budget-s 220
    python scripts/gemm_sweep.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(1, str(REPO))

# The nine shapes, then four LLM-like ones with N != 8192 and M not a power of two
# (Qwen-14B-like 5120 projection; Qwen2-7B MLP down projection; Llama-3-8B MLP down
# projection; Llama-3-405B MLP down projection at TP 8).
SHAPES = tuple((m, 8192, k) for m in (4096, 8192, 16384) for k in (2048, 7168, 8192)) + (
    (5000, 5120, 5120), (12000, 3584, 18944), (7000, 4096, 14336), (2500, 16384, 6656))
QUICK_SHAPES = ((4096, 8192, 2048), (5000, 5120, 5120))
FP16_SHAPES = ((4096, 8192, 2048), (8192, 8192, 7168), (5000, 5120, 5120))

# (name, GemmConfig overrides on the capability's default, group_m), by prior likelihood.
# Shared memory on sm_90 (Triton 3.6, bf16, compiled for sm_90 on a CPU): 128x256 3 stages
# 180 KB, 4 stages 229 KB (limit 227 KB = 232448 B: fits); 256x128 3 stages 213 KB, 4 stages
# 262 KB (does not fit, left out); 128x128 4 stages 164 KB.  On sm_90 with whole tiles the
# 128x128 candidates run the warp-specialized kernel (since it took that tile), elsewhere the
# pipelined one.
CANDIDATES = (
    ("default", {}, 8),
    ("s4", {"num_stages": 4}, 8),
    ("256x128", {"block_m": 256, "block_n": 128}, 8),
    ("gm16", {}, 16),
    ("gm4", {}, 4),
    ("subtile", {"epilogue_subtile": True}, 8),
    ("s4_subtile", {"num_stages": 4, "epilogue_subtile": True}, 8),
    ("128x128_s4", {"block_n": 128, "num_stages": 4}, 8),
    ("128x128_w4_s4", {"block_n": 128, "num_warps": 4, "num_stages": 4}, 8),
    ("256x128_gm4", {"block_m": 256, "block_n": 128}, 4),
    ("no_accmb", {"acc_multibuffer": False}, 8),
    # Triton 3.6 on sm_90 drops the release atomic under warp specialization: signal_gemm
    # refuses it at compile time (NotImplementedError), recorded as a failure.
    ("ws_128x128_w4", {"block_n": 128, "num_warps": 4, "num_stages": 3, "flatten": False,
                       "warp_specialize": True}, 8),
    # short K / few tiles, where the split last wave's fixed costs (fp32 partials, tickets)
    # may outweigh the K steps it saves
    ("nosplit", {"split_tail": False}, 8),
    ("gm16_nosplit", {"split_tail": False}, 16),
    ("128x128_s4_nosplit", {"block_n": 128, "num_stages": 4, "split_tail": False}, 8),
    # 128 x 128 on the warp-specialized kernel with 5 stages (sm_90, whole tiles; the grouped
    # kernel's default): twice the tiles, for small problems whose 128 x 256 grid leaves a
    # poor last wave
    ("128x128_s5", {"block_n": 128, "num_stages": 5}, 8),
    ("128x128_s5_gm16", {"block_n": 128, "num_stages": 5}, 16),
)
QUICK_CANDIDATES = ("default", "s4", "256x128", "ws_128x128_w4")
CONFIG_FIELDS = ("block_m", "block_n", "block_k", "num_warps", "num_stages", "use_tma",
                 "flatten", "epilogue_subtile", "acc_multibuffer", "warp_specialize",
                 "split_tail", "cluster_ctas")


def _parse_shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    shapes = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        parts = item.lower().split("x")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not MxNxK")
        shapes.append(tuple(int(p) for p in parts))
    return tuple(shapes)


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=Path("gemm_sweep.json"), help="JSON rows file")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="total wall-clock budget in seconds (default 240)")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny run: shapes {QUICK_SHAPES}, candidates {QUICK_CANDIDATES}, "
                        "fewer iterations, fp16 on one shape")
    p.add_argument("--shapes", type=_parse_shapes, default=None,
                   help="MxNxK shapes, comma-separated (default: 9 issue shapes + 4 LLM ones)")
    p.add_argument("--fp16-shapes", type=_parse_shapes, default=None,
                   help="shapes also run in fp16, B row-major, default + best bf16 candidates "
                        f"(default {'.'.join('x'.join(map(str, s)) for s in FP16_SHAPES)}; "
                        "'' for none)")
    p.add_argument("--num-ctas", default=None,
                   help="comma-separated P values (default: all SMs and SMs-16)")
    p.add_argument("--layouts", default="kn,nk", help="B layouts, comma-separated: kn, nk")
    p.add_argument("--candidates", default=None,
                   help="comma-separated candidate names (default all, in order): "
                        + ", ".join(c[0] for c in CANDIDATES))
    p.add_argument("--max-candidates", type=int, default=20, help="first N candidates only")
    p.add_argument("--iters", type=int, default=25, help="timed calls per measurement (>= 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    p.add_argument("--sets", type=int, default=3, help="minimum input sets rotated (>= 3)")
    p.add_argument("--compile-frac", type=float, default=0.4,
                   help="at most this fraction of the budget compiles kernels up front")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes = args.shapes or QUICK_SHAPES
        if args.fp16_shapes is None:
            args.fp16_shapes = QUICK_SHAPES[:1]
        args.candidates = args.candidates or ",".join(QUICK_CANDIDATES)
        args.iters = min(args.iters, 20)
        args.warmup = min(args.warmup, 3)
    args.shapes = args.shapes or SHAPES
    args.fp16_shapes = FP16_SHAPES if args.fp16_shapes is None else args.fp16_shapes
    names = [c[0] for c in CANDIDATES]
    if args.candidates:
        wanted = [x.strip() for x in args.candidates.split(",") if x.strip()]
        bad = [w for w in wanted if w not in names]
        if bad:
            p.error(f"unknown candidates {bad}; known: {names}")
        if "default" not in wanted:
            wanted.insert(0, "default")
        args.candidate_list = [c for c in CANDIDATES if c[0] in wanted]
    else:
        args.candidate_list = list(CANDIDATES)
    args.candidate_list = args.candidate_list[:max(args.max_candidates, 1)]
    args.layout_list = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if not args.layout_list or any(x not in ("kn", "nk") for x in args.layout_list):
        p.error("--layouts takes kn and/or nk")
    if args.iters < 1 or args.sets < 1 or args.budget_s <= 0:
        p.error("--iters, --sets and --budget-s must be positive")
    for M, N, K in tuple(args.shapes) + tuple(args.fp16_shapes):
        if min(M, N, K) < 1:
            p.error(f"bad shape {M}x{N}x{K}")
    return args


# --------------------------------------------------------------------------------------


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s

    def now(self) -> float:
        return time.monotonic()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, timeout=10,
                             capture_output=True, text=True, check=False)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


class Sweep:
    def __init__(self, args) -> None:
        import torch
        import triton

        from flashoverlap import kernels
        from flashoverlap.kernels import signal_gemm as sg
        from flashoverlap.plan import PlanConfig, Problem, make_plan

        self.args, self.torch, self.triton = args, torch, triton
        self.kernels, self.sg = kernels, sg
        self.PlanConfig, self.Problem, self.make_plan = PlanConfig, Problem, make_plan
        self.dev = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(self.dev)
        self.capability = (props.major, props.minor)
        self.sms = props.multi_processor_count
        self.l2_bytes = int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))
        if args.num_ctas:
            self.ps = [int(x) for x in args.num_ctas.split(",") if x.strip()]
        else:
            self.ps = [self.sms, max(self.sms - 16, 1)]
        self.meta = {"gpu": props.name, "torch": torch.__version__,
                     "triton": triton.__version__,
                     "date": datetime.date.today().isoformat(), "commit": _commit()}
        self.rows: list[dict] = []
        self.failures: list[dict] = []
        self.broken: dict[tuple, str] = {}  # (candidate, layout, dtype) -> reason
        self.plans: dict[tuple, tuple] = {}
        self.clock = Clock(args.budget_s)

    # -- configurations ---------------------------------------------------------------
    def base_config(self, dtype):
        return self.kernels.config_for_capability(self.capability, dtype)

    def candidate(self, cand, dtype):
        name, overrides, group_m = cand
        return dataclasses.replace(self.base_config(dtype), **overrides), group_m

    def candidates_for(self, M, N, K, dtype, ps):
        """The candidate list, plus the table's choice for each P in ``ps`` when it differs
        from every candidate (``rule``, or ``rule@P`` where the choice depends on P: the
        wave-tile rule, clusters of 4 at P in [112, 121))."""
        cands = list(self.args.candidate_list)
        known = {self.candidate(c, dtype) for c in cands}
        choices = {}
        for P in ps:
            choice = self.kernels.gemm_config_for(M, N, K, dtype, P, self.capability)
            if (choice.config, choice.group_m) not in known:
                choices.setdefault((choice.config, choice.group_m), []).append(P)
        for i, ((config, group_m), where) in enumerate(choices.items()):
            overrides = {f: getattr(config, f) for f in CONFIG_FIELDS
                         if getattr(config, f) != getattr(self.base_config(dtype), f)}
            name = ("rule" if len(choices) == 1 and where == list(ps)
                    else "rule@" + "/".join(map(str, where)))
            cands.insert(1 + i, (name, overrides, group_m))
        return cands

    # -- inputs, plans --------------------------------------------------------------------
    def operands(self, M, N, K, dtype, layout, sets, seed=0):
        torch = self.torch
        gen = torch.Generator(device=self.dev).manual_seed(seed + M * 131 + N * 7 + K)
        out = []
        for _ in range(sets):
            a = torch.randn(M, K, device=self.dev, dtype=dtype, generator=gen)
            if layout == "nk":
                b = torch.randn(N, K, device=self.dev, dtype=dtype, generator=gen).t()
            else:
                b = torch.randn(K, N, device=self.dev, dtype=dtype, generator=gen)
            c = torch.empty(M, N, device=self.dev, dtype=dtype)
            out.append((a, b, c))
        return out

    def plan(self, M, N, K, dtype_name, cfg, P, group_m):
        key = (M, N, K, cfg.block_m, cfg.block_n, P, group_m)
        if key not in self.plans:
            plan = self.make_plan(self.Problem(M, N, K, dtype_name, 1, "all_reduce"),
                                  self.PlanConfig(block_m=cfg.block_m, block_n=cfg.block_n,
                                                  num_ctas=P, group_m=group_m,
                                                  group_bands=None))
            table = self.torch.from_numpy(plan.step_table.copy()).to(self.dev)
            expected = self.torch.from_numpy(
                plan.group_tile_counts.astype("int64")).to(self.dev, self.torch.int32)
            if len(self.plans) > 64:
                self.plans.clear()
            self.plans[key] = (plan, table, expected)
        return self.plans[key]

    # -- timing ---------------------------------------------------------------------------
    def time_calls(self, call, n_sets, before=None) -> float:
        """Median ms of ``call(i)`` over rotated sets (CUDA events, queue pre-filled)."""
        torch, args = self.torch, self.args
        for i in range(args.warmup):
            if before is not None:
                before(i % n_sets)
            call(i % n_sets)
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(args.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(args.iters)]
        torch.cuda._sleep(20_000_000)  # ~10 ms: the host queues the calls meanwhile
        for i in range(args.iters):
            j = (i + args.warmup) % n_sets
            if before is not None:
                before(j)
            starts[i].record()
            call(j)
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))

    def torch_ms(self, sets) -> float:
        mm = self.torch.matmul

        def call(i):
            a, b, c = sets[i]
            mm(a, b, out=c)

        return self.time_calls(call, len(sets))

    def signal_ms(self, sets, cfg, table, P, n_groups) -> float:
        torch = self.torch
        counters = torch.zeros(n_groups, device=self.dev, dtype=torch.int32)
        try:
            launcher = self.sg.SignalGemmLauncher(table, counters, block_m=cfg.block_m,
                                                  block_n=cfg.block_n, num_ctas=P,
                                                  config=cfg)
            a, b, c = sets[0]
            launcher(a, b, c, stream=torch.cuda.current_stream())

            def call(i):
                a, b, c = sets[i]
                launcher(a, b, c)
        except Exception:  # noqa: BLE001 - fall back to the JIT path
            def call(i):
                a, b, c = sets[i]
                self.sg.signal_gemm(a, b, c, step_table=table, block_m=cfg.block_m,
                                    block_n=cfg.block_n, num_ctas=P, counters=counters,
                                    config=cfg)

        return self.time_calls(call, len(sets), before=lambda i: counters.zero_())

    # -- correctness ----------------------------------------------------------------------
    def check(self, a, b, cfg, table, expected, P) -> str | None:
        """None if ``signal_gemm`` matches torch.matmul and the counters, else why not."""
        torch = self.torch
        M, N = a.shape[0], b.shape[1]
        out = torch.full((M, N), float("nan"), device=self.dev, dtype=a.dtype)
        counters = torch.zeros(expected.numel(), device=self.dev, dtype=torch.int32)
        self.sg.signal_gemm(a, b, out, step_table=table, block_m=cfg.block_m,
                            block_n=cfg.block_n, num_ctas=P, counters=counters, config=cfg)
        ref = torch.matmul(a, b).float()
        torch.cuda.synchronize()
        got = out.float()
        if not bool(torch.isfinite(got).all()):
            return "non-finite elements (tiles not written)"
        err = float((got - ref).abs().max())
        scale = float(ref.abs().max())
        rel = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
        if err > 2.0 ** -6 * scale + 1e-3 or rel > 1e-2:
            return f"wrong: max abs err {err:.3g} (scale {scale:.3g}), rel {rel:.3g}"
        if not bool(torch.equal(counters, expected)):
            bad = int((counters != expected).sum())
            return f"counters differ from the group tile counts in {bad} groups"
        return None

    # -- phases ---------------------------------------------------------------------------
    def fail(self, cand_name, layout, dtype_name, reason, shape=None):
        self.broken[(cand_name, layout, dtype_name)] = reason
        row = {"bench": "gemm_sweep_failure", "candidate": cand_name, "b_layout": layout,
               "dtype": dtype_name, "reason": reason[:500], **self.meta}
        if shape is not None:
            row.update(M=shape[0], N=shape[1], K=shape[2])
        self.failures.append(row)
        print(f"  ! {cand_name} {layout} {dtype_name}: {reason[:160]}", flush=True)

    def precompile(self, jobs) -> None:
        """Compile (and check) every candidate on a tiny problem, in order, within a cap."""
        torch = self.torch
        cap = self.clock.now() + self.args.compile_frac * self.args.budget_s
        M, N, K = 384, 512, 256
        for dtype, layout, cands in jobs:
            dtype_name = str(dtype).removeprefix("torch.")
            (a, b, _), = self.operands(M, N, K, dtype, layout, 1, seed=1)
            for cand in cands:
                if (cand[0], layout, dtype_name) in self.broken:
                    continue
                if self.clock.now() > cap:
                    self.fail(cand[0], layout, dtype_name, "not compiled: compile budget spent")
                    continue
                t = self.clock.now()
                cfg, group_m = self.candidate(cand, dtype)
                try:
                    plan, table, expected = self.plan(M, N, K, dtype_name, cfg, self.ps[0],
                                                      group_m)
                    why = self.check(a, b, cfg, table, expected, self.ps[0])
                except Exception as exc:  # noqa: BLE001 - compile errors, out of resources
                    why = f"{type(exc).__name__}: {exc}".replace("\n", " ")
                    torch.cuda.synchronize()
                if why:
                    self.fail(cand[0], layout, dtype_name, why, (M, N, K))
                else:
                    print(f"  compiled {cand[0]:>14} {layout} {dtype_name} "
                          f"({self.clock.now() - t:.1f} s)", flush=True)
            del a, b
        self.plans.clear()

    def run_shape(self, M, N, K, dtype, layout, cands, slice_end) -> None:
        torch, args = self.torch, self.args
        dtype_name = str(dtype).removeprefix("torch.")
        footprint = (M * K + K * N + M * N) * torch.empty((), dtype=dtype).element_size()
        n_sets = max(args.sets, min(8, math.ceil(2 * self.l2_bytes / max(footprint, 1))))
        sets = self.operands(M, N, K, dtype, layout, n_sets)
        t_before = self.torch_ms(sets)
        measured = []  # (cand, cfg, group_m, P, ms)
        for cand in cands:
            name = cand[0]
            if (name, layout, dtype_name) in self.broken:
                continue
            if name != "default" and self.clock.now() > slice_end:
                print(f"  (slice spent: {name} and later skipped)", flush=True)
                break
            if self.clock.left() <= 0:
                break
            cfg, group_m = self.candidate(cand, dtype)
            try:
                for i, P in enumerate(self.ps):
                    plan, table, expected = self.plan(M, N, K, dtype_name, cfg, P, group_m)
                    if i == 0:
                        why = self.check(sets[0][0], sets[0][1], cfg, table, expected, P)
                        if why:
                            self.fail(name, layout, dtype_name, why, (M, N, K))
                            break
                    ms = self.signal_ms(sets, cfg, table, P, plan.num_groups)
                    measured.append((cand, cfg, group_m, P, ms))
            except Exception as exc:  # noqa: BLE001
                torch.cuda.synchronize()
                self.fail(name, layout, dtype_name,
                          f"{type(exc).__name__}: {exc}".replace("\n", " "), (M, N, K))
        t_after = self.torch_ms(sets)
        t_torch = 0.5 * (t_before + t_after)
        flops = 2.0 * M * N * K
        for cand, cfg, group_m, P, ms in measured:
            self.rows.append({
                "bench": "gemm", "op": "matmul", "M": M, "N": N, "K": K, "dtype": dtype_name,
                "world_size": 1, "engine": "flashoverlap", "num_ctas": P, "median_ms": ms,
                "torch_ms": t_torch, "torch_ms_before": t_before, "torch_ms_after": t_after,
                "efficiency_vs_torch": t_torch / ms, "tflops": flops / ms / 1e9,
                "b_layout": layout, "candidate": cand[0], "default": cand[0] == "default",
                "group_m": group_m, **{f: getattr(cfg, f) for f in CONFIG_FIELDS},
                "iters": args.iters, "input_sets": n_sets, **self.meta,
            })
        del sets
        torch.cuda.empty_cache()

    def write(self) -> None:
        path = self.args.out
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.rows + self.failures, indent=1))
        tmp.replace(path)

    def best_bf16(self, M, N, K):
        """Names of the best bf16 candidates of a shape (row-major B), per P."""
        best = {}
        for r in self.rows:
            if (r["M"], r["N"], r["K"], r["dtype"], r["b_layout"]) == (M, N, K, "bfloat16",
                                                                           "kn"):
                if r["num_ctas"] not in best or r["median_ms"] < best[r["num_ctas"]][1]:
                    best[r["num_ctas"]] = (r["candidate"], r["median_ms"])
        return [name for name, _ in best.values()]

    def run(self) -> None:
        torch, args = self.torch, self.args
        print(f"{self.meta['gpu']} ({self.sms} SMs, sm_{self.capability[0]}{self.capability[1]})"
              f", torch {self.meta['torch']}, triton {self.meta['triton']}, P {self.ps}, "
              f"budget {args.budget_s:.0f} s", flush=True)
        bf16, fp16 = torch.bfloat16, torch.float16
        jobs = [(bf16, layout, args.candidate_list) for layout in args.layout_list]
        if args.fp16_shapes:
            jobs.append((fp16, "kn", args.candidate_list[:1]))
        self.precompile(jobs)
        print(f"compiled in {self.clock.elapsed():.0f} s", flush=True)
        work = [(s, bf16, layout) for s in args.shapes for layout in args.layout_list]
        work += [(s, fp16, "kn") for s in args.fp16_shapes]
        weights = [len(args.candidate_list) if dt == bf16 else 3 for _, dt, _ in work]
        for idx, ((M, N, K), dtype, layout) in enumerate(work):
            left = self.clock.left()
            if left <= 0:
                print(f"budget spent: {len(work) - idx} shape runs skipped", flush=True)
                for (m2, n2, k2), dt2, l2 in work[idx:]:
                    self.failures.append({"bench": "gemm_sweep_failure", "candidate": "*",
                                          "M": m2, "N": n2, "K": k2, "b_layout": l2,
                                          "dtype": str(dt2).removeprefix("torch."),
                                          "reason": "budget spent", **self.meta})
                break
            slice_end = self.clock.now() + left * weights[idx] / sum(weights[idx:])
            if dtype == bf16:
                cands = self.candidates_for(M, N, K, dtype, self.ps)
            else:
                names = ["default", *self.best_bf16(M, N, K)]
                cands = [c for c in args.candidate_list if c[0] in names]
            print(f"[{self.clock.elapsed():5.0f} s] {M}x{N}x{K} {layout} "
                  f"{str(dtype).removeprefix('torch.')}: {len(cands)} candidates, "
                  f"slice {slice_end - self.clock.now():.0f} s", flush=True)
            try:
                self.run_shape(M, N, K, dtype, layout, cands, slice_end)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: keep going
                traceback.print_exc()
                self.failures.append({"bench": "gemm_sweep_failure", "candidate": "*",
                                      "M": M, "N": N, "K": K, "b_layout": layout,
                                      "dtype": str(dtype).removeprefix("torch."),
                                      "reason": f"{type(exc).__name__}: {exc}"[:500],
                                      **self.meta})
                torch.cuda.empty_cache()
            self.write()
        self.write()
        summarize(self.rows, self.failures)
        print(f"wrote {len(self.rows)} rows and {len(self.failures)} failures to {args.out} "
              f"in {self.clock.elapsed():.0f} s", flush=True)


def _label(r) -> str:
    return (f"{r['block_m']}x{r['block_n']}x{r['block_k']} w{r['num_warps']} s{r['num_stages']}"
            f"{' sub' if r['epilogue_subtile'] else ''}{'' if r['acc_multibuffer'] else ' noMB'}"
            f"{' ws' if r['warp_specialize'] else ''}{'' if r['flatten'] else ' noflat'}"
            f"{'' if r.get('split_tail', True) else ' nosplit'}"
            f" gm{r['group_m']}")


def summarize(rows, failures) -> None:
    """Per shape x P x layout x dtype: default and best efficiency, and suggested rules."""
    groups: dict[tuple, list] = {}
    for r in rows:
        key = (r["dtype"], r["M"], r["N"], r["K"], r["num_ctas"], r["b_layout"])
        groups.setdefault(key, []).append(r)
    print("\n dtype        M     N     K    P  B  | default | best  config (candidate)")
    effs: dict[tuple, dict[str, list]] = {}
    for key in sorted(groups):
        rs = groups[key]
        best = min(rs, key=lambda r: r["median_ms"])
        dflt = next((r for r in rs if r["candidate"] == "default"), None)
        d_eff = f"{dflt['efficiency_vs_torch']:.3f}" if dflt else "  -  "
        print(f" {key[0]:8} {key[1]:5} {key[2]:5} {key[3]:5} {key[4]:4} {key[5]} | "
              f" {d_eff}  | {best['efficiency_vs_torch']:.3f} {_label(best)} "
              f"({best['candidate']})")
        e = effs.setdefault((key[0], key[4]), {"default": [], "best": []})
        if dflt:
            e["default"].append(dflt["efficiency_vs_torch"])
        e["best"].append(best["efficiency_vs_torch"])
    for (dtype, P), e in sorted(effs.items()):
        parts = []
        for which in ("default", "best"):
            if e[which]:
                parts.append(f"{which} median {statistics.median(e[which]):.3f} "
                             f"min {min(e[which]):.3f}")
        print(f" {dtype} P={P}: " + "; ".join(parts) + f" ({len(e['best'])} rows)")
    # Suggested rules: a candidate that beats the default by > 1% on every measured P and
    # layout of a bf16 shape.
    by_shape: dict[tuple, dict[str, list]] = {}
    for r in rows:
        if r["dtype"] == "bfloat16":
            by_shape.setdefault((r["M"], r["N"], r["K"]), {}).setdefault(
                r["candidate"], []).append(r)
    print("\nsuggested rules (candidate > 1% faster than default on every P and layout):")
    any_rule = False
    for (M, N, K), cands in sorted(by_shape.items()):
        dflt = {(r["num_ctas"], r["b_layout"]): r["median_ms"] for r in cands.get("default", [])}
        best_name, best_gain = None, 1.01
        for name, rs in cands.items():
            if name == "default":
                continue
            ratios = [dflt[(r["num_ctas"], r["b_layout"])] / r["median_ms"] for r in rs
                      if (r["num_ctas"], r["b_layout"]) in dflt]
            if len(ratios) == len(dflt) and ratios and min(ratios) > best_gain:
                best_name, best_gain = name, min(ratios)
        if best_name:
            any_rule = True
            r = cands[best_name][0]
            overrides = tuple((f, r[f]) for f in CONFIG_FIELDS if f in r)
            print(f"  GemmRule(overrides={overrides}, group_m={r['group_m']}, "
                  f"m=({M}, {M + 1}), n=({N}, {N + 1}), k=({K}, {K + 1}), "
                  f"note='gemm_sweep: {best_name} {best_gain:.3f}x default'),")
    if not any_rule:
        print("  (none)")
    if failures:
        print(f"\nfailures ({len(failures)}):")
        seen = set()
        for f in failures:
            key = (f["candidate"], f.get("b_layout"), f.get("dtype"), f["reason"][:80])
            if key not in seen:
                seen.add(key)
                print(f"  {f['candidate']} {f.get('b_layout')} {f.get('dtype')}: "
                      f"{f['reason'][:150]}")


def main(argv=None) -> int:
    args = _parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gemm_sweep: needs a CUDA GPU", file=sys.stderr)
        return 2
    sweep = Sweep(args)
    try:
        sweep.run()
    finally:
        sweep.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
