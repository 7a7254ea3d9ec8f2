"""Reference engine: the overlap plan executed group by group with ``torch.matmul``.

For each group, in plan order: compute the group's tiles with one ``torch.matmul`` per swizzle
band it touches (``a[rows] @ b[:, cols]``, a few per group), pack them into the group's slots of the comm buffer, and
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
from .plan import COL_START, COL_STOP, ROW_START, SLOT, OverlapPlan


# (row_lo, row_hi, col_lo, col_hi, tile_rows, tile_cols, slots): one matmul box and where its
# tiles go.
Recipe = tuple[int, int, int, int, torch.Tensor, torch.Tensor, torch.Tensor]


@functools.lru_cache(maxsize=64)
def _group_recipes(plan: OverlapPlan, device: torch.device) -> list[list[Recipe]]:
    """Per group, one matmul box per swizzle band the group touches.

    A band is ``group_m`` tile rows of one row block; the swizzled order walks a band column
    by column, so a group's tiles in a band fill a box ``band rows x [col_lo, col_hi)`` up to
    a partial first and last column.  One ``a[rows] @ b[:, cols]`` per box (a few per group)
    computes every tile of the group with little waste; ``tile_rows``/``tile_cols`` pick the
    group's tiles out of the box.  Index tensors live on ``device``, cached with the plan.
    """
    BM, BN = plan.config.block_m, plan.config.block_n
    band_rows = plan.config.group_m * BM
    rows_per_block = plan.problem.rows_per_block
    table = plan.step_table.astype(np.int64)
    block = table[:, ROW_START] // rows_per_block
    band = (table[:, ROW_START] - block * rows_per_block) // band_rows
    recipes = []
    for g in range(plan.num_groups):
        lo, hi = plan.group_bounds[g], plan.group_bounds[g + 1]
        steps, keys = table[lo:hi], np.stack([block[lo:hi], band[lo:hi]], axis=1)
        boxes = []
        for blk, bnd in np.unique(keys, axis=0):
            tiles = steps[(keys[:, 0] == blk) & (keys[:, 1] == bnd)]
            row_lo = int(blk * rows_per_block + bnd * band_rows)
            row_hi = int(min(row_lo + band_rows, (blk + 1) * rows_per_block))
            col_lo, col_hi = int(tiles[:, COL_START].min()), int(tiles[:, COL_STOP].max())
            boxes.append((
                row_lo, row_hi, col_lo, col_hi,
                torch.tensor((tiles[:, ROW_START] - row_lo) // BM, device=device),
                torch.tensor((tiles[:, COL_START] - col_lo) // BN, device=device),
                torch.tensor(tiles[:, SLOT], dtype=torch.int64, device=device),
            ))
        recipes.append(boxes)
    return recipes


def tiles_view(x: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """``[rows, cols]`` (multiples of the block) viewed as ``[tiles_m, tiles_n, BM, BN]``."""
    rows, cols = x.shape
    return x.view(rows // block_m, block_m, cols // block_n, block_n).permute(0, 2, 1, 3)


def _pad_to_tiles(x: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    rows, cols = x.shape
    pad_r, pad_c = -rows % block_m, -cols % block_n
    return torch.nn.functional.pad(x, (0, pad_c, 0, pad_r)) if pad_r or pad_c else x


def compute_group(plan: OverlapPlan, a: torch.Tensor, b: torch.Tensor, buf: torch.Tensor, g: int) -> None:
    """Write group ``g``'s tiles of ``a @ b`` into their slots of ``buf [T, BM, BN]``."""
    BM, BN = plan.config.block_m, plan.config.block_n
    for row_lo, row_hi, col_lo, col_hi, tile_rows, tile_cols, slots in _group_recipes(plan, a.device)[g]:
        box = _pad_to_tiles(a[row_lo:row_hi] @ b[:, col_lo:col_hi], BM, BN)
        buf[slots] = tiles_view(box, BM, BN)[tile_rows, tile_cols]


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
