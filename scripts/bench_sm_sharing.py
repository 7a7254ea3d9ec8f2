"""Do NCCL-shaped kernels start beside the persistent signal GEMM?  (issue 14, one GPU)

Role
----
Issue 14 asks whether NCCL's CTAs co-reside with the signal GEMM at ``P`` = all SMs, given the
GEMM's register and shared-memory budget.  This benchmark answers it on one GPU (world size
1, no communicator): while the signal GEMM runs ``P`` persistent CTAs, a *probe* kernel with
NCCL's CTA shape (threads, registers, shared memory, cluster size) is launched on a
high-priority stream.  It reports whether the probe's CTAs start at once -- beside GEMM CTAs
or on SMs the GEMM left free (``P`` < SMs) -- or only when the GEMM ends, and what a probe
that does run alongside costs the GEMM.

Why
---
Stream priority only orders the CTAs that are *waiting* to be dispatched; it never preempts
a CTA that is running.  The persistent GEMM keeps each of its CTAs resident until its last
tile, so a collective launched during it starts only where an SM still has registers, shared
memory, thread slots and a CTA slot left beside a GEMM CTA, or on SMs without one.  If
NCCL's CTAs fit nowhere, every collective the overlap engine issues waits for the GEMM and
nothing overlaps.  An analytic occupancy model (:func:`fits_beside`) predicts the answer from
the two CTA shapes; the measurement checks it.

Method
------
* **Probe kernel** (CuPy ``RawKernel``, NVRTC): ``T`` threads, dynamic shared memory ``S``
  (touched), optionally a compile-time cluster of ``c`` CTAs (``__cluster_dims__``), compiled
  with ``--maxrregcount=R``.  Each thread spins ``--probe-us`` (``%globaltimer``) updating
  ``R - 12`` independent FMA accumulators that are all summed and stored at the end, so ptxas
  needs about ``R`` registers; the count the driver reports (``num_regs``) is what every row
  shows.  Thread 0 records ``%globaltimer`` at entry and exit and ``%smid``.  No
  ``__launch_bounds__``: with it ptxas ignores ``--maxrregcount`` (nvcc 13.0, sm_90: a
  32-register target compiled to 39-55 registers), and ``__maxnreg__`` cannot be combined
  with it.
* **GEMM markers**: a 1-thread kernel on the GEMM's stream right before the GEMM (it first
  spins ``--gate-us``, so the GEMM is already queued when it ends: no launch gap) and right
  after it.  Stream order gives ``before.exit <= GEMM start`` and ``after.entry >= GEMM end``.
* **One sample**: synchronize (GPU idle); on a normal-priority stream: event ``E0``, marker,
  GEMM, marker; the host busy-waits ``--delay-us`` after the GEMM launch (much less than the
  GEMM's time); on a high-priority stream: event ``EP``, probe.  The probe's launch time on
  the GPU clock is ``before.entry + (EP - E0)`` (CUDA event clock; a few microseconds
  late, as ``E0`` precedes the marker's entry, so start latencies read a little short).
  A sample is invalid (dropped, counted) if a probe CTA started before the GEMM did or if
  the probe was launched less than ``--margin-us`` before the GEMM ended.
* **One scenario** (GEMM config x ``P`` x probe shape): ``--reps`` samples with the probe,
  interleaved with as many without it (same host delay).  Reported: probe CTAs that started
  before the GEMM ended (``started_during_gemm``, of ``--probe-ctas``) and within
  ``--at-once-us`` of the launch (``started_at_once``); first and median probe start after
  the GEMM's start and median start minus the GEMM's end (negative: during the GEMM); start
  latency after the launch; distinct SMs the probe ran on; probe duration; the GEMM's time
  alone (``median_ms``) and with the probe (``gemm_cost`` = with / alone, medians).
* **Matrix**: ``P`` in {SMs, SMs-8, SMs-16}; the default :class:`GemmConfig` and the same with
  ``max_registers`` 168 and 128 (skipped, with a note, where ``GemmConfig`` has no such
  field); probe shapes below.  The GEMM is the product's launch for the plan: on sm_90 whole tiles run
  the warp-specialized kernel (12 warps, 208 KB of shared memory: nothing fits beside it),
  while a ``max_registers`` cap takes the pipelined kernel; each row records ``kernel``.  The GEMM's own registers and shared memory (Triton's compiled
  kernel) are printed per configuration and stored in every row.

NCCL's CTA shape (assumptions, from NCCL's source; not measured here)
---------------------------------------------------------------------
* Threads: chosen per launch, up to ``NCCL_MAX_NTHREADS`` = 640 (LL128; simple and LL use
  up to 512, some algorithms one more warp).  Every probe with NCCL's shape uses 640: the
  largest CTA NCCL launches.
* Registers: NCCL's kernels are built with ``__launch_bounds__(NCCL_MAX_NTHREADS, 1)``, which
  caps them at 96 on sm_90.  ``--nccl-lib`` / ``cuobjdump -res-usage`` reads the real counts
  of ``ncclDevKernel*`` from the library torch uses (the ``nccl-measured`` probe).
* Shared memory: static (``SHARED`` in cuobjdump) plus the dynamic size NCCL passes at every
  launch, ``ncclShmemDynamicSize(cudaArch)`` = 20 warps x ``(8 * 32 + 1) * 16`` B = 82240 B on
  sm_80+ (NCCL 2.18-2.19 ``device.h``; other versions may differ): ``--probe-smem``.
* Clusters: NCCL >= 2.17 defaults ``cgaClusterSize`` to 4 and launches with that cluster
  dimension on sm_90 (``NCCL_CGA_CLUSTER_SIZE``), so ``nccl-like`` uses clusters of 4 CTAs
  (co-scheduled within one GPC); ``nccl-like-c1`` is the same CTA without a cluster.
* CTAs: one per channel, ``--probe-ctas`` (16, a typical one-node channel count).

The prediction (:func:`fits_beside`) models one SM as a flat register file allocated per
warp in 256-register units, shared memory in 128-byte units plus 1 KiB reserved per CTA,
2048 threads and 32 CTA slots.  It ignores the four register-file quarters (warps are spread
over them), clusters and the GPC placement of the GEMM's CTAs: treat it as an upper bound.

Run (one H200, defaults about a minute, most of it compiling; nothing else on the GPU)::

    python scripts/bench_sm_sharing.py --out DIR
    python scripts/bench_sm_sharing.py --quick          # P = SMs, default config, 3 probes

Writes ``DIR/sm-sharing.json`` (default ``results/<date>-<machine>/``): one row per
scenario plus a ``nccl_kernels`` row (what cuobjdump found).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent

# NCCL's launch shape (see the module docstring for where each number comes from).
NCCL_MAX_NTHREADS = 640
NCCL_LAUNCH_BOUNDS_REGS = 96
NCCL_DYNAMIC_SMEM_SM90 = 20 * (8 * 32 + 1) * 16  # ncclShmemDynamicSize(900), NCCL 2.18-2.19
NCCL_CGA_CLUSTER_SIZE = 4
NCCL_KERNEL_NAME = re.compile(r"ncclDevKernel|ncclKernel_")

# Accumulators the probe keeps live below its register target: with --maxrregcount=R ptxas
# (nvcc 13.0, sm_90) fits R - 12 accumulators plus the loop without spilling and reports
# R - 1 registers for R in {32, 64, 96, 168}.
PROBE_REGISTER_OVERHEAD = 12


# --------------------------------------------------------------------------------------
# Occupancy model (pure Python)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CtaShape:
    """What one CTA of a kernel holds on an SM while it runs.

    Attributes:
        threads: threads per CTA.
        regs_per_thread: registers per thread (``num_regs`` of the compiled kernel).
        smem_bytes: shared memory per CTA, static plus dynamic, in bytes.
        reallocates_registers: the kernel moves registers between its warpgroups at run time
            (``setmaxnreg``, the warp-specialized GEMM).  Modelled as holding the SM's whole
            register file: on one H200 not even a 32-thread, 31-register CTA started beside
            such a GEMM CTA (168 x 384 registers leave 1,024 free), ``wssplit-run3``.
    """

    threads: int
    regs_per_thread: int
    smem_bytes: int = 0
    reallocates_registers: bool = False


@dataclasses.dataclass(frozen=True)
class SmLimits:
    """Resources of one streaming multiprocessor (defaults: Hopper, H100/H200).

    Attributes:
        regs: 32-bit registers per SM.
        max_threads: resident threads per SM.
        max_ctas: resident CTAs per SM.
        smem: shared memory per SM in bytes (228 KiB).
        smem_per_cta_reserved: shared memory the system reserves per CTA (1 KiB on sm_80+).
        reg_alloc_unit: registers are allocated per warp in units of this many.
        max_regs_per_thread: most registers one thread can have.
        smem_alloc_unit: shared memory is allocated per CTA in units of this many bytes.
        warp_size: threads per warp.
    """

    regs: int = 65536
    max_threads: int = 2048
    max_ctas: int = 32
    smem: int = 233472
    smem_per_cta_reserved: int = 1024
    reg_alloc_unit: int = 256
    max_regs_per_thread: int = 255
    smem_alloc_unit: int = 128
    warp_size: int = 32


H100_SM = SmLimits()


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _check_cta(cta: CtaShape, sm: SmLimits) -> None:
    if not 1 <= cta.threads <= 1024:
        raise ValueError(f"a CTA has 1 to 1024 threads, got {cta.threads}")
    if not 0 <= cta.regs_per_thread <= sm.max_regs_per_thread:
        raise ValueError(f"registers per thread must be in [0, {sm.max_regs_per_thread}], "
                         f"got {cta.regs_per_thread}")
    if cta.smem_bytes < 0:
        raise ValueError(f"shared memory must be >= 0, got {cta.smem_bytes}")


def regs_per_cta(cta: CtaShape, sm: SmLimits = H100_SM) -> int:
    """Registers one CTA takes: its warps, each ``regs * 32`` rounded up to the unit (the
    whole register file for a kernel that reallocates registers with ``setmaxnreg``)."""
    if cta.reallocates_registers:
        return sm.regs
    warps = -(-cta.threads // sm.warp_size)
    return warps * _round_up(cta.regs_per_thread * sm.warp_size, sm.reg_alloc_unit)


def smem_per_cta(cta: CtaShape, sm: SmLimits = H100_SM) -> int:
    """Shared memory one CTA takes: its bytes rounded up to the unit, plus the reserve."""
    return _round_up(cta.smem_bytes, sm.smem_alloc_unit) + sm.smem_per_cta_reserved


def fits_on_sm(resident: Sequence[CtaShape], probe: CtaShape, sm: SmLimits = H100_SM) -> int:
    """How many ``probe`` CTAs fit on one SM that already runs the ``resident`` CTAs.

    The smallest of what is left of each resource (registers, shared memory, threads, CTA
    slots) divided by what one probe CTA takes; 0 where the residents already exceed it.
    """
    for cta in (*resident, probe):
        _check_cta(cta, sm)
    left = {
        "regs": sm.regs - sum(regs_per_cta(c, sm) for c in resident),
        "smem": sm.smem - sum(smem_per_cta(c, sm) for c in resident),
        "threads": sm.max_threads - sum(_round_up(c.threads, sm.warp_size) for c in resident),
        "ctas": sm.max_ctas - len(resident),
    }
    need = {
        "regs": regs_per_cta(probe, sm),
        "smem": smem_per_cta(probe, sm),
        "threads": _round_up(probe.threads, sm.warp_size),
        "ctas": 1,
    }
    if any(v < 0 for v in left.values()):
        return 0
    return min(left[k] // need[k] for k in need if need[k] > 0)


def fits_beside(gemm: CtaShape, probe: CtaShape, sm: SmLimits = H100_SM) -> int:
    """How many ``probe`` CTAs fit on one SM that already runs one ``gemm`` CTA."""
    return fits_on_sm((gemm,), probe, sm)


def predicted_immediate_ctas(gemm: CtaShape, probe: CtaShape, sms: int, gemm_ctas: int,
                             probe_ctas: int, sm: SmLimits = H100_SM) -> int:
    """Probe CTAs that can start at once while a persistent GEMM holds ``gemm_ctas`` SMs
    (one CTA each): ``fits_beside`` on each GEMM SM plus ``fits_on_sm(())`` on each free
    one, at most ``probe_ctas`` (clusters and GPC placement not modelled)."""
    free = max(0, sms - gemm_ctas)
    room = free * fits_on_sm((), probe, sm) + min(gemm_ctas, sms) * fits_beside(gemm, probe, sm)
    return min(probe_ctas, room)


def sm_limits_for(props: Any) -> SmLimits:
    """:class:`SmLimits` from ``torch.cuda.get_device_properties`` (Hopper values where a
    property is missing; CTA slots, allocation units and the reserve are not reported)."""
    return dataclasses.replace(
        H100_SM,
        regs=int(getattr(props, "regs_per_multiprocessor", H100_SM.regs) or H100_SM.regs),
        max_threads=int(getattr(props, "max_threads_per_multi_processor", H100_SM.max_threads)
                        or H100_SM.max_threads),
        smem=int(getattr(props, "shared_memory_per_multiprocessor", H100_SM.smem)
                 or H100_SM.smem),
    )


# --------------------------------------------------------------------------------------
# Probe shapes and kernel sources (pure Python)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeShape:
    """A probe kernel's launch shape: ``threads`` per CTA, a register target, dynamic shared
    memory in bytes and the compile-time cluster size (1: no cluster)."""

    name: str
    threads: int
    regs: int
    smem: int = 0
    cluster: int = 1

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"probe name must be [A-Za-z0-9_.-]+, got {self.name!r}")
        if not 1 <= self.threads <= 1024:
            raise ValueError(f"probe threads must be in [1, 1024], got {self.threads}")
        if not 24 <= self.regs <= 255:
            raise ValueError(f"probe register target must be in [24, 255], got {self.regs}")
        if self.smem < 0:
            raise ValueError(f"probe shared memory must be >= 0, got {self.smem}")
        if not 1 <= self.cluster <= 8:
            raise ValueError(f"probe cluster size must be in [1, 8], got {self.cluster}")

    def cta(self, regs: int | None = None) -> CtaShape:
        """The CTA it occupies, with the compiled register count where known."""
        return CtaShape(self.threads, self.regs if regs is None else regs, self.smem)


def default_probe_shapes(nccl_smem: int = NCCL_DYNAMIC_SMEM_SM90,
                         nccl_cluster: int = NCCL_CGA_CLUSTER_SIZE) -> tuple[ProbeShape, ...]:
    """NCCL's CTA (with and without its cluster and shared memory) and smaller CTAs."""
    T, R = NCCL_MAX_NTHREADS, NCCL_LAUNCH_BOUNDS_REGS
    return (
        ProbeShape("nccl-like", T, R, nccl_smem, nccl_cluster),
        ProbeShape("nccl-like-c1", T, R, nccl_smem, 1),
        ProbeShape("nccl-regs", T, R, 0, 1),
        ProbeShape("t512-r96", 512, 96),
        ProbeShape("t256-r96", 256, 96),
        ProbeShape("t128-r64", 128, 64),
        ProbeShape("tiny", 32, 32),
    )


