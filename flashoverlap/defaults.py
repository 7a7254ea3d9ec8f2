"""Rule-based default plans: the GPU fallback when the tuner is unavailable, and the CPU plan.

The tuner (``flashoverlap.tuning.search.analytic_default``) is the usual source of a default
on a GPU; these rules need nothing but :mod:`flashoverlap.plan`.

Rules, chosen from measurements (docs/design.md, "Reference numbers") rather than tuned
per shape:

* tile ``128 x 256`` (the Hopper GEMM's block; the kernel module may pick another per arch);
* ``P = SMs - 16`` GEMM CTAs: 16 SMs are left to NCCL, which on NVLink costs AllReduce
  ~10% bandwidth (0.65 -> 0.71 ms for 128 MiB) while the GEMM keeps ~90% of its rate.  No
  rounding to the world size: groups are whole row bands of every row block, so any ``P``
  gives every rank the same rows per group;
* bands: a group is a run of whole bands (``group_m`` tile rows, the full width), so the
  band count bounds how fine the pipeline can be.  ``group_m`` is the GEMM's preferred swizzle
  width (L2 reuse: 8 as in Triton's matmul, 16 for K < 4096 -- ``kernels.GEMM_RULES``) unless
  that leaves fewer than :data:`MIN_BANDS` bands; then the largest power of two that gives
  that many (down to 1: one tile row per band);
* groups: about four groups of equal band counts, the first one band only so the first
  collective starts as early as possible; a single band gives one group, and the engine
  then falls back to sequential.
"""

from __future__ import annotations

import math

from .plan import PlanConfig, Problem, band_layout, num_bands_for

DEFAULT_BLOCK = (128, 256)
DEFAULT_RESERVED_SMS = 16
DEFAULT_GROUP_M = 8
MIN_BANDS = 8
TARGET_GROUPS = 4
CPU_MIN_BLOCK_M = 16


def split_bands(num_bands: int, target_groups: int = TARGET_GROUPS) -> tuple[int, ...]:
    """One band first, then the rest in ~equal groups; sums to ``num_bands``."""
    if num_bands <= 1:
        return (max(num_bands, 1),)
    groups = min(target_groups, num_bands)
    if groups <= 1:
        return (num_bands,)
    rest = num_bands - 1
    tail = groups - 1
    sizes = [rest // tail + (1 if i < rest % tail else 0) for i in range(tail)]
    return (1, *sizes)


def band_group_m(problem: Problem, block_m: int, *, max_group_m: int | None = None,
                 min_bands: int = MIN_BANDS) -> int:
    """The largest power of two ``<= max_group_m`` that leaves ``min_bands`` bands, else 1.

    ``max_group_m=None``: the band height the GEMM prefers for the problem's shape,
    :func:`flashoverlap.kernels.gemm_config_for`'s ``group_m`` (:data:`DEFAULT_GROUP_M` but
    where a measured rule says otherwise; matched with the sm_90 table at 132 CTAs -- no band
    height depends on ``P`` or the GPU today: only the tile does, :func:`~flashoverlap.
    kernels.wave_tile`, which keeps the band height).
    """
    if max_group_m is None:
        from .kernels import gemm_config_for  # torch-only import; no GPU needed

        try:
            max_group_m = gemm_config_for(problem.M, problem.N, problem.K,
                                          problem.dtype).group_m
        except TypeError:  # a dtype the GEMM table does not know: the default swizzle
            max_group_m = DEFAULT_GROUP_M
    tiles_m = math.ceil(problem.rows_per_block / block_m)
    group_m = 1 << (max(max_group_m, 1).bit_length() - 1)
    while group_m > 1 and math.ceil(tiles_m / group_m) < min_bands:
        group_m //= 2
    return group_m


def default_plan_config(
    problem: Problem,
    num_sms: int = 132,
    block: tuple[int, int] = DEFAULT_BLOCK,
    reserved_sms: int = DEFAULT_RESERVED_SMS,
) -> PlanConfig:
    """The rule-based :class:`PlanConfig` for ``problem`` on a GPU with ``num_sms``."""
    P = max(num_sms - reserved_sms, 1)
    group_m = band_group_m(problem, block[0])
    base = PlanConfig(block_m=block[0], block_n=block[1], num_ctas=P, group_m=group_m)
    return PlanConfig(block_m=block[0], block_n=block[1], num_ctas=P, group_m=group_m,
                      group_bands=split_bands(num_bands_for(problem, base)))


def cpu_plan_config(problem: Problem, block: tuple[int, int] = (64, 64)) -> PlanConfig:
    """A plan for the reference engine on CPU: small tiles, one tile row per band, about
    four groups.

    ``block_m`` is halved (down to :data:`CPU_MIN_BLOCK_M`) while a row block has fewer than
    four tile rows, so that small ``M`` still gives several groups.  ``P`` runs one band of
    every row block per wave (it does not change the reference engine's result).
    """
    rows = problem.rows_per_block
    block_m = block[0]
    while block_m > CPU_MIN_BLOCK_M and math.ceil(rows / block_m) < TARGET_GROUPS:
        block_m //= 2
    base = PlanConfig(block_m=block_m, block_n=block[1], num_ctas=1, group_m=1)
    layout = band_layout(problem, base)
    return PlanConfig(block_m=block_m, block_n=block[1],
                      num_ctas=layout.row_blocks * layout.tiles_n, group_m=1,
                      group_bands=split_bands(layout.num_bands))
