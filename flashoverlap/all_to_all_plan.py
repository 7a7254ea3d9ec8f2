"""The plan of a (grouped) GEMM + AllToAll: uneven row segments, one expert per tile.

:mod:`flashoverlap.plan` cuts the GEMM output into ``B`` *equal* row blocks; an AllToAll
needs blocks of any height (``input_splits``) and, in the grouped (MoE) form, one segment per
(local expert ``e``, destination ``d``) with its own weight matrix ``w[e]``.  This module is
that generalisation, kept beside :mod:`flashoverlap.plan` so the equal-block planner (and its
hash, cache schema and tests) stays as it is.

Problem
-------
``counts[e][d]`` rows of ``a`` belong to expert ``e`` and go to rank ``d``; ``a`` is ordered
by expert, then destination (segment ``(e, d)`` starts at ``a_offset[e][d]``).  The send side
is ordered by destination, then expert (``send_offset[d] + seg_offset[e][d]``): that reorder is
done by the GEMM's stores (``dest_row``), not by a copy.  ``recv_splits[s]`` rows arrive from
rank ``s`` and are stored in ``out`` by source rank.  The plain form is ``E = 1``.

Tiles and groups
----------------
Tiles never straddle a segment (a segment whose height is not a multiple of ``BM`` ends in a
short tile).  Destinations are visited in *ring order* ``o = 1, 2, ..., W-1, 0``: ring offset
``o`` sends to ``(r + o) % W`` and receives from ``(r - o) % W`` -- the pairwise exchange
schedule.  A group is a run of ring offsets (``PlanConfig.group_bands``: offsets per group,
summing to ``W``; default one per offset); its tiles are the segments of its destinations,
expert by expert, each in the swizzled band order of :func:`flashoverlap.plan.swizzled_tile_order`.
Group ``g`` of rank ``r`` then sends *whole* destination blocks (contiguous on the send side)
and receives whole source blocks (contiguous in ``out``), so

* the receiver needs only its own ``recv_splits`` to place what arrives -- no rank needs the
  global split matrix to build its plan, and nothing is copied after the exchange;
* the sends of rank ``r``'s group ``g`` (ring offset ``o``) meet the receives of rank
  ``(r+o) % W``'s group ``g`` (the same offset), so the groups match across ranks whenever the
  config does and the splits are consistent (``input_splits`` of ``s`` to ``d`` ==
  ``output_splits`` of ``d`` from ``s``, which the ops check across ranks once per call
  signature);
* the self block (offset 0) comes last and is written by the GEMM straight into ``out``:
  no transfer, no send-buffer rows (at world size 1 the op is a grouped GEMM into ``out``).

Rejected: groups of row *bands* across every segment (as ReduceScatter does).  A band of a
destination block cuts every expert's segment, so its rows are not contiguous on either side
(E transfers per peer per group, or a restore pass), and the receiver would need every
sender's per-expert counts to size them.  The cost of the ring grouping is granularity: ``W``
groups at most (at ``W = 2``, half of the output overlaps the other half's GEMM).

Step table
----------
``int32 [T, 9]``: :mod:`flashoverlap.plan`'s seven columns (``row_start, row_stop`` -- rows of
``a``; ``col_start, col_stop``; ``dest_row`` -- row in the send buffer, or in ``out`` when
``to_out``; ``group``; ``block`` -- the destination rank) plus ``expert`` (which ``w[e]``) and
``to_out`` (1: the self block, stored into ``out``).

Device-side counts (no host sync) -- not implemented
----------------------------------------------------
Today the counts are host integers: the plan (step table, group tile counts, transfer sizes)
is built on the host, and a new count matrix means a new plan and one small blocking exchange
(the cross-rank check).  Keeping counts on the device would need: (1) a step table the GEMM
derives on the device from a counts tensor (prefix sums per (e, d), tiles per segment, a
device-side tile -> (segment, tile) search, as MoE grouped GEMMs do with a tile-offset array),
a grid sized for the worst case with idle CTAs exiting; (2) counter targets computed on the
device (the stream wait compares with a host constant today: a device-written target needs
``cuStreamWaitValue`` on a value written by a kernel, or a spin kernel that reads both);
(3) NCCL transfer sizes on the device -- NCCL's host API takes host counts, so either a
fixed-capacity exchange (send ``capacity`` rows per peer, padded, plus the counts; receivers
compact) or a device-initiated transport (NCCL's device API / NVSHMEM put with signal).
(4) The receiver's ``output_splits`` would then be device data too, so ``out`` is sized for
the capacity.  Capacity padding costs bandwidth; the host-known path is what
``torch.distributed.all_to_all_single`` offers as well.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from functools import cached_property

import numpy as np

from .collectives.all_to_all import AllToAll
from .plan import PlanConfig, swizzled_tile_order

A2A_PLAN_FORMAT_VERSION = 1

# Columns of AllToAllPlan.step_table (int32): plan.py's seven, then the expert and to_out.
ROW_START, ROW_STOP, COL_START, COL_STOP, DEST_ROW, GROUP, BLOCK, EXPERT, TO_OUT = range(9)
A2A_STEP_COLUMNS = 9

_ELEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def _as_counts(counts) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(x) for x in row) for row in counts)


@dataclasses.dataclass(frozen=True)
class AllToAllProblem:
    """``counts[e][d]`` rows for expert ``e`` going to rank ``d`` (``[E][W]``),
    ``recv_splits[s]`` rows from rank ``s``; ``w`` is ``[E, K, N]``; this is ``rank`` of
    ``world_size``."""

    counts: tuple[tuple[int, ...], ...]
    recv_splits: tuple[int, ...]
    N: int
    K: int
    dtype: str
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "counts", _as_counts(self.counts))
        object.__setattr__(self, "recv_splits", tuple(int(x) for x in self.recv_splits))
        W = self.world_size
        if not self.counts or any(len(row) != W for row in self.counts):
            raise ValueError(f"counts must be [E][{W}] with E >= 1, got {self.counts!r}")
        if len(self.recv_splits) != W:
            raise ValueError(f"output splits must have {W} entries, got {self.recv_splits!r}")
        if any(x < 0 for row in self.counts for x in row) or any(x < 0 for x in self.recv_splits):
            raise ValueError("split sizes and counts must be non-negative")
        if self.N < 1 or self.K < 1:
            raise ValueError(f"N and K must be positive, got N={self.N}, K={self.K}")
        if not 0 <= self.rank < W:
            raise ValueError(f"rank {self.rank} outside a group of {W}")
        if self.recv_splits[self.rank] != self.send_splits[self.rank]:
            raise ValueError(
                f"this rank sends itself {self.send_splits[self.rank]} rows but expects "
                f"{self.recv_splits[self.rank]} from itself (output_split_sizes[{self.rank}])")

    @property
    def E(self) -> int:
        return len(self.counts)

    @property
    def M(self) -> int:
        return sum(map(sum, self.counts))

    @cached_property
    def send_splits(self) -> tuple[int, ...]:
        return tuple(int(sum(row[d] for row in self.counts)) for d in range(self.world_size))

    @property
    def recv_rows(self) -> int:
        return sum(self.recv_splits)

    @property
    def elem_bytes(self) -> int:
        return _ELEM_BYTES[self.dtype]

    def offsets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(a_offset[E, W], send_offset[W], seg_offset[E, W], recv_offset[W])``."""
        c = np.asarray(self.counts, dtype=np.int64).reshape(self.E, self.world_size)
        a_off = (np.cumsum(c.reshape(-1)) - c.reshape(-1)).reshape(c.shape)
        send = c.sum(axis=0)
        send_off = np.cumsum(send) - send
        seg_off = np.cumsum(c, axis=0) - c
        recv = np.asarray(self.recv_splits, dtype=np.int64)
        return a_off, send_off, seg_off, np.cumsum(recv) - recv

    def ring(self) -> list[int]:
        """Ring offsets in execution order: the other ranks first, this rank's block last."""
        return list(range(1, self.world_size)) + [0]