QUICK_PROBES = ("nccl-like", "nccl-regs", "tiny")


def parse_probe_spec(text: str) -> ProbeShape:
    """``NAME:THREADS:REGS[:SMEM[:CLUSTER]]`` (``--probe-add``)."""
    parts = text.split(":")
    if not 3 <= len(parts) <= 5:
        raise ValueError(f"probe spec must be NAME:THREADS:REGS[:SMEM[:CLUSTER]], got {text!r}")
    try:
        numbers = [int(p) for p in parts[1:]]
    except ValueError:
        raise ValueError(f"probe spec numbers must be integers, got {text!r}") from None
    return ProbeShape(parts[0], *numbers)


def nccl_measured_probe(usage: dict[str, Any], dynamic_smem: int,
                        cluster: int) -> ProbeShape | None:
    """The ``nccl-measured`` probe from a :func:`summarize_nccl_usage` summary: 640 threads,
    the largest register count, the largest static shared memory plus the dynamic size."""
    if not usage.get("count"):
        return None
    regs = min(255, max(24, int(usage["reg_max"])))  # ProbeShape's range
    return ProbeShape("nccl-measured", NCCL_MAX_NTHREADS, regs,
                      int(usage["shared_max"]) + dynamic_smem, cluster)


def probe_accumulators(regs: int) -> int:
    """Live fp32 accumulators for a register target (see PROBE_REGISTER_OVERHEAD)."""
    return max(1, regs - PROBE_REGISTER_OVERHEAD)


