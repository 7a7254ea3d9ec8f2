"""CUDA C templates of flashoverlap and the generator that renders them (see generate.py)."""

from .generate import (
    RESTORE_DTYPES,
    WAIT_GEQ_KERNEL,
    cupy_kernel,
    render,
    restore_residual_source,
    template_names,
    wait_geq_source,
)

__all__ = [
    "RESTORE_DTYPES",
    "WAIT_GEQ_KERNEL",
    "cupy_kernel",
    "render",
    "restore_residual_source",
    "template_names",
    "wait_geq_source",
]
