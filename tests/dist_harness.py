"""Run a function on W processes joined by a gloo (or NCCL) process group.

``run_distributed(fn, W, *args)`` spawns W processes; each initialises torch.distributed
through a file store in a fresh temp dir, calls ``fn(rank, W, *args)`` and tears down.  An
exception on any rank fails the caller with that rank's traceback (``mp.spawn`` semantics).
``fn`` must be defined at module level so the spawned interpreter can import it.
"""

from __future__ import annotations

import gc
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, backend: str, fn, args) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        fn(rank, world_size, *args)
    finally:
        # Objects that a reference cycle keeps alive (an exception's traceback frames hold
        # the c10d Work of a collective) go while the process group still exists.
        gc.collect()
        dist.destroy_process_group()


# A rendezvous failure of the transport itself is retried once (seen once in CI on a loaded
# 2-core machine: gloo's connectFullMesh "Connection closed by peer" before any test code
# ran); any other failure -- inside ``fn``, or a rank that dies after it ("terminate called
# without an active exception" at exit, the bug of issue 12) -- fails the test.
_TRANSPORT_FLAKES = ("connectFullMesh",)


def run_distributed(fn, world_size: int, *args, backend: str = "gloo") -> None:
    for attempt in range(2):
        with tempfile.TemporaryDirectory() as tmp:
            init_file = os.path.join(tmp, "store")
            try:
                mp.spawn(_entry, args=(world_size, init_file, backend, fn, args),
                         nprocs=world_size)
                return
            except mp.ProcessRaisedException as exc:
                if attempt or not any(flake in str(exc) for flake in _TRANSPORT_FLAKES):
                    raise
