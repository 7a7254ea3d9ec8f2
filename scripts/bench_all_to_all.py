"""Grouped signal GEMM and GEMM + AllToAll on one GPU (world size 1).

Rows (JSON list, ``--out``):

* ``bench=gemm, op=grouped``: the grouped signal GEMM of an AllToAll plan (no signals) against
  ``torch._grouped_mm`` (a per-expert ``torch.matmul`` loop where that op is missing or fails),
  ``efficiency_vs_torch = T_torch / T_ours`` (>= 0.95 is the target);
* ``bench=overhead, op=all_to_all``: ``fo.grouped_gemm_all_to_all(engine="overlap")`` against
  its grouped GEMM alone with the same plan, ``overhead_vs_gemm = T_op / T_gemm`` (<= 1.05).

E in {8, 16, 64}, K = N in {2048, 4096, 7168}, ``--tokens`` rows split unevenly over the
experts (a seeded Dirichlet draw; some experts get no rows), bf16, weights as the transposed
view of ``[E, N, K]`` (``--layout kn`` for ``[E, K, N]``).  CUDA events, interleaved calls,
median of ``--iters`` after warm-up.  At world size 1 every row is this rank's own block (the
GEMM stores it into ``out``; no NCCL), so the overhead row measures the op's host path and
launch, not communication.

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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--experts", default="8,16,64")
    p.add_argument("--sizes", default="2048,4096,7168", help="K = N values")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layout", choices=("nk", "kn"), default="nk")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import numpy as np
    import torch
    import torch.distributed as dist
    import triton

    import flashoverlap as fo
    from flashoverlap.all_to_all_plan import AllToAllProblem, make_all_to_all_plan
    from flashoverlap.all_to_all_ops import _default_config
    from flashoverlap.kernels.grouped_signal_gemm import grouped_signal_gemm

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

    def time_interleaved(fns):
        times = [[] for _ in fns]
        for i in range(args.warmup + args.iters):
            for j, fn in enumerate(fns):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                if i >= args.warmup:
                    times[j].append(start.elapsed_time(end))
        return [statistics.median(t) for t in times]

    for E in map(int, args.experts.split(",")):
        for size in map(int, args.sizes.split(",")):
            K = N = size
            M = args.tokens
            counts = _uneven_counts(np, E, M, seed=E * 7 + size)
            common = dict(M=M, N=N, K=K, dtype="bfloat16", world_size=1, E=E, **prov)
            try:
                a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                if args.layout == "nk":
                    w = (torch.randn(E, N, K, device=dev, dtype=torch.bfloat16)
                         / K**0.5).transpose(1, 2)
                else:
                    w = torch.randn(E, K, N, device=dev, dtype=torch.bfloat16) / K**0.5
                out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
                cfg = _default_config(dev, 1)
                plan = make_all_to_all_plan(
                    AllToAllProblem([[c] for c in counts], [M], N, K, "bfloat16", 0, 1), cfg)
                table = torch.from_numpy(plan.step_table.copy()).to(dev)
                offs = torch.tensor(np.cumsum(counts), device=dev, dtype=torch.int32)

                def ours():
                    grouped_signal_gemm(a, w, out, out, step_table=table, block_m=cfg.block_m,
                                        block_n=cfg.block_n, num_ctas=cfg.num_ctas)

                def op():
                    fo.grouped_gemm_all_to_all(a, w, [[c] for c in counts], [M], out=out,
                                               engine="overlap")

                baseline = "torch._grouped_mm"

                def torch_ref():
                    return torch._grouped_mm(a, w, offs=offs)

                try:
                    if not has_gmm:
                        raise RuntimeError("torch._grouped_mm missing")
                    ref = torch_ref()
                except Exception as exc:  # noqa: BLE001
                    baseline = f"per-expert matmul loop ({type(exc).__name__})"
                    splits = list(counts)

                    def torch_ref():
                        res = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
                        for e, (x, r) in enumerate(zip(torch.split(a, splits),
                                                       torch.split(res, splits))):
                            if x.shape[0]:
                                torch.matmul(x, w[e], out=r)
                        return res
                    ref = torch_ref()
                ours()
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                op()
                err_op = float((out.float() - ref.float()).norm() / ref.float().norm())
                t_torch, t_ours, t_op = time_interleaved([torch_ref, ours, op])
                rows.append(dict(bench="gemm", op="grouped", engine="grouped_signal_gemm",
                                 num_ctas=cfg.num_ctas, median_ms=round(t_ours, 4),
                                 torch_ms=round(t_torch, 4), baseline=baseline,
                                 efficiency_vs_torch=round(t_torch / t_ours, 4),
                                 rel_err=err, **common))
                rows.append(dict(bench="overhead", op="all_to_all", engine="overlap",
                                 num_ctas=cfg.num_ctas, median_ms=round(t_op, 4),
                                 gemm_ms=round(t_ours, 4),
                                 overhead_vs_gemm=round(t_op / t_ours, 4), rel_err=err_op,
                                 **common))
                print(f"E={E:3d} K=N={size}: torch {t_torch:.3f} ms ({baseline}), grouped "
                      f"signal GEMM {t_ours:.3f} ms -> eff {t_torch / t_ours:.3f}; op "
                      f"{t_op:.3f} ms -> overhead {t_op / t_ours:.3f}; rel err {err:.1e}/"
                      f"{err_op:.1e}", flush=True)
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001 - one failing shape must not lose the rest
                rows.append(dict(bench="gemm", op="grouped", error=f"{type(exc).__name__}: "
                                 f"{exc}"[:500], **common))
                print(f"E={E} K=N={size}: FAILED {type(exc).__name__}: {exc}"[:600], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    effs = [r["efficiency_vs_torch"] for r in rows if "efficiency_vs_torch" in r]
    ovh = [r["overhead_vs_gemm"] for r in rows if "overhead_vs_gemm" in r]
    if effs:
        print(f"efficiency_vs_torch: median {statistics.median(effs):.3f}, min {min(effs):.3f}; "
              f"overhead_vs_gemm: median {statistics.median(ovh):.3f}, max {max(ovh):.3f}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
