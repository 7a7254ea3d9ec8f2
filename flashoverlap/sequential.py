"""Sequential engine: one GEMM, then one collective.  The baseline every speedup is quoted
against, and what the overlap engine falls back to when its plan predicts no gain."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .dist_utils import reduce_scatter_rows


def run_sequential(
    op: str, a: torch.Tensor, b: torch.Tensor, group: ProcessGroup, out: torch.Tensor
) -> torch.Tensor:
    if op == "all_reduce":
        torch.matmul(a, b, out=out)
        dist.all_reduce(out, group=group)
        return out
    full = a @ b
    reduce_scatter_rows(out, full, group)
    return out
