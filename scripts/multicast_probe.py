"""Does TMA multicast in a 2-CTA cluster buy a Gluon GEMM clock under the power cap? (issue 14)

Role
----
At ``P = 116`` the signal GEMM is about 1 % behind cuBLASLt on the same 116 SMs, and
``gemm_clock_probe.py`` put the difference in the clock: at equal power (~691 W, the H200's
cap) cuBLASLt runs 1.7-3.2 % more MHz, with thread-block clusters of 4 and 8 at that SM
target -- clusters are how a Hopper GEMM multicasts an operand tile (one L2 read for several
CTAs), fewer bytes per FLOP, less power per clock (``results/2026-12-02-h200/clock-run3``).
Rewriting the warp-specialized signal GEMM (``flashoverlap/kernels/ws_signal_gemm.py``) as
a cluster kernel is a large change (its release protocol, split tail and epilogue), so this
probe measures the lever first, in a kernel built only for the comparison: the same
persistent, warp-specialized Gluon GEMM (a one-warp TMA loader, two MMA warpgroups, 128 x
256 x 64 tiles per CTA, 3 stages) in three variants that differ only in how B arrives:

* ``single``    -- no cluster; each CTA loads its own A and B tiles (what the signal GEMM does);
* ``cluster``   -- clusters of 2 CTAs on vertically adjacent tiles, each CTA still loading B;
* ``multicast`` -- the same clusters, the lead CTA's TMA writes the shared B tile into both
  CTAs' shared memory (``tma.async_load(..., multicast=True)``): B is read from L2 once per
  pair.  A slot's B half may be refilled only when both CTAs' MMAs are done with it, so its
  "empty" barrier is shared by the pair (both arrive, the lead's loader waits); the A half
  and the "ready" barriers stay per CTA.

Each variant first checks its result against ``torch.matmul`` (fp32 reference), then runs
back to back for ``--seconds`` at each ``P`` while ``nvidia-smi`` samples clock and power
(``gemm_clock_probe``'s phases: a settled clock, not a 100-ms window), interleaved with
torch.matmul on all SMs, cuBLASLt told to use ``P`` SMs and the signal GEMM itself at ``P``
(the tuner's configuration), all on ``bench_gemm.py``'s four rotating input sets.
``multicast`` against ``cluster`` is the lever; ``cluster`` against ``single`` is what the
cluster launch itself costs; ``single`` against ``signal`` says how far the probe is from the
product's kernel (its epilogue stores from registers, without the C buffer and bulk store).

Requires Triton's Gluon with multicast loads (Triton 3.9 has them; 3.6 -- the GPU image's --
does not: ``NYI: Support multicast``).  Compiled for sm_90 on the CPU (``--ptx``, and
``tests/test_multicast_probe_cpu.py``), Triton 3.9 emits ``cp.async.bulk.tensor ...
multicast::cluster`` issued by the lead CTA only (four 64-column boxes of the 256-column B
tile), the remote ``mbarrier.arrive.shared::cluster`` for the shared empty barrier, and,
before each multicast, a pairwise handshake between the two loaders that the compiler inserts
(a remote ``mbarrier.arrive.release.cluster`` and an ``acquire.cluster`` wait) -- no
cluster-wide barrier inside the K loop.

Measured (one H200, Triton 3.9.0, torch 2.11; ``results/2026-12-02-h200/multicast-run10``
and ``stages-run11``): all three variants match ``torch.matmul``; ``cluster`` takes
0.987-1.009 of ``single``'s time, ``multicast`` **1.27-1.33x** at a 19-25 % higher clock
(a stalled kernel's clock: at 8192^3 it still draws the 690 W cap); ``--stages 4`` does not
hide the loaders' rendezvous (1.29-1.32x), ``--stages 2`` makes it worse (1.51-1.65x).  The
lever is not reachable through Gluon's multicast as Triton 3.9 lowers it.

    python scripts/multicast_probe.py --out DIR [--shapes 4096x8192x2048,...] [--ctas 116,132]
    python scripts/multicast_probe.py --ptx      # compile for sm_90 only (no GPU), summarize
    python scripts/multicast_probe.py --summarize DIR/multicast-probe.json   # the table again

Writes ``DIR/<--name>.json`` (``bench="multicast_probe"`` rows) and prints a table.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from flashoverlap.kernels import LAUNCH_OPTIONS
from flashoverlap.kernels.offline_compile import compile_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm_clock_probe import chosen_variants, print_summaries  # noqa: E402

VARIANTS = {"single": (1, False), "cluster": (2, False), "multicast": (2, True)}
BM, BN, BK, STAGES, GROUP = 128, 256, 64, 3, 8
NUM_MMA_WARPS = 8
PTRS = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16"}
# each variant's constexprs (the kernel's last parameters)
VARIANT_META = {v: dict(BM=BM, BN=BN, BK=BK, STAGES=STAGES, GROUP=GROUP, CTAS=ctas,
                        MULTICAST=multicast)
                for v, (ctas, multicast) in VARIANTS.items()}
# each variant's launch and compile options (a program is a cluster of CTAS CTAs)
VARIANT_OPTIONS = {v: dict(num_warps=NUM_MMA_WARPS, num_ctas=ctas, **LAUNCH_OPTIONS)
                   for v, (ctas, _) in VARIANTS.items()}
SHAPES = "4096x8192x2048,8192x8192x2048,8192x8192x8192,6144x5120x4096"


def have_multicast() -> bool:
    """This Triton's Gluon TMA load takes ``multicast``."""
    import inspect
    load = getattr(tma, "async_load", None)  # Triton 3.6: async_copy_global_to_shared only
    if load is None:
        return False
    return "multicast" in inspect.signature(getattr(load, "__wrapped__", load)).parameters


