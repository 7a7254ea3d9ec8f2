"""Grouped signal GEMM and GEMM + AllToAll on one GPU (world size 1).

Rows (JSON list, ``--out``):

* ``bench=gemm, op=grouped``: the grouped signal GEMM of an AllToAll plan (no signals) against
  ``torch._grouped_mm`` (a per-expert ``torch.matmul`` loop where that op is missing or fails),
  ``efficiency_vs_torch = T_torch / T_ours`` (>= 0.95 is the target);
* ``bench=overhead, op=all_to_all``: ``fo.grouped_gemm_all_to_all(engine="overlap")`` against
  its grouped GEMM alone with the same plan, ``overhead_vs_gemm = T_op / T_gemm`` (<= 1.05).

E in {8, 16, 64}, K = N in {2048, 4096, 7168}, ``--tokens`` rows split unevenly over the
experts (a seeded Dirichlet draw; some experts get no rows), bf16, weights as the transposed
view of ``[E, N, K]`` (``--layout kn`` for ``[E, K, N]``).  CUDA events around each call, calls back to
back and interleaved (torch, ours, op), ``--rotate`` input sets used in turn, median of
``--iters`` after warm-up -- the measurement of ``scripts/bench_overhead.py``.  At world size 1
every row is this rank's own block (the GEMM stores it into ``out``; no NCCL), so the overhead
row measures what the op adds on the GPU (counter reset, events, the watcher's waits); its
host time per call (enqueue only, GPU busy) is reported beside it (``host_us``), against the
GEMM launch alone and ``torch._grouped_mm``.  ``--sweep`` also times other grouped-GEMM
configurations per problem (rows ``bench=gemm_sweep``).

    python scripts/bench_all_to_all.py --out /tmp/all_to_all.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def _uneven_counts(np, E: int, M: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    share = rng.dirichlet(np.full(E, 0.7))
    share[rng.random(E) < 0.1] = 0  # some experts get nothing
    share /= share.sum()
    counts = np.floor(share * M).astype(int)
    counts[np.argmax(counts)] += M - counts.sum()
    return counts.tolist()


_PIPE = {"warp_specialized_kernel": False}  # the pipelined Triton kernel even on sm_90

CANDIDATES = {  # name -> (block_m, block_n, GemmConfig overrides); "default" is the engine's
    "default": (None, None, {}),
    "128x256_s4": (128, 256, {"num_stages": 4, **_PIPE}),
    "128x128_w8_s4": (128, 128, {"num_warps": 8, "num_stages": 4, **_PIPE}),
    "128x128_w4_s4": (128, 128, {"num_warps": 4, "num_stages": 4, **_PIPE}),
    "128x128_w8_s5": (128, 128, {"num_warps": 8, "num_stages": 5, **_PIPE}),
    "256x128_w8_s3": (256, 128, {"num_warps": 8, "num_stages": 3, **_PIPE}),
    "64x256_w4_s4": (64, 256, {"num_warps": 4, "num_stages": 4, **_PIPE}),
    "128x256_noflat": (128, 256, {"flatten": False, **_PIPE}),
    # the warp-specialized Gluon kernel (sm_90; elsewhere these run the pipelined one)
    "ws_128x128_s4": (128, 128, {"num_stages": 4, "warp_specialized_kernel": True}),
    "ws_128x128_s5": (128, 128, {"num_stages": 5, "warp_specialized_kernel": True}),
    "ws_128x128_s6": (128, 128, {"num_stages": 6, "warp_specialized_kernel": True}),
    "ws_128x256_s3": (128, 256, {"num_stages": 3, "warp_specialized_kernel": True}),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--experts", default="8,16,64")
    p.add_argument("--sizes", default="2048,4096,7168", help="K = N values")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rotate", type=int, default=3, help="input sets, used in turn")
    p.add_argument("--host-iters", type=int, default=50)
    p.add_argument("--layout", choices=("nk", "kn"), default="nk")
    p.add_argument("--sweep", default="", help=f"comma list of grouped-GEMM candidates to time "
                   f"besides the engine's choice: {','.join(CANDIDATES)} (or 'all')")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    sweep = list(CANDIDATES) if args.sweep == "all" else [c for c in args.sweep.split(",") if c]
    for c in sweep:
        if c not in CANDIDATES:
            p.error(f"unknown candidate {c!r}")

    import dataclasses
    import time

    import numpy as np
    import torch
    import torch.distributed as dist
    import triton

    import flashoverlap as fo
    from flashoverlap.all_to_all_ops import _default_config
    from flashoverlap.all_to_all_plan import AllToAllProblem, make_all_to_all_plan
    from flashoverlap.kernels import default_config, grouped_gemm_config_for
    from flashoverlap.kernels.grouped_signal_gemm import (
        GroupedSignalGemmLauncher,
        uses_warp_specialized,
    )

    if not torch.cuda.is_available():
        print("bench_all_to_all: needs CUDA")
        return 1
    torch.cuda.set_device(0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    dev = torch.device("cuda", 0)
    prov = dict(gpu=torch.cuda.get_device_name(dev), torch=torch.__version__,
                triton=triton.__version__, date=datetime.date.today().isoformat(),
                commit=_commit())
    has_gmm = hasattr(torch, "_grouped_mm")
    rows = []
    R = args.rotate

    def paired_ms(fns):
        """Median ms of each fns[j](i), calls back to back and interleaved (A B C A B C),
        CUDA events around each call, input set i = n % rotate."""
        for n in range(args.warmup):
            for fn in fns:
                fn(n % R)
        torch.cuda.synchronize()
        stamps = [[] for _ in fns]
        for n in range(args.iters):
            for j, fn in enumerate(fns):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn(n % R)
                end.record()
                stamps[j].append((start, end))
        torch.cuda.synchronize()
        return [statistics.median(s.elapsed_time(e) for s, e in st) for st in stamps]

    def host_us(fns):
        """Median us to enqueue each fns[j](i), the GPU busy behind a sleep kernel."""
        samples = [[] for _ in fns]
        for n in range(args.host_iters):
            for j, fn in enumerate(fns):
                torch.cuda.synchronize()
                torch.cuda._sleep(2_000_000)
                t0 = time.perf_counter_ns()
                fn(n % R)
                samples[j].append((time.perf_counter_ns() - t0) / 1e3)
        torch.cuda.synchronize()
        return [statistics.median(s) for s in samples]

    for E in map(int, args.experts.split(",")):
        for size in map(int, args.sizes.split(",")):
            K = N = size
            M = args.tokens
            counts = _uneven_counts(np, E, M, seed=E * 7 + size)
            common = dict(M=M, N=N, K=K, dtype="bfloat16", world_size=1, E=E,
                          b_layout=args.layout, **prov)
            try:
                gen = torch.Generator(device=dev).manual_seed(E * 1000 + size)
                A = [torch.randn(M, K, device=dev, dtype=torch.bfloat16, generator=gen)
                     for _ in range(R)]
                if args.layout == "nk":
                    w = (torch.randn(E, N, K, device=dev, dtype=torch.bfloat16, generator=gen)
                         / K**0.5).transpose(1, 2)
                else:
                    w = torch.randn(E, K, N, device=dev, dtype=torch.bfloat16,
                                    generator=gen) / K**0.5
                out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
                offs = torch.tensor(np.cumsum(counts), device=dev, dtype=torch.int32)
                nested = [[c] for c in counts]
                baseline = "torch._grouped_mm"

                def torch_ref(i):
                    return torch._grouped_mm(A[i], w, offs=offs)

                try:
                    if not has_gmm:
                        raise RuntimeError("torch._grouped_mm missing")
                    ref = torch_ref(0)
                except Exception as exc:  # noqa: BLE001
                    baseline = f"per-expert matmul loop ({type(exc).__name__})"
                    splits = list(counts)

                    def torch_ref(i):
                        res = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
                        for e, (x, r) in enumerate(zip(torch.split(A[i], splits),
                                                       torch.split(res, splits))):
                            if x.shape[0]:
                                torch.matmul(x, w[e], out=r)
                        return res
                    ref = torch_ref(0)

                def launcher_for(name):
                    """(plan config, gemm config, launcher) of a candidate; "engine" is the
                    op's own choice for this problem."""
                    if name == "engine":
                        cfg = _default_config(dev, 1)
                        gcfg = grouped_gemm_config_for(
                            M, N, K, E, torch.bfloat16, cfg.num_ctas,
                            torch.cuda.get_device_capability(dev))
                        cfg = dataclasses.replace(cfg, block_m=gcfg.block_m,
                                                  block_n=gcfg.block_n)
                    else:
                        bm, bn, over = CANDIDATES[name]
                        cfg = _default_config(dev, 1)
                        if bm is not None:
                            cfg = dataclasses.replace(cfg, block_m=bm, block_n=bn)
                        gcfg = dataclasses.replace(default_config(dev, torch.bfloat16),
                                                   block_m=cfg.block_m, block_n=cfg.block_n,
                                                   **over)
                    plan = make_all_to_all_plan(
                        AllToAllProblem(nested, [M], N, K, "bfloat16", 0, 1), cfg)
                    table = torch.from_numpy(plan.step_table.copy()).to(dev)
                    return cfg, gcfg, GroupedSignalGemmLauncher(
                        table, None, block_m=cfg.block_m, block_n=cfg.block_n,
                        num_ctas=cfg.num_ctas, config=gcfg)

                def kernel_of(c, gc):
                    return ("warp_specialized" if uses_warp_specialized(
                        A[0], w, out, out, c.block_m, c.block_n, gc) else "pipelined")

                cfg, gcfg, launch = launcher_for("engine")
                kernel = kernel_of(cfg, gcfg)

                def ours(i):
                    launch(A[i], w, out, out)

                def op(i):
                    fo.grouped_gemm_all_to_all(A[i], w, nested, [M], out=out, engine="overlap")

                out.fill_(float("nan"))
                ours(0)
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                out.fill_(float("nan"))
                op(0)
                err_op = float((out.float() - ref.float()).norm() / ref.float().norm())
                t_torch, t_ours, t_op = paired_ms([torch_ref, ours, op])
                h_torch, h_ours, h_op = host_us([torch_ref, ours, op])
                cname = (f"{gcfg.block_m}x{gcfg.block_n}x{gcfg.block_k} w{gcfg.num_warps} "
                         f"s{gcfg.num_stages} {kernel}")
                rows.append(dict(bench="gemm", op="grouped", engine="grouped_signal_gemm",
                                 num_ctas=cfg.num_ctas, median_ms=round(t_ours, 4),
                                 torch_ms=round(t_torch, 4), baseline=baseline,
                                 efficiency_vs_torch=round(t_torch / t_ours, 4),
                                 config=cname, kernel=kernel, rel_err=err, **common))
                rows.append(dict(bench="overhead", op="all_to_all", engine="flashoverlap",
                                 num_ctas=cfg.num_ctas, median_ms=round(t_op, 4),
                                 gemm_ms=round(t_ours, 4),
                                 overhead_vs_gemm=round(t_op / t_ours, 4), rel_err=err_op,
                                 host_us=round(h_op, 1), host_us_gemm=round(h_ours, 1),
                                 host_us_torch=round(h_torch, 1), config=cname, **common))
                print(f"E={E:3d} K=N={size}: torch {t_torch:.3f} ms ({baseline}), grouped "
                      f"signal GEMM [{cname}] {t_ours:.3f} ms -> eff {t_torch / t_ours:.3f}; op "
                      f"{t_op:.3f} ms -> overhead {t_op / t_ours:.3f}; host us op {h_op:.0f} "
                      f"gemm {h_ours:.0f} torch {h_torch:.0f}; rel err {err:.1e}/{err_op:.1e}",
                      flush=True)
                for name in sweep:
                    try:
                        c_cfg, gc, launch_c = launcher_for(name)
                        out.fill_(float("nan"))
                        launch_c(A[0], w, out, out)
                        e_c = float((out.float() - ref.float()).norm() / ref.float().norm())
                        t_ref, t_c = paired_ms([torch_ref, lambda i: launch_c(A[i], w, out,
                                                                              out)])
                        rows.append(dict(bench="gemm_sweep", op="grouped", candidate=name,
                                         median_ms=round(t_c, 4), torch_ms=round(t_ref, 4),
                                         efficiency_vs_torch=round(t_ref / t_c, 4),
                                         kernel=kernel_of(c_cfg, gc), rel_err=e_c,
                                         num_ctas=cfg.num_ctas, **common))
                        print(f"    {name:<16} {t_c:.3f} ms -> eff {t_ref / t_c:.3f} "
                              f"(err {e_c:.1e}, {kernel_of(c_cfg, gc)})", flush=True)
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        print(f"    {name:<16} FAILED {type(exc).__name__}: {exc}"[:300],
                              flush=True)
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001 - one failing shape must not lose the rest
                rows.append(dict(bench="gemm", op="grouped", error=f"{type(exc).__name__}: "
                                 f"{exc}"[:500], **common))
                print(f"E={E} K=N={size}: FAILED {type(exc).__name__}: {exc}"[:600], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    effs = [r["efficiency_vs_torch"] for r in rows
            if r["bench"] == "gemm" and "efficiency_vs_torch" in r]
    ovh = [r["overhead_vs_gemm"] for r in rows if "overhead_vs_gemm" in r]
    if effs:
        print(f"efficiency_vs_torch: median {statistics.median(effs):.3f}, min {min(effs):.3f}; "
              f"overhead_vs_gemm: median {statistics.median(ovh):.3f}, max {max(ovh):.3f}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
