"""AllGather + GEMM on one GPU: what the gather GEMM costs against the dense signal GEMM and
``torch.matmul``, what waiting on chunk flags costs, and which tile its plans should take.

One GPU moves nothing, so this measures the mechanism.  ``--plan-world-size W`` builds the
plan of ``W`` ranks (``m = M / W`` rows per chunk, rank 0's step table, ``W`` flags all set):
the GEMM then runs the chunk-by-chunk tile order a ``W``-rank call runs, on the whole
``[M, K]`` input.

Rows (JSON list, ``--out``), keys ``bench, op="all_gather", M, N, K, dtype, world_size (1, the
processes), plan_world_size, engine, variant, block_m, block_n, group_m, num_ctas, median_ms``,
the provenance keys of ``bench_common.provenance`` and a metric:

* ``bench=gemm, engine=nowait``: the gather GEMM with ``WAIT_FLAGS=False`` (same plan, same
  tile order) -- on sm_90 with whole tiles the warp-specialized kernel (``kernel`` says
  which).  One row per ``variant``: ``product`` (the plan config the library takes,
  :func:`flashoverlap.gather_plan.default_gather_config`) and each ``--compare`` tile
  (``BMxBN:GROUP_M``; default ``128x256:8``, the config every gather plan took before the
  kernel table's tile choice applied to them); ``efficiency_vs_product = T_product / T``;
* ``bench=gemm, engine=nowait-pipelined``: the product config on the pipelined Triton kernel
  (``GemmConfig.warp_specialized_kernel=False``);
* ``bench=gemm, engine=wait``: the product config waiting on every chunk's flag (flags set,
  so only the polls cost), ``efficiency_vs_gemm = T_nowait / T_wait`` (target >= 0.97);
* ``bench=gemm, engine=signal``: the dense signal GEMM (``SignalGemmLauncher``) with the same
  tile, band height and CTAs -- the kernel an AllReduce plan runs --, and on the nowait rows
  ``efficiency_vs_signal = T_signal / T``;
* ``bench=gemm, engine=torch``: ``torch.matmul`` on all SMs; every GEMM row carries
  ``efficiency_vs_torch = T_torch / T``;
* ``bench=op, engine=overlap`` (``--plan-world-size 1`` only: the op needs a group of ``W``):
  ``fo.all_gather_gemm(engine="overlap", config=product)`` (arm the flags, copy the own chunk
  and write its flag on the watcher, the waiting GEMM), ``efficiency_vs_gemm = T_nowait /
  T_op``.

Timing: CUDA events around each call, calls queued back to back (no host synchronization
between them, so the launchers' host time hides behind the GPU's work, as in the engine) and
interleaved round-robin over the engines, ``--sets`` input sets rotated per call (the L2 does
not hold the operands), median of ``--iters`` rounds after ``--warmup``.  (Until 2026-12-03
each call was followed by a host synchronization, which put every launch's host time into the
measured interval; ``results/2026-12-03-h200/gather-ws-run24`` ran that way.)

    python scripts/bench_all_gather.py --out /tmp/all_gather.json
    python scripts/bench_all_gather.py --plan-world-size 8 --shapes 2048:2048:8192 --out ag8.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

SHAPES = ((8192, 8192, 8192), (16384, 8192, 4096), (4096, 7168, 8192), (2048, 8192, 8192))


def _parse_compare(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        tile, _, gm = item.partition(":")
        bm, _, bn = tile.partition("x")
        out.append((int(bm), int(bn), int(gm or 8)))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("all_gather.json"))
    p.add_argument("--shapes", default=None, help="M:N:K,... (default: a fixed list)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reserve", type=int, default=16, help="SMs left to NCCL")
    p.add_argument("--sets", type=int, default=4, help="input sets rotated per call")
    p.add_argument("--plan-world-size", type=int, default=1,
                   help="build the plan of this many ranks (M must divide by it)")
    p.add_argument("--compare", default="128x256:8",
                   help="extra nowait variants BMxBN:GROUP_M,... ('' for none)")
    args = p.parse_args()
    W = args.plan_world_size
    if W < 1:
        p.error("--plan-world-size must be >= 1")
    compare = _parse_compare(args.compare)

    import torch
    import torch.distributed as dist

    import bench_common
    import flashoverlap as fo
    from flashoverlap.gather_plan import GatherProblem, default_gather_config, make_gather_plan
    from flashoverlap.kernels import config_for_tile, default_config
    from flashoverlap.kernels.gather_gemm import GatherGemmLauncher, uses_warp_specialized
    from flashoverlap.kernels import ws_signal_gemm
    from flashoverlap.kernels.signal_gemm import SignalGemmLauncher
    from flashoverlap.plan import Problem, make_plan

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    bench_common.load_torch()
    torch.cuda.set_device(0)
    device = torch.device("cuda", 0)
    init = Path(tempfile.mkdtemp()) / "store"
    dist.init_process_group("nccl", init_method=f"file://{init}", rank=0, world_size=1,
                            device_id=device)
    shapes = SHAPES if args.shapes is None else tuple(
        tuple(int(x) for x in s.split(":")) for s in args.shapes.split(","))
    for M, _, _ in shapes:
        if M % W:
            p.error(f"M={M} does not divide by --plan-world-size {W}")
    props = torch.cuda.get_device_properties(device)
    sms, capability = props.multi_processor_count, torch.cuda.get_device_capability(device)
    common = dict(op="all_gather", dtype="bfloat16", world_size=1, plan_world_size=W,
                  p2p=None, **bench_common.provenance(device))
    rows = []
    for M, N, K in shapes:
        problem = GatherProblem(M // W, N, K, "bfloat16", W)
        product = default_gather_config(problem, sms, capability, reserved_sms=args.reserve)
        P = product.num_ctas
        variants = {"product": product}
        for bm, bn, gm in compare:
            while gm > 1 and gm > -(-(M // W) // bm):  # as default_gather_config shrinks it
                gm //= 2
            cfg = fo.PlanConfig(block_m=bm, block_n=bn, num_ctas=P, group_m=gm)
            if cfg != product:
                variants[f"{bm}x{bn}:gm{gm}"] = cfg
        flags = torch.ones(W, dtype=torch.int32, device=device)
        sets = [(torch.randn(M, K, device=device, dtype=torch.bfloat16),
                 (torch.randn(N, K, device=device, dtype=torch.bfloat16) / K**0.5).t())
                for _ in range(max(1, args.sets))]
        outs = [torch.empty(M, N, device=device, dtype=torch.bfloat16) for _ in sets]
        gathered = torch.empty(M, K, device=device, dtype=torch.bfloat16)
        a, b = sets[0]

        def launcher(cfg, wait, pipelined=False):
            plan = make_gather_plan(problem, cfg)
            kcfg = config_for_tile(default_config(device), cfg.block_m, cfg.block_n)
            if pipelined:
                kcfg = dataclasses.replace(kcfg, warp_specialized_kernel=False)
            table = torch.from_numpy(plan.step_table(0).copy()).to(device)
            run = GatherGemmLauncher(table, flags if wait else None, config=kcfg,
                                     block_m=cfg.block_m, block_n=cfg.block_n, num_ctas=P,
                                     full_tiles=plan.full_tiles)
            ws = (not pipelined) and uses_warp_specialized(
                a, b, outs[0], block_m=cfg.block_m, block_n=cfg.block_n, config=kcfg,
                full_tiles=plan.full_tiles)
            return run, "warp_specialized" if ws else "pipelined"

        def dense_signal(cfg):
            plan = make_plan(Problem(M, N, K, "bfloat16", 1, "all_reduce"), cfg)
            kcfg = config_for_tile(default_config(device), cfg.block_m, cfg.block_n)
            table = torch.from_numpy(plan.step_table.copy()).to(device)
            counters = torch.zeros(plan.num_groups, device=device, dtype=torch.int32)
            run = SignalGemmLauncher(table, counters, block_m=cfg.block_m,
                                     block_n=cfg.block_n, num_ctas=P, config=kcfg,
                                     rows_per_block=plan.problem.rows_per_block,
                                     full_tiles=plan.full_tiles)
            ws = ws_signal_gemm.eligible(a, b, outs[0], kcfg, None, plan.full_tiles)
            return run, "warp_specialized" if ws else "pipelined"

        calls, kernels, configs = {}, {}, {}
        for name, cfg in variants.items():
            run, kernels[("nowait", name)] = launcher(cfg, wait=False)
            calls[("nowait", name)] = run
            configs[("nowait", name)] = cfg
        run, kernels[("nowait-pipelined", "product")] = launcher(product, False, True)
        calls[("nowait-pipelined", "product")] = run
        run, kernels[("wait", "product")] = launcher(product, wait=True)
        calls[("wait", "product")] = run
        calls[("signal", "product")], kernels[("signal", "product")] = dense_signal(product)
        calls[("torch", "-")] = lambda x, y, out: torch.matmul(x, y, out=out)
        if W == 1:
            calls[("overlap", "product")] = lambda x, y, out: fo.all_gather_gemm(
                x, y, out=out, gathered=gathered, engine="overlap", config=product)
        turn = [0]

        def call(fn):
            turn[0] += 1
            i = turn[0] % len(sets)
            fn(*sets[i], outs[i])

        for _ in range(args.warmup):
            for fn in calls.values():
                call(fn)
        torch.cuda.synchronize()
        stamps: dict = {key: [] for key in calls}
        for _ in range(args.iters):
            for key, fn in calls.items():
                start, end = (torch.cuda.Event(enable_timing=True),
                              torch.cuda.Event(enable_timing=True))
                start.record()
                call(fn)
                end.record()
                stamps[key].append((start, end))
        torch.cuda.synchronize()
        med = {key: statistics.median(s.elapsed_time(e) for s, e in v)
               for key, v in stamps.items()}
        ref = torch.matmul(a, b).float()
        errs = {}
        for key in calls:
            if key[0] in ("torch", "overlap"):
                continue
            outs[0].fill_(float("nan"))
            calls[key](a, b, outs[0])
            errs[key] = float((outs[0].float() - ref).norm() / ref.norm())
        t_torch, t_nowait = med[("torch", "-")], med[("nowait", "product")]
        t_signal = med[("signal", "product")]
        for key in calls:
            engine, variant = key
            cfg = configs.get(key, product)
            row = dict(bench="op" if engine == "overlap" else "gemm", M=M, N=N, K=K,
                       engine=engine, variant=variant, num_ctas=None if engine == "torch" else P,
                       median_ms=round(med[key], 4), **common)
            if engine != "torch":
                row.update(block_m=cfg.block_m, block_n=cfg.block_n, group_m=cfg.group_m)
            if key in kernels:
                row["kernel"] = kernels[key]
            if key in errs:
                row["rel_err_vs_torch"] = errs[key]
            if engine in ("wait", "overlap", "nowait-pipelined"):
                row["efficiency_vs_gemm"] = round(t_nowait / med[key], 4)
            if engine == "nowait":
                row["efficiency_vs_signal"] = round(t_signal / med[key], 4)
                row["efficiency_vs_product"] = round(t_nowait / med[key], 4)
            if engine != "overlap":
                row["efficiency_vs_torch"] = round(t_torch / med[key], 4)
            rows.append(row)
        tile = f"{product.block_m}x{product.block_n} gm{product.group_m}"
        others = "".join(f", {v} {med[('nowait', v)]:.3f} ms "
                         f"({t_nowait / med[('nowait', v)]:.3f} of product)"
                         for v in variants if v != "product")
        op = (f", op {med[('overlap', 'product')]:.3f} ms "
              f"(eff {t_nowait / med[('overlap', 'product')]:.3f})" if W == 1 else "")
        print(f"M={M} N={N} K={K} W={W} P={P} product {tile} "
              f"({kernels[('nowait', 'product')]}): nowait {t_nowait:.3f} ms "
              f"({t_torch / t_nowait:.3f} of torch, {t_signal / t_nowait:.3f} of the dense "
              f"signal GEMM {t_signal:.3f} ms){others}; pipelined "
              f"{med[('nowait-pipelined', 'product')]:.3f} ms; wait "
              f"{med[('wait', 'product')]:.3f} ms (eff "
              f"{t_nowait / med[('wait', 'product')]:.3f}); torch {t_torch:.3f} ms{op}; "
              f"err {max(errs.values()):.1e}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    worst = min(r["efficiency_vs_gemm"] for r in rows if r["engine"] == "wait")
    print(f"{common['gpu']}, torch {common['torch']}, triton {common['triton']}, nccl "
          f"{common['nccl']}, commit {common['commit']}; worst efficiency_vs_gemm (wait / "
          f"nowait) = {worst:.3f} (target >= 0.97); rows in {args.out}")
    from flashoverlap.comm import destroy_communicators
    from flashoverlap.engine.gather import clear_gather_workspaces

    clear_gather_workspaces()
    destroy_communicators()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
