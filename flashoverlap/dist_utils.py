"""Small `torch.distributed` helpers shared by the engines, examples and CLI.

* :func:`resolve_group` turns ``None`` into the default group and checks membership.
* :func:`reduce_scatter_rows` hides the ``reduce_scatter_tensor`` -> ``reduce_scatter_single``
  rename (torch >= 2.13 deprecates the former; torch 2.11 has only the former).
* :func:`init_from_env` starts a process group under ``torchrun`` *or* ``mpirun``: Open MPI,
  MPICH/Hydra and Slurm publish the rank in their own variables, which are mapped to the
  ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` names ``torch.distributed`` reads.
* :func:`register_group_cache` / :func:`release_process_groups`: the library's caches that
  hold process groups, and one call that drops them all.

Why the library must let go of process groups (issue 12)
--------------------------------------------------------
``dist.destroy_process_group()`` only unregisters a group; the C++ ``ProcessGroupGloo`` (and
its worker threads) is freed when the last Python reference goes.  The memo tables of the
ops and engines (validated call signatures, group info, workspaces) keyed on the group kept
it alive past ``destroy_process_group``, so its worker threads were still running when the
interpreter finalised.  A worker that had just finished an async collective then dropped
the last reference to the work's tensors, which needs the GIL to release their Python
objects; during ``Py_FinalizeEx`` taking the GIL ends the thread with ``pthread_exit``, whose
forced unwind through a ``noexcept`` destructor is ``std::terminate``: "terminate called
without an active exception", SIGABRT after correct results (core dump: the abort in
``ProcessGroupGloo::runLoop`` -> ``~AsyncAllreduceWork`` -> ``decref_pyobject`` ->
``PyThread_exit_thread`` while the main thread is in ``Py_FinalizeEx``).  Plain torch with a
script-level reference to the group aborts the same way.

So every such cache registers its ``clear`` here, and :func:`release_process_groups` runs
(a) from ``atexit``, before finalisation, while threads can still take the GIL: the last
reference goes, and the group's destructor joins its threads in an orderly way; and (b)
when the library first sees a new default group (``destroy_process_group`` then
``init_process_group``), so stale groups of the old world are not kept alive either.  The
exit handler also runs one garbage collection: a group referenced only from a reference
cycle (an exception kept with its traceback, e.g. ``pytest.raises``' ``info``, holds the
frames of the failed call) would otherwise be freed by the collection inside
``Py_FinalizeEx``, the very moment the worker threads can no longer take the GIL.

Two more holders showed up later (a CI failure of a test that compiles ``all_gather_gemm``):
(1) ``torch.compile`` of an op called with ``group=None`` made the default group a *graph
input* -- the compiled function's cache kept it for the life of the process; the ops now pass
the group's name as a compile-time constant (``checks.group_name``).  (2) torch itself:
``torch.distributed.nn.functional`` declares ``group=group.WORLD`` default arguments, which are
evaluated when that module is first imported, and ``torch._dynamo`` imports it -- so the first
``torch.compile`` after ``init_process_group`` pins the default group in those defaults until
the interpreter tears its modules down.  This module imports it (3 ms) when flashoverlap is
imported before any group exists (the usual order), so the defaults are None; imported after
``init_process_group``, flashoverlap leaves it alone rather than pin the group itself.
"""

from __future__ import annotations

import atexit
import gc
import os
import threading
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

if not dist.is_initialized():  # imported now, its defaults are None (module docstring); with a
    import torch.distributed.nn.functional  # noqa: F401 -- group alive, it would pin that group

_RANK_VARS = {
    "RANK": ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"),
    "WORLD_SIZE": ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"),
    "LOCAL_RANK": ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"),
}


def launcher_env() -> dict[str, str]:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as torchrun would set them, from any launcher."""
    env: dict[str, str] = {}
    for name, aliases in _RANK_VARS.items():
        value = os.environ.get(name)
        for alias in aliases:
            if value is not None:
                break
            value = os.environ.get(alias)
        if value is not None:
            env[name] = value
    env.setdefault("LOCAL_RANK", env.get("RANK", "0"))
    return env


def _mpi_rendezvous() -> None:
    """Under mpirun without MASTER_ADDR: rank 0's host and a free port, broadcast by mpi4py."""
    if "MASTER_ADDR" in os.environ or "OMPI_COMM_WORLD_RANK" not in os.environ and "PMI_RANK" not in os.environ:
        return
    try:
        from mpi4py import MPI
    except ImportError:
        return  # single host: the localhost default below works
    import socket

    comm = MPI.COMM_WORLD
    addr = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            addr = (socket.gethostbyname(socket.gethostname()), s.getsockname()[1])
    addr = comm.bcast(addr, root=0)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr[0], str(addr[1])


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun or mpirun variables.

    Returns ``(rank, world_size)``.  Picks NCCL when CUDA is available, else gloo, and binds
    the process to GPU ``LOCAL_RANK``.  A no-op when the group already exists.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = launcher_env()
    os.environ.update(env)
    _mpi_rendezvous()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {}
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend, **kwargs)
    return dist.get_rank(), dist.get_world_size()