_TIMER_HELPERS = r"""
__device__ __forceinline__ unsigned long long probe_globaltimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ unsigned int probe_smid() {
    unsigned int id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    return id;
}
"""

_PROBE_BODY = r"""
extern "C" __global__ void @CLUSTER@ sm_probe(
        unsigned long long* __restrict__ start_ns, unsigned long long* __restrict__ end_ns,
        unsigned int* __restrict__ smid, float* __restrict__ sink,
        unsigned long long spin_ns, float mul, float add, int smem_words) {
    extern __shared__ float probe_smem[];
    const unsigned long long t0 = probe_globaltimer();
    if (threadIdx.x == 0) start_ns[blockIdx.x] = t0;
    for (int i = threadIdx.x; i < smem_words; i += blockDim.x) probe_smem[i] = (float)i;
    float acc[@NACC@];
#pragma unroll
    for (int i = 0; i < @NACC@; ++i) acc[i] = (float)(threadIdx.x + i);
    __syncthreads();
    unsigned long long now = t0;
    while (now - t0 < spin_ns) {
#pragma unroll
        for (int i = 0; i < @NACC@; ++i) acc[i] = __fmaf_rn(acc[i], mul, add);
        now = probe_globaltimer();
    }
    float total = smem_words > 0 ? probe_smem[(threadIdx.x * 7) % smem_words] : 0.0f;
#pragma unroll
    for (int i = 0; i < @NACC@; ++i) total += acc[i];
    sink[blockIdx.x * blockDim.x + threadIdx.x] = total;
    __syncthreads();
    if (threadIdx.x == 0) {
        end_ns[blockIdx.x] = probe_globaltimer();
        smid[blockIdx.x] = probe_smid();
    }
}
"""

_MARKER_BODY = r"""
extern "C" __global__ void gemm_marker(unsigned long long* __restrict__ slots, int index,
                                       unsigned long long wait_ns) {
    const unsigned long long t0 = probe_globaltimer();
    while (probe_globaltimer() - t0 < wait_ns) { }
    slots[2 * index] = t0;
    slots[2 * index + 1] = probe_globaltimer();
}
"""


def probe_source(shape: ProbeShape) -> str:
    """CUDA source of the probe kernel ``sm_probe`` for one shape (compile it with
    ``--maxrregcount=shape.regs``; launch ``shape.threads`` threads, ``shape.smem`` bytes)."""
    cluster = f"__cluster_dims__({shape.cluster}, 1, 1)" if shape.cluster > 1 else ""
    body = _PROBE_BODY.replace("@NACC@", str(probe_accumulators(shape.regs)))
    return _TIMER_HELPERS + body.replace("@CLUSTER@", cluster)


def marker_source() -> str:
    """CUDA source of ``gemm_marker``: waits ``wait_ns``, then stores its entry and exit
    ``%globaltimer`` in ``slots[2 * index]`` and ``slots[2 * index + 1]``."""
    return _TIMER_HELPERS + _MARKER_BODY


# --------------------------------------------------------------------------------------
# NCCL's kernels: cuobjdump -res-usage (pure Python parsing, tolerant tool calls)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelUsage:
    """One ``Function`` entry of ``cuobjdump -res-usage``: name, the ELF's arch (or None),
    registers, stack, static shared and local memory in bytes."""

    name: str
    arch: str | None
    regs: int
    stack: int
    shared: int
    local: int


_ARCH_LINE = re.compile(r"^\s*arch\s*=\s*(sm_\w+)")
_FUNCTION_LINE = re.compile(r"^\s*Function\s+(.+?):\s*((?:REG|STACK|SHARED|LOCAL):.*)?$")
_RESOURCE = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")


def parse_res_usage(text: str, name_pattern: re.Pattern[str] = NCCL_KERNEL_NAME
                    ) -> list[KernelUsage]:
    """``Function NAME:`` entries of ``cuobjdump -res-usage`` output whose name matches.

    Format (one ELF per ``arch = sm_XX`` header)::

        arch = sm_90
        ...
        Resource usage:
         Common:
          GLOBAL:0
         Function _Z21ncclDevKernel_Generic19ncclDevKernelArgs4K:
          REG:96 STACK:0 SHARED:1664 LOCAL:0 CONSTANT[0]:1456 TEXTURE:0 SURFACE:0 SAMPLER:0

    The resources may also follow the name on the same line.  Entries without a ``REG``
    field are skipped.
    """
    found: list[KernelUsage] = []
    arch: str | None = None
    pending: str | None = None
    for line in text.splitlines():
        m = _ARCH_LINE.match(line)
        if m:
            arch, pending = m.group(1), None
            continue
        m = _FUNCTION_LINE.match(line)
        if m:
            pending = m.group(1).strip()
            line = m.group(2) or ""
        if pending is None:
            continue
        fields = dict(_RESOURCE.findall(line))
        if "REG" not in fields:
            continue
        if name_pattern.search(pending):
            found.append(KernelUsage(pending, arch, int(fields["REG"]),
                                     int(fields.get("STACK", 0)), int(fields.get("SHARED", 0)),
                                     int(fields.get("LOCAL", 0))))
        pending = None
    return found


