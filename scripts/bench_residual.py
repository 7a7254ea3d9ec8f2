"""Fused residual add (``residual=``) against the op followed by a separate ``torch.add``.

A transformer block adds each row-parallel layer's reduced output to its residual stream.
``gemm_all_reduce(a, b, residual=h, out=h, residual_replicated=True)`` folds that add into the
GEMM epilogue (rank 0 adds the replicated residual, the AllReduce carries it; a ReduceScatter's
owning rank adds its shard); this benchmark times, per shape and op, in one run (CUDA events,
median over ranks' maxima, rotated random inputs, as ``bench_overlap.py``):

* ``sequential + add``: :func:`flashoverlap.engine.run_sequential` (``torch.matmul``, the
  ``torch.distributed`` collective), then ``torch.add``;
* ``flashoverlap + add``: the op, then ``torch.add``;
* ``flashoverlap fused``: the op with ``residual=`` (in place, ``out=residual``; the residual
  is the same on every rank, as a tensor-parallel block's residual stream is).

    torchrun --nproc-per-node 4 scripts/bench_residual.py --shape 8192x8192x2048 --op both
    torchrun --nproc-per-node 1 scripts/bench_residual.py --config-json '{"block_m":128,"block_n":256,"num_ctas":116}'

Prints a table and writes ``residual.json`` (rows ``bench=residual``) to the results folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
from bench_overlap import load_plan_config, parse_shape  # noqa: E402

DEFAULT_SHAPES = ((4096, 8192, 2048), (8192, 8192, 2048), (8192, 8192, 7168))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=parse_shape, action="append", default=None,
                   help="MxNxK with K per rank (repeatable); default: three reference shapes")
    p.add_argument("--config-json", default=None,
                   help="a PlanConfig for the flashoverlap rows (default: tuned or analytic)")
    bc.add_common_args(p)
    args = p.parse_args(argv)
    bc.check_common_args(p, args)
    args.plan_config = load_plan_config(args.config_json) if args.config_json else None
    return args


def measure(bench: bc.Bench, op: str, M: int, N: int, K: int, config: Any) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist

    import flashoverlap as fo
    from flashoverlap.engine import run_sequential

    group = dist.group.WORLD
    run = bc.ShapeRun(bench, "residual", group, op, M, N, K, engines=())
    coll = run.coll
    # The same residual on every rank (a replicated residual stream): seeded without the rank.
    gen = torch.Generator(device=bench.device).manual_seed(bench.args.seed)
    residual = torch.randn(run.out.shape, generator=gen, device=bench.device).to(bench.dtype)
    h = residual.clone()  # the residual stream, updated in place by the fused variant

    def sequential_add(i: int) -> None:
        run_sequential(coll, run.a[i], run.b[i], group, run.out, world_size=run.W)
        torch.add(run.out, residual, out=h)

    def overlap_add(i: int) -> None:
        fo.gemm_collective(run.a[i], run.b[i], coll, group, out=run.out, config=config)
        torch.add(run.out, residual, out=h)

    def overlap_fused(i: int) -> None:
        # h grows by one reduced product per call; b is scaled by 1/sqrt(K), so it stays finite.
        fo.gemm_collective(run.a[i], run.b[i], coll, group, out=h, residual=h,
                           residual_replicated=True, config=config)

    variants = (("sequential", "sequential + add", sequential_add),
                ("flashoverlap", "flashoverlap + add", overlap_add),
                ("flashoverlap", "flashoverlap fused", overlap_fused))
    rows = []
    for engine, name, variant in variants:
        stats = run.time(variant)
        rows.append({"bench": "residual", "op": op, "M": M, "N": N, "K": K,
                     "dtype": bc.dtype_name(bench.dtype), "world_size": run.W,
                     "engine": engine, "variant": name,
                     "median_ms": stats.median_ms, "min_ms": stats.min_ms, "p90_ms": stats.p90_ms,
                     "num_ctas": None if config is None else config.num_ctas,
                     "plan_config": None if config is None else vars(config), "p2p": bench.p2p,
                     **bench.prov, "timer": "cuda_events" if bench.clock.cuda else "perf_counter",
                     "iters": bench.args.iters, "warmup": bench.args.warmup,
                     "input_sets": bench.args.rotate})
    base = rows[0]["median_ms"]
    for row in rows:
        row["speedup_vs_sequential"] = base / row["median_ms"]
    run.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = bc.setup(args)
    try:
        bench.log(bc.header(bench, "flashoverlap fused residual benchmark"))
        rows = []
        for op in bc.selected_ops(args):
            for M, N, K in args.shape or DEFAULT_SHAPES:
                if bc.problem_fits(op, M, N, bench.world) is not None:
                    continue
                rows += measure(bench, op, M, N, K, args.plan_config)
        if bench.is_root:
            print(f"\n{'op':<15}{'M':>7}{'N':>7}{'K':>7}  {'variant':<20}{'median ms':>10}{'vs seq':>8}")
            for r in rows:
                print(f"{r['op']:<15}{r['M']:>7}{r['N']:>7}{r['K']:>7}  {r['variant']:<20}"
                      f"{r['median_ms']:>10.3f}{r['speedup_vs_sequential']:>7.2f}x")
            out = bc.output_dir(bench) / bc.result_stem("residual", bench)
            out.parent.mkdir(parents=True, exist_ok=True)
            merged = bc.write_json(out.with_suffix(".json"), rows, fresh=args.fresh)
            print(f"wrote {out.with_suffix('.json')} ({len(merged)} rows)")
    finally:
        bc.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
