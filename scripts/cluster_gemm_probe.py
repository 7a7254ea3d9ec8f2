"""Does TMA multicast in clusters buy a CUDA C GEMM clock under the power cap? (issue 14)

``flashoverlap.kernels.cluster_gemm`` (``csrc_gen/cluster_gemm.cu``) is one persistent
warp-specialized sm_90a signal GEMM (a TMA producer thread, a storer thread that TMA-stores
each tile and releases its group counter, two wgmma m64n256k16 consumer warpgroups, 128x256x64
tiles, 3 stages) that runs a plan's step table, compiled four ways:
``single`` (no cluster), ``cluster2`` (clusters of two CTAs stacked along M, each loading its
own B), ``multicast2`` / ``multicast4`` (the cluster's CTAs each load 1/2 or 1/4 of the shared
B tile and TMA writes it into all of them).  Per shape and ``P`` it times, in clock-settled
phases (``gemm_clock_probe._phase``: back-to-back calls for ``--seconds``, nvidia-smi's clock
and power), torch.matmul on all SMs, cuBLASLt told to use ``P`` SMs, the product's signal
GEMM (``gemm_config_for``'s choice) and the variants -- on an AllReduce plan at world size 1
with 128 x 256 tiles and the tuner's band height, counters on, as ``bench_gemm.py`` times the
signal GEMM -- on the rotating inputs of ``bench_gemm.py`` in either B layout.  Every variant is
first checked against an fp32 ``torch.matmul`` with its output poisoned (NaN) and its counters
against the plan's tiles per group; a wrong variant stops the run.  A cluster variant runs
only where the plan's step table lets a cluster share B tiles (``runs_table``; any table for
the ``-mixed`` variants).

    python scripts/cluster_gemm_probe.py --out DIR [--layouts nk,kn] [--shapes MxNxK,...]
        [--ctas 116,132] [--variants single,cluster2,multicast2,multicast4] [--check-only]
    python scripts/cluster_gemm_probe.py --summarize DIR/cluster-gemm-probe.json

Writes ``DIR/<--name>.json`` (``bench="cluster_gemm_probe"`` rows, ``efficiency_vs_torch``
per row: torch.matmul's time in the same round over the row's) and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flashoverlap.kernels.cluster_gemm import ClusterGemmConfig  # noqa: E402
from gemm_clock_probe import chosen_variants, print_summaries  # noqa: E402

VARIANTS = {
    "single": dict(cluster=1, multicast=False),
    "cluster2": dict(cluster=2, multicast=False),
    "multicast2": dict(cluster=2, multicast=True),
    "multicast4": dict(cluster=4, multicast=True),
    # base-kernel knobs for the 1-2 % the kernel trails the Gluon one (K-major B only for the
    # one-box variants); verify-run40: l2none and 1box within +-0.5 % of single (noise)
    "single-l2none": dict(cluster=1, multicast=False, l2_promotion=0),
    "single-1box": dict(cluster=1, multicast=False, b_one_box=True),
    "multicast2-1box": dict(cluster=2, multicast=True, b_one_box=True),
    # the epilogue through stmatrix (16 STSM a thread, as the Gluon kernel) instead of 64 STS
    "single-stsm": dict(cluster=1, multicast=False, stmatrix=True),
    "multicast2-stsm": dict(cluster=2, multicast=True, stmatrix=True),
    "multicast4-stsm": dict(cluster=4, multicast=True, stmatrix=True),
    # try_wait with a suspend-time hint (counters-run42: 1.67x the Gluon kernel's
    # instructions; hint-run43: 3 % fewer with it, +0.3 % in time)
    "single-stsm-hint": dict(cluster=1, multicast=False, stmatrix=True, wait_hint_ns=10_000_000),
    "multicast4-stsm-hint": dict(cluster=4, multicast=True, stmatrix=True,
                                 wait_hint_ns=10_000_000),
    # the main loop with incremental ring positions and descriptors in uniform registers
    # (~40 SASS a K step per consumer warp instead of ~70)
    "single-lean": dict(cluster=1, multicast=False, lean_loop=True),
    "single-stsm-lean": dict(cluster=1, multicast=False, stmatrix=True, lean_loop=True),
    "multicast2-stsm-lean": dict(cluster=2, multicast=True, stmatrix=True, lean_loop=True),
    "multicast4-stsm-lean": dict(cluster=4, multicast=True, stmatrix=True, lean_loop=True),
    # the product's kernel on any band height: a cluster's CTAs may stand in different columns
    # (11008-row shapes: bands of 6 tile rows); valid-run50: 1.4-3.6 % slower
    "multicast4-mixed": dict(cluster=4, multicast=True, stmatrix=True, lean_loop=True,
                             mixed_columns=True),
    "multicast2-mixed": dict(cluster=2, multicast=True, stmatrix=True, lean_loop=True,
                             mixed_columns=True),
    # the C staging in 16 KB halves per consumer warpgroup (-half), and the fourth ring stage
    # that frees (-s4): a slot has ~2 K steps between its release and its next use with 3;
    # stages-run51: -0.5..+0.5 % in clusters of 4, 1.6-2.6 % slower without
    "multicast4-half": dict(cluster=4, multicast=True, stmatrix=True, lean_loop=True,
                            half_epilogue=True),
    "multicast4-s4": dict(cluster=4, multicast=True, stmatrix=True, lean_loop=True,
                          half_epilogue=True, stages=4),
    "single-s4": dict(cluster=1, multicast=False, stmatrix=True, lean_loop=True,
                      half_epilogue=True, stages=4),
    "multicast2-s4": dict(cluster=2, multicast=True, stmatrix=True, lean_loop=True,
                          half_epilogue=True, stages=4),
}
SHAPES = "4096x8192x2048,8192x8192x8192,16384x8192x7168,6144x5120x4096,11008x3072x8192"


def variant_config(name: str, layout: str, dtype: str = "bfloat16") -> ClusterGemmConfig:
    """The kernel configuration of variant ``name`` for B layout ``layout`` (``nk``: w.t())."""
    return ClusterGemmConfig(b_kmajor=layout == "nk", dtype=dtype, **VARIANTS[name])


def runs_on(name: str, layout: str) -> bool:
    """Whether variant ``name`` exists for B layout ``layout`` (one-box: K-major B only)."""
    return layout == "nk" or not VARIANTS[name].get("b_one_box")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="result folder")
    p.add_argument("--name", default="cluster-gemm-probe")
    p.add_argument("--shapes", default=SHAPES, help="MxNxK, comma-separated")
    p.add_argument("--layouts", default="nk,kn", help="B layouts: nk (weight.t()), kn")
    p.add_argument("--ctas", default="132,116", help="CTAs (P), comma-separated")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seconds", type=float, default=1.2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--check-only", action="store_true", help="correctness checks, no timing")
    p.add_argument("--no-signal", action="store_true", help="leave the signal GEMM out")
    p.add_argument("--summarize", nargs="+", type=Path, metavar="JSON",
                   help="only print the table of result files (no GPU needed)")
    args = p.parse_args(argv)
    variants = chosen_variants(p, args.variants, VARIANTS)
    if args.summarize:
        return print_summaries(args.summarize, summarize)
    if args.out is None:
        p.error("--out is required")

    import torch
    import triton

    import bench_common
    from bench_gemm import _Bench
    from gemm_clock_probe import _phase, _Sampler, write_rows

    from flashoverlap.kernels import gemm_config_for
    from flashoverlap.kernels import signal_gemm as sg
    from flashoverlap.kernels.cluster_gemm import ClusterGemm, runs_table
    from flashoverlap.plan import PlanConfig, Problem, make_plan

    if not torch.cuda.is_available():
        print("cluster_gemm_probe.py needs a CUDA GPU", file=sys.stderr)
        return 2
    ctas = [int(x) for x in args.ctas.split(",")]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    dev = torch.device("cuda", 0)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    cap = torch.cuda.get_device_capability(dev)
    bench_common.load_torch()
    prov = bench_common.provenance(dev)
    kernels = {(v, lay): ClusterGemm(variant_config(v, lay)) for v in variants for lay in layouts
               if runs_on(v, lay)}
    # a grid whose clusters the device cannot hold at once is not persistent: not timed
    fits = {}
    unpaired: set[tuple] = set()  # (variant, layout, P, shape) whose plan pairs no tiles
    for (v, lay), k in kernels.items():
        for P in ctas:
            held = k.max_active_clusters(P) if k.config.cluster > 1 else P
            fits[v, lay, P] = held * k.config.cluster >= P - P % k.config.cluster
            if k.config.cluster > 1:
                print(f"{v} {lay}: {P} CTAs -> {P // k.config.cluster} clusters, the device "
                      f"holds {held} at once", flush=True)
    sampler = None if args.check_only else _Sampler()
    rows: list[dict] = []
    try:
        for lay in layouts:
            for M, N, K in shapes:
                bench = _Bench(torch, triton, sg, M, N, K, torch.bfloat16, lay, 4)
                a, b = bench.sets[0]
                want = a.float() @ b.float()
                scale = want.abs().max().item()
                c = bench.c[0]
                plans = {}
                for P in ctas:
                    choice = gemm_config_for(M, N, K, "bfloat16", P, cap)
                    plan = make_plan(Problem(M, N, K, "bfloat16", 1, "all_reduce"),
                                     PlanConfig(block_m=128, block_n=256, num_ctas=P,
                                                group_m=choice.group_m))
                    steps = torch.from_numpy(plan.step_table.copy()).to(dev)
                    per_group = torch.bincount(steps[:, 5].long(), minlength=plan.num_groups)
                    counters = torch.zeros(plan.num_groups, device=dev, dtype=torch.int32)
                    plans[P] = (choice, plan, steps, per_group, counters)
                    for v in variants:
                        if (v, lay) not in kernels:
                            continue
                        k = kernels[v, lay]
                        if not runs_table(k.config, plan.step_table, P):
                            unpaired.add((v, lay, P, M, N, K))
                            print(f"check {lay} {M}x{N}x{K} {v} P={P}: the plan's step "
                                  f"table does not pair tiles by column, skipped", flush=True)
                            continue
                        c.fill_(float("nan"))
                        counters.zero_()
                        k(a, b, c, steps, counters, P)
                        torch.cuda.synchronize()
                        err = (c.float() - want).abs().max().item() / scale
                        sig = bool((counters.long() == per_group).all())
                        print(f"check {lay} {M}x{N}x{K} {v} P={P}: max error {err:.2e} of max "
                              f"|c|, counters {'right' if sig else 'WRONG'}", flush=True)
                        if not err < 2e-2 or not sig:  # NaN (unwritten) fails too
                            raise SystemExit(f"{v} {lay} P={P} {M}x{N}x{K}: wrong, no timing")
                del want
                if args.check_only:
                    continue

                def variant_fn(v, P, bench=bench, lay=lay, plans=plans):
                    k = kernels[v, lay]
                    _, _, steps, _, counters = plans[P]
                    return bench._rotating(lambda i: k(*bench.sets[i], bench.c[i], steps,
                                                       counters, P))

                phases = [("torch", None, bench._rotating(bench._torch_run))]
                for P in ctas:
                    phases.append(("cublaslt", P, bench.torch_sm_target_fn(sms - P)))
                    if not args.no_signal:
                        choice = plans[P][0]
                        plan = make_plan(Problem(M, N, K, "bfloat16", 1, "all_reduce"),
                                         PlanConfig(block_m=choice.config.block_m,
                                                    block_n=choice.config.block_n,
                                                    num_ctas=P, group_m=choice.group_m))
                        phases.append(("signal", P, bench.signal_fn(plan, choice.config)))
                    phases += [(v, P, variant_fn(v, P)) for v in variants
                               if (v, lay) in kernels and fits[v, lay, P]
                               and (v, lay, P, M, N, K) not in unpaired]
                for rnd in range(args.rounds):
                    t_torch = None
                    for engine, P, fn in phases:
                        r = _phase(torch, fn, sampler, args.seconds)
                        if engine == "torch":
                            t_torch = r["median_ms"]
                        rows.append({**prov, "bench": "cluster_gemm_probe", "op": "matmul",
                                     "dtype": "bfloat16", "world_size": 1, "b_layout": lay,
                                     "M": M, "N": N, "K": K, "engine": engine, "num_ctas": P,
                                     "sms": sms, "round": rnd,
                                     "efficiency_vs_torch": t_torch / r["median_ms"], **r})
                        print(f"{lay} {M}x{N}x{K} round {rnd} {engine:>10} P={P}: "
                              f"{r['median_ms']:.4f} ms eff {t_torch / r['median_ms']:.3f} "
                              f"{r['sm_clock_mhz'] or 0:.0f} MHz {r['power_w'] or 0:.0f} W",
                              flush=True)
                del bench
                torch.cuda.empty_cache()
    finally:
        if sampler is not None:
            sampler.stop()
    if rows:
        write_rows(args.out, args.name, rows, summarize,
                   "efficiency vs torch.matmul on all SMs (mean of the rounds), clock ratio "
                   "to the signal GEMM:")
    return 0


def summarize(rows: list[dict]) -> list[str]:
    """Per layout, shape and ``P``: each engine's efficiency against torch.matmul (mean over
    rounds) and its clock relative to the signal GEMM's (or cuBLASLt's without one)."""
    by: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        if r["num_ctas"] is not None:
            by.setdefault((r["b_layout"], r["M"], r["N"], r["K"], r["num_ctas"]), {}).setdefault(
                r["engine"], []).append(r)
    lines = []
    for (lay, M, N, K, P), engines in sorted(by.items()):
        ref = engines.get("signal") or engines.get("cublaslt")
        c0 = statistics.mean(r["sm_clock_mhz"] or 0 for r in ref) if ref else 0
        cells = [f"{lay} {M}x{N}x{K} P={P}:"]
        for engine, rs in sorted(engines.items()):
            eff = statistics.mean(r["efficiency_vs_torch"] for r in rs)
            clk = statistics.mean(r["sm_clock_mhz"] or 0 for r in rs)
            cells.append(f"{engine} {eff:.3f}" + (f" (clock {clk / c0:.3f})" if c0 else ""))
        lines.append(" ".join(cells))
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