def summarize_nccl_usage(usages: Sequence[KernelUsage], arch: str | None) -> dict[str, Any]:
    """Count and min/median/max of REG and SHARED over the kernels of ``arch`` (all of
    them, with a note, if none was built for it or the output names no arch)."""
    chosen = [u for u in usages if arch is not None and u.arch == arch]
    note = None
    if not chosen:
        chosen = list(usages)
        if chosen and arch is not None:
            note = f"no entry for {arch}; statistics over all {len(chosen)} entries"
    summary: dict[str, Any] = {"count": len(chosen), "arch": arch if not note else None}
    if chosen:
        regs = [u.regs for u in chosen]
        shared = [u.shared for u in chosen]
        summary.update(reg_min=min(regs), reg_median=statistics.median(regs),
                       reg_max=max(regs), shared_min=min(shared),
                       shared_median=statistics.median(shared), shared_max=max(shared),
                       local_max=max(u.local for u in chosen),
                       names=sorted({u.name for u in chosen})[:8])
    if note:
        summary["note"] = note
    return summary


def find_nccl_library(explicit: str | None) -> str | None:
    """``--nccl-lib``, else the library flashoverlap's binding would load (the one mapped
    into this process, then the nvidia-nccl wheel), torch's lib folder, ``ldconfig -p``."""
    if explicit:
        return explicit
    candidates: list[str] = []
    try:
        from flashoverlap.nccl_lib import find_nccl_library as binding_candidates

        candidates.extend(binding_candidates())
    except Exception:  # noqa: BLE001 - provenance only
        pass
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin:
        candidates.extend(sorted(str(p) for p in (Path(spec.origin).parent / "lib")
                                 .glob("libnccl.so*")))
    candidates.extend(_ldconfig_nccl())
    return next((c for c in candidates if os.path.isfile(c)), None)


def _ldconfig_nccl() -> list[str]:
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=20,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split("=>")[-1].strip() for line in out.splitlines()
            if "libnccl.so" in line and "=>" in line]


def find_cuobjdump(explicit: str | None) -> str | None:
    """``--cuobjdump``, else ``PATH``, ``$CUDA_HOME/bin``, ``/usr/local/cuda/bin`` or the
    nvidia-cuda-cuobjdump wheel."""
    if explicit:
        return explicit
    found = shutil.which("cuobjdump")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in filter(None, roots):
        path = Path(root) / "bin" / "cuobjdump"
        if path.is_file():
            return str(path)
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for pattern in ("cuda_cuobjdump/bin/cuobjdump", "cu1*/bin/cuobjdump"):
            hits = sorted(Path(root).glob(pattern))
            if hits:
                return str(hits[0])
    return None


