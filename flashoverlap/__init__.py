"""flashoverlap: hide tensor-parallel communication behind the GEMM that produces it.

Public API::

    gemm_all_reduce(a, b, group=None, *, out=None, engine=None, config=None)
    gemm_reduce_scatter(a, b, group=None, *, scatter_dim=0, out=None, engine=None, config=None)
    PlanConfig, Problem, make_plan          # the overlap plan (pure Python)
    RowParallelLinear                       # tensor-parallel layer (flashoverlap.nn)
    patch_tensor_parallel(model, group=None, *, pattern=None, engine=None, sequence_parallel=False)
    unpatch_tensor_parallel(result)         # flashoverlap.patch

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
    "RowParallelLinear",
    "patch_tensor_parallel",
    "unpatch_tensor_parallel",
]

# Layers and patching register torch.library ops and import torch.distributed.tensor: loaded
# on first use so that `import flashoverlap` stays light.
_LAZY = {
    "RowParallelLinear": "nn",
    "patch_tensor_parallel": "patch",
    "unpatch_tensor_parallel": "patch",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flashoverlap' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
