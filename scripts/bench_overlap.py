"""Overlap microbenchmark: flashoverlap against every baseline, on the reference shapes.

For each problem ``out = collective(x[M, K] @ w[K, N])`` (row-parallel layer, per-rank K) and
each op (AllReduce, ReduceScatter), in ONE process run and on the same random inputs:

    GEMM          torch.matmul alone                                   T_gemm
    comm          the NCCL collective of the [M, N] output alone       T_comm
    seq           flashoverlap.engine.run_sequential: torch.matmul, then the
                  torch.distributed collective, one stream             T_seq  (the baseline)
    decomp        flashoverlap's reference engine: per-group matmul + async collective
    torch fused   torch's symmetric-memory fused matmul + collective (RS only; n/a if it fails)
    ceiling       the GEMM and an *independent* collective on two streams       T_conc
    ideal         max(T_gemm, T_comm)                                            T_ideal
    flashoverlap  engine="overlap", default plan (and --config-json's PlanConfig)

At world size 1 the collectives are the identity: the sequential baseline and the default
flashoverlap call are the plain GEMM (use --config-json to force an overlapped plan, or
scripts/bench_overhead.py for the mechanism's cost at one rank).

Timing (docs/design.md "Measuring"): CUDA events, warm-up, median of --iters calls,
inputs rotated among --rotate sets, max over ranks, a barrier before every measurement.

Launch (one GPU per rank)::

    torchrun --nproc-per-node 4 scripts/bench_overlap.py --preset design --op both
    mpirun -n 4 python scripts/bench_overlap.py --shape 8192x8192x2048 --op all_reduce
    torchrun --nproc-per-node 4 scripts/bench_overlap.py --no-p2p --preset pcie --op all_reduce
    torchrun --nproc-per-node 2 scripts/bench_overlap.py --device cpu     # gloo pipeline check

Writes ``results/<date>-<machine>/overlap[-nop2p].json`` (rows merged into the file), ``.md``
and a speedup chart ``.png``; prints the table on rank 0.  ``--timeline PATH`` draws one
overlapped call (GEMM on the compute stream; wait / collective per group on the watcher
stream, from the engine's :mod:`flashoverlap.timeline` hook when present) above the
sequential baseline, on a shared time axis.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import bench_common as bc

PRESETS = {
    # The reference table (docs/design.md "Reference numbers"): Llama-70B-like row-parallel layers at TP=4 (per-rank K).
    "design": [(M, 8192, K) for M in (4096, 8192, 16384) for K in (2048, 7168)],
    # NCCL_P2P_DISABLE=1: communication dominates, so larger K balances it.
    "pcie": [(8192, 8192, 32768), (8192, 8192, 65536)],
    # CPU/gloo pipeline check.
    "tiny": [(256, 192, 128), (128, 128, 64)],
    # small token counts (decode / short prefill): the engine must fall back, never slower
    "smallm": [(M, 8192, 2048) for M in (16, 128, 512, 1024)],
}
TITLE = "flashoverlap overlap benchmark"
TIMELINE_REPS = 5  # calls recorded for a timeline; the one with the median duration is drawn


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        M, N, K = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape wants MxNxK (e.g. 8192x8192x2048), got {text!r}") from None
    if min(M, N, K) < 1:
        raise argparse.ArgumentTypeError(f"--shape dimensions must be positive, got {text!r}")
    return M, N, K


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=parse_shape, action="append", default=None,
                   help="MxNxK with K per rank (repeatable); overrides --preset")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="design: the six reference shapes (default on GPU); pcie: M=N=8192, "
                        "K=32768/65536 for --no-p2p; tiny: CPU check (default on CPU); smallm: "
                        "M=16..1024, the never-slower check")
    p.add_argument("--config-json", default=None,
                   help="PlanConfig for an extra flashoverlap row, as JSON or a JSON file, e.g. "
                        '\'{"block_m":128,"block_n":256,"num_ctas":116,"group_m":8,"group_bands":[1,1,2]}\' '
                        "(group_bands sum to the plan's band count; omitted: one group per band)")
    p.add_argument("--timeline", type=Path, default=None,
                   help="PNG of one overlapped call vs the sequential baseline (several problems: "
                        "one file each, <stem>-<op>-<M>x<N>x<K>.png)")
    bc.add_common_args(p)
    args = p.parse_args(argv)
    bc.check_common_args(p, args)
    if args.config_json is not None:
        try:
            args.plan_config = load_plan_config(args.config_json)
        except (ValueError, TypeError, OSError) as exc:
            p.error(f"--config-json: {exc}")
    else:
        args.plan_config = None
    return args


def load_plan_config(text: str):
    from flashoverlap.plan import PlanConfig

    source = text if text.lstrip().startswith("{") else Path(text).read_text()
    fields = json.loads(source)
    if not isinstance(fields, dict):
        raise TypeError("expected a JSON object of PlanConfig fields")
    if fields.get("group_bands") is not None:
        fields["group_bands"] = tuple(fields["group_bands"])
    return PlanConfig(**fields)


# --------------------------------------------------------------------------------------------
# timeline
# --------------------------------------------------------------------------------------------
SPAN_COLORS = {"GEMM": "tab:blue", "wait": "0.85", "collective": "tab:orange",
               "whole call": "tab:purple"}
LANE_NAMES = {"compute": "compute stream", "watcher": "watcher stream", "stream": "caller stream",
              "call": "whole call"}


def overlapped_call(run: bc.ShapeRun) -> tuple[str, bc.Candidate] | None:
    """The call the timeline shows: flashoverlap (custom, else default plan); on CPU or when
    the overlap engine was n/a, the decomposition engine (drawn from outside only)."""
    for engine, variant in (("flashoverlap", "custom"), ("flashoverlap", "default"), ("decomposition", "default")):
        cand = run.candidate(engine, variant)
        if cand is not None:
            return (bc.LABELS[engine] + ("" if variant == "default" else f" ({variant})")), cand
    return None


def capture_timeline(bench: bc.Bench, run: bc.ShapeRun):
    """Spans of one overlapped call and of one sequential call (collective: all ranks)."""
    from flashoverlap.timeline import Span, record_timeline

    chosen = overlapped_call(run)
    clock, sets = bench.clock, bench.args.rotate
    run.barrier()
    seq = []
    for i in range(TIMELINE_REPS):
        t0 = clock.stamp()
        run.gemm(i % sets)
        t1 = clock.stamp()
        run.comm_full()
        seq.append((t0, t1, clock.stamp()))
    over = []
    if chosen is not None:
        run.barrier()
        for i in range(TIMELINE_REPS):
            with record_timeline() as rec:
                t0 = clock.stamp()
                chosen[1].run(i % sets)
                over.append((rec, t0, clock.stamp()))
    clock.sync()
    run.barrier()

    def median_call(calls, total):
        return sorted(calls, key=total)[len(calls) // 2]

    t0, t1, t2 = median_call(seq, lambda c: clock.elapsed_ms(c[0], c[2]))
    gemm_ms = clock.elapsed_ms(t0, t1)
    seq_spans = [Span("stream", "GEMM", None, 0.0, gemm_ms),  # one stream: the caller's
                 Span("stream", "collective", None, gemm_ms, clock.elapsed_ms(t0, t2))]
    over_spans, hooked = [], False
    if chosen is not None:
        rec, s0, s1 = median_call(over, lambda c: clock.elapsed_ms(c[1], c[2]))
        total = clock.elapsed_ms(s0, s1)
        hooked = len(rec) > 0
        if hooked:  # the engine marked its steps (flashoverlap.timeline hook in run_overlap)
            over_spans = rec.spans(s0)
        else:  # outside view only: the GEMM alone (same input, sequential run) and the call
            over_spans = [Span("compute", "GEMM", None, 0.0, gemm_ms)]
        over_spans.append(Span("call", "whole call", None, 0.0, total))
    return (chosen[0] if chosen else None), chosen[1].info if chosen else {}, hooked, over_spans, seq_spans


def plot_timeline(path: Path, title: str, panels: list[tuple[str, list[Any]]]) -> None:
    """Two stacked Gantt panels with a shared time axis (ms from each call's start)."""
    from matplotlib.patches import Patch

    plt = bc.pyplot()
    heights = [max(len({s.lane for s in spans}), 1) for _, spans in panels]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(11, 1.2 + 0.7 * sum(heights) + 0.6 * len(panels)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    used = set()
    for ax, (name, spans) in zip(axes[:, 0], panels):
        lanes = list(dict.fromkeys(s.lane for s in spans))
        for s in spans:
            y = lanes.index(s.lane)
            ax.broken_barh([(s.start_ms, max(s.duration_ms, 1e-6))], (y - 0.38, 0.76),
                           facecolors=SPAN_COLORS.get(s.name, "tab:red"), edgecolor="black", linewidth=0.4,
                           alpha=0.35 if s.name == "whole call" else 1.0)
            used.add(s.name)
            if s.group is not None and s.name == "collective":
                ax.text(s.start_ms + s.duration_ms / 2, y, str(s.group), ha="center", va="center", fontsize=7)
        ax.set_yticks(range(len(lanes)))
        ax.set_yticklabels([LANE_NAMES.get(lane, lane) for lane in lanes])
        ax.set_ylim(-0.6, len(lanes) - 0.4)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("ms since the call was issued (numbers on collectives: group index)")
    fig.legend(handles=[Patch(facecolor=SPAN_COLORS[n], edgecolor="black", label=n) for n in SPAN_COLORS if n in used],
               loc="upper right", fontsize=7, ncol=len(used))
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def draw_timeline(bench: bc.Bench, run: bc.ShapeRun, path: Path) -> None:
    label, info, hooked, over_spans, seq_spans = capture_timeline(bench, run)
    if not bench.is_root:
        return
    seq_total = seq_spans[-1].end_ms
    panels = []
    if label is not None:
        plan = info.get("plan") or {}
        detail = f", {plan['num_waves']} waves in {plan['num_groups']} groups" if plan else ""
        if info.get("fallback"):
            detail += f", did not overlap (path: {info.get('path')})"
        how = "engine marks" if hooked else "outside view: GEMM alone + whole call (no engine hook)"
        call = next(s for s in over_spans if s.name == "whole call").end_ms
        panels.append((f"{label}: {call:.3f} ms ({seq_total / call:.2f}x){detail} [{how}]", over_spans))
    panels.append((f"sequential (torch.matmul, then the collective): {seq_total:.3f} ms", seq_spans))
    regime = "" if bench.p2p else f", {bc.PCIE_TITLE}"
    title = (f"{run.op} M={run.M} N={run.N} K={run.K} W={run.W} {bc.dtype_name(bench.dtype)} on "
             f"{bench.prov['gpu']}{regime} ({bench.clock.name}, rank 0)")
    plot_timeline(path, title, panels)
    bench.log(f"timeline -> {path}")


def timeline_path(base: Path, op: str, shape: tuple[int, int, int], single: bool) -> Path:
    if single:
        return base
    M, N, K = shape
    return base.with_name(f"{base.stem}-{op}-{M}x{N}x{K}{base.suffix or '.png'}")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def run(bench: bc.Bench) -> None:
    args = bench.args
    shapes = args.shape or PRESETS[args.preset or ("design" if bench.clock.cuda else "tiny")]
    problems = [(op, shape) for op in bc.selected_ops(args) for shape in shapes]
    configs: dict[str, Any] = {"default": None}
    if args.plan_config is not None:
        if "flashoverlap" in bench.engines:
            configs["custom"] = args.plan_config
        else:
            bench.log("note: --config-json ignored (flashoverlap is not measured on this device)")
    bench.log(bc.header(bench, TITLE))
    if bench.clock.cuda and bench.is_root:
        from flashoverlap.engine import overlap

        hook = hasattr(overlap, "timeline")
        bench.log(f"engine timeline hook: {'present' if hook else 'absent (timelines show outside spans)'}")
    import torch.distributed as dist

    group = dist.group.WORLD
    rows: list[dict[str, Any]] = []
    bar = bc.progress(bench, len(problems), "overlap")
    for op, (M, N, K) in problems:
        reason = bc.problem_fits(op, M, N, bench.world)
        if reason is not None:
            bench.log(f"skip {op} {M}x{N}x{K}: {reason}")
            bar.update()
            continue
        shape_run = bc.ShapeRun(bench, "overlap", group, op, M, N, K, configs=configs)
        rows += shape_run.measure()
        if args.timeline is not None:
            draw_timeline(bench, shape_run, timeline_path(args.timeline, op, (M, N, K), len(problems) == 1))
        shape_run.close()
        bar.set_postfix_str(f"{op} {M}x{N}x{K}")
        bar.update()
    bar.close()
    if bench.is_root:
        report(bench, rows)


def report(bench: bc.Bench, rows: list[dict[str, Any]]) -> None:
    """Rank 0: table on stdout; JSON (merged), Markdown and chart files; one summary line."""
    keys = [("op", "op"), ("W", "world_size"), ("M", "M"), ("N", "N"), ("K", "K")]
    intro = (bc.header(bench, TITLE) + "\n\nTimes in ms; (x) = speedup vs seq, same run; ceiling = the "
             "GEMM and an independent collective on two streams; ideal = max(GEMM, comm).\n\n")
    print("\n" + intro + bc.shape_table(rows, keys, bc.engine_columns(rows)) + "\n", flush=True)
    out_dir = bc.output_dir(bench)
    stem = bc.result_stem("overlap", bench)
    merged = bc.write_json(out_dir / f"{stem}.json", rows, fresh=bench.args.fresh)
    (out_dir / f"{stem}.md").write_text(intro + bc.shape_table(merged, keys, bc.engine_columns(merged)) + "\n")
    measured = [r for r in merged if r["median_ms"] is not None]
    regime = "" if bench.p2p else f"{bc.PCIE_TITLE}, "
    panels = [(f"{op} ({regime}{bench.prov['gpu']})", [r for r in measured if r["op"] == op])
              for op in bc.OPS if any(r["op"] == op for r in measured)]
    if panels:
        bc.plot_speedups(out_dir / f"{stem}.png", panels, TITLE,
                         label=lambda r: f"W{r['world_size']} M{r['M']} N{r['N']} K{r['K']}")
    main_engine = "flashoverlap" if any(r["engine"] == "flashoverlap" for r in rows) else "decomposition"
    print(f"overlap: problems {len({(r['op'], r['M'], r['N'], r['K']) for r in rows})}, W={bench.world}, "
          f"{bench.prov['gpu']}; {bc.speedup_summary(rows, main_engine)}; "
          f"{bc.speedup_summary(rows, 'concurrent_ceiling')}; -> {out_dir / stem}.{{json,md,png}}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = bc.setup(args)
    try:
        run(bench)
    finally:
        bc.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