def nccl_kernel_usage(library: str | None, cuobjdump: str | None, arch: str | None,
                      timeout_s: float = 60.0) -> dict[str, Any]:
    """What ``cuobjdump -res-usage`` says about NCCL's kernels; never raises (a ``note``
    says what was missing or failed)."""
    result: dict[str, Any] = {"nccl_lib": library, "cuobjdump": cuobjdump, "count": 0}
    if library is None:
        result["note"] = "no libnccl found (pass --nccl-lib)"
        return result
    if cuobjdump is None:
        result["note"] = "no cuobjdump found (pass --cuobjdump, or install the CUDA toolkit)"
        return result
    attempts = ([["-arch", arch]] if arch else []) + [[]]
    for extra in attempts:  # this arch's ELFs only (fast), then every ELF
        try:
            proc = subprocess.run([cuobjdump, *extra, "-res-usage", library],
                                  capture_output=True, text=True, timeout=timeout_s,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            result["note"] = f"cuobjdump failed: {type(exc).__name__}: {exc}"[:300]
            return result
        usages = parse_res_usage(proc.stdout)
        if usages:
            result.update(summarize_nccl_usage(usages, arch))
            return result
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        result["note"] = (f"cuobjdump {' '.join(extra)} exit {proc.returncode}: no "
                          f"ncclDevKernel entries; {tail[0]}")[:300]
    return result


# --------------------------------------------------------------------------------------
# Sample analysis (pure Python)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    """Raw ``%globaltimer`` readings (ns) of one run of the GEMM.

    ``before_*`` / ``after_*``: entry and exit of the markers around the GEMM.
    ``probe_launch_ns``: the probe's launch on the same clock (None: no probe).  ``starts``,
    ``ends``, ``smids``: per probe CTA.
    """

    before_entry: int
    before_exit: int
    after_entry: int
    after_exit: int
    probe_launch_ns: float | None = None
    starts: tuple[int, ...] = ()
    ends: tuple[int, ...] = ()
    smids: tuple[int, ...] = ()

    @property
    def gemm_start(self) -> int:
        return self.before_exit

    @property
    def gemm_end(self) -> int:
        return self.after_entry

    @property
    def gemm_us(self) -> float:
        return (self.gemm_end - self.gemm_start) / 1e3


@dataclasses.dataclass(frozen=True)
class ProbeTiming:
    """One sample with the probe, relative to the GEMM (microseconds)."""

    valid: bool
    reason: str
    gemm_us: float
    launch_us: float  # probe launch after the GEMM's start
    started_during_gemm: int
    started_at_once: int
    first_start_us: float  # after the GEMM's start
    median_start_us: float
    last_start_us: float
    start_vs_gemm_end_us: float  # median start minus the GEMM's end (< 0: during it)
    first_latency_us: float  # start minus launch
    median_latency_us: float
    probe_sms: int
    probe_us: float  # median CTA duration


def sample_problem(sample: Sample, margin_us: float) -> str:
    """Why a sample with the probe cannot be used ('' if it can)."""
    if sample.gemm_end <= sample.gemm_start:
        return "markers out of order"
    if not sample.starts or min(sample.starts) == 0 or min(sample.ends) == 0:
        return "probe output missing"
    if min(sample.starts) < sample.gemm_start:
        return "probe started before the GEMM"
    if sample.probe_launch_ns is None:
        return "probe launch time unknown"
    if sample.probe_launch_ns > sample.gemm_end - margin_us * 1e3:
        return "GEMM ended before the probe was launched (lower --delay-us)"
    return ""


def time_probe(sample: Sample, margin_us: float, at_once_us: float) -> ProbeTiming:
    """The probe's starts against the GEMM and its launch (see :class:`ProbeTiming`)."""
    reason = sample_problem(sample, margin_us)
    starts = sorted(sample.starts)
    g0, g1 = sample.gemm_start, sample.gemm_end
    launch = sample.probe_launch_ns if sample.probe_launch_ns is not None else float("nan")
    median_start = statistics.median(starts) if starts else float("nan")
    durations = [e - s for s, e in zip(sample.starts, sample.ends)]
    return ProbeTiming(
        valid=not reason, reason=reason, gemm_us=sample.gemm_us,
        launch_us=(launch - g0) / 1e3,
        started_during_gemm=sum(s < g1 for s in starts),
        started_at_once=sum(s - launch <= at_once_us * 1e3 for s in starts),
        first_start_us=(starts[0] - g0) / 1e3 if starts else float("nan"),
        median_start_us=(median_start - g0) / 1e3,
        last_start_us=(starts[-1] - g0) / 1e3 if starts else float("nan"),
        start_vs_gemm_end_us=(median_start - g1) / 1e3,
        first_latency_us=(starts[0] - launch) / 1e3 if starts else float("nan"),
        median_latency_us=(median_start - launch) / 1e3,
        probe_sms=len(set(sample.smids)),
        probe_us=statistics.median(durations) / 1e3 if durations else float("nan"),
    )


def summarize_scenario(with_probe: Sequence[ProbeTiming],
                       alone_us: Sequence[float]) -> dict[str, Any]:
    """Medians over the valid samples with the probe, the GEMM alone, and their ratio."""
    valid = [t for t in with_probe if t.valid]
    out: dict[str, Any] = {
        "samples": len(with_probe), "samples_valid": len(valid),
        "median_ms": statistics.median(alone_us) / 1e3 if alone_us else None,
    }
    reasons = sorted({t.reason for t in with_probe if not t.valid})
    if reasons:
        out["invalid_reasons"] = reasons
    if not valid:
        return out
    ints = ("started_during_gemm", "started_at_once", "probe_sms")
    floats = ("launch_us", "first_start_us", "median_start_us", "last_start_us",
              "start_vs_gemm_end_us", "first_latency_us", "median_latency_us", "probe_us")
    for name in ints:
        out[name] = statistics.median_low([getattr(t, name) for t in valid])
    out["started_during_gemm_min"] = min(t.started_during_gemm for t in valid)
    out["started_during_gemm_max"] = max(t.started_during_gemm for t in valid)
    for name in floats:
        out[name] = round(statistics.median([getattr(t, name) for t in valid]), 2)
    with_ms = statistics.median([t.gemm_us for t in valid]) / 1e3
    out["gemm_with_probe_ms"] = with_ms
    if out["median_ms"]:
        out["gemm_cost"] = with_ms / out["median_ms"]
    return out


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for the method and the "
                                       "assumptions about NCCL's CTA shape.")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: results/<date>-<machine>)")
    p.add_argument("--machine", default=None, help="machine tag of the default folder name")
    p.add_argument("--name", default="sm-sharing", help="result file name (without .json)")
    p.add_argument("--quick", action="store_true",
                   help=f"P = SMs only, default config only, probes {','.join(QUICK_PROBES)}, "
                        "3 repetitions")
    p.add_argument("--m", type=int, default=16384)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--k", type=int, default=8192)
    p.add_argument("--group-m", type=int, default=8, help="plan swizzle width")
    p.add_argument("--cta-offsets", default="0,8,16", help="P = SMs - offset, comma-separated")
    p.add_argument("--max-registers", default="168,128",
                   help="GemmConfig.max_registers caps to measure besides the default "
                        "(comma-separated; empty: none)")
    p.add_argument("--cluster-ctas", default="",
                   help="GemmConfig.cluster_ctas values to measure besides the default (the "
                        "CUDA C cluster kernel; comma-separated; empty: none)")
    p.add_argument("--probes", default=None,
                   help="comma-separated probe names (default: all of "
                        f"{','.join(s.name for s in default_probe_shapes())}, nccl-measured)")
    p.add_argument("--probe-add", action="append", default=[], metavar="NAME:T:R[:S[:C]]",
                   help="extra probe shape (threads, register target, smem bytes, cluster)")
    p.add_argument("--probe-smem", type=int, default=NCCL_DYNAMIC_SMEM_SM90,
                   help="dynamic shared memory of NCCL's CTA, bytes (nccl-like, nccl-measured)")
    p.add_argument("--probe-cluster", type=int, default=NCCL_CGA_CLUSTER_SIZE,
                   help="cluster size of nccl-like / nccl-measured (NCCL's cgaClusterSize)")
    p.add_argument("--probe-ctas", type=int, default=16, help="probe CTAs (NCCL channels)")
    p.add_argument("--probe-us", type=float, default=200.0, help="probe CTA spin time")
    p.add_argument("--delay-us", type=float, default=300.0,
                   help="host busy-wait between the GEMM launch and the probe launch")
    p.add_argument("--gate-us", type=float, default=50.0,
                   help="spin of the marker before the GEMM (queues the GEMM behind it)")
    p.add_argument("--margin-us", type=float, default=50.0,
                   help="a probe launched later than this before the GEMM's end is invalid")
    p.add_argument("--at-once-us", type=float, default=50.0,
                   help="a probe CTA that starts within this of its launch started at once")
    p.add_argument("--reps", type=int, default=7,
                   help="samples per scenario, with and without the probe each")
    p.add_argument("--nccl-lib", default=None,
                   help="libnccl.so to inspect ('none': skip; default: the one torch uses)")
    p.add_argument("--cuobjdump", default=None, help="cuobjdump binary")
    args = p.parse_args(argv)
    if args.quick:
        args.cta_offsets, args.max_registers = "0", ""
        args.probes = args.probes or ",".join(QUICK_PROBES)
        args.reps = min(args.reps, 3)
    try:
        args.offsets = _int_list(args.cta_offsets)
        args.caps = _int_list(args.max_registers)
        args.clusters = _int_list(args.cluster_ctas)
        args.extra_probes = [parse_probe_spec(s) for s in args.probe_add]
    except ValueError as exc:
        p.error(str(exc))
    if args.reps < 1 or args.probe_ctas < 1 or not args.offsets or min(args.offsets) < 0:
        p.error("--reps and --probe-ctas must be positive, --cta-offsets non-negative")
    for cluster in (args.probe_cluster, *(s.cluster for s in args.extra_probes)):
        if cluster < 1 or args.probe_ctas % cluster:
            p.error(f"--probe-ctas ({args.probe_ctas}) must be a multiple of every probe's "
                    f"cluster size ({cluster})")
    if args.delay_us <= 0 or args.probe_us <= 0:
        p.error("--delay-us and --probe-us must be positive")
    return args


def select_probes(args: argparse.Namespace,
                  measured: ProbeShape | None) -> tuple[list[ProbeShape], list[str]]:
    """The probe shapes to run (defaults, ``nccl-measured`` where cuobjdump worked, extra
    ones), filtered by ``--probes``; and the requested names that are not available."""
    shapes = list(default_probe_shapes(args.probe_smem, args.probe_cluster))
    if measured is not None:
        shapes.append(measured)
    shapes.extend(args.extra_probes)
    if args.probes is None:
        return shapes, []
    wanted = [w.strip() for w in args.probes.split(",") if w.strip()]
    wanted += [s.name for s in args.extra_probes if s.name not in wanted]
    by_name = {s.name: s for s in shapes}
    return [by_name[w] for w in wanted if w in by_name], [w for w in wanted if w not in by_name]


# --------------------------------------------------------------------------------------
# GPU side (torch, Triton, CuPy imported in main)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class CompiledProbe:
    """A compiled probe: its CuPy kernel, shape, real registers, spill bytes, max threads."""

    shape: ProbeShape
    kernel: Any
    regs: int
    local_bytes: int
    max_threads: int

    @property
    def cta(self) -> CtaShape:
        return self.shape.cta(self.regs)


