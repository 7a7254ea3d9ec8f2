"""The analytic default plan, used when no tuned config matches (see ``flashoverlap.tuning``).

Rules, chosen from DESIGN.md's measurements rather than tuned per shape:
* tile ``128 x 256`` (the Hopper GEMM's block; the kernel module may pick another per arch);
* ``P = SMs - 16`` GEMM CTAs: 16 SMs are left to NCCL, which on NVLink costs AllReduce
  ~10% bandwidth (0.65 -> 0.71 ms for 128 MiB) while the GEMM keeps ~90% of its rate;
  for ReduceScatter ``P`` is rounded down to a multiple of the world size;
* groups: about four groups of equal wave counts.  The first group is kept to one wave so the
  first collective starts as early as possible; small problems (fewer than two waves) get one
  group, and the engine then falls back to sequential.
"""

from __future__ import annotations

import math

from .plan import PlanConfig, Problem, num_waves_for

DEFAULT_BLOCK = (128, 256)
DEFAULT_RESERVED_SMS = 16
DEFAULT_GROUP_M = 8
TARGET_GROUPS = 4


def split_waves(num_waves: int, target_groups: int = TARGET_GROUPS) -> tuple[int, ...]:
    """One small first group, then the rest in ~equal groups; sums to ``num_waves``."""
    if num_waves <= 1:
        return (max(num_waves, 1),)
    groups = min(target_groups, num_waves)
    rest = num_waves - 1
    tail = groups - 1
    sizes = [rest // tail + (1 if i < rest % tail else 0) for i in range(tail)]
    return (1, *sizes)


def default_plan_config(
    problem: Problem,
    num_sms: int = 132,
    block: tuple[int, int] = DEFAULT_BLOCK,
    reserved_sms: int = DEFAULT_RESERVED_SMS,
) -> PlanConfig:
    """The analytic default :class:`PlanConfig` for ``problem`` on a GPU with ``num_sms``."""
    W = problem.world_size
    P = max(num_sms - reserved_sms, 1)
    if problem.op == "reduce_scatter":
        P = max(P // W * W, W)
    base = PlanConfig(block_m=block[0], block_n=block[1], num_ctas=P, group_m=DEFAULT_GROUP_M)
    waves = num_waves_for(problem, base)
    return PlanConfig(
        block_m=block[0], block_n=block[1], num_ctas=P, group_m=DEFAULT_GROUP_M,
        group_waves=split_waves(waves),
    )


def cpu_plan_config(problem: Problem, block: tuple[int, int] = (64, 64)) -> PlanConfig:
    """A plan for the reference engine on CPU: small tiles, about four groups."""
    W = problem.world_size
    probe = PlanConfig(block_m=block[0], block_n=block[1], num_ctas=W)
    tiles = num_waves_for(problem, probe) * W
    P = max(math.ceil(tiles / TARGET_GROUPS / W) * W, W)
    base = PlanConfig(block_m=block[0], block_n=block[1], num_ctas=P)
    waves = num_waves_for(problem, base)
    return PlanConfig(block_m=block[0], block_n=block[1], num_ctas=P, group_waves=(1,) * waves)
