"""Test helper: a kernel's sm_90 PTX compiled on the CPU, or a skip where this Triton cannot
(no CUDA backend or ptxas).  The recipe is :func:`flashoverlap.kernels.offline_compile.compile_for`."""

from __future__ import annotations

from typing import Any

import pytest


def sm90_ptx(fn: Any, ptrs: dict[str, str], const: dict[str, Any], **options: Any) -> str:
    pytest.importorskip("triton")
    from flashoverlap.kernels.offline_compile import compile_for

    try:
        compiled = compile_for(fn, ptrs, const, **options)
    except Exception as exc:  # noqa: BLE001 - a Triton without the CUDA backend / ptxas
        if "ptxas" in str(exc).lower() or "backend" in str(exc).lower():
            pytest.skip(f"cannot compile for sm_90 here: {exc}")
        raise
    return compiled.asm["ptx"]