def compile_probe(cp: Any, shape: ProbeShape) -> CompiledProbe:
    """NVRTC-compile and load one probe; raises ``RuntimeError`` if it cannot launch."""
    kernel = cp.RawKernel(probe_source(shape), "sm_probe",
                          options=(f"--maxrregcount={shape.regs}",), backend="nvrtc")
    if shape.smem > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = shape.smem
    attrs = kernel.attributes  # compiles and loads
    probe = CompiledProbe(shape, kernel, int(attrs["num_regs"]),
                          int(attrs.get("local_size_bytes", 0)),
                          int(attrs["max_threads_per_block"]))
    if shape.threads > probe.max_threads:
        raise RuntimeError(f"{shape.name}: {shape.threads} threads > the kernel's "
                           f"max_threads_per_block {probe.max_threads} ({probe.regs} registers)")
    return probe


@dataclasses.dataclass
class GemmUnderTest:
    """One signal GEMM (configuration x ``P``) ready to launch, and its compiled CTA."""

    label: str
    config: Any
    num_ctas: int
    launcher: Any
    cta: CtaShape | None
    spills: int | None
    note: str | None = None
    kernel: str = "pipelined"  # or "warp_specialized" (sm_90, whole tiles)


def gemm_config_label(config: Any) -> str:
    cluster = getattr(config, "cluster_ctas", 0)
    if cluster:
        return f"cluster{cluster}"
    cap = getattr(config, "max_registers", None)
    return "default" if cap is None else f"maxreg{cap}"


def gemm_configs(base: Any, caps: Iterable[int],
                 clusters: Iterable[int] = ()) -> tuple[list[tuple[str, Any]], list[str]]:
    """The default configuration, one per register cap and one per cluster size (the CUDA C
    cluster kernel, ``GemmConfig.cluster_ctas``: the product's GEMM at P = 112-120 on sm_90);
    notes for what cannot be applied (no such ``GemmConfig`` field, or a value it rejects)."""
    configs, notes = [("default", base)], []
    fields = {f.name for f in dataclasses.fields(base)}
    for field, values in (("max_registers", list(caps)), ("cluster_ctas", list(clusters))):
        if values and field not in fields:
            notes.append(f"GemmConfig has no {field} field: skipping {values}")
            continue
        for value in values:
            try:
                cfg = dataclasses.replace(base, **{field: value})
            except (TypeError, ValueError) as exc:
                notes.append(f"{field}={value}: {exc}")
                continue
            configs.append((gemm_config_label(cfg), cfg))
    return configs, notes


def build_gemm(torch: Any, sg: Any, plan_api: tuple, operands: tuple, M: int, N: int,
               K: int, label: str, cfg: Any, P: int, group_m: int,
               stream: Any) -> GemmUnderTest:
    """The plan (AllReduce at world size 1, as scripts/bench_gemm.py), a launcher with
    counters, and the compiled kernel's CTA (threads, ``n_regs``, ``metadata.shared``)."""
    make_plan, Problem, PlanConfig = plan_api
    a, b, c = operands
    plan = make_plan(Problem(M, N, K, "bfloat16", 1, "all_reduce"),
                     PlanConfig(block_m=cfg.block_m, block_n=cfg.block_n, num_ctas=P,
                                group_m=group_m))
    table = torch.from_numpy(plan.step_table.copy()).to("cuda")
    counters = torch.zeros(plan.num_groups, device="cuda", dtype=torch.int32)
    launcher = sg.SignalGemmLauncher(table, counters, block_m=cfg.block_m,
                                     block_n=cfg.block_n, num_ctas=P, config=cfg,
                                     rows_per_block=plan.problem.rows_per_block,
                                     full_tiles=plan.full_tiles)
    gemm = GemmUnderTest(label, cfg, P, launcher, None, None)
    cluster = getattr(cfg, "cluster_ctas", 0)
    if cluster:
        cg = sg.cluster_gemm
        kernel = (cg.kernel_for(a, b, cfg, P) if cg.eligible(
            a, b, c, cfg, None, plan.full_tiles, plan.step_table, P) else None)
        if kernel is not None:  # what the launcher will run: its CTA from the cubin
            gemm.kernel = f"cluster{cluster}"
            gemm.cta = CtaShape(cg.NUM_THREADS, kernel.num_regs, kernel.config.smem_bytes,
                                reallocates_registers=True)
            gemm.spills = 0
            with torch.cuda.stream(stream):
                launcher(a, b, c, stream=stream)
            return gemm
        gemm.note = f"clusters of {cluster} cannot run this plan: the Gluon kernel runs"
    with torch.cuda.stream(stream):
        try:  # as scripts/bench_gemm.py's _compiled: one launch through the JIT
            fn, jit, grid, args, meta = sg._choose_launch(
                a, b, c, table, cfg.block_m, cfg.block_n, P, counters, None, 0, None, cfg,
                plan.full_tiles)
            if fn is sg.ws_signal_gemm.kernel():
                gemm.kernel = "warp_specialized"
            kernel = jit(grid, args, meta)
            # (the warp-specialized kernel: num_warps counts its worker warps too)
            warps = getattr(getattr(kernel, "metadata", None), "num_warps", cfg.num_warps)
            gemm.cta = CtaShape(int(warps) * 32, int(kernel.n_regs),
                                int(kernel.metadata.shared),
                                reallocates_registers=gemm.kernel == "warp_specialized")
            gemm.spills = int(getattr(kernel, "n_spills", 0))
        except Exception as exc:  # noqa: BLE001 - the rows still measure, without prediction
            gemm.note = f"compiled kernel not inspected: {type(exc).__name__}: {exc}"[:200]
        launcher(a, b, c, stream=stream)  # the launcher's own first (checked) launch
    cap = getattr(cfg, "max_registers", None)
    if cap is not None and gemm.cta is not None and gemm.cta.regs_per_thread > cap:
        gemm.note = (f"max_registers={cap} not applied: the kernel has "
                     f"{gemm.cta.regs_per_thread} registers")
    return gemm


