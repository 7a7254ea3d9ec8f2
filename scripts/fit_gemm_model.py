"""Fit the tuner's analytic GEMM model to measured signal-GEMM times (no GPU needed).

Role
----
:class:`flashoverlap.tuning.search.AnalyticModel` predicts the signal GEMM's time when no
curve was measured: whole waves of ``P`` tiles (the split last wave as the kernel splits it),
each tile ``2*BM*BN*K`` FLOPs at ``gemm_flops / ref_sms`` per SM, times
``(ref_sms / P) ** power_exponent``.  This script fits ``gemm_flops`` (the whole GPU's rate at
``ref_sms`` CTAs) and ``power_exponent`` to ``bench_gemm.py`` rows (``engine=flashoverlap``),
so that the defaults in ``search.py`` are traceable to committed measurements, and prints how
far the model's current defaults are from the same rows.

Why an exponent: at a board power cap (the H200 runs these GEMMs at 700 W) a GEMM on fewer
SMs gets a higher clock, so the per-SM rate is not constant; a power law in ``ref_sms / P``
fits the P in {132, 116} rows to ~2 % (``clock-run3`` measured the clock itself).

Method: the model's own :meth:`~AnalyticModel.wave_times` with a unit rate gives each row's
critical-path work (FLOPs per SM, the split part included); the model's fixed times (the
launch, a split last wave's fix-up) come off the measured ``t``; for each exponent on a grid
the rate that minimises the squared log error has a closed form (the mean of
``log(work * (ref/P)^-a) - log(t - fixed)``), and the grid point with the least rms wins.

    python scripts/fit_gemm_model.py results/2026-12-02-h200/{wssplit-run3,grouped-run5}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path


def load_rows(paths: list[Path], dtype: str) -> list[dict]:
    """``bench=gemm`` signal-GEMM rows of ``dtype`` from JSON files or folders of them."""
    files = []
    for p in paths:
        files.extend(sorted(p.glob("gemm-*.json")) if p.is_dir() else [p])
    rows = []
    for f in files:
        data = json.loads(f.read_text())
        rows += [r for r in data if isinstance(r, dict) and r.get("bench") == "gemm"
                 and r.get("engine") == "flashoverlap" and r.get("dtype") == dtype]
    return rows


def _plan(row: dict):
    """The row's GEMM as the model sees it: ``(Problem, PlanConfig)`` at world size 1."""
    from flashoverlap.plan import PlanConfig, Problem

    cfg = row.get("config") or {}
    return (Problem(row["M"], row["N"], row["K"], row["dtype"], 1, "all_reduce"),
            PlanConfig(block_m=cfg.get("block_m", 128), block_n=cfg.get("block_n", 256),
                       num_ctas=row["num_ctas"], group_m=row.get("group_m", 8)))


def _rms(errors: list[float]) -> float:
    return math.sqrt(statistics.fmean(e * e for e in errors))


def fit(rows: list[dict], model=None, exponents=None) -> dict:
    """Best ``(gemm_flops, power_exponent)`` for the rows, and the rms / per-P log errors
    of that fit and of ``model`` as it is."""
    from flashoverlap.tuning.search import AnalyticModel

    model = model or AnalyticModel()
    ref = model.ref_sms
    plans = [_plan(r) for r in rows]
    # Critical-path FLOPs per SM under the model's wave rules: its own wave_times at a unit
    # rate per SM, with no exponent, launch or split fix-up.
    unit = dataclasses.replace(model, gemm_flops={r["dtype"]: float(ref) for r in rows},
                               power_exponent=0.0, launch_s=0.0, split_fixup_s=0.0,
                               split_per_part_s=0.0)
    # The model's fixed times per row (launch, a split last wave's fix-up) come off the
    # measured time before the rate is fitted, as the launch alone did before the split cost
    # was calibrated.
    no_fixed = dataclasses.replace(model, launch_s=0.0, split_fixup_s=0.0,
                                   split_per_part_s=0.0)
    data = [(sum(unit.wave_times(*plan)), r["num_ctas"], r["median_ms"] * 1e-3,
             sum(model.wave_times(*plan)) - sum(no_fixed.wave_times(*plan)))
            for r, plan in zip(rows, plans)]
    grid = exponents if exponents is not None else [i / 200 for i in range(201)]
    best = None
    for a in grid:
        logs = [math.log(w * (ref / P) ** -a) - math.log(t - fixed)
                for w, P, t, fixed in data]
        log_rate = statistics.fmean(logs)
        errs = [log_rate - x for x in logs]  # log(predicted / measured)
        if best is None or _rms(errs) < best[0]:
            best = (_rms(errs), a, math.exp(log_rate), errs)
    rms, a, rate, errs = best

    def by_p(errors):
        out = {}
        for e, (_, P, _, _) in zip(errors, data):
            out.setdefault(P, []).append(e)
        return {P: statistics.fmean(v) for P, v in sorted(out.items())}

    current = [math.log(sum(model.wave_times(*plan)) / t)
               for plan, (_, _, t, _) in zip(plans, data)]
    return {"gemm_flops": rate * ref, "power_exponent": a, "rms": rms,
            "mean_error_by_p": by_p(errs), "rows": len(rows),
            "current_rms": _rms(current), "current_mean_error_by_p": by_p(current)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", type=Path, help="bench_gemm JSON files or folders")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    rows = load_rows(args.paths, args.dtype)
    if not rows:
        print("no bench=gemm signal-GEMM rows found", file=sys.stderr)
        return 2
    r = fit(rows)
    print(f"{r['rows']} rows ({args.dtype}): gemm_flops {r['gemm_flops'] / 1e12:.0f} TFLOP/s, "
          f"power_exponent {r['power_exponent']:.3f}, rms log error {r['rms']:.3f}; mean by P "
          + ", ".join(f"{P}: {e:+.3f}" for P, e in r["mean_error_by_p"].items()))
    print(f"the model's current defaults on the same rows: rms {r['current_rms']:.3f}; mean by "
          "P " + ", ".join(f"{P}: {e:+.3f}" for P, e in r["current_mean_error_by_p"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
