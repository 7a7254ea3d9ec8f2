"""Shared machinery of the flashoverlap benchmarks (``bench_overlap.py``, ``bench_scaling.py``).

What lives here, so that the two scripts only describe *which* shapes they run and how they
present them:

* **Setup**: command-line options common to both, ``--no-p2p`` (``NCCL_P2P_DISABLE=1`` set
  before NCCL initialises), the process group from torchrun *or* mpirun
  (:func:`flashoverlap.dist_utils.init_from_env`), a long-timeout gloo *control* group for
  host-side waits, provenance (GPU, torch, NCCL, Triton, date, commit).
* **Engines**: one callable per measured engine of one ``(op, M, N, K)`` problem on one group
  (:class:`ShapeRun`): ``gemm_only``, ``comm_only``, ``sequential``
  (:func:`flashoverlap.engine.run_sequential`: ``torch.matmul`` then the collective through
  ``torch.distributed``; the one implementation every speedup is quoted against),
  ``decomposition`` (flashoverlap's reference engine), ``torch_fused`` (torch's
  symmetric-memory fused matmul + collective, where torch has one), ``concurrent_ceiling`` (the
  GEMM and an *independent* collective of the same size on two streams) and ``flashoverlap``
  (the overlap engine).  ``op`` names a registered :mod:`flashoverlap.collectives` object and
  everything op-specific (result rows, in place or not, the collective call) is asked of it.
* **Timing** (docs/design.md "Measuring"): CUDA events around each call (on CPU:
  ``time.perf_counter`` wall clock, labelled as such), warm-up, median of the timed calls,
  inputs rotated among several random sets so the L2 does not hold them, a barrier before every
  measurement, and the max over ranks of each rank's median.
* **Results**: rows with the keys of docs/design.md "Result files", merged into ``<out>/<name>.json``; CSV and
  Markdown tables; lazily imported matplotlib bar charts; a tqdm progress bar on rank 0.

Same order on every rank: an engine that cannot run (not installed, unsupported) must be
skipped on *all* ranks, or the others hang in its collectives.  Every skip decision is
therefore agreed over the group (:meth:`ShapeRun.agree`) before the engine issues anything:
first the local availability check, then a first (untimed) call whose failure is agreed too.
A failure on one rank *inside* a collective cannot be rescued this way; it would hang, as any
mismatched collective does.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

# torch is imported by load_torch() (called by setup()), not here: `--help` must be instant and
# must work anywhere, and nothing below runs before setup().
torch: Any = None
dist: Any = None

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(1, str(REPO))

# Canonical order: every rank builds and runs the engines in this order.
ENGINES = ("gemm_only", "comm_only", "sequential", "decomposition", "torch_fused",
           "concurrent_ceiling", "flashoverlap")
CPU_ENGINES = ("gemm_only", "comm_only", "sequential", "decomposition", "concurrent_ceiling")
# Tables and charts put the ceiling right after flashoverlap, the number it is judged against.
TABLE_ORDER = ("gemm_only", "comm_only", "sequential", "decomposition", "torch_fused",
               "flashoverlap", "concurrent_ceiling")
LABELS = {"gemm_only": "GEMM", "comm_only": "comm", "sequential": "seq", "decomposition": "decomp",
          "torch_fused": "torch fused", "concurrent_ceiling": "ceiling",
          "flashoverlap": "flashoverlap"}
OPS = ("all_reduce", "reduce_scatter")
DTYPES = ("bfloat16", "float16", "float32")
# Identity of a row: a later run of the same measurement replaces it in the JSON file.
ROW_KEY = ("bench", "op", "M", "N", "K", "dtype", "world_size", "engine", "variant", "p2p",
           "device", "layer")
PCIE_TITLE = "PCIe-class (NCCL_P2P_DISABLE=1)"
# Test hook, comma list: "<engine>@<rank>" makes that engine unavailable on that rank only (the
# skip must be agreed by all ranks), "<engine>@*" makes its first call raise on every rank.
FAIL_ENV = "FLASHOVERLAP_BENCH_FAIL"


def load_torch() -> None:
    global torch, dist
    import torch as torch_module
    import torch.distributed as dist_module

    torch, dist = torch_module, dist_module


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options of both scripts.  Names avoid prefixes of torchrun's own options (torchrun
    abbreviates, so e.g. ``--m`` would be ambiguous with ``--master-addr``)."""
    p.add_argument("--op", choices=[*OPS, "both"], default="both", help="collective(s) to run")
    p.add_argument("--engines", type=csv_list, default=None,
                   help=f"comma list out of {','.join(ENGINES)} (default: all that run on the "
                        f"device; on CPU: {','.join(CPU_ENGINES)})")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="cuda: one GPU per rank, NCCL, CUDA events; cpu: gloo, tiny shapes, "
                        "wall-clock timing (a pipeline check, not a performance number)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--iters", type=int, default=30, help="timed calls per measurement (>= 20 on GPU)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    p.add_argument("--rotate", type=int, default=3, help="input sets rotated so the L2 can't hold them")
    p.add_argument("--seed", type=int, default=1234, help="random data seed (plus the rank)")
    p.add_argument("--no-p2p", action="store_true",
                   help="set NCCL_P2P_DISABLE=1 before NCCL starts (PCIe-class regime); labels "
                        "every row p2p=false and names files *-nop2p")
    p.add_argument("--nccl-cta-policy", choices=["default", "efficiency", "zero"], default=None,
                   help="ncclConfig_t.CTAPolicy of flashoverlap's communicators (sets "
                        "FLASHOVERLAP_NCCL_CTA_POLICY; NCCL >= 2.27); labels every row and names "
                        "files *-cta<policy>")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: results/<YYYY-MM-DD>-<machine>)")
    p.add_argument("--machine", default=None, help="machine tag of the default folder (default: GPU name)")
    p.add_argument("--fresh", action="store_true",
                   help="overwrite the JSON file instead of merging rows into it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.iters < 1 or args.warmup < 0 or args.rotate < 1:
        p.error("--iters and --rotate must be >= 1 and --warmup >= 0")
    unknown = [e for e in args.engines or () if e not in ENGINES]
    if unknown:
        p.error(f"unknown engine(s) {unknown}; choose from {ENGINES}")


def selected_ops(args: argparse.Namespace) -> list[str]:
    return list(OPS) if args.op == "both" else [args.op]


# --------------------------------------------------------------------------------------------
# setup and provenance
# --------------------------------------------------------------------------------------------
class Clock:
    """CUDA events on GPU (device time of the caller's stream); ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.name = "CUDA events" if self.cuda else "wall clock (time.perf_counter)"

    def stamp(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclasses.dataclass
class Bench:
    """Everything a measurement needs besides the problem: the rank, device, timing knobs."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    clock: Clock
    control: Any  # gloo group over all ranks, long timeout: host-side waits of any length
    p2p: bool
    prov: dict[str, Any]
    side_stream: Any = None  # second stream of the concurrency ceiling (CUDA)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def engines(self) -> tuple[str, ...]:
        allowed = ENGINES if self.device.type == "cuda" else CPU_ENGINES
        wanted = self.args.engines or allowed
        return tuple(e for e in ENGINES if e in wanted and e in allowed)

    def log(self, *parts: Any) -> None:
        """Print on rank 0, above the progress bar rather than through it."""
        if not self.is_root:
            return
        text = " ".join(map(str, parts))
        try:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stdout)
        except ImportError:
            print(text)
        sys.stdout.flush()