@gluon.jit
def _tile(t, tiles_m, tiles_n, GROUP: gl.constexpr):
    """Grouped order: bands of GROUP cluster rows, column by column inside a band."""
    band = t // (GROUP * tiles_n)
    first = band * GROUP
    rows = gl.minimum(tiles_m - first, GROUP)
    r = t % (GROUP * tiles_n)
    return first + r % rows, r // rows


@gluon.jit
def _loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty_a, empty_b, tiles_m, tiles_n, K,
            CM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
            GROUP: gl.constexpr, MULTICAST: gl.constexpr):
    i = 0
    for t in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        tm, tn = _tile(t, tiles_m, tiles_n, GROUP)
        for k in range(0, K, BK):
            s = i % STAGES
            ph = ((i // STAGES) & 1) ^ 1
            mbarrier.wait(empty_a.index(s), ph)
            mbarrier.wait(empty_b.index(s), ph)
            mbarrier.expect(ready.index(s), a_desc.nbytes_per_cta + b_desc.nbytes_per_cta)
            tma.async_load(a_desc, [tm * CM, k], ready.index(s), a_bufs.index(s))
            tma.async_load(b_desc, [k, tn * BN], ready.index(s), b_bufs.index(s),
                           multicast=MULTICAST)
            i += 1


@gluon.jit
def _mma(a_bufs, b_bufs, ready, empty_a, empty_b, c_ptr, tiles_m, tiles_n, N, K,
         CM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
         GROUP: gl.constexpr, ACC_LAYOUT: gl.constexpr):
    i = 0
    for t in range(gl.program_id(0), tiles_m * tiles_n, gl.num_programs(0)):
        tm, tn = _tile(t, tiles_m, tiles_n, GROUP)
        acc = gl.zeros([CM, BN], gl.float32, ACC_LAYOUT)
        # one wgmma group in flight, as in the signal GEMM: a slot is released when the
        # group after the one that read it has been issued
        for k in range(0, K, BK):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=[acc])
            prev = (i + STAGES - 1) % STAGES
            mbarrier.arrive(empty_a.index(prev), pred=k > 0)
            mbarrier.arrive(empty_b.index(prev), pred=k > 0)
            i += 1
        acc = warpgroup_mma_wait(0, deps=[acc])
        last = (i + STAGES - 1) % STAGES
        mbarrier.arrive(empty_a.index(last))
        mbarrier.arrive(empty_b.index(last))
        rows = tm * CM + gl.arange(0, CM, gl.SliceLayout(1, ACC_LAYOUT))
        cols = tn * BN + gl.arange(0, BN, gl.SliceLayout(0, ACC_LAYOUT))
        gl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty))


