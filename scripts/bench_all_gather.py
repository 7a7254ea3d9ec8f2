"""AllGather + GEMM on one GPU (world size 1): what waiting on chunk flags costs the GEMM.

Rows (JSON list, ``--out``), keys ``bench, op="all_gather", M, N, K, dtype, world_size, engine,
num_ctas, median_ms, gpu, torch, triton, date, commit`` (+ a metric):

* ``bench=gemm, engine=nowait``: the gather GEMM with ``WAIT_FLAGS=False`` (the plain
  persistent GEMM, same plan, same tile order) -- on sm_90 with whole tiles the
  warp-specialized kernel (``kernel`` says which);
* ``bench=gemm, engine=nowait-pipelined``: the same with the pipelined Triton kernel
  (``GemmConfig.warp_specialized_kernel=False``), the kernel every plan ran before;
* ``bench=gemm, engine=wait``: the same GEMM waiting on every chunk's flag (flags already
  set, so only the polls cost), ``efficiency_vs_gemm = T_nowait / T_wait`` (target >= 0.97);
* ``bench=gemm, engine=torch``: ``torch.matmul`` for scale, ``efficiency_vs_gemm =
  T_nowait / T_torch``; the GEMM rows carry ``efficiency_vs_torch = T_torch / T`` (how each
  kernel compares with cuBLAS on all SMs);
* ``bench=op, engine=overlap``: ``fo.all_gather_gemm(engine="overlap", config=...)`` (arm
  flags, copy own chunk + flag write on the watcher, the waiting GEMM),
  ``efficiency_vs_gemm = T_nowait / T_op``.

CUDA events, calls interleaved round-robin, ``--sets`` input sets rotated per call (the L2
does not hold the operands), median of ``--iters`` after warm-up.

    python scripts/bench_all_gather.py --out /tmp/all_gather.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = ((8192, 8192, 8192), (16384, 8192, 4096), (4096, 7168, 8192), (2048, 8192, 8192))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except Exception:  # noqa: BLE001
        return "?"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("all_gather.json"))
    p.add_argument("--shapes", default=None, help="M:N:K,... (default: a fixed list)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reserve", type=int, default=16, help="SMs left to NCCL")
    p.add_argument("--sets", type=int, default=4, help="input sets rotated per call")
    args = p.parse_args()

    import torch
    import torch.distributed as dist
    import triton

    import flashoverlap as fo
    import dataclasses

    from flashoverlap.gather_plan import GatherProblem, make_gather_plan
    from flashoverlap.kernels import config_for_tile, default_block_shape, default_config
    from flashoverlap.kernels.gather_gemm import GatherGemmLauncher, uses_warp_specialized

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.cuda.set_device(0)
    device = torch.device("cuda", 0)
    init = Path(tempfile.mkdtemp()) / "store"
    dist.init_process_group("nccl", init_method=f"file://{init}", rank=0, world_size=1,
                            device_id=device)
    shapes = SHAPES if args.shapes is None else tuple(
        tuple(int(x) for x in s.split(":")) for s in args.shapes.split(","))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    bm, bn = default_block_shape(device)
    common = dict(op="all_gather", dtype="bfloat16", world_size=1,
                  gpu=torch.cuda.get_device_name(device), torch=torch.__version__,
                  triton=triton.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  commit=_commit())
    rows = []
    for M, N, K in shapes:
        cfg = fo.PlanConfig(block_m=bm, block_n=bn, num_ctas=sms - args.reserve,
                            group_m=max(1, min(8, -(-M // bm))))
        plan = make_gather_plan(GatherProblem(M, N, K, "bfloat16", 1), cfg)
        table = torch.from_numpy(plan.step_table(0).copy()).to(device)
        flags = torch.ones(1, dtype=torch.int32, device=device)
        kcfg = config_for_tile(default_config(device), bm, bn)
        full = plan.full_tiles
        launch = dict(block_m=bm, block_n=bn, num_ctas=cfg.num_ctas, full_tiles=full)
        wait = GatherGemmLauncher(table, flags, config=kcfg, **launch)
        nowait = GatherGemmLauncher(table, None, config=kcfg, **launch)
        pipelined = GatherGemmLauncher(
            table, None, config=dataclasses.replace(kcfg, warp_specialized_kernel=False),
            **launch)
        sets = [(torch.randn(M, K, device=device, dtype=torch.bfloat16),
                 (torch.randn(N, K, device=device, dtype=torch.bfloat16) / K**0.5).t())
                for _ in range(max(1, args.sets))]
        a, b = sets[0]
        out = torch.empty(M, N, device=device, dtype=torch.bfloat16)
        gathered = torch.empty(M, K, device=device, dtype=torch.bfloat16)
        kernel = ("warp_specialized" if uses_warp_specialized(a, b, out, block_m=bm,
                                                              block_n=bn, config=kcfg,
                                                              full_tiles=full)
                  else "pipelined")
        turn = [0]

        def operands():
            turn[0] += 1
            return sets[turn[0] % len(sets)]

        calls = {
            "nowait": lambda x: nowait(*x, out),
            "nowait-pipelined": lambda x: pipelined(*x, out),
            "wait": lambda x: wait(*x, out),
            "torch": lambda x: torch.matmul(*x, out=out),
            "overlap": lambda x: fo.all_gather_gemm(*x, out=out, gathered=gathered,
                                                    engine="overlap", config=cfg),
        }
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(args.warmup):
            for fn in calls.values():
                fn(operands())
        torch.cuda.synchronize()
        for _ in range(args.iters):
            for name, fn in calls.items():
                x = operands()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn(x)
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
        med = {k: statistics.median(v) for k, v in times.items()}
        ref = torch.matmul(a, b).float()
        errs = {}
        for name in ("nowait", "nowait-pipelined", "wait"):
            out.fill_(float("nan"))
            calls[name]((a, b))
            errs[name] = float((out.float() - ref).norm() / ref.norm())
        kernels = {"nowait": kernel, "wait": kernel, "nowait-pipelined": "pipelined"}
        for name in calls:
            row = dict(bench="op" if name == "overlap" else "gemm", M=M, N=N, K=K,
                       engine=name, num_ctas=cfg.num_ctas, median_ms=round(med[name], 4),
                       **common)
            if name in kernels:
                row["kernel"] = kernels[name]
                row["rel_err_vs_torch"] = errs[name]
            if name != "nowait":
                row["efficiency_vs_gemm"] = round(med["nowait"] / med[name], 4)
            if name != "overlap":
                row["efficiency_vs_torch"] = round(med["torch"] / med[name], 4)
            rows.append(row)
        print(f"M={M} N={N} K={K} ({kernel}): nowait {med['nowait']:.3f} ms "
              f"({med['torch'] / med['nowait']:.3f} of torch), pipelined "
              f"{med['nowait-pipelined']:.3f} ms ({med['torch'] / med['nowait-pipelined']:.3f}), "
              f"wait {med['wait']:.3f} ms (eff {med['nowait'] / med['wait']:.3f}), torch "
              f"{med['torch']:.3f} ms, op {med['overlap']:.3f} ms "
              f"(eff {med['nowait'] / med['overlap']:.3f}), err {max(errs.values()):.1e}",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    worst = min(r["efficiency_vs_gemm"] for r in rows if r["engine"] == "wait")
    print(f"worst efficiency_vs_gemm (wait / nowait) = {worst:.3f} (target >= 0.97); "
          f"rows in {args.out}")
    from flashoverlap.comm import destroy_communicators
    from flashoverlap.engine.gather import clear_gather_workspaces

    clear_gather_workspaces()
    destroy_communicators()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
