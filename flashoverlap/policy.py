"""Policy: which engine runs a call, with which plan, and whether to overlap at all.

Decided once per validated call signature (:mod:`flashoverlap.ops` memoises the result), and
agreed across ranks on first use:

* **engine**: the requested one, or the overlap engine where it can run (CUDA tensors, an
  NCCL group, Triton, the GPU packages, a loadable NCCL), else the reference engine.
* **plan config**: an explicit :class:`PlanConfig`; else a tuned entry from the cache
  (``flashoverlap tune``) matching the problem on this machine; else the analytic default
  (:mod:`flashoverlap.tuning.search`; on CPU :func:`flashoverlap.defaults.cpu_plan_config`).
  This module is the only one that imports :mod:`flashoverlap.tuning` at run time, which keeps
  the engines free of import cycles (the tuner runs plans through the engines).
* **overlap or not** (the *never slower* rule): at world size 1 the default call runs the
  plain GEMM (nothing to hide); a plan of fewer than two groups, or one the tuner (or the
  analytic model) says gains nothing, runs the sequential path through flashoverlap's own
  NCCL communicator; an explicit config is the caller's decision and always overlaps.
* **agreement**: the decision reads a per-machine tuning cache and every rank passes its own
  shapes, so two ranks could disagree; they would then issue mismatched collectives and hang.
  The first call of each signature all-gathers one 63-bit hash of (collective, shapes, dtype,
  engine, decision, plan) over the group and raises on every rank if they differ -- one small
  blocking collective per new signature, never on the hot path.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import warnings
from typing import Literal

import torch
from torch.distributed import ProcessGroup

from .collectives import Collective
from .plan import OverlapPlan, PlanConfig, Problem, make_plan

Path = Literal["overlap", "reference", "sequential", "gemm"]
ENGINES: tuple[str, ...] = ("overlap", "reference", "sequential")


@functools.lru_cache(maxsize=256)
def get_plan(problem: Problem, config: PlanConfig) -> OverlapPlan:
    """Plans are pure functions of (problem, config): build each once per process."""
    return make_plan(problem, config)


def resolve_engine(engine: str | None, device: torch.device, group: ProcessGroup) -> str:
    """The engine to run: the requested one (checked), or the best available."""
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} or None, got {engine!r}")
    if engine in ("reference", "sequential"):
        return engine
    from .availability import overlap_unavailable_reason

    reason = overlap_unavailable_reason(device, group)
    if engine == "overlap" and reason is not None:
        raise ValueError(f"the overlap engine cannot run here: {reason}")
    return "overlap" if reason is None else "reference"


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tuned_entry(problem: Problem, device: torch.device):
    """The cache entry tuned for this problem on this machine, or None (never raises)."""
    try:
        from .tuning.cache import detect_key, lookup_entry

        return lookup_entry(detect_key(problem, device=device.index))
    except Exception as exc:  # noqa: BLE001 - a broken cache must never break the op
        warnings.warn(f"flashoverlap: tuning cache unusable ({exc}); using the analytic default",
                      stacklevel=3)
        return None


@functools.lru_cache(maxsize=256)
def choose_config(problem: Problem, device: torch.device) -> PlanConfig:
    """Tuned config from the cache when one matches, else the analytic default (cached per
    problem and device: the cache lookup reads files)."""
    if device.type != "cuda":
        from .defaults import cpu_plan_config

        return cpu_plan_config(problem)
    entry = _tuned_entry(problem, device)
    if entry is not None:
        return entry.plan_config
    from .defaults import DEFAULT_RESERVED_SMS
    from .tuning.search import engine_default

    # The tile is the kernel table's for the problem on the CTAs the default leaves the GEMM
    # (128 x 256, or 128 x 128 where that wastes less of a last wave: kernels.wave_tile).
    return engine_default(problem, _num_sms(device), torch.cuda.get_device_capability(device),
                          reserved_sms=DEFAULT_RESERVED_SMS)


@functools.lru_cache(maxsize=256)
def predicts_gain(plan: OverlapPlan, device: torch.device) -> bool:
    """Whether overlapping this plan beats GEMM-then-collective: two groups at least, then the
    measured decision of a matching tuned entry, else the analytic model's prediction."""
    if plan.num_groups < 2:
        return False
    entry = _tuned_entry(plan.problem, device)
    if entry is not None and entry.plan_config == plan.config:
        return bool(entry.use_overlap)
    from .tuning.search import predict_gain

    return bool(predict_gain(plan.problem, plan.config, _num_sms(device)))


@dataclasses.dataclass(frozen=True)
class Decision:
    """How one call signature runs.

    ``path``: ``overlap`` (the overlap engine), ``reference`` (the plan with torch ops),
    ``sequential`` (GEMM then one collective; through flashoverlap's NCCL communicator when
    ``nccl`` is true, else ``torch.distributed``), ``gemm`` (world size 1: the plain GEMM).
    """

    engine: str
    path: Path
    plan: OverlapPlan | None
    nccl: bool = False


def decide(collective: Collective, M: int, N: int, K: int, dtype: torch.dtype,
           world_size: int, device: torch.device, group: ProcessGroup, engine: str | None,
           config: PlanConfig | None) -> Decision:
    """The :class:`Decision` for one validated call signature (raises ``ValueError`` on a
    config that does not fit the problem)."""
    name = resolve_engine(engine, device, group)
    if name == "sequential":
        return Decision(name, "sequential", None)
    problem = Problem(M=M, N=N, K=K, dtype=str(dtype).removeprefix("torch."),
                      world_size=world_size, op=collective.name)
    if config is not None and not isinstance(config, PlanConfig):
        raise TypeError(f"config must be a PlanConfig or None, got {type(config).__name__}")
    if name == "reference":
        return Decision(name, "reference", get_plan(problem, config or choose_config(problem, device)))
    if config is None and world_size == 1 and collective.trivial_at_one_rank:
        return Decision(name, "gemm", None)
    plan = get_plan(problem, config or choose_config(problem, device))
    if config is not None or predicts_gain(plan, device):
        return Decision(name, "overlap", plan)
    return Decision(name, "sequential", plan, nccl=True)


def signature_hash(*parts: object) -> int:
    """A 63-bit hash of ``repr(parts)`` that is the same in every process (not ``hash()``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def agree(group: ProcessGroup, decision: Decision, *parts: object) -> None:
    """Raise on every rank of ``group`` unless all ranks made the same call and decision."""
    from .agreement import agree_on_call

    plan_hash = decision.plan.hash_int64() if decision.plan is not None else None
    agree_on_call(group, (*parts, ("engine used", decision.engine), ("path", decision.path),
                          ("nccl fallback", decision.nccl), ("plan", plan_hash),
                          ("local check", "ok")),
                  "flashoverlap call (collective, shapes, dtype, engine, decision, plan)")
