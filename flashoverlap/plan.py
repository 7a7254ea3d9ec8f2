"""The overlap plan: which tile runs when, which group it signals, where it lands.

A plan is a pure, deterministic function of the problem (M, N, K, dtype, world size W, the
collective's name) and a :class:`PlanConfig` (tile ``BM x BN``, GEMM CTA count ``P``, swizzle
width ``group_m``, group sizes in bands).  It needs no GPU; the signal GEMM, the overlap engine
and the reference engine all execute the same plan, and every rank must hold the same one
(:attr:`OverlapPlan.hash`).

Vocabulary
----------
* **row block**: the collective splits the GEMM output ``[M, N]`` into ``B`` row blocks of
  ``M/B`` rows (``B = 1`` for AllReduce, ``W`` for ReduceScatter: one per destination rank).
  Tiles never straddle row blocks, so a block whose height is not a multiple of ``BM`` ends in
  a short (edge) tile.
* **band**: ``group_m`` tile rows of a block, the full width ``N``.  Inside a block the tiles
  run band by band (column-major inside a band, the L2 swizzle of Triton's matmul tutorial),
  and the blocks are interleaved: step ``s`` runs local tile ``s // B`` of block ``s % B``.  So
  band ``b`` of every block is complete after a known step.
* **step**: position in the persistent schedule.  CTA ``p`` runs steps ``p, p+P, p+2P, ...``.
* **group**: a run of consecutive bands (``PlanConfig.group_bands``); one collective call per
  group.  Its tiles are a contiguous step range, and its rows are whole rows: the restore-free
  layouts below need no copy after the collective.

Where a tile lands (``dest_row`` of the step table)
---------------------------------------------------
The GEMM writes every tile into a row-major destination with ``N`` columns: the result itself
for an in-place collective (AllReduce), else a send buffer of ``M`` rows.  Group ``g`` covers
local rows ``[lo_g, hi_g)`` of every block; its send rows are ``[B*lo_g, B*hi_g)``, packed by
block: block ``k``'s rows of the band come at ``B*lo_g + k*(hi_g - lo_g)``.  With one block this
is the identity (``dest_row = row``), so AllReduce reduces the group's rows of the result in
place; with ``W`` blocks it is exactly what ``ncclReduceScatter`` expects, and rank ``r``
receives its block's rows ``[lo_g, hi_g)`` straight into its result.

Rejected: grouping by waves (``P`` tiles) with a tile-granular comm buffer and a restore pass
after each group (the previous design, as in the FlashOverlap paper): groups then end mid-row,
so every call paid a second read and write of the output and one more launch per group.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from functools import cached_property

import numpy as np

from . import collectives

PLAN_FORMAT_VERSION = 2

# Columns of OverlapPlan.step_table (int32), one row per step in execution order.
ROW_START, ROW_STOP, COL_START, COL_STOP, DEST_ROW, GROUP, BLOCK = range(7)
STEP_TABLE_COLUMNS = ("row_start", "row_stop", "col_start", "col_stop", "dest_row", "group",
                      "block")


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """Tunable knobs of a plan.

    Attributes:
        block_m, block_n: tile shape ``BM x BN`` of the GEMM.
        num_ctas: ``P``, CTAs of the persistent GEMM (SMs minus the ones left to NCCL).
        group_m: band height in tile rows (the L2 swizzle width).
        group_bands: bands per communication group, in order.  ``None`` means one group per
            band.  Their sum must equal the plan's band count.
    """

    block_m: int = 128
    block_n: int = 256
    num_ctas: int = 132
    group_m: int = 8
    group_bands: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "num_ctas", "group_m"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PlanConfig.{name} must be a positive int, got {value!r}")
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"PlanConfig.{name} must be a power of two, got {value}")
        if self.group_bands is not None:
            bands = tuple(self.group_bands)
            if not bands or any(not isinstance(w, int) or isinstance(w, bool) or w < 1
                                for w in bands):
                raise ValueError(f"PlanConfig.group_bands must be positive ints, got {bands!r}")
            object.__setattr__(self, "group_bands", bands)
        # Hashed on every call that passes a config (the ops' memo key): computed once.  The
        # fields are ints, whose hashes are the same in every process, so pickling is safe.
        object.__setattr__(self, "_hash", hash(dataclasses.astuple(self)))

    def __hash__(self) -> int:
        return self._hash


@dataclasses.dataclass(frozen=True)
class Problem:
    """``collective(a[M, K] @ b[K, N])`` over ``world_size`` ranks; ``op`` names the collective
    (:func:`flashoverlap.collectives.get`)."""

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
        self.collective.check_problem(self.M, self.N, self.world_size)

    @property
    def collective(self) -> collectives.Collective:
        return collectives.get(self.op)

    @property
    def row_blocks(self) -> int:
        return self.collective.row_blocks(self.world_size)

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


@dataclasses.dataclass(frozen=True)
class BandLayout:
    """Bands of one plan shape, without the step table (what the tuner needs)."""

    row_blocks: int
    tiles_m: int
    tiles_n: int
    num_bands: int
    band_row_lo: np.ndarray  # [num_bands + 1] local row where each band starts (+ the end)
    band_step_end: np.ndarray  # [num_bands] steps after which band b of every block is done

    @property
    def num_tiles(self) -> int:
        return self.row_blocks * self.tiles_m * self.tiles_n


def band_layout(problem: Problem, config: PlanConfig) -> BandLayout:
    """Band geometry of ``problem`` under ``config`` (cheap: no per-tile arrays)."""
    B = problem.row_blocks
    rows = problem.rows_per_block
    tiles_m = math.ceil(rows / config.block_m)
    tiles_n = math.ceil(problem.N / config.block_n)
    num_bands = math.ceil(tiles_m / config.group_m)
    first_tile_row = np.minimum(np.arange(num_bands + 1) * config.group_m, tiles_m)
    row_lo = np.minimum(first_tile_row * config.block_m, rows).astype(np.int64)
    step_end = (B * first_tile_row[1:] * tiles_n).astype(np.int64)
    return BandLayout(B, tiles_m, tiles_n, num_bands, row_lo, step_end)


def num_bands_for(problem: Problem, config: PlanConfig) -> int:
    """Band count of a plan without building it (tuners and defaults)."""
    return band_layout(problem, config).num_bands


def num_waves_for(problem: Problem, config: PlanConfig) -> int:
    """Wave count (``ceil(tiles / P)``) of a plan without building it."""
    return math.ceil(band_layout(problem, config).num_tiles / config.num_ctas)


@dataclasses.dataclass(frozen=True, eq=False)
class OverlapPlan:
    """A fully resolved plan; build it with :func:`make_plan`.

    Array attributes are read-only numpy arrays (int32 where a kernel reads them).
    """

    problem: Problem
    config: PlanConfig
    tiles_m: int  # tile rows per row block
    tiles_n: int
    step_table: np.ndarray  # [T, 7] int32, see STEP_TABLE_COLUMNS
    group_bounds: np.ndarray  # [G+1] step bounds of each group
    group_rows: np.ndarray  # [G+1] local row bounds of each group (rows of every block)

    # -- sizes -------------------------------------------------------------------------
    @property
    def collective(self) -> collectives.Collective:
        return self.problem.collective

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
    def group_tile_counts(self) -> np.ndarray:
        """Tiles (== counter target) of each group."""
        return np.diff(self.group_bounds)

    @property
    def full_tiles(self) -> bool:
        """Every step is a whole ``block_m x block_n`` tile (no row block or ``N`` ends
        inside one): what lets sm_90 run the warp-specialized signal GEMM, whose TMA store
        writes whole tiles (:mod:`flashoverlap.kernels.ws_signal_gemm`)."""
        t = self.step_table
        return bool(((t[:, 1] - t[:, 0]) == self.config.block_m).all()
                    and ((t[:, 3] - t[:, 2]) == self.config.block_n).all())

    @property
    def out_rows(self) -> int:
        """Rows of this rank's result (``M / B``)."""
        return self.problem.rows_per_block

    def spans(self) -> list[collectives.GroupSpan]:
        """Send and result rows of every group (see the module docstring)."""
        B = self.problem.row_blocks
        rows = self.group_rows
        return [collectives.GroupSpan(g, B * int(rows[g]), B * int(rows[g + 1]),
                                      int(rows[g]), int(rows[g + 1]))
                for g in range(self.num_groups)]

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
        for arr in (self.step_table, self.group_bounds, self.group_rows):
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        return h.hexdigest()

    def hash_int64(self) -> int:
        """The first 63 bits of :attr:`hash`, for exchanging as a tensor element."""
        return int(self.hash[:16], 16) >> 1