@gluon.jit
def probe_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: gl.constexpr, BN: gl.constexpr,
                 BK: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr,
                 CTAS: gl.constexpr, MULTICAST: gl.constexpr):
    """``c = a @ b`` (row-major, every dimension a multiple of its block), one program per
    cluster of ``CTAS`` CTAs, persistent over ``[CTAS * BM, BN]`` cluster tiles."""
    CM: gl.constexpr = CTAS * BM
    if CTAS == 2:
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(
            [CM, BK], gl.bfloat16, cga_layout=[[1, 0]])
        b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(
            [BK, BN], gl.bfloat16, cga_layout=[[0, 0]])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, BN, 16], cga_layout=[[1, 0]])
    else:
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([CM, BK], gl.bfloat16)
        b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BK, BN], gl.bfloat16)
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, BN, 16])
    a_desc = tma.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1],
                                        block_shape=[CM, BK], layout=a_layout)
    b_desc = tma.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[N, 1],
                                        block_shape=[BK, BN], layout=b_layout)
    a_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, CM, BK], a_layout)
    b_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BK, BN], b_layout)
    ready = mbarrier.allocate_mbarrier(batch=STAGES)
    empty_a = mbarrier.allocate_mbarrier(batch=STAGES)
    # the B half of a slot is refilled by the lead's multicast: free only when both CTAs'
    # MMAs are done with it (both arrive on the lead's barrier; only the lead waits)
    empty_b = mbarrier.allocate_mbarrier(batch=STAGES, two_ctas=MULTICAST)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty_a.index(s), count=1)
        mbarrier.init(empty_b.index(s), count=1)
    tiles_m = M // CM
    tiles_n = N // BN
    gl.warp_specialize([
        (_mma, (a_bufs, b_bufs, ready, empty_a, empty_b, c_ptr, tiles_m, tiles_n, N, K, CM, BN,
                BK, STAGES, GROUP, acc_layout)),
        (_loader, (a_desc, b_desc, a_bufs, b_bufs, ready, empty_a, empty_b, tiles_m, tiles_n, K,
                   CM, BN, BK, STAGES, GROUP, MULTICAST)),
    ], [1], [40])


def _meta(variant: str, stages: int) -> dict:
    """The variant's constexprs with ``stages`` pipeline slots."""
    return {**VARIANT_META[variant], "STAGES": stages}


def compile_sm90(variant: str, stages: int = STAGES):
    """The variant compiled for sm_90 without a GPU (Triton's bundled ptxas)."""
    return compile_for(probe_kernel, PTRS, _meta(variant, stages), **VARIANT_OPTIONS[variant])


def ptx_summary(ptx: str) -> dict:
    """Counts of the instructions the docstring describes."""
    return {
        "multicast_loads": len(re.findall(r"\.multicast::cluster", ptx)),
        "cluster_barriers": len(re.findall(r"barrier\.cluster\.wait", ptx)),
        "remote_arrives": len(re.findall(r"mbarrier\.arrive[.\w]*\.shared::cluster", ptx)),
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
    }


