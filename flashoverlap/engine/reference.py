"""Reference engine: the overlap plan executed group by group with ``torch.matmul`` and
asynchronous ``torch.distributed`` calls.

For each group, in plan order: compute the group's rows of every row block with one matmul per
block (into the result itself for an in-place collective, else into the packed send buffer at
the plan's rows, the residual added where the collective's rule puts it in the GEMM epilogue)
and start the group's collective asynchronously (:meth:`Collective.torch_group`); then wait
for the groups in order (adding the residual after a group where the rule says so).  It uses
exactly the plan's groups and layout, so on any backend (gloo on CPU) it checks the plan end to
end; on CUDA it is the classic *decomposition* baseline (the matmul of group g+1 overlaps the
collective of group g).
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from ..plan import OverlapPlan


def run_reference(
    plan: OverlapPlan,
    a: torch.Tensor,
    b: torch.Tensor,
    group: ProcessGroup,
    out: torch.Tensor,
    *,
    rank: int,
    residual: torch.Tensor | None = None,
    residual_replicated: bool = False,
) -> torch.Tensor:
    """Execute ``plan`` on ``a @ b`` with one async collective per group; fills ``out``."""
    collective = plan.collective
    problem = plan.problem
    B, rows = problem.row_blocks, problem.rows_per_block
    in_place = collective.in_place_for(problem.world_size)
    dest = out if in_place else torch.empty(
        (problem.M, problem.N), dtype=a.dtype, device=a.device)
    rule = (collective.residual_rule(rank, problem.world_size, residual_replicated)
            if residual is not None else None)
    after = residual if rule is not None and rule.after_group else None
    if after is not None and after.data_ptr() == out.data_ptr():
        # out is the residual: the GEMM (in place) or the collective (into the result rows)
        # overwrites a group's rows before its residual is added
        after = after.clone()
    epilogue_block = rule.epilogue_block if rule is not None else None

    finishes = []
    for span in plan.spans():
        lo, hi = span.recv_lo, span.recv_hi
        for k in range(B):
            d = dest[span.send_lo + k * (hi - lo): span.send_lo + (k + 1) * (hi - lo)]
            a_rows = a[k * rows + lo: k * rows + hi]
            if k == epilogue_block:
                r = residual[lo:hi]
                if r.data_ptr() == d.data_ptr():
                    d.addmm_(a_rows, b)
                else:
                    torch.addmm(r, a_rows, b, out=d)
            else:
                torch.matmul(a_rows, b, out=d)
        finishes.append(collective.torch_group(dest[span.send_lo:span.send_hi],
                                               out[lo:hi], group))
    for span, finish in zip(plan.spans(), finishes):
        finish()
        if after is not None:
            out[span.recv_lo:span.recv_hi].add_(after[span.recv_lo:span.recv_hi])
    return out
