"""The pipelined Triton kernels' sm_90 PTX, compiled on a CPU: dump it, or compare two dumps.

Role
----
A refactoring of a Triton kernel (a helper pulled out, a prologue shared between kernels)
should not change what runs on the GPU, and the PTX says whether it does -- without a GPU:
Triton compiles for ``sm_90`` on any machine (:func:`flashoverlap.kernels.offline_compile.compile_for`,
the product's launch options).  ``dump DIR`` writes one ``.ptx`` per variant of the signal GEMM
(TMA or pointer loads x split last wave x B layout x residual: 16), the grouped GEMM (TMA or
pointers x weight layout: 4) and the gather GEMM (TMA or pointers x B layout x flag waits: 8),
with what does not reach the GPU removed (debug sections, ``.loc`` / ``.file`` lines, comments,
the ``$L__tmpN`` labels debug info hangs on, which an inlined helper adds).  ``compare A B``
lists the variants whose PTX differs (exit 1) -- run the dump before and after a change, under
every Triton the product supports (the GPU image's 3.6 and PyPI's 3.9 so far:
``PYTHONPATH=<a Triton 3.6 install>:$PWD``).  Used for ``signal_gemm._tma_operands`` and
``_release_tile`` (28 variants identical under both).  The Gluon (warp-specialized) kernels are not dumped:
their PTX-order tests compile them the same way.

    python scripts/kernel_ptx.py dump /tmp/before
    python scripts/kernel_ptx.py compare /tmp/before /tmp/after
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

_DEBUG_LABEL = re.compile(r"\$L__tmp\d+:")


def clean(ptx: str) -> str:
    """The PTX without what does not reach the GPU: debug sections, ``.loc`` / ``.file``
    lines, comments, blank lines and debug-info labels."""
    keep = []
    for line in ptx.splitlines():
        s = line.strip()
        if s.startswith(".section") and "debug" in s:
            break  # the debug sections close the file
        if not s or s.startswith((".loc", ".file", "//")) or _DEBUG_LABEL.fullmatch(s):
            continue
        keep.append(line)
    return "\n".join(keep) + "\n"


def signal_variant(tma: bool, split: bool, b_trans: bool, residual: bool = False):
    """``(kernel, pointer types, constexprs, options)`` of the pipelined signal GEMM (128 x 256
    tiles, counters on, bf16), as the product compiles it for sm_90."""
    from flashoverlap.kernels import signal_gemm as sg

    const = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, B_TRANS=b_trans, HAS_COUNTERS=True,
                 HAS_RESIDUAL=residual, USE_TMA=tma, FLATTEN=True, EPILOGUE_SUBTILE=False,
                 ACC_MULTIBUFFER=True, WARP_SPECIALIZE=False, ALIGN=8, ASM_BARRIER=True,
                 INPUT_PRECISION=None, DOT_FP32=False, SPLIT_TAIL=split)
    ptrs = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "step_ptr": "*i32",
            "counter_ptr": "*i32", "res_ptr": "*bf16", "part_ptr": "*fp32",
            "ticket_ptr": "*i32"}
    return sg._signal_gemm_kernel, ptrs, const, dict(num_warps=8, num_stages=3)


def grouped_variant(tma: bool, w_trans: bool):
    """The same for the pipelined grouped GEMM (128 x 128 tiles, 5 stages)."""
    from flashoverlap.kernels import grouped_signal_gemm as gsg

    const = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, W_TRANS=w_trans, HAS_COUNTERS=True,
                 USE_TMA=tma, FLATTEN=True, ACC_MULTIBUFFER=True, ALIGN=8,
                 ASM_BARRIER=True, INPUT_PRECISION=None, DOT_FP32=False)
    ptrs = {"a_ptr": "*bf16", "w_ptr": "*bf16", "c_ptr": "*bf16", "step_ptr": "*i32",
            "counter_ptr": "*i32"}
    return gsg._grouped_signal_gemm_kernel, ptrs, const, dict(num_warps=8, num_stages=5)


def gather_variant(tma: bool, b_trans: bool, wait_flags: bool):
    """The same for the pipelined gather GEMM (128 x 256 tiles, 3 stages)."""
    from flashoverlap.kernels import gather_gemm as gg

    const = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, B_TRANS=b_trans, WAIT_FLAGS=wait_flags,
                 USE_TMA=tma, ALIGN=8, POLL_ASM=True, PROXY_FENCE=True,
                 INPUT_PRECISION=None, DOT_FP32=False)
    ptrs = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "step_ptr": "*i32",
            "flag_ptr": "*i32"}
    return gg._gather_gemm_kernel, ptrs, const, dict(num_warps=8, num_stages=3)


def variants():
    """``(name, kernel, pointer types, constexprs, options)`` of every dumped variant."""
    on_off = (True, False)
    for tma, split, bt, res in itertools.product(on_off, on_off, on_off, on_off):
        yield (f"signal_tma{tma:d}_split{split:d}_btrans{bt:d}_res{res:d}",
               *signal_variant(tma, split, bt, res))
    for tma, wt in itertools.product(on_off, on_off):
        yield f"grouped_tma{tma:d}_wtrans{wt:d}", *grouped_variant(tma, wt)
    for tma, bt, wait in itertools.product(on_off, on_off, on_off):
        yield f"gather_tma{tma:d}_btrans{bt:d}_wait{wait:d}", *gather_variant(tma, bt, wait)


def dump(directory: Path, only: str | None = None) -> list[Path]:
    """Compile every variant (whose name contains ``only``) and write its cleaned PTX."""
    from flashoverlap.kernels.offline_compile import compile_for

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn, ptrs, const, options in variants():
        if only and only not in name:
            continue
        path = directory / f"{name}.ptx"
        path.write_text(clean(compile_for(fn, ptrs, const, **options).asm["ptx"]))
        written.append(path)
    return written


def compare(a: Path, b: Path) -> list[str]:
    """The variant names whose PTX differs between two dumps, or that only one has."""
    names = sorted({p.name for p in a.glob("*.ptx")} | {p.name for p in b.glob("*.ptx")})
    return [n for n in names
            if not (a / n).exists() or not (b / n).exists()
            or (a / n).read_text() != (b / n).read_text()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="compile every variant and write DIR/<variant>.ptx")
    d.add_argument("dir", type=Path)
    d.add_argument("--only", help="only the variants whose name contains this")
    c = sub.add_parser("compare", help="list the variants whose PTX differs (exit 1 if any)")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "dump":
        import triton

        written = dump(args.dir, args.only)
        print(f"{len(written)} variants (Triton {triton.__version__}) in {args.dir}")
        return 0 if written else 1
    differ = compare(args.a, args.b)
    count = len({q.name for q in args.a.glob('*.ptx')} | {q.name for q in args.b.glob('*.ptx')})
    print(f"{count - len(differ)} of {count} variants identical"
          + (": differ " + ", ".join(differ) if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
