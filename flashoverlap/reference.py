"""Reference engine: the overlap plan executed group by group with ``torch.matmul``.

For each group, in plan order: compute the group's tiles with one ``torch.matmul`` per tile
row band (``a[rows] @ b[:, cols]``), pack them into the group's slots of the comm buffer, and
start an asynchronous collective on that slot range; then, group by group, wait and restore
the received slots into the output.  It uses exactly the plan's slots, shares and restore map,
so on any backend (gloo on CPU, NCCL on CUDA) it checks the plan end to end; on CUDA it is the
classic *decomposition* baseline (compute of group g+1 overlaps the collective of group g).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .dist_utils import reduce_scatter_rows
from .plan import COL_START, COL_STOP, ROW_START, ROW_STOP, SLOT, OverlapPlan


Recipe = tuple[int, int, int, int, torch.Tensor, torch.Tensor]


@functools.lru_cache(maxsize=64)
def _group_recipes(plan: OverlapPlan, device: torch.device) -> list[list[Recipe]]:
    """Per group, per tile row band: (row_start, row_stop, col_lo, col_hi, tile_cols, slots).

    ``tile_cols`` are the band's tile indices relative to ``col_lo // BN``; computing the band
    once and gathering tiles from it costs one matmul per band instead of one per tile.  Index
    tensors live on ``device`` and are cached with the plan, so a call copies nothing to it.
    """
    BN = plan.config.block_n
    table = plan.step_table.astype(np.int64)
    recipes = []
    for g in range(plan.num_groups):
        rows = table[plan.group_bounds[g] : plan.group_bounds[g + 1]]
        bands = []
        for row_start in np.unique(rows[:, ROW_START]):
            band = rows[rows[:, ROW_START] == row_start]
            col_lo = int(band[:, COL_START].min())
            col_hi = int(band[:, COL_STOP].max())
            tile_cols = torch.tensor((band[:, COL_START] - col_lo) // BN, device=device)
            slots = torch.tensor(band[:, SLOT], dtype=torch.int64, device=device)
            bands.append((int(row_start), int(band[0, ROW_STOP]), col_lo, col_hi, tile_cols, slots))
        recipes.append(bands)
    return recipes


def tiles_view(x: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """``[rows, cols]`` (multiples of the block) viewed as ``[tiles_m, tiles_n, BM, BN]``."""
    rows, cols = x.shape
    return x.view(rows // block_m, block_m, cols // block_n, block_n).permute(0, 2, 1, 3)


def compute_group(plan: OverlapPlan, a: torch.Tensor, b: torch.Tensor, buf: torch.Tensor, g: int) -> None:
    """Write group ``g``'s tiles of ``a @ b`` into their slots of ``buf [T, BM, BN]``."""
    BM, BN = plan.config.block_m, plan.config.block_n
    for row_start, row_stop, col_lo, col_hi, tile_cols, slots in _group_recipes(plan, a.device)[g]:
        band = a[row_start:row_stop] @ b[:, col_lo:col_hi]
        width = -(-(col_hi - col_lo) // BN) * BN
        band = torch.nn.functional.pad(band, (0, width - band.shape[1], 0, BM - band.shape[0]))
        tiles = tiles_view(band, BM, BN)[0]  # [n_cols, BM, BN]
        buf[slots] = tiles[tile_cols]


@functools.lru_cache(maxsize=64)
def _restore_index(plan: OverlapPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(plan.restore_tile_m, device=device),
            torch.tensor(plan.restore_tile_n, device=device))


def restore_group(plan: OverlapPlan, recv: torch.Tensor, out_padded: torch.Tensor, g: int) -> None:
    """Copy group ``g``'s received slots into the padded output grid."""
    lo, hi = int(plan.restore_bounds[g]), int(plan.restore_bounds[g + 1])
    tm, tn = _restore_index(plan, recv.device)
    tm, tn = tm[lo:hi], tn[lo:hi]
    tiles_view(out_padded, plan.config.block_m, plan.config.block_n)[tm, tn] = recv[lo:hi]


def run_reference(
    plan: OverlapPlan,
    a: torch.Tensor,
    b: torch.Tensor,
    group: ProcessGroup,
    out: torch.Tensor,
) -> torch.Tensor:
    """Execute ``plan`` on ``a @ b`` with one async collective per group; fills ``out``."""
    BM, BN = plan.config.block_m, plan.config.block_n
    W = plan.problem.world_size
    reduce_scatter = plan.problem.op == "reduce_scatter"
    buf = torch.empty(plan.num_tiles, BM, BN, dtype=a.dtype, device=a.device)
    # With one rank the ReduceScatter share is the whole range: receive in place.
    scatter = reduce_scatter and W > 1
    recv = torch.empty(plan.recv_tiles, BM, BN, dtype=a.dtype, device=a.device) if scatter else buf
    # gloo has no native reduce-scatter on every torch version: reduce the whole range there
    # and keep this rank's share (same result, more traffic; the CPU path is for checking).
    gloo = "gloo" in str(dist.get_backend(group)).lower()
    rank = dist.get_rank(group)

    works = []
    for g in range(plan.num_groups):
        compute_group(plan, a, b, buf, g)
        lo, hi = int(plan.group_bounds[g]), int(plan.group_bounds[g + 1])
        if not scatter or gloo:
            works.append(dist.all_reduce(buf[lo:hi], group=group, async_op=True))
        else:
            rlo, rhi = int(plan.restore_bounds[g]), int(plan.restore_bounds[g + 1])
            works.append(reduce_scatter_rows(recv[rlo:rhi], buf[lo:hi], group, async_op=True))

    rows, N = plan.out_rows, plan.problem.N
    padded_shape = (plan.tiles_m * BM, plan.tiles_n * BN)
    direct = tuple(out.shape) == padded_shape and out.is_contiguous()
    out_padded = out if direct else torch.empty(padded_shape, dtype=out.dtype, device=out.device)
    for g, work in enumerate(works):
        work.wait()
        if scatter and gloo:
            lo, hi = int(plan.group_bounds[g]), int(plan.group_bounds[g + 1])
            share = (hi - lo) // W
            rlo = int(plan.restore_bounds[g])
            recv[rlo : rlo + share] = buf[lo + rank * share : lo + (rank + 1) * share]
        restore_group(plan, recv, out_padded, g)
    if not direct:
        out.copy_(out_padded[:rows, :N])
    return out