def setup(args: argparse.Namespace) -> Bench:
    """Start the process group (torchrun or mpirun) and collect provenance."""
    load_torch()
    if args.no_p2p:
        # NCCL reads its environment when the first communicator is created, i.e. inside
        # init_process_group (eager, device_id is bound) or the first collective: setting it
        # here, before either, is enough -- no re-exec needed.
        os.environ["NCCL_P2P_DISABLE"] = "1"
    p2p = os.environ.get("NCCL_P2P_DISABLE", "0").strip() in ("", "0")
    if getattr(args, "nccl_cta_policy", None):
        from flashoverlap.settings import NCCL_CTA_POLICY_ENV

        os.environ[NCCL_CTA_POLICY_ENV] = args.nccl_cta_policy  # read at communicator creation
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU")
    from flashoverlap.dist_utils import init_from_env

    rank, world = init_from_env("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if use_cuda else torch.float32)
    # Ranks outside a scaling subgroup wait here while the members measure (minutes): a gloo
    # barrier with a long timeout, never an NCCL one that the watchdog would kill.
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=12))
    bench = Bench(args=args, rank=rank, world=world, device=device, dtype=dtype, clock=Clock(device),
                  control=control, p2p=p2p, prov=provenance(device))
    if use_cuda:
        from flashoverlap.engine.workspace import highest_stream_priority

        bench.side_stream = torch.cuda.Stream(device=device, priority=highest_stream_priority())
        if args.iters < 20 or args.rotate < 3:
            bench.log(f"warning: --iters {args.iters} / --rotate {args.rotate}: docs/design.md asks for "
                      ">= 20 timed calls and >= 3 rotated input sets")
    return bench


