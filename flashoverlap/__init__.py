"""flashoverlap: hide tensor-parallel communication behind the GEMM that produces it.

Public API::

    gemm_all_reduce(a, b, group=None, *, out=None, engine=None, config=None)
    gemm_reduce_scatter(a, b, group=None, *, scatter_dim=0, out=None, engine=None, config=None)
    PlanConfig, Problem, make_plan          # the overlap plan (pure Python)

GPU dependencies (Triton, CuPy, cuda-bindings, NCCL) are imported only when the overlap engine
runs, so this package imports on CPU-only machines with torch and numpy alone.
"""

from .ops import ENGINES, EngineName, gemm_all_reduce, gemm_reduce_scatter
from .plan import OverlapPlan, PlanConfig, Problem, make_plan

__version__ = "0.1.0"

__all__ = [
    "ENGINES",
    "EngineName",
    "OverlapPlan",
    "PlanConfig",
    "Problem",
    "gemm_all_reduce",
    "gemm_reduce_scatter",
    "make_plan",
    "__version__",
]
