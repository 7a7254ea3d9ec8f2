"""Scaling benchmark: row-parallel layers of Llama-3 models over 1, 2, 4, ... ranks.

For every world size ``w`` up to the launched one (a subgroup of ranks ``0..w-1``; the other
ranks wait at a host-side barrier), every model preset, layer and token count::

    o_proj     out[T, hidden] = x[T, hidden/w]       @ w_o[hidden/w, hidden]
    down_proj  out[T, hidden] = x[T, intermediate/w] @ w_down[intermediate/w, hidden]

and each op (AllReduce, ReduceScatter), it times the engines ``sequential`` (torch.matmul, then
the collective), ``decomposition`` (flashoverlap's reference engine), ``torch_fused`` (torch's
fused matmul+ReduceScatter, RS only, where it runs) and ``flashoverlap`` (the overlap engine),
with the timing rules of docs/design.md "Measuring" (see ``bench_common``).  ``--engines`` adds ``gemm_only``,
``comm_only`` and ``concurrent_ceiling``.

Presets (hidden, intermediate): 8b (4096, 14336), 70b (8192, 28672), 405b (16384, 53248);
``tiny`` (256, 512) for the CPU check; ``name=H:I`` for another model.  All built-in sizes are
divisible by 8, so ``--presets 8b,70b,405b`` runs as-is at W = 8; a shape a world size does not
divide is skipped (the same way on every rank).

Launch (one GPU per rank)::

    torchrun --nproc-per-node 4 scripts/bench_scaling.py --presets 8b,70b --tokens 4096,16384
    mpirun -n 8 python scripts/bench_scaling.py --max-shapes 4
    torchrun --nproc-per-node 2 scripts/bench_scaling.py --device cpu   # gloo pipeline check

Writes to ``results/<date>-<machine>/``: ``scaling[-nop2p].json`` (rows merged into the file),
``.csv``, ``.md`` (one table per world size and op) and ``scaling[-nop2p]-w<W>.png`` (speedup
vs sequential per shape and engine, one chart per world size).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import bench_common as bc

PRESETS = {"8b": (4096, 14336), "70b": (8192, 28672), "405b": (16384, 53248), "tiny": (256, 512)}
LAYERS = ("o_proj", "down_proj")
DEFAULT_ENGINES = ("sequential", "decomposition", "torch_fused", "flashoverlap")
DEFAULT_TOKENS = {"cuda": "2048,4096,8192,16384", "cpu": "64,128"}


def parse_presets(text: str) -> dict[str, tuple[int, int]]:
    """``8b,70b`` or ``mine=5120:13824`` (hidden:intermediate)."""
    out = {}
    for item in bc.csv_list(text):
        if "=" in item:
            name, _, dims = item.partition("=")
            try:
                hidden, inter = (int(v) for v in dims.split(":"))
            except ValueError:
                raise argparse.ArgumentTypeError(f"preset {item!r}: want name=hidden:intermediate") from None
            out[name] = (hidden, inter)
        elif item.lower() in PRESETS:
            out[item.lower()] = PRESETS[item.lower()]
        else:
            raise argparse.ArgumentTypeError(f"unknown preset {item!r}; known: {', '.join(PRESETS)} or name=H:I")
    return out


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in bc.csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"want positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", type=parse_presets, default=None,
                   help="comma list of 8b,70b,405b,tiny or name=hidden:intermediate "
                        "(default: 8b,70b,405b on GPU, tiny on CPU)")
    p.add_argument("--tokens", type=int_list, default=None,
                   help=f"token counts M (default: {DEFAULT_TOKENS['cuda']}; CPU: {DEFAULT_TOKENS['cpu']})")
    p.add_argument("--layers", type=bc.csv_list, default=list(LAYERS), help="o_proj,down_proj")
    p.add_argument("--world-sizes", type=int_list, default=None,
                   help="world sizes to sweep (default: 1, 2, 4, ... and the launched world size)")
    p.add_argument("--max-shapes", type=int, default=None,
                   help="at most this many (preset, layer, tokens) shapes per world size")
    bc.add_common_args(p)
    args = p.parse_args(argv)
    bc.check_common_args(p, args)
    if any(layer not in LAYERS for layer in args.layers):
        p.error(f"--layers: choose from {LAYERS}")
    if args.max_shapes is not None and args.max_shapes < 1:
        p.error("--max-shapes must be >= 1")
    if args.engines is None:
        args.engines = list(DEFAULT_ENGINES)
    return args


def world_sizes(args: argparse.Namespace, world: int) -> list[int]:
    if args.world_sizes:
        too_big = [w for w in args.world_sizes if w > world]
        if too_big:
            raise SystemExit(f"--world-sizes {too_big} exceed the launched world size {world}")
        return sorted(set(args.world_sizes))
    sizes, w = [], 1
    while w < world:
        sizes.append(w)
        w *= 2
    return sizes + [world]


def shapes_for(args: argparse.Namespace, presets: dict[str, tuple[int, int]], tokens: list[int],
               w: int) -> list[dict[str, Any]]:
    """The (preset, layer, tokens) shapes world size ``w`` divides, capped by --max-shapes."""
    shapes = []
    for name, (hidden, inter) in presets.items():
        for layer in args.layers:
            k_total = hidden if layer == "o_proj" else inter
            if k_total % w:
                continue
            for t in tokens:
                shapes.append({"preset": name, "layer": f"{name}.{layer}", "tokens": t,
                               "M": t, "N": hidden, "K": k_total // w})
    return shapes[: args.max_shapes] if args.max_shapes else shapes


def run(bench: bc.Bench) -> list[dict[str, Any]]:
    import torch.distributed as dist

    args = bench.args
    device = "cuda" if bench.clock.cuda else "cpu"
    presets = args.presets or parse_presets("8b,70b,405b" if bench.clock.cuda else "tiny")
    tokens = args.tokens or int_list(DEFAULT_TOKENS[device])
    sizes = world_sizes(args, bench.world)
    # Subgroups are created by every rank, in the same order, before anything runs (NCCL
    # splits them off the world communicator collectively).
    groups = {w: dist.group.WORLD if w == bench.world else dist.new_group(list(range(w))) for w in sizes}
    plan = {w: [(op, s) for s in shapes_for(args, presets, tokens, w) for op in bc.selected_ops(args)
                if bc.problem_fits(op, s["M"], s["N"], w) is None] for w in sizes}
    bench.log(bc.header(bench, "flashoverlap scaling benchmark"))
    bench.log(f"world sizes {sizes}; presets {', '.join(f'{k}={h}:{i}' for k, (h, i) in presets.items())}; "
              f"tokens {tokens}; engines {', '.join(bench.engines)}")
    rows: list[dict[str, Any]] = []
    bar = bc.progress(bench, sum(map(len, plan.values())), "scaling")
    for w in sizes:
        if bench.rank < w:
            for op, s in plan[w]:
                extra = {"layer": s["layer"], "preset": s["preset"], "tokens": s["tokens"]}
                shape_run = bc.ShapeRun(bench, "scaling", groups[w], op, s["M"], s["N"], s["K"], extra=extra)
                rows += shape_run.measure()
                shape_run.close()
                bar.set_postfix_str(f"W={w} {s['layer']} T={s['tokens']} {op}")
                bar.update()
        # Ranks >= w wait here, on the long-timeout gloo group, while the members measure.
        dist.barrier(group=bench.control)
    bar.close()
    return rows  # rank 0 is a member of every subgroup, so it holds every row


def report(bench: bc.Bench, rows: list[dict[str, Any]]) -> None:
    out_dir = bc.output_dir(bench)
    stem = bc.result_stem("scaling", bench)
    merged = bc.write_json(out_dir / f"{stem}.json", rows, fresh=bench.args.fresh)
    bc.write_csv(out_dir / f"{stem}.csv", merged)
    keys = [("layer", "layer"), ("M (tokens)", "M"), ("N", "N"), ("K per rank", "K")]
    sections = [bc.header(bench, "flashoverlap scaling benchmark"),
                "Times in ms; (x) = speedup vs seq, same run. K is per rank (K_total / W)."]
    for w in sorted({r["world_size"] for r in merged}):
        for op in bc.OPS:
            rs = [r for r in merged if r["world_size"] == w and r["op"] == op]
            if rs:
                sections.append(f"## W = {w}, {op}\n\n" + bc.shape_table(rs, keys, bc.engine_columns(rs)))
        panels = [(op, [r for r in merged if r["world_size"] == w and r["op"] == op and r["median_ms"] is not None])
                  for op in bc.OPS]
        panels = [(op, rs) for op, rs in panels if rs]
        if panels:
            regime = "" if bench.p2p else f", {bc.PCIE_TITLE}"
            bc.plot_speedups(out_dir / f"{stem}-w{w}.png", panels,
                             f"W = {w}, {bench.prov['gpu']}{regime}: speedup vs sequential",
                             label=lambda r: f"{r['layer']} T={r['M']}")
    markdown = "\n\n".join(sections) + "\n"
    (out_dir / f"{stem}.md").write_text(markdown)
    print("\n" + markdown, flush=True)
    main_engine = "flashoverlap" if any(r["engine"] == "flashoverlap" for r in rows) else "decomposition"
    per_w = "; ".join(f"W={w}: {bc.speedup_summary([r for r in rows if r['world_size'] == w], main_engine)}"
                      for w in sorted({r["world_size"] for r in rows}))
    print(f"scaling: {len(rows)} rows on {bench.prov['gpu']}; {per_w or 'nothing measured'}; "
          f"-> {out_dir / stem}.{{json,csv,md}} + {stem}-w*.png", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = bc.setup(args)
    try:
        rows = run(bench)
        if bench.is_root:
            report(bench, rows)
    finally:
        bc.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
