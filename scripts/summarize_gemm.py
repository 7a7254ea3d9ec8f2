"""Summarize ``bench_gemm.py`` rows as issue 14's acceptance table: median / min efficiency.

Reads the ``bench=gemm`` JSON files given (or every ``*.json`` in the folders given) and prints,
for every ``num_ctas`` found, the median and minimum ``efficiency_vs_torch`` of the signal
GEMM rows: per dtype and B layout, for the nine square-ish shapes (N = 8192) and the others,
and over all bf16 rows; then the lowest rows.  ``--replace`` files supply rows that take the
place of same-shape rows (same M, N, K, dtype, layout, P) -- how an A/B run's rows stand in
for the main run's (e.g. ``ws-run5``'s ``ab-gm8-*``).  ``--check P=MEDIAN/MIN`` exits 1 when
the all-bf16 row of that P is below the target.  ``--key efficiency_vs_torch_sm_target``
summarizes the ratio to cuBLASLt on the same SMs instead (``bench_gemm.py --torch-sm-target``;
rows without it are left out).  ``--engine torch-sm-target`` summarizes another engine's rows:
there, cuBLASLt told to use ``P`` SMs against ``torch.matmul`` on all of them -- what the
signal GEMM's reduced-P rows are up against (its all-SM control rows, without a ``num_ctas``,
are left out).  ``--noise`` adds what the files' kept timings (``samples_ms``, written since
``valid-run55``) say about the measurement itself: how much two ``torch.matmul`` timings of one
shape in one repeat differ, how a shape's first timing of a repeat (right after the previous
shape's teardown and this one's setup) compares with its last, and how far apart a row's
paired efficiency ratios lie.  ``--pool`` treats all the files given as one longer run: the
rows of one shape (M, N, K, dtype, layout, P) from several runs become one row whose efficiency
is the median of all their paired ratios (``efficiency_samples``; the median of the runs' own
values where a row kept none) -- issue 14's "median of >= 3 repeats" over every repeat of the
runs pooled.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def _files(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        out.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
    return out


ENGINE = "flashoverlap"


def load_rows(paths: list[Path], replace: list[Path] = (), engine: str = ENGINE) -> list[dict]:
    """The ``engine`` rows (default the signal GEMM's) of the ``bench=gemm`` files that name
    their ``num_ctas``."""
    def rows_of(files):
        rows = []
        for f in files:
            data = json.loads(f.read_text())
            if not isinstance(data, list):
                continue
            rows += [r for r in data if isinstance(r, dict) and r.get("bench") == "gemm"
                     and r.get("engine") == engine and r.get("num_ctas") is not None]
        return rows

    subs = {_shape_key(r): r for r in rows_of(_files(list(replace)))}
    return [subs.get(_shape_key(r), r) for r in rows_of(_files(paths))]


KEY = "efficiency_vs_torch"


def _shape_key(r: dict) -> tuple:
    return r["M"], r["N"], r["K"], r["dtype"], r.get("b_layout"), r["num_ctas"]


def pool_rows(rows: list[dict], key: str = KEY) -> list[dict]:
    """One row per shape (M, N, K, dtype, layout, P): its ``key`` the median of every paired
    ratio its rows kept (``efficiency_samples``, for ``efficiency_vs_torch``), or of the rows'
    own values where any row kept none; ``efficiency_samples`` every ratio pooled (None where
    a row kept none); ``pooled_rows`` how many rows went in, ``commit`` the sorted distinct
    commits joined by ``+``."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_shape_key(r), []).append(r)
    out = []
    for group in groups.values():
        kept = [r.get("efficiency_samples") for r in group]
        samples = [x for s in kept for x in s] if all(kept) else None
        value = statistics.median(samples if key == KEY and samples else
                                  [r[key] for r in group])
        commits = sorted({str(r.get("commit")) for r in group})
        out.append(dict(group[0], **{key: value}, efficiency_samples=samples,
                        pooled_rows=len(group), commit="+".join(commits)))
    return out


def stats(rows: list[dict], key: str = KEY) -> tuple[float, float] | None:
    effs = [r[key] for r in rows]
    return (statistics.median(effs), min(effs)) if effs else None


def table(rows: list[dict], key: str = KEY) -> list[str]:
    ps = sorted({r["num_ctas"] for r in rows}, reverse=True)
    groups = []
    for dtype in sorted({r["dtype"] for r in rows}):
        for layout in sorted({r.get("b_layout") for r in rows}, key=str):
            for name, pred in (("N = 8192", lambda r: r["N"] == 8192),
                               ("other N", lambda r: r["N"] != 8192)):
                groups.append((f"{dtype} {layout} {name}",
                               lambda r, d=dtype, lay=layout, p=pred:
                               r["dtype"] == d and r.get("b_layout") == lay and p(r)))
    for dtype in sorted({r["dtype"] for r in rows}):
        groups.append((f"all {dtype} rows", lambda r, d=dtype: r["dtype"] == d))
    lines = [f"{'rows':<28}" + "".join(f" | P = {p:<4} median / min (n)" for p in ps)]
    for name, pred in groups:
        cells = []
        for p in ps:
            sel = [r for r in rows if r["num_ctas"] == p and pred(r)]
            s = stats(sel, key)
            cells.append(f" | {s[0]:.3f} / {s[1]:.3f} ({len(sel):>2})       " if s else
                         f" | {'-':<24}")
        if any("/" in c for c in cells):
            lines.append(f"{name:<28}" + "".join(cells))
    return lines


def _robust_sd(xs: list[float]) -> float:
    """1.4826 x the median absolute deviation: the sd of a normal sample, unmoved by outliers."""
    m = statistics.median(xs)
    return 1.4826 * statistics.median(abs(x - m) for x in xs)


def timing_noise(paths: list[Path]) -> dict | None:
    """From the ``torch`` rows' ``samples_ms`` (per repeat: the timing before the first
    signal-GEMM timing, then one after each P) and the signal rows' ``efficiency_samples``:
    ``first_over_last`` (median, mean; the first timing of a repeat over its last),
    ``later_log_sd`` (robust sd, sd of the log ratio of consecutive later timings),
    ``pairs``, and ``efficiency_spread`` (median over rows of (max - min) / median of a row's
    paired ratios).  None where no row kept its timings."""
    first, later, spread = [], [], []
    for f in _files(paths):
        data = json.loads(f.read_text())
        for r in data if isinstance(data, list) else []:
            if not isinstance(r, dict) or r.get("bench") != "gemm":
                continue
            if r.get("engine") == "torch" and r.get("samples_ms") and r.get("repeats"):
                s, reps = r["samples_ms"], r["repeats"]
                per = len(s) // reps
                for i in range(0, per * reps, per):
                    group = s[i:i + per]
                    first.append(group[0] / group[-1])
                    later += [math.log(a / b) for a, b in zip(group[1:], group[2:])]
            elif r.get("engine") == ENGINE and len(r.get("efficiency_samples") or ()) > 1:
                e = r["efficiency_samples"]
                spread.append((max(e) - min(e)) / statistics.median(e))
    if not first:
        return None
    return {"first_over_last": (statistics.median(first), statistics.mean(first)),
            "later_log_sd": ((_robust_sd(later), statistics.pstdev(later)) if len(later) > 1
                             else None),
            "pairs": len(later), "timings": len(first),
            "efficiency_spread": statistics.median(spread) if spread else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", type=Path, help="JSON files or folders of them")
    p.add_argument("--replace", nargs="*", type=Path, default=[],
                   help="files whose rows replace same-shape rows of the main files")
    p.add_argument("--key", default=KEY,
                   choices=[KEY, "efficiency_vs_torch_sm_target"],
                   help="which efficiency to summarize")
    p.add_argument("--engine", default=ENGINE, choices=[ENGINE, "torch-sm-target"],
                   help="whose rows: the signal GEMM's, or cuBLASLt's on P SMs")
    p.add_argument("--lowest", type=int, default=5, help="lowest rows to list")
    p.add_argument("--noise", action="store_true",
                   help="also summarize the kept timings (samples_ms): the measurement's noise")
    p.add_argument("--pool", action="store_true",
                   help="one row per shape over all the files: the median of every paired "
                        "ratio of its rows (several runs as one)")
    p.add_argument("--check", action="append", default=[], metavar="P=MEDIAN/MIN",
                   help="target for the all-bf16 rows of P (exit 1 if not met or absent)")
    args = p.parse_args(argv)
    key = args.key
    rows = [r for r in load_rows(args.paths, args.replace, args.engine) if key in r]
    if not rows:
        print(f"no bench=gemm {args.engine} rows with {key} found", file=sys.stderr)
        return 2
    pooled = ""
    if args.pool:
        n = len(rows)
        rows = pool_rows(rows, key)
        pooled = f" (pooled: {n} rows as {len(rows)})"
    print(f"{key}" + (f" of {args.engine}" if args.engine != ENGINE else "") + pooled + ":")
    print("\n".join(table(rows, key)))
    low = sorted(rows, key=lambda r: r[key])[:args.lowest]
    print("lowest: " + "; ".join(f"{r['M']}x{r['N']}x{r['K']} {r['dtype']} {r.get('b_layout')} "
                                 f"P={r['num_ctas']} {r[key]:.3f}" for r in low))
    if args.noise:
        n = timing_noise(args.paths)
        if n is None:
            print("noise: no row kept its timings (samples_ms)")
        else:
            print(f"noise: a repeat's first torch.matmul timing over its last: median "
                  f"{n['first_over_last'][0]:.4f}, mean {n['first_over_last'][1]:.4f} "
                  f"({n['timings']} repeats x shapes)"
                  + (f"; consecutive later timings, log ratio: robust sd "
                     f"{n['later_log_sd'][0]:.4f}, sd {n['later_log_sd'][1]:.4f} "
                     f"({n['pairs']} pairs)" if n["later_log_sd"] else "")
                  + (f"; a row's paired ratios span {n['efficiency_spread']:.3f} of their "
                     f"median (median over rows)" if n["efficiency_spread"] is not None
                     else ""))
    failed = False
    for target in args.check:
        P, _, bounds = target.partition("=")
        want_median, want_min = (float(x) for x in bounds.split("/"))
        s = stats([r for r in rows if r["num_ctas"] == int(P) and r["dtype"] == "bfloat16"],
                  key)
        ok = s is not None and s[0] >= want_median and s[1] >= want_min
        failed |= not ok
        print(f"target P={P} (bfloat16 rows): median >= {want_median}, min >= {want_min}: "
              + (("met" if ok else "NOT met") + f" ({s[0]:.3f} / {s[1]:.3f})" if s
                 else "no bfloat16 rows at this P"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