def _version(dist_name: str) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    """Short HEAD, with ``+dirty`` when tracked files differ from it (results then come
    from a tree no commit holds).  ``$FLASHOVERLAP_COMMIT`` overrides it, for a copy of the
    tree whose ``.git`` is not the source's (a remote GPU machine fed a working tree)."""
    if os.environ.get("FLASHOVERLAP_COMMIT"):
        return os.environ["FLASHOVERLAP_COMMIT"]
    try:
        proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              check=False, capture_output=True, text=True, timeout=10)
        commit = proc.stdout.strip()
        if not commit:
            return "unknown"
        status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                 "--untracked-files=no"],
                                check=False, capture_output=True, text=True, timeout=10)
        return commit + ("+dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def provenance(device: torch.device) -> dict[str, Any]:
    """The provenance keys of every row (docs/design.md "Result files") plus a few more."""
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:  # noqa: BLE001 - NCCL-less build
            nccl = "unknown"
        try:  # the library the overlap engine loads may differ from torch's
            from flashoverlap.nccl_lib import get_nccl

            nccl_fo = get_nccl().version_string
        except Exception:  # noqa: BLE001
            nccl_fo = "not loadable"
    else:
        gpu = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
        nccl = nccl_fo = "n/a (gloo)"
    import flashoverlap

    from flashoverlap.settings import CTA_POLICIES, settings

    policy = settings().nccl_cta_policy
    policy_names = {value: name for name, value in CTA_POLICIES.items()}
    return {
        "gpu": gpu,
        "gpu_count": torch.cuda.device_count() if device.type == "cuda" else 0,
        "nccl_cta_policy": "unset" if policy is None else policy_names[policy],
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "nccl": nccl,
        "nccl_flashoverlap": nccl_fo,
        "triton": _version("triton"),
        "flashoverlap": getattr(flashoverlap, "__version__", "unknown"),
        "commit": _git_commit(),
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "device": device.type,
        "backend": "nccl" if device.type == "cuda" else "gloo",
    }


def machine_tag(gpu_name: str) -> str:
    """Short folder tag from the GPU name (same rule as scripts/bench_gemm.py)."""
    if gpu_name.startswith("cpu"):
        return "cpu"
    for tag in ("h200", "h100", "b200", "a100", "l40s", "gh200"):
        if tag in gpu_name.lower().replace(" ", ""):
            return tag
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"


def output_dir(bench: Bench) -> Path:
    args = bench.args
    return args.out or Path("results") / f"{bench.prov['date']}-{args.machine or machine_tag(bench.prov['gpu'])}"


def result_stem(name: str, bench: Bench) -> str:
    stem = name if bench.p2p else f"{name}-nop2p"
    policy = getattr(bench.args, "nccl_cta_policy", None)
    return f"{stem}-cta{policy}" if policy else stem


def header(bench: Bench, title: str) -> str:
    """Versions, GPU, timing method and regime: printed above every table."""
    p, a = bench.prov, bench.args
    regime = "NVLink/P2P allowed" if bench.p2p else PCIE_TITLE
    lines = [
        f"# {title} -- {regime}",
        (f"GPU: {p['gpu']} x {bench.world} ranks | torch {p['torch']} (CUDA {p['cuda']}) | "
         f"NCCL {p['nccl']} (flashoverlap: {p['nccl_flashoverlap']}) | Triton {p['triton']} | "
         f"flashoverlap {p['flashoverlap']} @ {p['commit']} | {p['date']} on {p['host']}"),
        (f"timing: {bench.clock.name}, median of {a.iters} calls after {a.warmup} warm-up, "
         f"{a.rotate} rotated random input sets, max over ranks; dtype {dtype_name(bench.dtype)}"),
    ]
    if not bench.clock.cuda:
        lines.append("CPU/gloo run: checks the benchmark pipeline; the times are not GPU numbers")
    return "\n".join(lines)


def teardown() -> None:
    """Free flashoverlap's communicators, then the process group."""
    if "flashoverlap.engine" in sys.modules:
        sys.modules["flashoverlap.engine"].clear_workspaces()
    if "flashoverlap.comm" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["flashoverlap.comm"].destroy_communicators()
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# one problem, every engine
# --------------------------------------------------------------------------------------------
# torch's own fused matmul + collective, by collective name (torch has no fused AllReduce).
TORCH_FUSED = {"reduce_scatter": "_fused_matmul_reduce_scatter"}


def get_collective(op: str) -> Any:
    """The registered :class:`flashoverlap.collectives.Collective` named ``op``."""
    from flashoverlap import collectives

    return collectives.get(op)


def start_collective(coll: Any, send: torch.Tensor, result: torch.Tensor, group: Any) -> Callable[[], None]:
    """Start ``coll`` of ``send`` into ``result`` (``send`` itself when the collective is in
    place) through ``torch.distributed``; returns the function that waits for it."""
    return coll.torch_group(send, send if coll.in_place else result, group)


def problem_fits(op: str, M: int, N: int, world: int) -> str | None:
    """``None`` if the collective accepts the problem, else its reason (same on every rank)."""
    try:
        get_collective(op).check_problem(M, N, world)
    except ValueError as exc:
        return str(exc)
    return None


@dataclasses.dataclass
class Candidate:
    engine: str
    variant: str
    run: Callable[[int], Any]  # one call on input set i
    unavailable: str | None = None  # local reason not to run (agreed over the group first)
    prepare: Callable[[], Any] | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra row keys


@dataclasses.dataclass
class Stats:
    median_ms: float | None
    min_ms: float | None = None
    p90_ms: float | None = None
    note: str | None = None


class ShapeRun:
    """The engines of one ``(op, M, N, K)`` problem on ``group``; all its ranks must call
    :meth:`measure` (and anything else collective here) in the same order."""

    def __init__(self, bench: Bench, name: str, group: Any, op: str, M: int, N: int, K: int,
                 engines: Sequence[str] | None = None,
                 configs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None):
        self.bench, self.name, self.group, self.op = bench, name, group, op
        self.M, self.N, self.K = M, N, K
        self.W = dist.get_world_size(group)
        self.extra = dict(extra or {})
        self.configs = configs or {"default": None}  # flashoverlap variants -> PlanConfig
        engines = bench.engines if engines is None else engines
        self.coll = get_collective(op)
        rows = self.coll.result_rows(M, self.W)
        dev, dt = bench.device, bench.dtype
        torch.manual_seed(bench.args.seed + bench.rank)
        # Random data (never zeros, which would let the GEMM run cooler); b scaled so outputs
        # stay O(1).  Several sets, rotated per call, so no call finds its inputs in the L2.
        self.a = [torch.randn(M, K, device=dev, dtype=dt) for _ in range(bench.args.rotate)]
        self.b = [torch.randn(K, N, device=dev, dtype=dt) / K**0.5 for _ in range(bench.args.rotate)]
        self.full = torch.empty(M, N, device=dev, dtype=dt)  # GEMM output (and AR buffer)
        self.out = torch.empty(rows, N, device=dev, dtype=dt)  # op output
        needs_comm = {"comm_only", "concurrent_ceiling"} & set(engines)
        # Buffers of the standalone collective.  AllReduce is in place, so their values grow
        # by W per call; they are refilled before every measurement (see measure()), which
        # keeps randn * W**n finite in bf16/fp32 for (warm-up + iters) / rotate calls per set.
        self.comm = [torch.randn(M, N, device=dev, dtype=dt) for _ in range(bench.args.rotate)] if needs_comm else []
        self.comm_out = torch.empty(rows, N, device=dev, dtype=dt) if needs_comm else None
        self.candidates = [c for e in engines for c in self._candidates(e)]
        self.stats: dict[tuple[str, str], Stats] = {}

    # -- the engines ----------------------------------------------------------------------
    def gemm(self, i: int) -> None:
        torch.matmul(self.a[i], self.b[i], out=self.full)

    def comm_full(self) -> None:
        """The collective of the GEMM's output (the sequential baseline's second half, for
        timelines)."""
        start_collective(self.coll, self.full, self.out, self.group)()

    def _sequential(self, i: int) -> None:
        from flashoverlap.engine import run_sequential

        run_sequential(self.coll, self.a[i], self.b[i], self.group, self.out, world_size=self.W)

    def _comm_only(self, i: int) -> None:
        start_collective(self.coll, self.comm[i], self.comm_out, self.group)()

    def _concurrent(self, i: int) -> None:
        """GEMM and an independent collective at once: the practical ceiling T_conc."""
        if not self.bench.clock.cuda:  # gloo runs collectives on its own thread
            finish = start_collective(self.coll, self.comm[i], self.comm_out, self.group)
            self.gemm(i)
            finish()
            return
        caller = torch.cuda.current_stream()
        side = self.bench.side_stream
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            start_collective(self.coll, self.comm[i], self.comm_out, self.group)()
        self.gemm(i)
        caller.wait_stream(side)

    def _library(self, engine: str, config: Any) -> Callable[[int], Any]:
        import flashoverlap as fo

        coll = self.coll
        return lambda i: fo.gemm_collective(self.a[i], self.b[i], coll, self.group, out=self.out,
                                            engine=engine, config=config)

    def _torch_fused(self, i: int) -> torch.Tensor:
        import torch.distributed._symmetric_memory as symm

        fused = getattr(symm, TORCH_FUSED[self.op])
        return fused(self.a[i], self.b[i], "sum", 0, self.group.group_name)

    def _candidates(self, engine: str) -> list[Candidate]:
        simple = {"gemm_only": self.gemm, "comm_only": self._comm_only,
                  "sequential": self._sequential, "concurrent_ceiling": self._concurrent}
        if engine in simple:
            return [Candidate(engine, "default", simple[engine])]
        if engine == "decomposition":
            return [Candidate(engine, "default", self._library("reference", None),
                              info=self._plan_info("reference", None))]
        if engine == "torch_fused":
            if self.op not in TORCH_FUSED:
                return []  # torch has no fused matmul + this collective
            return [Candidate(engine, "default", self._torch_fused,
                              unavailable=self._torch_fused_reason(), prepare=self._enable_symm_mem)]
        if engine == "flashoverlap":
            from flashoverlap.availability import overlap_unavailable_reason

            reason = overlap_unavailable_reason(self.bench.device, self.group)
            return [Candidate(engine, variant, self._library("overlap", config), unavailable=reason,
                              info={} if reason else self._plan_info("overlap", config))
                    for variant, config in self.configs.items()]
        raise ValueError(f"unknown engine {engine!r}")

    def _torch_fused_reason(self) -> str | None:
        if self.bench.device.type != "cuda":
            return "needs CUDA"
        try:
            import torch.distributed._symmetric_memory as symm
        except ImportError as exc:
            return f"torch.distributed._symmetric_memory unavailable: {exc}"
        if not hasattr(symm, TORCH_FUSED[self.op]):
            return f"torch {torch.__version__} has no {TORCH_FUSED[self.op]}"
        return None

    def _enable_symm_mem(self) -> None:
        import torch.distributed._symmetric_memory as symm

        enable = getattr(symm, "enable_symm_mem_for_group", None)
        if enable is not None:  # newer torch enables groups on first use
            enable(self.group.group_name)

    def _plan_info(self, engine: str, config: Any) -> dict[str, Any]:
        """How the library runs this problem (:func:`flashoverlap.policy.decide`): the path
        (overlap, reference, sequential, or the plain GEMM at world size 1) and the plan.
        ``fallback`` marks a flashoverlap row that did not overlap.  Never raises: provenance."""
        try:
            from flashoverlap.policy import decide

            d = decide(self.coll, self.M, self.N, self.K, self.bench.dtype, self.W,
                       self.bench.device, self.group, engine, config)
            info: dict[str, Any] = {"path": d.path, "fallback": d.path in ("sequential", "gemm")}
            if d.plan is not None:
                info["plan"] = {**dataclasses.asdict(d.plan.config),
                                "num_groups": d.plan.num_groups, "num_waves": d.plan.num_waves}
            return info
        except Exception as exc:  # noqa: BLE001
            return {"plan_error": f"{type(exc).__name__}: {exc}"}

    def candidate(self, engine: str, variant: str = "default") -> Candidate | None:
        """A measured (not skipped) engine; the same answer on every rank of the group."""
        stats = self.stats.get((engine, variant))
        if stats is None or stats.median_ms is None:
            return None
        return next(c for c in self.candidates if (c.engine, c.variant) == (engine, variant))

    # -- collective bookkeeping ---------------------------------------------------------------
    def agree(self, reason: str | None) -> str | None:
        """``None`` if no rank of the group has a reason to skip, else a reason (ours if any).

        Called before an engine's first call (local availability) and after it (did it raise?).
        The second catches failures every rank hits alike, the usual kind (unsupported setup);
        a rank that fails while the others are already inside the engine's collectives leaves
        them waiting there -- no agreement can rescue that, as with any mismatched collective.
        """
        flag = torch.tensor([0 if reason is None else 1], device=self.bench.device, dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if int(flag.item()) == 0:
            return None
        return reason or "n/a on another rank"

    def barrier(self) -> None:
        self.bench.clock.sync()
        dist.barrier(group=self.group)

    def time(self, fn: Callable[[int], Any]) -> Stats:
        """Median (and min, p90) ms of ``fn`` over the timed calls, max over the group's ranks."""
        b, clock = self.bench.args, self.bench.clock
        self.barrier()
        n = 0
        for _ in range(b.warmup):
            fn(n % b.rotate)
            n += 1
        self.barrier()
        stamps = []
        for _ in range(b.iters):  # calls queue back to back; each is bracketed by two stamps
            start = clock.stamp()
            fn(n % b.rotate)
            n += 1
            stamps.append((start, clock.stamp()))
        clock.sync()
        times = sorted(clock.elapsed_ms(s, e) for s, e in stamps)
        p90 = times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)]
        local = torch.tensor([statistics.median(times), times[0], p90], device=self.bench.device,
                             dtype=torch.float64)
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.group)
        return Stats(*[float(x) for x in local.tolist()])

    def measure(self) -> list[dict[str, Any]]:
        """Time every candidate (skips agreed over the group) and return the rows."""
        injected = csv_list(os.environ.get(FAIL_ENV, ""))
        for c in self.candidates:
            for buf in self.comm:
                buf.normal_()
            local = f"{FAIL_ENV} marks it unavailable" if f"{c.engine}@{self.bench.rank}" in injected else None
            reason = self.agree(c.unavailable or local)
            if reason is None:
                try:  # first call: JIT, communicators, symmetric memory -- and a failure probe
                    if f"{c.engine}@*" in injected:
                        raise RuntimeError(f"failure injected by {FAIL_ENV}")
                    if c.prepare is not None:
                        c.prepare()
                    c.run(0)
                    self.bench.clock.sync()
                except Exception as exc:  # noqa: BLE001 - reported as n/a, agreed below
                    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                reason = self.agree(reason)
            self.stats[(c.engine, c.variant)] = Stats(None, note=reason) if reason else self.time(c.run)
        self.barrier()
        return self.rows()

    def rows(self) -> list[dict[str, Any]]:
        med = {key: s.median_ms for key, s in self.stats.items()}
        seq = med.get(("sequential", "default"))
        gemm, comm = med.get(("gemm_only", "default")), med.get(("comm_only", "default"))
        bounds: dict[str, float] = {}
        if gemm is not None and comm is not None:
            bounds["ideal_ms"] = max(gemm, comm)  # T_ideal = max(T_gemm, T_comm)
        if med.get(("concurrent_ceiling", "default")) is not None:
            bounds["ceiling_ms"] = med[("concurrent_ceiling", "default")]
        out = []
        for c in self.candidates:
            s = self.stats[(c.engine, c.variant)]
            b = self.bench
            row = {
                "bench": self.name, "op": self.op, "M": self.M, "N": self.N, "K": self.K,
                "dtype": dtype_name(b.dtype), "world_size": self.W,
                "engine": c.engine, "variant": c.variant,
                "num_ctas": (c.info.get("plan") or {}).get("num_ctas"), "median_ms": s.median_ms,
                "speedup_vs_sequential": (seq / s.median_ms) if seq and s.median_ms else None,
                "min_ms": s.min_ms, "p90_ms": s.p90_ms, "p2p": b.p2p, **bounds, **b.prov,
                "timer": "cuda_events" if b.clock.cuda else "perf_counter",
                "iters": b.args.iters, "warmup": b.args.warmup, "input_sets": b.args.rotate,
                **self.extra, **c.info,
            }
            if s.note:
                row["note"] = s.note
            out.append(row)
        return out

    def close(self) -> None:
        """Drop this problem's buffers (and the overlap engine's workspaces) before the next."""
        self.a = self.b = self.comm = []
        self.full = self.out = self.comm_out = None
        if "flashoverlap.engine" in sys.modules:
            sys.modules["flashoverlap.engine"].clear_workspaces()
        if self.bench.clock.cuda:
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# results: JSON, CSV, Markdown
# --------------------------------------------------------------------------------------------
def row_key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in ROW_KEY)


