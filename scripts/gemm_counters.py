"""Hardware counters of the GEMM engines on one shape, under Nsight Compute (issue 14).

Why: under the H200's 700 W cap a GEMM's speed is its clock, and its clock is what the
power left over buys.  cuBLAS on 116 SMs runs a 1-5 % higher clock than the signal GEMM on
the same SMs (``cluster_gemm_probe.py``, ``verify-run40``/``stsm-run41``), and the CUDA C
cluster kernel without clusters trails the Gluon kernel by 1-2 % at the same clock.  Timing
cannot say where the energy goes; counters can: bytes read from HBM and moved through L2,
instructions issued, the tensor pipe's activity and where warps stall.

This script only launches: each engine runs ``--reps`` times inside its own
``cudaProfilerStart/Stop`` window, in the order printed, so ``ncu --profile-from-start off``
profiles exactly those launches.  Run it under ncu (``--clock-control none``: leave the
clocks alone) and read the CSV with ``--parse``::

    ncu --profile-from-start off --clock-control none --csv --page raw \\
        --print-units base --section SpeedOfLight --section WarpStateStats \\
        --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,sm__inst_executed.sum \\
        python scripts/gemm_counters.py --shape 6144x5120x4096 --layout nk --ctas 116 \\
        > counters.csv
    python scripts/gemm_counters.py --parse counters.csv

Engines: ``torch`` (torch.matmul, all SMs), ``cublaslt`` (cuBLASLt told to use ``P`` SMs),
``signal`` (the product's signal GEMM, ``gemm_config_for``'s choice; ``--group-m``: the same
kernel on plans with other band heights), and cluster-kernel
variants named as in ``cluster_gemm_probe.py``.  A kernel's counters under replay are counts,
not a timing: ncu serializes kernels and replays each one per metric pass.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# the GEMM kernels' names (cuBLAS: nvjet / sm90 xmma / cutlass; ours: *gemm*); fills and
# counter resets in the same windows are left out
GEMM_NAME_PARTS = ("gemm", "nvjet", "xmma", "cutlass")
ENGINE_LINE = "gemm_counters engine:"
# what the table prints per engine, as (column, metric name, scale)
COLUMNS = [
    ("ms", "gpu__time_duration.sum", 1e-6),
    ("MHz", "gpc__cycles_elapsed.avg.per_second", 1e-6),
    ("HBM rd GB", "dram__bytes_read.sum", 1e-9),
    ("HBM wr GB", "dram__bytes_write.sum", 1e-9),
    ("L2 GB", "lts__t_bytes.sum", 1e-9),
    ("Minst", "sm__inst_executed.sum", 1e-6),
]


def is_gemm(name: str) -> bool:
    low = name.lower()
    return any(part in low for part in GEMM_NAME_PARTS)


def _to_base(value: str, unit: str) -> float:
    """A raw-page value in base units (ns, Hz, bytes, counts)."""
    v = float(value.replace(",", ""))
    scale = {"nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9,
             "hz": 1, "khz": 1e3, "mhz": 1e6, "ghz": 1e9, "cycle/nsecond": 1e9,
             "cycle/usecond": 1e6, "cycle/second": 1,
             "byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12}
    return v * scale.get(unit.strip().lower(), 1)


def parse(text: str) -> tuple[list[str], list[dict[str, float]]]:
    """The engines this script announced (its stdout lines) and, per GEMM kernel ncu
    profiled, its metrics in base units, in launch order."""
    engines = [line.split(ENGINE_LINE, 1)[1].strip() for line in text.splitlines()
               if ENGINE_LINE in line]
    start = next((i for i, line in enumerate(text.splitlines())
                  if line.startswith('"ID"')), None)
    kernels: list[dict[str, float]] = []
    if start is None:
        return engines, kernels
    rows = list(csv.reader(io.StringIO("\n".join(text.splitlines()[start:]))))
    header, units, body = rows[0], rows[1], rows[2:]
    for row in body:
        if len(row) != len(header):
            continue
        rec = dict(zip(header, row))
        if not is_gemm(rec.get("Kernel Name", "")):
            continue
        out: dict[str, float] = {}
        for col, unit in zip(header, units):
            try:
                out[col] = _to_base(rec[col], unit)
            except ValueError:
                pass
        out["_name"] = rec.get("Kernel Name", "")  # type: ignore[assignment]
        kernels.append(out)
    return engines, kernels


def table(engines: list[str], kernels: list[dict], reps: int) -> list[str]:
    """One line per engine: the mean of its ``reps`` kernels' metrics."""
    if len(kernels) != reps * len(engines):
        return [f"expected {reps} GEMM kernels for each of {len(engines)} engines, ncu "
                f"profiled {len(kernels)}: {[k['_name'][:40] for k in kernels]}"]
    width = max([22] + [len(e) + 1 for e in engines])  # the engine column fits every name
    lines = [f"{'engine':<{width}}" + "".join(f"{c:>11}" for c, _, _ in COLUMNS)]
    for i, engine in enumerate(engines):
        ks = kernels[i * reps:(i + 1) * reps]
        cells = []
        for _, metric, scale in COLUMNS:
            vals = [k[metric] for k in ks if metric in k]
            cells.append(f"{sum(vals) / len(vals) * scale:>11.3f}" if vals else f"{'-':>11}")
        lines.append(f"{engine:<{width}}" + "".join(cells))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8192x8192x8192", help="MxNxK")
    p.add_argument("--layout", default="nk", choices=["nk", "kn"])
    p.add_argument("--ctas", default="116", help="P values, comma-separated")
    p.add_argument("--variants", default="single,multicast4-stsm",
                   help="cluster-kernel variants (cluster_gemm_probe.py's names)")
    p.add_argument("--group-m", default="",
                   help="extra signal-GEMM engines with these band heights (tile rows), e.g. "
                        "4,16,32 -- the L2 swizzle decides how often A and B come from HBM")
    p.add_argument("--reps", type=int, default=2, help="profiled launches per engine")
    p.add_argument("--parse", type=Path, help="only read an ncu CSV (+ this script's lines)")
    args = p.parse_args(argv)
    if args.parse:
        engines, kernels = parse(args.parse.read_text())
        print("\n".join(table(engines, kernels, args.reps)))
        return 0

    import torch
    import triton

    from bench_gemm import _Bench
    from cluster_gemm_probe import variant_config
    from flashoverlap.kernels import gemm_config_for
    from flashoverlap.kernels import signal_gemm as sg
    from flashoverlap.kernels.cluster_gemm import ClusterGemm, runs_table
    from flashoverlap.plan import PlanConfig, Problem, make_plan

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    cap = torch.cuda.get_device_capability(dev)
    M, N, K = (int(x) for x in args.shape.split("x"))
    bench = _Bench(torch, triton, sg, M, N, K, torch.bfloat16, args.layout, 2)
    engines = [("torch", bench._rotating(bench._torch_run))]
    def plan_for(P, group_m, block_m=128, block_n=256):  # an AllReduce plan at world size 1
        return make_plan(Problem(M, N, K, "bfloat16", 1, "all_reduce"),
                         PlanConfig(block_m=block_m, block_n=block_n, num_ctas=P,
                                    group_m=group_m))

    for P in (int(x) for x in args.ctas.split(",")):
        engines.append((f"cublaslt P={P}", bench.torch_sm_target_fn(sms - P)))
        choice = gemm_config_for(M, N, K, "bfloat16", P, cap)
        tile = (choice.config.block_m, choice.config.block_n)
        engines.append((f"signal P={P}",
                        bench.signal_fn(plan_for(P, choice.group_m, *tile), choice.config)))
        for gm in (int(x) for x in args.group_m.split(",") if x):
            engines.append((f"signal gm{gm} P={P}",
                            bench.signal_fn(plan_for(P, gm, *tile), choice.config)))
        plan256 = plan_for(P, choice.group_m)  # the cluster kernel's 128 x 256 tiles
        steps = torch.from_numpy(plan256.step_table.copy()).to(dev)
        counters = torch.zeros(plan256.num_groups, device=dev, dtype=torch.int32)
        for v in (x for x in args.variants.split(",") if x):
            k = ClusterGemm(variant_config(v, args.layout))
            if not (runs_table(k.config, plan256.step_table, P) and k.fits(P)):
                print(f"{v} P={P}: not runnable on this plan/device, skipped", flush=True)
                continue
            engines.append((f"{v} P={P}", bench._rotating(
                lambda i, k=k, P=P: k(*bench.sets[i], bench.c[i], steps, counters, P))))
    for _, fn in engines:  # compile and warm everything outside the profiled windows
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    for name, fn in engines:
        print(f"{ENGINE_LINE} {name}", flush=True)
        torch.cuda.profiler.start()
        for _ in range(args.reps):
            fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