def resolve_group(group: ProcessGroup | None) -> ProcessGroup:
    """The group to use; ``ValueError`` if torch.distributed is down or we are not a member."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group "
            "(or flashoverlap.dist_utils.init_from_env) first"
        )
    group = group if group is not None else dist.group.WORLD
    try:
        rank = dist.get_rank(group)
    except ValueError as exc:  # torch: "Group ... is not registered"
        raise ValueError(
            f"the process group is not registered with torch.distributed: it was destroyed "
            f"(destroy_process_group) or never created; pass a live group ({exc})") from exc
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the given group"
        )
    return group


def reduce_scatter_rows(
    output: torch.Tensor, input: torch.Tensor, group: ProcessGroup, async_op: bool = False
):
    """``reduce_scatter_tensor`` along dim 0 under whichever name this torch has."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, group=group, async_op=async_op)


_CACHES_LOCK = threading.Lock()
_GROUP_CACHES: list[Callable[[], None]] = []


# Tensors of finished CPU-group works whose worker thread had not let go of them in time
# (retire_cpu_tensors): kept for the life of the process -- dropping them would make that
# thread, not this one, free their Python objects.
_UNRETIRED: list = []


def retire_cpu_tensors(tensors: Sequence[torch.Tensor], timeout_s: float = 5.0) -> bool:
    """After ``work.wait()`` on a gloo (CPU) group and ``del work``: return once gloo's worker
    thread has let go of the work's ``tensors`` too (each one's C++ use count back to 1: ours).

    Why: the worker drops its reference to a finished work a moment *after* ``wait()``
    returns.  If Python dropped the tensors first, torch hands their Python objects to the C++
    tensors, and the worker then frees them -- which needs the GIL.  During interpreter
    finalization taking the GIL ends the thread (``pthread_exit``), and the forced unwind
    through ``~AsyncWork`` is ``std::terminate``: the "terminate called without an active
    exception" abort at exit, seen on a loaded 2-core machine in ~1-2 % of a two-rank test's
    runs (core dump: ``runLoop`` -> ``~AsyncAllgatherWork`` -> ``decref_pyobject`` ->
    ``take_gil`` -> ``PyThread_exit_thread`` while the main thread is in ``Py_FinalizeEx``,
    the agreement's all-gather, issued shortly before the process ended).  Waiting here for
    the worker (microseconds; a thread descheduled under load takes longer) makes the last
    reference ours.  Returns False, keeping the tensors alive for good, if the worker has not
    let go within ``timeout_s``.  CUDA tensors (NCCL) are left alone: their works are retired
    by the watchdog after the GPU finishes, and waiting would stall the host.
    """
    if any(t.is_cuda for t in tensors):
        return True
    deadline = time.monotonic() + timeout_s
    while any(t._use_count() > 1 for t in tensors):
        if time.monotonic() > deadline:
            _UNRETIRED.append(list(tensors))
            return False
        time.sleep(50e-6)
    return True


def register_group_cache(clear: Callable[[], None]) -> None:
    """Register the ``clear`` of a cache that holds process groups (see the module doc)."""
    with _CACHES_LOCK:
        if clear not in _GROUP_CACHES:
            _GROUP_CACHES.append(clear)


def release_process_groups() -> None:
    """Drop every reference flashoverlap's caches hold to process groups.

    Safe at any time: the caches refill on the next call.  Runs at interpreter exit (before
    finalisation) and when the default group changes; call it yourself after
    ``destroy_process_group()`` to free a destroyed group's threads and sockets right away.
    """
    with _CACHES_LOCK:
        clears = list(_GROUP_CACHES)
    for clear in clears:
        clear()


def _release_at_exit() -> None:
    release_process_groups()
    gc.collect()  # groups held only by reference cycles (see the module doc)


atexit.register(_release_at_exit)
