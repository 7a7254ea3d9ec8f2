"""Relaunch an already compiled Triton kernel without the JIT's per-call dispatch.

``kernel[grid](*args)`` re-derives the specialization of every argument, hashes it, looks
the compiled kernel up and checks the kernel's globals on *every* launch: about 20 us of host
time on an H100 host (Triton 3.6), where the launch itself (``CompiledKernel.run``) takes
about 10.  The overlap engine launches one GEMM per call, with
arguments whose specialization is fixed by the plan, so it resolves the compiled kernel once
through a normal launch (which returns it) and then calls its launcher directly.

A compiled kernel is valid only for the specialization it was compiled for: argument dtypes,
16-byte alignment of pointers, and integers equal to 1 or divisible by 16 unless the kernel
lists them in ``do_not_specialize``.  :class:`KernelCache` keys its entries on exactly the
properties the caller lets vary; everything else must be fixed by the caller's key.

The launcher's calling convention (``run(gx, gy, gz, stream, function, packed_metadata,
launch_metadata, enter_hook, exit_hook, *args)`` with *all* parameters, constexprs included,
in declaration order) is the one ``JITFunction.run`` uses from Triton 3.4 on.  Elsewhere, in
the interpreter, or with ``FLASHOVERLAP_DIRECT_LAUNCH=0``, :data:`ENABLED` is false and
callers take the normal path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import triton


def _supported() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    from ..settings import settings

    if not settings().direct_launch:
        return False
    try:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (3, 4) and hasattr(triton, "knobs")


ENABLED: bool = _supported()


def ordered_args(fn: Any, args: Sequence[Any], meta: dict[str, Any]) -> tuple:
    """Every parameter of the ``@triton.jit`` function ``fn`` in declaration order.

    ``args`` are the leading positional arguments, ``meta`` the keyword ones; launch options
    (``num_warps``, ``num_stages``, ...) in ``meta`` are not parameters and are dropped.
    """
    names = fn.arg_names
    values = dict(zip(names, args))
    for name in names[len(args):]:
        if name not in meta:
            raise TypeError(f"{fn.__name__}: no value for parameter {name!r}")
        values[name] = meta[name]
    return tuple(values[name] for name in names)


def launch(kernel: Any, grid: tuple[int, int, int], stream: int, args: tuple) -> None:
    """Launch compiled ``kernel`` on the raw CUDA ``stream`` handle with ``args`` (all
    parameters, as :func:`ordered_args` gives them).  Profiler hooks still fire."""
    runtime = triton.knobs.runtime
    kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
               kernel.launch_metadata(grid, stream, *args), runtime.launch_enter_hook,
               runtime.launch_exit_hook, *args)


class KernelCache:
    """Compiled kernels (or entries holding one) by the caller's specialization key.

    The caller launches through the JIT when :meth:`get` has nothing for its key and hands
    the compiled kernel that launch returned to :meth:`remember`, with whatever else it wants
    back from :meth:`get` as ``entry`` (default: the kernel itself); with the cache disabled
    (:data:`ENABLED` false) nothing is remembered and every launch goes through the JIT.
    """

    def __init__(self) -> None:
        self._kernels: dict[Any, Any] = {}

    def __len__(self) -> int:
        return len(self._kernels)

    def get(self, key: Any) -> Any | None:
        return self._kernels.get(key)

    def remember(self, key: Any, compiled: Any, entry: Any = None) -> None:
        """``compiled``: the kernel a JIT launch returned (the interpreter's None is not
        kept), or a launcher the caller calls itself (a callable: the cluster GEMM)."""
        if ENABLED and compiled is not None and (hasattr(compiled, "run") or callable(compiled)):
            self._kernels[key] = compiled if entry is None else entry
