"""The overlap plan: which tile runs when, which group it signals, where it lands.

A plan is a pure, deterministic function of the problem (M, N, K, dtype, world size W, op)
and a :class:`PlanConfig` (tile ``BM x BN``, GEMM CTA count ``P``, swizzle ``group_m``,
group sizes in waves).  It needs no GPU; the signal GEMM, the overlap engine and the
reference engine all execute the same plan, and every rank must hold the same one
(:attr:`OverlapPlan.hash`).

Vocabulary
----------
* **row block**: AllReduce has one row block (all ``M`` rows); ReduceScatter has ``W`` row
  blocks of ``M/W`` rows, one per destination rank.  Tiles never straddle row blocks, so a
  block whose height is not a multiple of ``BM`` ends in a short (edge) tile.
* **step**: position in the persistent schedule.  CTA ``p`` runs steps ``p, p+P, p+2P, ...``;
  step ``s`` belongs to **wave** ``s // P``.
* **group**: a run of consecutive waves; one collective per group.
* **slot**: a tile's index in the comm buffer ``[T, BM, BN]`` (every tile padded to
  ``BM x BN``; padding is never read back).  Each group owns one contiguous slot range.

Layout rules (DESIGN.md)
------------------------
* AllReduce: slots follow execution order, so group ``g`` is slots
  ``[bounds[g], bounds[g+1])`` and the restore reads the reduced slots back into ``[M, N]``.
* ReduceScatter: the order interleaves the row blocks (step ``s`` runs local tile ``s // W``
  of rank ``s % W``), so every group holds the same local tiles for every rank.  Inside a
  group the slots are packed by destination rank, so ``ncclReduceScatter`` over the group's
  range hands rank ``r`` its share: ``(bounds[g+1]-bounds[g]) / W`` tiles, which it restores
  into its ``[M/W, N]`` shard.  Group bounds are multiples of ``W`` because ``P % W == 0``.

The *restore* view is uniform for both ops: after group ``g``'s collective, restore slots
``[restore_bounds[g], restore_bounds[g+1])`` of the received buffer (the comm buffer itself
for AllReduce, the ``[T/W, BM, BN]`` receive buffer for ReduceScatter) into the output grid
at tile coordinates ``(restore_tile_m[slot], restore_tile_n[slot])``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from functools import cached_property
from typing import Literal

import numpy as np

Op = Literal["all_reduce", "reduce_scatter"]
OPS: tuple[str, ...] = ("all_reduce", "reduce_scatter")
PLAN_FORMAT_VERSION = 1

# Columns of OverlapPlan.step_table (int32), one row per step in execution order.
ROW_START, ROW_STOP, COL_START, COL_STOP, SLOT, GROUP = range(6)
STEP_TABLE_COLUMNS = ("row_start", "row_stop", "col_start", "col_stop", "slot", "group")


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """Tunable knobs of a plan.

    Attributes:
        block_m, block_n: tile shape ``BM x BN`` of the GEMM (and of every comm-buffer slot).
        num_ctas: ``P``, CTAs of the persistent GEMM (SMs minus the ones left to NCCL).
        group_m: swizzle width: tiles run in bands of ``group_m`` tile rows for L2 reuse.
        group_waves: waves per communication group, in order.  ``None`` means one group
            per wave.  Their sum must equal the plan's wave count.
    """

    block_m: int = 128
    block_n: int = 256
    num_ctas: int = 132
    group_m: int = 8
    group_waves: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "num_ctas", "group_m"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PlanConfig.{name} must be a positive int, got {value!r}")
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"PlanConfig.{name} must be a power of two, got {value}")
        if self.group_waves is not None:
            waves = tuple(self.group_waves)
            if not waves or any(not isinstance(w, int) or w < 1 for w in waves):
                raise ValueError(f"PlanConfig.group_waves must be positive ints, got {waves!r}")
            object.__setattr__(self, "group_waves", waves)


@dataclasses.dataclass(frozen=True)
class Problem:
    """``out = reduce_over_ranks(a[M, K] @ b[K, N])`` with ``op`` over ``world_size`` ranks."""

    M: int
    N: int
    K: int
    dtype: str
    world_size: int
    op: str

    def __post_init__(self) -> None:
        for name in ("M", "N", "K", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.op == "reduce_scatter" and self.M % self.world_size:
            raise ValueError(
                f"reduce_scatter needs M divisible by the world size: M={self.M}, "
                f"world_size={self.world_size}"
            )

    @property
    def row_blocks(self) -> int:
        return self.world_size if self.op == "reduce_scatter" else 1

    @property
    def rows_per_block(self) -> int:
        return self.M // self.row_blocks


def swizzled_tile_order(tiles_m: int, tiles_n: int, group_m: int) -> np.ndarray:
    """Tile coordinates ``[(tm, tn)]`` of a ``tiles_m x tiles_n`` grid in swizzled order.

    Same rule as the Triton matmul tutorial: bands of ``group_m`` tile rows, column-major
    inside a band, so consecutive tiles share A rows and B columns in L2.
    """
    t = np.arange(tiles_m * tiles_n, dtype=np.int64)
    per_band = group_m * tiles_n
    band = t // per_band
    first_m = band * group_m
    band_rows = np.minimum(tiles_m - first_m, group_m)
    within = t % per_band
    tm = first_m + within % band_rows
    tn = within // band_rows
    return np.stack([tm, tn], axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class OverlapPlan:
    """A fully resolved plan; build it with :func:`make_plan`.

    Array attributes are read-only numpy arrays (int32 where a kernel reads them).
    """

    problem: Problem
    config: PlanConfig
    tiles_m: int  # tile rows per row block
    tiles_n: int
    step_table: np.ndarray  # [T, 6] int32, see STEP_TABLE_COLUMNS
    group_bounds: np.ndarray  # [G+1] step (== slot) bounds of each group in the comm buffer
    restore_bounds: np.ndarray  # [G+1] slot bounds of each group in the received buffer
    restore_tile_m: np.ndarray  # [R] tile row (in the output grid) of each received slot
    restore_tile_n: np.ndarray  # [R] tile column of each received slot

    # -- sizes -------------------------------------------------------------------------
    @property
    def num_tiles(self) -> int:
        return int(self.step_table.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.group_bounds.shape[0] - 1)

    @property
    def num_waves(self) -> int:
        return math.ceil(self.num_tiles / self.config.num_ctas)

    @property
    def tile_elems(self) -> int:
        return self.config.block_m * self.config.block_n

    @property
    def group_tile_counts(self) -> np.ndarray:
        """Tiles (== counter target) of each group."""
        return np.diff(self.group_bounds)

    @property
    def out_rows(self) -> int:
        """Rows of the op's output: M for AllReduce, M/W for ReduceScatter."""
        return self.problem.rows_per_block

    @property
    def recv_tiles(self) -> int:
        """Slots of the received buffer (the comm buffer itself for AllReduce)."""
        return int(self.restore_tile_m.shape[0])

    def wave_of_step(self) -> np.ndarray:
        return np.arange(self.num_tiles) // self.config.num_ctas

    # -- identity ----------------------------------------------------------------------
    def describe(self) -> dict:
        """JSON-able identity of the plan (problem + config + format version)."""
        return {
            "format": PLAN_FORMAT_VERSION,
            "problem": dataclasses.asdict(self.problem),
            "config": dataclasses.asdict(self.config),
        }

    @cached_property
    def hash(self) -> str:
        """Stable hex digest: identical on every rank that built the same plan."""
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        for arr in (self.step_table, self.group_bounds, self.restore_bounds,
                    self.restore_tile_m, self.restore_tile_n):
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        return h.hexdigest()

    def hash_int64(self) -> int:
        """The first 63 bits of :attr:`hash`, for exchanging as a tensor element."""
        return int(self.hash[:16], 16) >> 1