def make_plan(problem: Problem, config: PlanConfig) -> OverlapPlan:
    """Build the plan for ``problem`` under ``config``; raises ``ValueError`` if inconsistent."""
    layout = band_layout(problem, config)
    B = layout.row_blocks
    BM, BN = config.block_m, config.block_n
    rows = problem.rows_per_block
    tiles_m, tiles_n = layout.tiles_m, layout.tiles_n
    local = swizzled_tile_order(tiles_m, tiles_n, config.group_m)  # [Tl, 2]
    T = local.shape[0] * B

    bands = config.group_bands if config.group_bands is not None else (1,) * layout.num_bands
    if sum(bands) != layout.num_bands:
        raise ValueError(
            f"group_bands {bands} sum to {sum(bands)} but the plan has {layout.num_bands} bands "
            f"({tiles_m} tile rows of {BM} in bands of group_m={config.group_m})"
        )
    band_bounds = np.concatenate([[0], np.cumsum(np.asarray(bands, dtype=np.int64))])
    group_rows = layout.band_row_lo[band_bounds]
    group_bounds = np.concatenate([[0], layout.band_step_end[band_bounds[1:] - 1]])

    # Execution order: step s runs local tile s // B of row block s % B.
    steps = np.arange(T, dtype=np.int64)
    block = steps % B
    tm = local[steps // B, 0]
    tn = local[steps // B, 1]
    local_row = tm * BM
    row_start = block * rows + local_row
    row_stop = np.minimum(row_start + BM, (block + 1) * rows)
    col_start = tn * BN
    col_stop = np.minimum(col_start + BN, problem.N)
    group = np.searchsorted(group_bounds, steps, side="right") - 1
    lo, hi = group_rows[group], group_rows[group + 1]
    dest_row = B * lo + block * (hi - lo) + (local_row - lo)

    table = np.stack([row_start, row_stop, col_start, col_stop, dest_row, group, block], axis=1)
    arrays = dict(
        step_table=table.astype(np.int32),
        group_bounds=group_bounds.astype(np.int64),
        group_rows=group_rows.astype(np.int64),
    )
    for arr in arrays.values():
        arr.setflags(write=False)
    return OverlapPlan(problem=problem, config=config, tiles_m=tiles_m, tiles_n=tiles_n, **arrays)