def write_json(path: Path, rows: list[dict[str, Any]], fresh: bool = False) -> list[dict[str, Any]]:
    """Merge ``rows`` into the JSON list at ``path`` (same measurement: the new row wins), so
    shapes run one call at a time accumulate in one file.  Returns every row of the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict[str, Any]] = []
    if path.exists() and not fresh:
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            print(f"warning: {path} is not valid JSON; overwriting it", file=sys.stderr)
    new_keys = {row_key(r) for r in rows}
    merged = [r for r in old if row_key(r) not in new_keys] + rows
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    tmp.replace(path)
    return merged


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})


def markdown_table(headers: Sequence[str], body: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def _cell(rows: list[dict[str, Any]], engine: str, variant: str) -> str:
    row = next((r for r in rows if r["engine"] == engine and r.get("variant", "default") == variant), None)
    if row is None:
        return "-"
    if row["median_ms"] is None:
        return "n/a"
    text = f"{row['median_ms']:.3f}"
    if engine not in ("sequential", "gemm_only", "comm_only") and row.get("speedup_vs_sequential"):
        text += f" ({row['speedup_vs_sequential']:.2f}x)"
    if row.get("fallback"):
        text += "*"
    return text


def shape_table(rows: list[dict[str, Any]], key_fields: Sequence[tuple[str, str]],
                columns: Sequence[tuple[str, str, str]]) -> str:
    """One line per problem (``key_fields``: header, row key); one column per ``(header,
    engine, variant)`` with "ms (speedup vs seq)"; plus the ideal bound ``max(GEMM, comm)``
    where GEMM and comm were measured."""
    with_ideal = any(r.get("ideal_ms") for r in rows)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for _, k in key_fields), []).append(r)
    body = []
    for key, rs in groups.items():
        cells = [_cell(rs, e, v) for _, e, v in columns]
        if with_ideal:
            ideal = next((r["ideal_ms"] for r in rs if r.get("ideal_ms")), None)
            seq = next((r["median_ms"] for r in rs if r["engine"] == "sequential" and r["median_ms"]), None)
            cells.append("-" if ideal is None else f"{ideal:.3f}" + (f" ({seq / ideal:.2f}x)" if seq else ""))
        body.append([*key, *cells])
    headers = [*(h for h, _ in key_fields), *(h for h, _, _ in columns)]
    table = markdown_table(headers + (["ideal max(GEMM,comm)"] if with_ideal else []), body)
    if any(r.get("fallback") for r in rows):
        table += ("\n\n\\* flashoverlap did not overlap: the plan predicted no gain (sequential path) "
                  "or world size 1 (the plain GEMM)")
    return table


def engine_columns(rows: list[dict[str, Any]], skip: Sequence[str] = ()) -> list[tuple[str, str, str]]:
    """Table columns for the engines present in ``rows``, in canonical order."""
    present = {(r["engine"], r.get("variant", "default")) for r in rows}
    cols = []
    for e in TABLE_ORDER:
        for e2, v in sorted(present):
            if e2 == e and e not in skip:
                cols.append((LABELS[e] + ("" if v == "default" else f" ({v})"), e, v))
    return cols


def geomean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None


def speedup_summary(rows: list[dict[str, Any]], engine: str) -> str:
    sp = [r["speedup_vs_sequential"] for r in rows if r["engine"] == engine and r.get("speedup_vs_sequential")]
    if not sp:
        return f"{engine}: not measured"
    return (f"{engine} {geomean(sp):.2f}x geomean vs sequential over {len(sp)} problems "
            f"(min {min(sp):.2f}x, max {max(sp):.2f}x)")


# --------------------------------------------------------------------------------------------
# plots and progress
# --------------------------------------------------------------------------------------------
def pyplot():
    """matplotlib, imported only when a plot is drawn, with a file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