def launch(variant: str, a, b, c, P: int, stages: int = STAGES) -> None:
    M, K = a.shape
    N = b.shape[1]
    probe_kernel[(P // VARIANTS[variant][0],)](a, b, c, M, N, K, **_meta(variant, stages),
                                               **VARIANT_OPTIONS[variant])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="result folder")
    p.add_argument("--name", default="multicast-probe")
    p.add_argument("--shapes", default=SHAPES, help="MxNxK, comma-separated")
    p.add_argument("--ctas", default="116,132", help="CTAs (P), comma-separated, even")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seconds", type=float, default=1.5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--stages", type=int, default=STAGES, choices=(2, 3, 4),
                   help="pipeline slots (48 KB of shared memory each per CTA)")
    p.add_argument("--ptx", action="store_true", help="compile for sm_90 only and summarize")
    p.add_argument("--summarize", nargs="+", type=Path, metavar="JSON",
                   help="only print the ratio table of result files (no GPU needed)")
    args = p.parse_args(argv)
    variants = chosen_variants(p, args.variants, VARIANTS)
    if args.summarize:
        return print_summaries(args.summarize, summarize)
    if not have_multicast():
        p.error(f"Triton {triton.__version__}'s Gluon has no multicast TMA load")
    if args.ptx:
        for v in variants:
            print(v, ptx_summary(compile_sm90(v, args.stages).asm["ptx"]))
        return 0
    if args.out is None:
        p.error("--out is required (or --ptx)")

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_common
    from bench_gemm import _Bench
    from gemm_clock_probe import _phase, _Sampler, write_rows

    from flashoverlap.kernels import gemm_config_for
    from flashoverlap.kernels import signal_gemm as sg
    from flashoverlap.plan import PlanConfig, Problem, make_plan

    ctas = [int(x) for x in args.ctas.split(",")]
    if any(P % 2 for P in ctas):
        p.error("--ctas must be even (clusters of two)")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    for M, N, K in shapes:
        if M % (2 * BM) or N % BN or K % BK:
            p.error(f"{M}x{N}x{K}: M must be a multiple of {2 * BM}, N of {BN}, K of {BK}")
    if not torch.cuda.is_available():
        print("multicast_probe.py needs a CUDA GPU (or --ptx)", file=sys.stderr)
        return 2
    dev = torch.device("cuda", 0)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    cap = torch.cuda.get_device_capability(dev)
    # workspace of the in-kernel TMA descriptors (one per program and CTA)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                 device=dev))
    bench_common.load_torch()  # provenance() reads bench_common's lazily imported torch
    prov = bench_common.provenance(dev)
    sampler = _Sampler()
    rows: list[dict] = []
    try:
        for M, N, K in shapes:
            # the inputs bench_gemm.py and gemm_clock_probe.py time (4 rotating sets, B
            # row-major), so torch.matmul, cuBLASLt on P SMs and the signal GEMM run beside
            # the probe's variants on the same data
            bench = _Bench(torch, triton, sg, M, N, K, torch.bfloat16, "kn", 4)
            a, b = bench.sets[0]
            want = a.float() @ b.float()
            scale = want.abs().max().item()
            c = bench.c[0]
            for v in variants:
                for P in ctas:
                    c.fill_(float("nan"))
                    launch(v, a, b, c, P, args.stages)
                    torch.cuda.synchronize()
                    err = (c.float() - want).abs().max().item() / scale
                    if not err < 2e-2:  # NaN (unwritten) fails too
                        raise SystemExit(f"{v} P={P} {M}x{N}x{K}: max error {err:.3g} of "
                                         f"max |c|: the probe is wrong, no timing")
            del want

            def probe_fn(v, P, bench=bench):  # bound now: `bench` is deleted per shape
                return bench._rotating(lambda i: launch(v, *bench.sets[i], bench.c[i], P,
                                                        args.stages))

            phases = [("torch", None, bench._rotating(bench._torch_run))]
            for P in ctas:
                choice = gemm_config_for(M, N, K, "bfloat16", P, cap)
                plan = make_plan(Problem(M, N, K, "bfloat16", 1, "all_reduce"),
                                 PlanConfig(block_m=choice.config.block_m,
                                            block_n=choice.config.block_n, num_ctas=P,
                                            group_m=choice.group_m))
                phases += [("cublaslt", P, bench.torch_sm_target_fn(sms - P)),
                           ("signal", P, bench.signal_fn(plan, choice.config))]
                phases += [(v, P, probe_fn(v, P)) for v in variants]
            for rnd in range(args.rounds):
                for engine, P, fn in phases:
                    r = _phase(torch, fn, sampler, args.seconds)
                    rows.append({**prov, "bench": "multicast_probe", "op": "matmul",
                                 "dtype": "bfloat16", "world_size": 1, "b_layout": "kn",
                                 "M": M, "N": N, "K": K, "engine": engine, "num_ctas": P,
                                 "stages": args.stages, "sms": sms, "round": rnd, **r})
                    print(f"{M}x{N}x{K} round {rnd} {engine:>9} P={P}: "
                          f"{r['median_ms']:.4f} ms {r['sm_clock_mhz'] or 0:.0f} MHz "
                          f"{r['power_w'] or 0:.0f} W", flush=True)
            del bench
            torch.cuda.empty_cache()
    finally:
        sampler.stop()
    write_rows(args.out, args.name, rows, summarize,
               "time and clock against the probe without clusters, mean of the rounds:")
    return 0


def summarize(rows: list[dict]) -> list[str]:
    """Per shape and ``P``: the ``single`` variant's ms and MHz, then every other engine's
    time and clock as ratios to it (mean over the rounds)."""
    by: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        if r["num_ctas"] is not None:
            by.setdefault((r["M"], r["N"], r["K"], r["num_ctas"]), {}).setdefault(
                r["engine"], []).append(r)
    lines = []
    for (M, N, K, P), engines in sorted(by.items()):
        base = engines.get("single")
        if not base:
            continue
        t0 = statistics.mean(r["median_ms"] for r in base)
        c0 = statistics.mean(r["sm_clock_mhz"] or 0 for r in base)
        cells = [f"{M}x{N}x{K} P={P}: single {t0:.4f} ms {c0:.0f} MHz"]
        for engine, rs in sorted(engines.items()):
            if engine == "single":
                continue
            t = statistics.mean(r["median_ms"] for r in rs) / t0
            c = statistics.mean(r["sm_clock_mhz"] or 0 for r in rs) / c0 if c0 else float("nan")
            cells.append(f"{engine} {t:.3f} (clock {c:.3f})")
        lines.append(" | ".join(cells))
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
