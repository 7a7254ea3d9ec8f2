"""Render flashoverlap's CUDA C templates and compile them at run time (NVRTC via CuPy).

Role
----
The few pieces of CUDA C that are neither Triton kernels nor NCCL live here as ``.cu``
templates beside this file: the spin-wait fallback of :mod:`flashoverlap.stream_wait` (a restore + residual epilogue
lived here until plans became restore-free).  A template is plain CUDA C with ``${name}`` placeholders
(:class:`string.Template`), so it reads like the code that runs; this module fills the
placeholders (kernel name, tile shape, storage type, conversions) and hands the source to
NVRTC through CuPy.

Why run-time compilation: no build step, no nvcc on the user's machine, and the source is
specialised to the exact tile shape and dtype (compile-time constants) the plan chose.
CuPy caches compiled binaries on disk (``~/.cupy/kernel_cache``), so a process pays NVRTC
once per (source, GPU architecture).  Nothing here imports CuPy until a kernel is compiled.
"""

from __future__ import annotations

import functools
import string
from pathlib import Path
from typing import Any

TEMPLATE_DIR = Path(__file__).resolve().parent
WAIT_GEQ_KERNEL = "flashoverlap_wait_geq"



def template_names() -> list[str]:
    """Names of the available templates (``.cu`` files beside this module)."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.cu"))


@functools.lru_cache(maxsize=None)
def _template(name: str) -> string.Template:
    path = TEMPLATE_DIR / f"{name}.cu"
    if not path.is_file():
        raise ValueError(f"no CUDA template {name!r}; available: {template_names()}")
    return string.Template(path.read_text())


def render(name: str, **params: Any) -> str:
    """Source of template ``name`` with every ``${param}`` filled (a missing one raises)."""
    try:
        return _template(name).substitute({k: str(v) for k, v in params.items()})
    except KeyError as exc:
        raise ValueError(f"template {name!r} needs parameter {exc.args[0]!r}") from None


def _check_identifier(name: str) -> str:
    if not name.isidentifier():
        raise ValueError(f"kernel name must be a C identifier, got {name!r}")
    return name


def wait_geq_source(kernel_name: str = WAIT_GEQ_KERNEL, min_backoff_ns: int = 32,
                    max_backoff_ns: int = 1024) -> str:
    """The spin-wait kernel ``kernel_name(const unsigned* counter, unsigned target)``."""
    if not 0 < min_backoff_ns <= max_backoff_ns:
        raise ValueError(f"need 0 < min_backoff_ns <= max_backoff_ns, got {min_backoff_ns}, "
                         f"{max_backoff_ns}")
    return render("wait_geq", kernel_name=_check_identifier(kernel_name),
                  min_backoff_ns=f"{int(min_backoff_ns)}u", max_backoff_ns=f"{int(max_backoff_ns)}u")


@functools.lru_cache(maxsize=None)
def cupy_kernel(source: str, kernel_name: str, options: tuple[str, ...] = ("--std=c++17",)) -> Any:
    """A ``cupy.RawKernel`` for ``source`` (compiled by NVRTC on first use per device)."""
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(
            "compiling flashoverlap's CUDA C kernels needs CuPy: install it with "
            "`pip install flashoverlap[cuda12]` or `pip install flashoverlap[cuda13]`"
        ) from exc
    return cupy.RawKernel(source, kernel_name, options=options)