ENGINE_COLORS = {"decomposition": "tab:gray", "torch_fused": "tab:orange",
                 "concurrent_ceiling": "tab:purple", "flashoverlap": "tab:blue"}


def plot_speedups(path: Path, panels: Sequence[tuple[str, list[dict[str, Any]]]], title: str,
                  label: Callable[[dict[str, Any]], str]) -> None:
    """Grouped bars of speedup vs sequential: one panel per ``(title, rows)``, one bar group
    per problem (``label(row)``), one bar per engine/variant."""
    plt = pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.2 + 0.9 * max(len({label(r) for r in rs}) for _, rs in panels)),
                                                      3.2 * len(panels)), squeeze=False)
    for ax, (panel_title, rows) in zip(axes[:, 0], panels):
        cats = list(dict.fromkeys(label(r) for r in rows))
        series = [(e, v) for _, e, v in engine_columns(rows, skip=("sequential", "gemm_only", "comm_only"))]
        width = 0.8 / max(len(series), 1)
        for j, (e, v) in enumerate(series):
            vals = []
            for cat in cats:
                r = next((r for r in rows if label(r) == cat and r["engine"] == e and r.get("variant", "default") == v), None)
                vals.append(r["speedup_vs_sequential"] if r and r.get("speedup_vs_sequential") else 0.0)
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(cats))]
            ax.bar(xs, vals, width, label=LABELS[e] + ("" if v == "default" else f" ({v})"),
                   color=ENGINE_COLORS.get(e) if v == "default" else None)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("speedup vs sequential")
        ax.set_title(panel_title, fontsize=10)
        ax.legend(fontsize=7, ncol=4)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(bench: Bench, total: int, desc: str):
    """tqdm bar on rank 0 (stderr); a no-op elsewhere, with --no-progress, or without tqdm,
    and off where stderr is not a terminal (a log file would get one line per update)."""
    if not bench.is_root or bench.args.no_progress or total <= 1:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="problem", dynamic_ncols=True, disable=None)