@dataclasses.dataclass(frozen=True)
class Segment:
    """Rows ``[a_lo, a_lo + rows)`` of ``a`` times ``w[expert]``, stored at ``dest_lo`` of
    the send buffer (or of ``out`` when ``to_out``); part of ``group``.  ``send_lo``: the
    segment's rows in the whole send side (the sequential path's buffer)."""

    group: int
    expert: int
    dest: int
    a_lo: int
    rows: int
    dest_lo: int
    to_out: bool
    send_lo: int


@dataclasses.dataclass(frozen=True, eq=False)
class AllToAllPlan:
    """A resolved plan (:func:`make_all_to_all_plan`); arrays are read-only."""

    problem: AllToAllProblem
    config: PlanConfig
    segments: tuple[Segment, ...]
    step_table: np.ndarray  # [T, 9] int32
    group_bounds: np.ndarray  # [G+1] step bounds of each group
    group_collectives: tuple[AllToAll, ...]  # the transfers of each group
    exchange: AllToAll  # the whole exchange (sequential path)

    @property
    def num_tiles(self) -> int:
        return int(self.step_table.shape[0])

    @property
    def num_groups(self) -> int:
        return len(self.group_collectives)

    @property
    def group_tile_counts(self) -> np.ndarray:
        return np.diff(self.group_bounds)

    @property
    def send_rows(self) -> int:
        """Rows of the send buffer (``M``; the self block's rows stay unused)."""
        return self.problem.M

    @property
    def needs_send_buffer(self) -> bool:
        return any(not s.to_out for s in self.segments)

    @property
    def communicates(self) -> bool:
        return any(not c.empty for c in self.group_collectives)

    def describe(self) -> dict:
        return {"format": A2A_PLAN_FORMAT_VERSION, "problem": dataclasses.asdict(self.problem),
                "config": dataclasses.asdict(self.config)}

    @cached_property
    def hash(self) -> str:
        """Digest of this rank's plan (plans differ across ranks: their counts do)."""
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.step_table, dtype=np.int64).tobytes())
        return h.hexdigest()


