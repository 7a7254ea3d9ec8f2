"""Host time per NCCL call: flashoverlap's ctypes binding against NVIDIA's nccl4py.

The overlap engine's hot loop issues one NCCL call per group from raw pointers, so the host
cost of that call is first-order for small shapes.  This measures, on one GPU with a 1-rank
communicator (NCCL moves nothing; what is timed is the binding), the enqueue time of
``ncclAllReduce`` of a 1 MiB bf16 buffer on a stream:

* ``ctypes``: :class:`flashoverlap.nccl_lib.NCCLLibrary` (the engine's path),
* ``nccl4py-bindings``: ``nccl.bindings.nccl.all_reduce`` (Cython, raw pointers),
* ``nccl4py-core``: ``nccl.core.Communicator.allreduce`` on torch tensors, where available,

each as the median over batches of 1000 calls (the stream synchronised between batches so
the launch queue never fills).  Also reports which NCCL each one loaded.  Usage::

    python scripts/nccl_binding_bench.py --out results/.../nccl-binding.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _batches(fn, calls: int, batches: int) -> float:
    """Median microseconds per call of ``fn`` over ``batches`` batches of ``calls``."""
    per_call = []
    for _ in range(batches):
        torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter_ns() - t0) / calls / 1e3)
        torch.cuda.synchronize()
    return statistics.median(per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from flashoverlap import nccl_lib
    from flashoverlap.comm import NcclCommunicator, new_unique_id

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    buf = torch.randn(1 << 19, device=device, dtype=torch.bfloat16)  # 1 MiB
    stream = torch.cuda.Stream(device=device)
    handle = stream.cuda_stream
    rows = []

    comm = NcclCommunicator.from_unique_id(new_unique_id(), 0, 1, device=device)
    lib, c = comm.lib, comm.handle
    dt, op = nccl_lib.nccl_dtype(torch.bfloat16), nccl_lib.nccl_red_op("sum")
    ptr, n = buf.data_ptr(), buf.numel()
    us = _batches(lambda: lib.all_reduce(ptr, ptr, n, dt, op, c, handle), args.calls,
                  args.batches)
    rows.append({"binding": "ctypes", "host_us_per_call": us, "nccl": lib.version_string})

    try:
        import nccl.bindings.nccl as nb

        uid = nb.get_unique_id()
        comm4 = nb.comm_init_rank(1, uid, 0)
        version = nb.get_version() if hasattr(nb, "get_version") else None
        us = _batches(lambda: nb.all_reduce(ptr, ptr, n, dt, op, comm4, handle), args.calls,
                      args.batches)
        rows.append({"binding": "nccl4py-bindings", "host_us_per_call": us,
                     "nccl": version})
        # Interop: nccl4py's functions on flashoverlap's own communicator (created through
        # ctypes) -- only sound when both resolve to one mapped libnccl.
        maps = sorted({line.split()[-1] for line in open("/proc/self/maps")
                       if "libnccl" in line and "/" in line})
        rows.append({"binding": "nccl4py-on-flashoverlap-comm", "libnccl_mapped": maps})
        try:
            import gc

            from flashoverlap.nccl_enqueue import binding_status, enqueue_binding

            wrapped = nb.Comm(c)  # wraps, must not own: dropping it keeps the comm alive
            del wrapped
            gc.collect()
            lib.all_reduce(ptr, ptr, n, dt, op, c, handle)
            torch.cuda.synchronize()
            fast, cw = enqueue_binding(comm)
            rows[-1]["engine_binding"] = binding_status(lib)
            buf.fill_(1.0)
            fast.all_reduce(ptr, ptr, n, dt, op, cw, handle)
            half = n // 2
            fast.reduce_scatter(ptr, ptr, half, dt, op, cw, handle)
            torch.cuda.synchronize()
            ok = bool((buf == 1.0).all())
            us_ar = _batches(lambda: fast.all_reduce(ptr, ptr, n, dt, op, cw, handle),
                             args.calls, args.batches)
            us_rs = _batches(lambda: fast.reduce_scatter(ptr, ptr, half, dt, op, cw, handle),
                             args.calls, args.batches)
            us_rs_ct = _batches(lambda: lib.reduce_scatter(ptr, ptr, half, dt, op, c, handle),
                                args.calls, args.batches)
            rows[-1].update(result_ok=ok, all_reduce_us=us_ar, reduce_scatter_us=us_rs,
                            reduce_scatter_ctypes_us=us_rs_ct)
            try:
                fast.all_reduce(ptr, ptr, n, dt, 99, cw, handle)  # invalid op: how errors look
            except Exception as exc:  # noqa: BLE001
                rows[-1]["error_example"] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
            torch.cuda.synchronize()
            lib.all_reduce(ptr, ptr, n, dt, op, c, handle)  # the comm still works after it
            torch.cuda.synchronize()
            rows[-1]["comm_ok_after_error"] = True
        except Exception as exc:  # noqa: BLE001
            rows[-1]["error"] = repr(exc)[:300]
        try:
            import nccl.core as nc

            core = nc.Communicator._from_comm(comm4) if hasattr(nc.Communicator, "_from_comm") \
                else None
            if core is not None and hasattr(core, "allreduce"):
                with torch.cuda.stream(stream):
                    us = _batches(lambda: core.allreduce(buf, buf, "sum", stream=handle),
                                  args.calls, args.batches)
                rows.append({"binding": "nccl4py-core", "host_us_per_call": us})
        except Exception as exc:  # noqa: BLE001 - report, don't fail the measurement
            rows.append({"binding": "nccl4py-core", "error": repr(exc)[:300]})
    except Exception as exc:  # noqa: BLE001
        rows.append({"binding": "nccl4py-bindings", "error": repr(exc)[:300]})

    meta = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "calls": args.calls, "batches": args.batches, "bytes": buf.numel() * 2}
    for row in rows:
        row.update(meta)
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