class Bench:
    """The GPU state of one run: operands, streams, events, markers and output buffers."""

    def __init__(self, torch: Any, cp: Any, np: Any, args: argparse.Namespace) -> None:
        self.torch, self.cp, self.np, self.args = torch, cp, np, args
        dev = torch.device("cuda")
        gen = torch.Generator(device=dev).manual_seed(14)
        self.a = torch.randn(args.m, args.k, device=dev, dtype=torch.bfloat16, generator=gen)
        self.b = torch.randn(args.k, args.n, device=dev, dtype=torch.bfloat16, generator=gen)
        self.c = torch.empty(args.m, args.n, device=dev, dtype=torch.bfloat16)
        low, high = self.priorities(torch)
        self.gemm_stream = torch.cuda.Stream(priority=low)
        self.probe_stream = torch.cuda.Stream(priority=high)
        # CuPy's wrappers of the torch streams (flashoverlap.stream_wait's: CuPy 14 deprecates
        # ExternalStream, which every supported CuPy still has; its warning silenced there)
        from flashoverlap.stream_wait import _cupy_stream

        index = torch.cuda.current_device()
        self.cp_gemm = _cupy_stream(self.gemm_stream.cuda_stream, index)
        self.cp_probe = _cupy_stream(self.probe_stream.cuda_stream, index)
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        self.marker = cp.RawKernel(marker_source(), "gemm_marker", backend="nvrtc")
        self.slots = cp.zeros(4, dtype=cp.uint64)
        C = args.probe_ctas
        self.starts = cp.zeros(C, dtype=cp.uint64)
        self.ends = cp.zeros(C, dtype=cp.uint64)
        self.smids = cp.zeros(C, dtype=cp.uint32)
        self.sink = cp.zeros(C * 1024, dtype=cp.float32)

    @staticmethod
    def priorities(torch: Any) -> tuple[int, int]:
        """``(normal, high)`` stream priorities.  torch's ``priority_range()`` is
        ``(least, greatest)`` = ``(0, negative)``: lower numbers are higher priorities."""
        from flashoverlap.engine.workspace import highest_stream_priority

        return max(torch.cuda.Stream.priority_range()), highest_stream_priority()

    def launch_marker(self, index: int, wait_ns: int) -> None:
        with self.cp_gemm:
            self.marker((1,), (1,), (self.slots, self.np.int32(index),
                                     self.np.uint64(wait_ns)))

    def launch_probe(self, probe: CompiledProbe) -> None:
        np, s = self.np, probe.shape
        with self.cp_probe:
            probe.kernel((self.args.probe_ctas,), (s.threads,),
                         (self.starts, self.ends, self.smids, self.sink,
                          np.uint64(int(self.args.probe_us * 1e3)), np.float32(0.999999),
                          np.float32(1e-6), np.int32(s.smem // 4)),
                         shared_mem=s.smem)

    def probe_alone(self, probe: CompiledProbe) -> None:
        """One launch with nothing else running (loads the module; checks it runs)."""
        self.launch_probe(probe)
        self.torch.cuda.synchronize()

    def run(self, gemm: GemmUnderTest, probe: CompiledProbe | None) -> Sample:
        """One sample: markers and the GEMM on the normal stream, the probe (if any) on the
        high-priority stream ``--delay-us`` after the GEMM launch."""
        torch, args = self.torch, self.args
        for buf in (self.slots, self.starts, self.ends, self.smids):
            buf.fill(0)
        torch.cuda.synchronize()
        e0, e_probe, e_end = self.events
        with torch.cuda.stream(self.gemm_stream):
            e0.record(self.gemm_stream)
            self.launch_marker(0, int(args.gate_us * 1e3))
            gemm.launcher(self.a, self.b, self.c, stream=self.gemm_stream)
            t0 = time.perf_counter()
            self.launch_marker(1, 0)
            e_end.record(self.gemm_stream)
        while time.perf_counter() - t0 < args.delay_us * 1e-6:
            pass
        if probe is not None:
            e_probe.record(self.probe_stream)
            self.launch_probe(probe)
        torch.cuda.synchronize()
        slots = [int(x) for x in self.slots.get()]
        if probe is None:
            return Sample(*slots)
        return Sample(*slots, probe_launch_ns=slots[0] + e0.elapsed_time(e_probe) * 1e6,
                      starts=tuple(int(x) for x in self.starts.get()),
                      ends=tuple(int(x) for x in self.ends.get()),
                      smids=tuple(int(x) for x in self.smids.get()))

    def measure(self, gemm: GemmUnderTest, probe: CompiledProbe) -> dict[str, Any]:
        """``--reps`` samples with the probe interleaved with as many without."""
        timings, alone = [], []
        for _ in range(self.args.reps):
            alone.append(self.run(gemm, None).gemm_us)
            timings.append(time_probe(self.run(gemm, probe), self.args.margin_us,
                                      self.args.at_once_us))
        return summarize_scenario(timings, alone)


# --------------------------------------------------------------------------------------
# Rows and table
# --------------------------------------------------------------------------------------


def scenario_row(common: dict[str, Any], gemm: GemmUnderTest, probe: ProbeShape,
                 compiled: CompiledProbe | None, measured: dict[str, Any], sms: int,
                 sm: SmLimits) -> dict[str, Any]:
    """One JSON row (the keys of scripts/bench_gemm.py's rows plus the scenario's)."""
    cta = gemm.cta
    probe_cta = compiled.cta if compiled else probe.cta()
    row = dict(common, engine="flashoverlap", variant=f"{gemm.label}/{probe.name}",
               num_ctas=gemm.num_ctas, sms=sms, gemm_config=gemm.label, kernel=gemm.kernel,
               config=dataclasses.asdict(gemm.config),
               max_registers=getattr(gemm.config, "max_registers", None),
               gemm_threads=cta.threads if cta else None,
               gemm_regs=cta.regs_per_thread if cta else None,
               gemm_smem=cta.smem_bytes if cta else None, gemm_spills=gemm.spills,
               probe=probe.name, probe_threads=probe.threads, probe_regs_target=probe.regs,
               probe_regs=compiled.regs if compiled else None,
               probe_local_bytes=compiled.local_bytes if compiled else None,
               probe_smem=probe.smem, probe_cluster=probe.cluster,
               probe_ctas=common["probe_ctas"],
               predicted_fit=fits_beside(cta, probe_cta, sm) if cta else None,
               predicted_start_now=(predicted_immediate_ctas(
                   cta, probe_cta, sms, gemm.num_ctas, common["probe_ctas"], sm)
                   if cta else None))
    row.update(measured)
    for key in ("median_ms", "started_during_gemm", "first_start_us", "median_start_us",
                "start_vs_gemm_end_us", "probe_sms", "gemm_cost"):
        row.setdefault(key, None)
    notes = [n for n in (gemm.note, measured.get("note")) if n]
    if notes:
        row["note"] = "; ".join(notes)
    return row


TABLE_COLUMNS = (
    ("config", "gemm_config", "{:>10}"), ("P", "num_ctas", "{:>4}"),
    ("probe", "probe", "{:>13}"), ("T", "probe_threads", "{:>4}"),
    ("regs", "probe_regs", "{:>4}"), ("smem", "probe_smem", "{:>6}"),
    ("cl", "probe_cluster", "{:>2}"), ("pred", "predicted_fit", "{:>4}"),
    ("during", "started_during_gemm", "{:>6}"), ("atonce", "started_at_once", "{:>6}"),
    ("first_us", "first_start_us", "{:>8.0f}"), ("med_us", "median_start_us", "{:>8.0f}"),
    ("vs_end_us", "start_vs_gemm_end_us", "{:>9.0f}"),
    ("lat_us", "median_latency_us", "{:>7.0f}"), ("SMs", "probe_sms", "{:>4}"),
    ("dur_us", "probe_us", "{:>6.0f}"), ("gemm_ms", "median_ms", "{:>7.3f}"),
    ("cost", "gemm_cost", "{:>6.3f}"), ("ok", "samples_valid", "{:>3}"),
)


def table_header() -> str:
    cells = []
    for title, _, fmt in TABLE_COLUMNS:
        width = int(re.search(r">(\d+)", fmt).group(1))
        cells.append(f"{title:>{width}}")
    return " ".join(cells)


def table_line(row: dict[str, Any]) -> str:
    """One printed line per scenario (``-`` where a value is missing)."""
    cells = []
    for _, key, fmt in TABLE_COLUMNS:
        value = row.get(key)
        width = int(re.search(r">(\d+)", fmt).group(1))
        if value is None or (isinstance(value, float) and math.isnan(value)):
            cells.append(f"{'-':>{width}}")
        else:
            cells.append(fmt.format(value))
    line = " ".join(cells)
    if row.get("note"):
        line += f"  [{row['note']}]"
    return line


def prediction_text(row: dict[str, Any]) -> str:
    """``predicted: k probe CTAs fit beside a GEMM CTA`` (and on the SMs left free)."""
    if row.get("predicted_fit") is None:
        return "predicted: unknown (GEMM kernel not inspected)"
    text = f"predicted: {row['predicted_fit']} probe CTAs fit beside a GEMM CTA"
    free = row["sms"] - row["num_ctas"]
    if free > 0:
        text += f"; {free} SMs without a GEMM CTA take the probe"
    return text + f"; {row['predicted_start_now']}/{row['probe_ctas']} start at once"


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def _nccl_version(torch: Any) -> str | None:
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - NCCL-less builds
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_sm_sharing.py needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        import cupy as cp
    except ImportError as exc:
        print(f"bench_sm_sharing.py needs CuPy for the probe kernels ({exc}); "
              "install cupy-cuda12x or cupy-cuda13x", file=sys.stderr)
        return 2
    import numpy as np
    import triton

    sys.path.insert(0, str(SCRIPTS))
    from bench_common import _git_commit, machine_tag
    from flashoverlap.kernels import default_config
    from flashoverlap.kernels import signal_gemm as sg
    from flashoverlap.plan import PlanConfig, Problem, make_plan

    started = time.perf_counter()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    sms, sm = props.multi_processor_count, sm_limits_for(props)
    arch = "sm_{}{}".format(*torch.cuda.get_device_capability(dev))
    today = datetime.date.today().isoformat()
    provenance = {"gpu": props.name, "torch": torch.__version__, "triton": triton.__version__,
                  "nccl": _nccl_version(torch), "date": today, "commit": _git_commit(),
                  "p2p": None}
    common = {"bench": "sm_sharing", "op": "matmul", "M": args.m, "N": args.n, "K": args.k,
              "dtype": "bfloat16", "world_size": 1, "probe_ctas": args.probe_ctas,
              "delay_us": args.delay_us, "probe_spin_us": args.probe_us, "reps": args.reps,
              **provenance}
    print(f"{props.name}, {sms} SMs ({arch}), torch {torch.__version__}, triton "
          f"{triton.__version__}, cupy {cp.__version__}, nccl {provenance['nccl']}; "
          f"M={args.m} N={args.n} K={args.k} bf16")

    nccl = nccl_kernel_usage(None if args.nccl_lib == "none" else
                             find_nccl_library(args.nccl_lib),
                             find_cuobjdump(args.cuobjdump), arch)
    if args.nccl_lib == "none":
        nccl["note"] = "skipped (--nccl-lib none)"
    print(f"NCCL kernels ({nccl['nccl_lib']}): {nccl['count']} ncclDevKernel entries"
          + (f", REG {nccl['reg_min']}/{nccl['reg_median']}/{nccl['reg_max']}, SHARED "
             f"{nccl['shared_min']}/{nccl['shared_median']}/{nccl['shared_max']} "
             "(min/median/max)" if nccl["count"] else "")
          + (f" [{nccl['note']}]" if nccl.get("note") else ""))
    measured_shape = nccl_measured_probe(nccl, args.probe_smem, args.probe_cluster)
    shapes, missing = select_probes(args, measured_shape)
    if missing:
        print(f"note: probes not available: {', '.join(missing)}")

    bench = Bench(torch, cp, np, args)
    print(f"streams: GEMM priority {bench.gemm_stream.priority}, probe priority "
          f"{bench.probe_stream.priority} (lower is higher)")
    probes: dict[str, CompiledProbe | None] = {}
    probe_notes: dict[str, str] = {}
    for shape in shapes:
        try:
            probes[shape.name] = compile_probe(cp, shape)
            bench.probe_alone(probes[shape.name])
            p = probes[shape.name]
            print(f"probe {shape.name}: {shape.threads} threads, {p.regs} registers (target "
                  f"{shape.regs}, {p.local_bytes} B local), {shape.smem} B smem, "
                  f"cluster {shape.cluster}")
        except Exception as exc:  # noqa: BLE001 - reported in its rows
            probes[shape.name] = None
            probe_notes[shape.name] = f"probe failed: {type(exc).__name__}: {exc}"[:200]
            print(f"probe {shape.name}: {probe_notes[shape.name]}")

    configs, notes = gemm_configs(default_config(dev, torch.bfloat16), args.caps,
                                  args.clusters)
    for note in notes:
        print(f"note: {note}")
    rows: list[dict[str, Any]] = []
    print("\n" + table_header())
    for label, cfg in configs:
        for offset in args.offsets:
            P = sms - offset
            try:
                gemm = build_gemm(torch, sg, (make_plan, Problem, PlanConfig),
                                  (bench.a, bench.b, bench.c), args.m, args.n, args.k, label,
                                  cfg, P, args.group_m, bench.gemm_stream)
                bench.run(gemm, None)  # warm-up
            except Exception as exc:  # noqa: BLE001 - next configuration
                print(f"{label} P={P}: GEMM failed: {type(exc).__name__}: {exc}"[:300])
                continue
            if gemm.cta is not None:
                print(f"# GEMM {label} P={P} ({gemm.kernel}): {gemm.cta.threads} threads, "
                      f"{gemm.cta.regs_per_thread} registers ({gemm.spills} spills), "
                      f"{gemm.cta.smem_bytes} B shared memory"
                      + (f" [{gemm.note}]" if gemm.note else ""))
            for shape in shapes:
                compiled = probes.get(shape.name)
                measured: dict[str, Any] = {}
                if compiled is None:
                    measured["note"] = probe_notes.get(shape.name, "probe not compiled")
                else:
                    try:
                        measured = bench.measure(gemm, compiled)
                    except Exception as exc:  # noqa: BLE001 - reported in the row
                        measured = {"note": f"{type(exc).__name__}: {exc}"[:200]}
                        torch.cuda.synchronize()
                row = scenario_row(common, gemm, shape, compiled, measured, sms, sm)
                rows.append(row)
                print(table_line(row) + "\n    " + prediction_text(row), flush=True)

    print("\nGEMM alone (median over its scenarios' samples):")
    for (label, P), times in _alone_times(rows).items():
        print(f"  {label:>10} P={P}: {statistics.median(times):.3f} ms")
    rows.append(dict(common, engine="nccl_kernels", variant="cuobjdump", num_ctas=None,
                     median_ms=None, **{k: v for k, v in nccl.items() if k != "names"},
                     kernel_names=nccl.get("names")))

    out_dir = args.out or Path("results") / f"{today}-{args.machine or machine_tag(props.name)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name}.json"
    path.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print(f"wrote {path} ({len(rows)} rows, {time.perf_counter() - started:.0f} s)")
    return 0


def _alone_times(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int], list[float]]:
    times: dict[tuple[str, int], list[float]] = {}
    for row in rows:
        if row.get("median_ms"):
            times.setdefault((row["gemm_config"], row["num_ctas"]), []).append(row["median_ms"])
    return times


if __name__ == "__main__":
    sys.exit(main())
