"""The plan of an AllGather + GEMM: which tile runs when, and which chunk flag it waits on.

``a_full @ b`` with ``a_full`` ``[m*W, K]`` gathered chunk by chunk
(:mod:`flashoverlap.collectives.all_gather`): the output ``[m*W, N]`` is split into ``W`` row
blocks of ``m`` rows, one per source chunk, and tiles never straddle two blocks (a block whose
height is not a multiple of ``BM`` ends in a short tile), so every tile reads the rows of one
chunk only.

Tile order: block by block in *arrival order* -- slot 0 (this rank's own chunk, ready
first), then slot 1 (the first chunk to arrive), ...; inside a block the swizzled band order
of :func:`flashoverlap.plan.swizzled_tile_order` (``group_m`` tile rows, column-major inside a
band).  A persistent CTA ``p`` runs steps ``p, p+P, ...``, so its steps' slots never
decrease: it waits on a chunk's flag once, the first time it meets the chunk.

Rank independence: the plan is stated in slots, so every rank builds (and hashes) the same
plan; :meth:`GatherPlan.step_table` maps slots to rows for one rank (slot ``j`` is source
rank ``(r - j) mod W``).  The step table has :mod:`flashoverlap.plan`'s seven columns:
``row_start, row_stop, col_start, col_stop, dest_row (= row_start: the GEMM writes the
result itself), group (= the slot: the flag the tile waits on), block (= the source rank)``.

Configs reuse :class:`flashoverlap.plan.PlanConfig` (``block_m``, ``block_n``, ``num_ctas``,
``group_m``; ``group_bands`` must be ``None``: a chunk is the unit of communication).

Default tile (:func:`default_gather_config`): the kernel table's choice for the gathered GEMM
(:func:`flashoverlap.kernels.gemm_config_for`), as for a dense plan -- 128 x 128 where
128 x 256 would leave a poor last wave, bands of 16 tile rows at short K.  Measured on one
H200 with the gather GEMM alone (flags set, plans of 4 and 8 ranks emulated,
``results/2026-12-03-h200/gather-pfit-run26``): on the 7 shapes where the rule picks
128 x 128 (M in 1024-4096, N in 1024-4096, P = 116), the 128 x 256 plan every gather call
took before took 1.07-1.24x as long.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from functools import cached_property

import numpy as np

from .collectives.all_gather import ALL_GATHER
from .plan import PlanConfig, swizzled_tile_order

GATHER_PLAN_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class GatherProblem:
    """``all_gather(a_shard [m, K]) @ b [K, N]`` over ``world_size`` ranks."""

    m: int
    N: int
    K: int
    dtype: str
    world_size: int

    def __post_init__(self) -> None:
        for name in ("m", "N", "K", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    @property
    def M(self) -> int:
        return self.m * self.world_size


@dataclasses.dataclass(frozen=True, eq=False)
class GatherPlan:
    """A resolved gather plan (build it with :func:`make_gather_plan`)."""

    problem: GatherProblem
    config: PlanConfig
    tiles_m: int  # tile rows per chunk
    tiles_n: int
    slot_table: np.ndarray  # [T, 5] int32: slot, local row start/stop, col start/stop

    @property
    def num_tiles(self) -> int:
        return int(self.slot_table.shape[0])

    @property
    def tiles_per_chunk(self) -> int:
        return self.tiles_m * self.tiles_n

    @property
    def num_slots(self) -> int:
        return self.problem.world_size

    @property
    def full_tiles(self) -> bool:
        """Every step is a whole ``block_m x block_n`` tile (``m`` and ``N`` multiples of the
        tile: no chunk or ``N`` ends inside one) -- what lets sm_90 run the warp-specialized
        kernel, whose TMA loads and stores move whole boxes
        (:mod:`flashoverlap.kernels.gather_gemm`)."""
        t = self.slot_table
        return bool(((t[:, 2] - t[:, 1]) == self.config.block_m).all()
                    and ((t[:, 4] - t[:, 3]) == self.config.block_n).all())

    def step_table(self, rank: int) -> np.ndarray:
        """The seven-column step table of ``rank`` (module docstring), int32, read-only."""
        W, m = self.problem.world_size, self.problem.m
        if not 0 <= rank < W:
            raise ValueError(f"rank {rank} outside [0, {W})")
        slot = self.slot_table[:, 0].astype(np.int64)
        src = (rank - slot) % W
        base = src * m
        table = np.stack([base + self.slot_table[:, 1], base + self.slot_table[:, 2],
                          self.slot_table[:, 3], self.slot_table[:, 4],
                          base + self.slot_table[:, 1], slot, src], axis=1).astype(np.int32)
        table.setflags(write=False)
        return table

    def describe(self) -> dict:
        return {"format": GATHER_PLAN_FORMAT_VERSION, "collective": ALL_GATHER.name,
                "problem": dataclasses.asdict(self.problem),
                "config": dataclasses.asdict(self.config)}

    @cached_property
    def hash(self) -> str:
        """Identical on every rank that built the same plan (it is stated in slots)."""
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.slot_table, dtype=np.int64).tobytes())
        return h.hexdigest()


def make_gather_plan(problem: GatherProblem, config: PlanConfig) -> GatherPlan:
    """The plan of ``problem`` under ``config`` (``ValueError`` if ``group_bands`` is set)."""
    if not isinstance(config, PlanConfig):
        raise TypeError(f"config must be a PlanConfig, got {type(config).__name__}")
    if config.group_bands is not None:
        raise ValueError("an AllGather plan has one group per chunk: leave group_bands=None")
    BM, BN = config.block_m, config.block_n
    m, N = problem.m, problem.N
    tiles_m, tiles_n = math.ceil(m / BM), math.ceil(N / BN)
    local = swizzled_tile_order(tiles_m, tiles_n, config.group_m)  # [tiles_m*tiles_n, 2]
    W = problem.world_size
    slot = np.repeat(np.arange(W, dtype=np.int64), local.shape[0])
    tm = np.tile(local[:, 0], W)
    tn = np.tile(local[:, 1], W)
    row_lo = tm * BM
    row_hi = np.minimum(row_lo + BM, m)
    col_lo = tn * BN
    col_hi = np.minimum(col_lo + BN, N)
    table = np.stack([slot, row_lo, row_hi, col_lo, col_hi], axis=1).astype(np.int32)
    table.setflags(write=False)
    return GatherPlan(problem, config, tiles_m, tiles_n, table)


def default_gather_config(problem: GatherProblem, num_sms: int | None = None,
                          capability: tuple[int, int] | None = None,
                          reserved_sms: int = 16) -> PlanConfig:
    """A GPU config: ``SMs - reserved_sms`` CTAs (the reserved SMs are NCCL's: see
    :mod:`flashoverlap.engine.gather` on deadlock freedom) and the tile and band height that
    :func:`flashoverlap.kernels.gemm_config_for` picks for the gathered ``[m*W, K] @ [K, N]``
    on those CTAs (``capability=None``: sm_90) -- the same choice as a dense plan's, 128 x 128
    where 128 x 256 would leave a poor last wave --, ``group_m`` shrunk while a chunk has
    fewer tile rows.  ``num_sms=None``: a CPU config (small tiles)."""
    if num_sms is None:
        bm = 64
        while bm > 16 and problem.m < bm:
            bm //= 2
        return PlanConfig(block_m=bm, block_n=64, num_ctas=4, group_m=1)
    from .kernels import gemm_config_for

    P = max(num_sms - reserved_sms, 1)
    choice = gemm_config_for(problem.M, problem.N, problem.K, problem.dtype, P, capability)
    bm, bn = choice.config.block_m, choice.config.block_n
    tiles_m = math.ceil(problem.m / bm)
    group_m = choice.group_m
    while group_m > 1 and group_m > tiles_m:
        group_m //= 2
    return PlanConfig(block_m=bm, block_n=bn, num_ctas=P, group_m=group_m)
