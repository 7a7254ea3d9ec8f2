"""flashoverlap: hide tensor-parallel communication behind the GEMM that produces it.

Public API::

    gemm_all_reduce(a, b, group=None, *, out=None, residual=None, residual_replicated=False,
                    engine=None, config=None)
    gemm_reduce_scatter(a, b, group=None, *, scatter_dim=0, out=None, residual=None,
                        engine=None, config=None)
    gemm_collective(a, b, collective, group=None, *, out=None, residual=None, ...)
    gemm_all_to_all(a, b, output_split_sizes=None, input_split_sizes=None, group=None, out=None)
    grouped_gemm_all_to_all(a, w, counts, output_split_sizes, group=None, out=None)
    collectives                             # the Collective protocol, ALL_REDUCE, REDUCE_SCATTER
    PlanConfig, Problem, make_plan          # the overlap plan (pure Python)
    RowParallelLinear, row_parallel_linear  # tensor-parallel layer (flashoverlap.nn)
    all_gather_gemm(a_shard, b, group=None, out=None, gathered=None, *, engine=None, config=None)
    ColumnParallelLinear, column_parallel_linear  # flashoverlap.column_parallel
    patch_tensor_parallel(model, group=None, *, pattern=None, engine=None, sequence_parallel=False)
    unpatch_tensor_parallel(result)         # flashoverlap.patch
    torch.ops.flashoverlap.gemm_collective  # the torch.library op (registered on import)

GPU dependencies (Triton, CuPy, cuda-bindings, NCCL) are imported only when the overlap engine
runs, so this package imports on CPU-only machines with torch and numpy alone.  The design
record is ``docs/design.md`` and the module docstrings.
"""

from . import collectives
from . import library_ops as _library_ops  # registers torch.ops.flashoverlap.gemm_collective
from .all_to_all_ops import gemm_all_to_all, grouped_gemm_all_to_all
from .collectives import Collective
from .column_parallel import ColumnParallelLinear, column_parallel_linear
from .gather_ops import all_gather_gemm  # registers torch.ops.flashoverlap.all_gather_gemm
from .nn import RowParallelLinear, row_parallel_linear
from .ops import ENGINES, EngineName, gemm_all_reduce, gemm_collective, gemm_reduce_scatter
from .patch import patch_tensor_parallel, unpatch_tensor_parallel
from .plan import OverlapPlan, PlanConfig, Problem, make_plan

__version__ = "0.1.0"

__all__ = [
    "Collective",
    "ColumnParallelLinear",
    "ENGINES",
    "EngineName",
    "OverlapPlan",
    "PlanConfig",
    "Problem",
    "RowParallelLinear",
    "all_gather_gemm",
    "collectives",
    "column_parallel_linear",
    "gemm_all_reduce",
    "gemm_all_to_all",
    "gemm_collective",
    "gemm_reduce_scatter",
    "grouped_gemm_all_to_all",
    "make_plan",
    "patch_tensor_parallel",
    "row_parallel_linear",
    "unpatch_tensor_parallel",
    "__version__",
]
