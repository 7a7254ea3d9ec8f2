"""Test helper: a kernel's sm_90 PTX compiled on the CPU, or a skip where this Triton cannot
(no CUDA backend or ptxas).  The recipe is :func:`flashoverlap.kernels.offline_compile.compile_for`."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest


@contextlib.contextmanager
def skip_unless_sm90_compiles():
    """Turns a compile failure for want of Triton's CUDA backend or ``ptxas`` into a skip;
    any other error (a kernel that does not compile) propagates."""
    pytest.importorskip("triton")
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - a Triton without the CUDA backend / ptxas
        if "ptxas" in str(exc).lower() or "backend" in str(exc).lower():
            pytest.skip(f"cannot compile for sm_90 here: {exc}")
        raise


def sm90_ptx(fn: Any, ptrs: dict[str, str], const: dict[str, Any], **options: Any) -> str:
    with skip_unless_sm90_compiles():
        from flashoverlap.kernels.offline_compile import compile_for

        compiled = compile_for(fn, ptrs, const, **options)
    return compiled.asm["ptx"]
