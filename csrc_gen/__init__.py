"""CUDA C templates of flashoverlap and the generator that renders them (see generate.py)."""

from .generate import (
    WAIT_GEQ_KERNEL,
    cupy_kernel,
    render,
    template_names,
    wait_geq_source,
)

__all__ = [
    "WAIT_GEQ_KERNEL",
    "cupy_kernel",
    "render",
    "template_names",
    "wait_geq_source",
]
