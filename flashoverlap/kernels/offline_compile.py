"""Compile a Triton or Gluon kernel for an NVIDIA architecture on a machine without a GPU.

Role: the release protocol of the signal GEMMs is an ordering of instructions (stores, a
barrier or bulk-store wait, then a release atomic), and Triton's compiler -- not the source --
decides that order.  The PTX-order tests (``tests/test_signal_gemm_ptx_cpu.py``,
``tests/test_ws_signal_gemm_cpu.py``, ``tests/test_ws_grouped_signal_gemm_cpu.py``) and
``scripts/multicast_probe.py --ptx`` read the PTX the compiler emits for sm_90 on the CPU
(Triton ships ``ptxas``; no driver is needed).  One recipe serves all of them: pointer
arguments typed and marked 16-byte divisible (what the host's launch checks guarantee),
constexprs bound, every other argument an ``i32`` (shapes and strides are never specialized),
and the compile options every product launch names (:data:`flashoverlap.kernels.LAUNCH_OPTIONS`,
so the PTX read is the PTX launched -- and Triton 3.9 does not warn about the fp-fusion default).
"""

from __future__ import annotations

from typing import Any


def compile_for(fn: Any, ptrs: dict[str, str], const: dict[str, Any], *, arch: int = 90,
                **options: Any) -> Any:
    """``fn`` (a ``triton.jit`` or ``gluon.jit`` function) compiled for ``sm_<arch>``:
    ``ptrs`` maps pointer parameters to Triton types (``"*bf16"``), ``const`` binds the
    constexprs, ``options`` are compile options (``num_warps``, ``num_ctas``, ...).  Returns
    Triton's compiled kernel (``.asm["ptx"]``, ``.metadata``); compiler errors propagate."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource
    try:
        from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

        if isinstance(fn, GluonJITFunction):
            source = GluonASTSource
    except ImportError:  # a Triton without Gluon compiles plain Triton kernels only
        pass
    names = fn.arg_names
    sig = {n: ptrs.get(n, "constexpr" if n in const else "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ptrs}
    src = source(fn=fn, signature=sig, attrs=attrs,
                 constexprs={(names.index(n),): v for n, v in const.items()})
    from . import LAUNCH_OPTIONS

    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={**LAUNCH_OPTIONS, **options})