def num_waves_for(problem: Problem, config: PlanConfig) -> int:
    """Wave count of a plan without building it (for tuners and defaults)."""
    tiles = problem.row_blocks * math.ceil(problem.rows_per_block / config.block_m)
    tiles *= math.ceil(problem.N / config.block_n)
    return math.ceil(tiles / config.num_ctas)


def make_plan(problem: Problem, config: PlanConfig) -> OverlapPlan:
    """Build the plan for ``problem`` under ``config``; raises ``ValueError`` if inconsistent."""
    W = problem.world_size
    blocks = problem.row_blocks
    BM, BN, P = config.block_m, config.block_n, config.num_ctas
    if problem.op == "reduce_scatter" and P % W:
        raise ValueError(
            f"reduce_scatter needs num_ctas divisible by the world size so that every group "
            f"holds the same tiles for every rank: num_ctas={P}, world_size={W}"
        )
    rows = problem.rows_per_block
    tiles_m = math.ceil(rows / BM)
    tiles_n = math.ceil(problem.N / BN)
    local = swizzled_tile_order(tiles_m, tiles_n, config.group_m)  # [Tl, 2]
    T_local = local.shape[0]
    T = T_local * blocks

    # Execution order: step s runs local tile s // blocks of row block s % blocks.
    steps = np.arange(T, dtype=np.int64)
    block = steps % blocks
    local_idx = steps // blocks
    tm = local[local_idx, 0]
    tn = local[local_idx, 1]
    row_start = block * rows + tm * BM
    row_stop = np.minimum(row_start + BM, (block + 1) * rows)
    col_start = tn * BN
    col_stop = np.minimum(col_start + BN, problem.N)

    num_waves = math.ceil(T / P)
    waves = config.group_waves if config.group_waves is not None else (1,) * num_waves
    if sum(waves) != num_waves:
        raise ValueError(
            f"group_waves {waves} sum to {sum(waves)} but the plan has {num_waves} waves "
            f"({T} tiles over {P} CTAs)"
        )
    wave_ends = np.cumsum(np.asarray(waves, dtype=np.int64))
    group_bounds = np.concatenate([[0], np.minimum(wave_ends * P, T)]).astype(np.int64)
    group = np.searchsorted(group_bounds, steps, side="right") - 1

    # Slots: AllReduce keeps execution order; ReduceScatter packs each group by rank.
    if blocks == 1:
        slot = steps.copy()
    else:
        start = group_bounds[group]
        share = (group_bounds[group + 1] - start) // blocks
        slot = start + block * share + (steps - start) // blocks
    restore_bounds = group_bounds // blocks
    # Received slot i holds local tile i (execution order of one rank's tiles).
    restore_tile_m = local[:, 0]
    restore_tile_n = local[:, 1]

    table = np.stack([row_start, row_stop, col_start, col_stop, slot, group], axis=1)
    arrays = dict(
        step_table=table.astype(np.int32),
        group_bounds=group_bounds,
        restore_bounds=restore_bounds.astype(np.int64),
        restore_tile_m=restore_tile_m.astype(np.int64),
        restore_tile_n=restore_tile_n.astype(np.int64),
    )
    for arr in arrays.values():
        arr.setflags(write=False)
    return OverlapPlan(problem=problem, config=config, tiles_m=tiles_m, tiles_n=tiles_n, **arrays)