def make_all_to_all_plan(problem: AllToAllProblem, config: PlanConfig) -> AllToAllPlan:
    """Build this rank's plan; ``ValueError`` if ``config.group_bands`` does not sum to W."""
    W, E, N = problem.world_size, problem.E, problem.N
    rank = problem.rank
    BM, BN = config.block_m, config.block_n
    ring = problem.ring()
    per_group = config.group_bands if config.group_bands is not None else (1,) * W
    if sum(per_group) != W:
        raise ValueError(f"group_bands {per_group} must sum to the group size {W} (AllToAll "
                         f"plans group ring offsets, one per destination)")
    group_of_pos = np.repeat(np.arange(len(per_group)), per_group)
    a_off, send_off, seg_off, recv_off = problem.offsets()
    tiles_n = math.ceil(N / BN)

    segments: list[Segment] = []
    rows_tables: list[np.ndarray] = []
    group_bounds = [0]
    transfers: list[tuple[list, list]] = [([], []) for _ in per_group]
    steps = 0
    for pos, o in enumerate(ring):
        g = int(group_of_pos[pos])
        d, s = (rank + o) % W, (rank - o) % W
        if o:
            if problem.send_splits[d]:
                transfers[g][0].append((d, int(send_off[d]) * N, problem.send_splits[d] * N))
            if problem.recv_splits[s]:
                transfers[g][1].append((s, int(recv_off[s]) * N, problem.recv_splits[s] * N))
        for e in range(E):
            rows = problem.counts[e][d]
            if rows == 0:
                continue
            to_out = d == rank
            dest_lo = int((recv_off[rank] if to_out else send_off[d]) + seg_off[e, d])
            seg = Segment(g, e, d, int(a_off[e, d]), rows, dest_lo, to_out,
                          int(send_off[d] + seg_off[e, d]))
            segments.append(seg)
            tiles_m = math.ceil(rows / BM)
            local = swizzled_tile_order(tiles_m, tiles_n, config.group_m)
            local_row = local[:, 0] * BM
            col = local[:, 1] * BN
            row_start = seg.a_lo + local_row
            table = np.stack([
                row_start, np.minimum(row_start + BM, seg.a_lo + rows),
                col, np.minimum(col + BN, N),
                dest_lo + local_row, np.full_like(col, g), np.full_like(col, d),
                np.full_like(col, e), np.full_like(col, int(to_out)),
            ], axis=1)
            rows_tables.append(table)
            steps += table.shape[0]
        if pos + 1 == len(ring) or group_of_pos[pos + 1] != g:
            group_bounds.append(steps)
    table = (np.concatenate(rows_tables) if rows_tables
             else np.zeros((0, A2A_STEP_COLUMNS), dtype=np.int64)).astype(np.int32)
    bounds = np.asarray(group_bounds, dtype=np.int64)
    for arr in (table, bounds):
        arr.setflags(write=False)
    eb = problem.elem_bytes
    collectives = tuple(AllToAll(tuple(snd), tuple(rcv), eb, problem.M, problem.recv_rows)
                        for snd, rcv in transfers)
    exchange = AllToAll.from_splits(problem.send_splits, problem.recv_splits, N, eb)
    return AllToAllPlan(problem, config, tuple(segments), table, bounds, collectives, exchange)
