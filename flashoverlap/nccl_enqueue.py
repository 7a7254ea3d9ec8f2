"""The hot path's NCCL enqueue calls: NVIDIA's nccl4py where it can serve, ctypes otherwise.

Role
----
The overlap engines enqueue one or more NCCL calls per tile group per call from Python
(:class:`flashoverlap.collectives.NcclStream`), so the binding's own cost is paid per group.
Measured on one H200 host (NCCL 2.28.9, torch 2.11; ``scripts/nccl_binding_bench.py``,
``ncclAllReduce`` of 1 MiB bf16 at world size 1, median of 7 batches of 1,000 calls):
flashoverlap's ctypes binding 1.31-1.39 us per call, nccl4py's Cython bindings
(``nccl.bindings.nccl``) 0.36-0.39 us.  So the enqueue calls -- ``ncclAllReduce``,
``ncclReduceScatter``, ``ncclAllGather``, ``ncclSend``, ``ncclRecv``, ``ncclGroupStart`` /
``ncclGroupEnd`` -- go through nccl4py when it is installed (the ``cuda12``/``cuda13`` extras
bring it) and usable, through :mod:`flashoverlap.nccl_lib` otherwise.

Why not nccl4py for everything
------------------------------
Communicator creation, abort and error queries stay in :mod:`flashoverlap.nccl_lib`: that
binding stamps ``ncclConfig_t`` with the layout version it was written against, so the same
code sets ``maxCTAs``/``minCTAs`` on every NCCL from 2.17 (older ones ignore fields they do not
know), and it needs nothing beyond the ``libnccl.so.2`` torch already loaded.  The enqueue
calls' C signatures have not changed since NCCL 2.0, so for them nccl4py costs no coverage.

Soundness
---------
A communicator handle is only valid in the library that created it.  nccl4py finds its
library through ``cuda-pathfinder``, which prefers the one already mapped into the process; it
is used only if, after it loaded, the process maps exactly one ``libnccl`` file and nccl4py's
``ncclGetVersion`` equals flashoverlap's.  nccl4py's ``Comm(ptr)`` wraps an existing handle
without owning it (nccl4py's own ``Communicator(ptr)`` interop entry point does the same);
destroying stays with :class:`flashoverlap.comm.NcclCommunicator`.  nccl4py's ``NCCLError`` is
turned into :class:`flashoverlap.nccl_lib.NCCLError` with NCCL's last-error text.
``FLASHOVERLAP_NCCL4PY=0`` forces ctypes.  :func:`binding_status` says which one serves and why
(``flashoverlap info`` prints it).
"""

from __future__ import annotations

import threading
from typing import Any

from .settings import settings

__all__ = ["binding_status", "enqueue_binding"]

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}  # "module": nccl.bindings.nccl or None, "reason": str


def _mapped_nccl_files() -> set[str]:
    try:
        with open("/proc/self/maps") as maps:
            return {line.split()[-1] for line in maps if "libnccl" in line and "/" in line}
    except OSError:
        return set()


def _probe(lib: Any) -> tuple[Any, str]:
    """(nccl4py's bindings module or None, why)."""
    if not settings().nccl4py:
        return None, "ctypes: FLASHOVERLAP_NCCL4PY=0"
    try:
        import nccl.bindings.nccl as nb
    except Exception as exc:  # noqa: BLE001 - any import failure means: not usable
        return None, f"ctypes: nccl4py not importable ({type(exc).__name__}: {exc})"[:300]
    enqueue = [n for n in vars(Nccl4pyCalls) if not n.startswith("_")]  # its functions' names
    for name in (*enqueue, "get_version", "Comm", "NCCLError"):
        if not hasattr(nb, name):
            return None, f"ctypes: this nccl4py has no bindings.nccl.{name}"
    try:
        version = int(nb.get_version())  # loads nccl4py's libnccl
    except Exception as exc:  # noqa: BLE001
        return None, f"ctypes: nccl4py could not load NCCL ({type(exc).__name__}: {exc})"[:300]
    files = _mapped_nccl_files()
    if len(files) != 1:
        return None, f"ctypes: {len(files)} libnccl files mapped ({sorted(files)})"
    if version != lib.version_code:
        return None, (f"ctypes: nccl4py reports NCCL {version}, flashoverlap's library "
                      f"{lib.version_code}")
    return nb, f"nccl4py {_version_of('nccl4py')} on {next(iter(files))}"


def _version_of(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return "?"


def _bindings(lib: Any) -> Any:
    if "module" not in _STATE:
        with _LOCK:
            if "module" not in _STATE:
                _STATE["module"], _STATE["reason"] = _probe(lib)
    return _STATE["module"]


def binding_status(lib: Any | None = None) -> str:
    """Which binding enqueues NCCL calls, and why ("not decided yet" before first use)."""
    if "reason" not in _STATE and lib is not None:
        _bindings(lib)
    return _STATE.get("reason", "not decided yet (no communicator used)")


class Nccl4pyCalls:
    """nccl4py's enqueue functions with :class:`~flashoverlap.nccl_lib.NCCLLibrary`'s argument
    order and errors (the communicator argument is an ``nccl.bindings.nccl.Comm``)."""

    def __init__(self, nb: Any, lib: Any, handle: int) -> None:
        self._nb, self._lib, self._handle = nb, lib, handle
        self._error = nb.NCCLError
        self._all_reduce, self._reduce_scatter = nb.all_reduce, nb.reduce_scatter
        self._all_gather, self._send, self._recv = nb.all_gather, nb.send, nb.recv
        self._group_start, self._group_end = nb.group_start, nb.group_end

    def _raise(self, function: str, exc: Exception) -> None:
        from .nccl_lib import NCCLError

        code = next((getattr(exc, a) for a in ("status", "code", "result")
                     if isinstance(getattr(exc, a, None), int)), -1)
        message = str(exc)
        try:
            last = self._lib.last_error(self._handle)
            if last:
                message = f"{message}; last error: {last}"
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise NCCLError(function, code, message) from exc

    def all_reduce(self, send, recv, count, dtype, op, comm, stream) -> None:
        try:
            self._all_reduce(send, recv, count, dtype, op, comm, stream)
        except self._error as exc:
            self._raise("ncclAllReduce", exc)

    def reduce_scatter(self, send, recv, recv_count, dtype, op, comm, stream) -> None:
        try:
            self._reduce_scatter(send, recv, recv_count, dtype, op, comm, stream)
        except self._error as exc:
            self._raise("ncclReduceScatter", exc)

    def all_gather(self, send, recv, send_count, dtype, comm, stream) -> None:
        try:
            self._all_gather(send, recv, send_count, dtype, comm, stream)
        except self._error as exc:
            self._raise("ncclAllGather", exc)

    def send(self, buf, count, dtype, peer, comm, stream) -> None:
        try:
            self._send(buf, count, dtype, peer, comm, stream)
        except self._error as exc:
            self._raise("ncclSend", exc)

    def recv(self, buf, count, dtype, peer, comm, stream) -> None:
        try:
            self._recv(buf, count, dtype, peer, comm, stream)
        except self._error as exc:
            self._raise("ncclRecv", exc)

    def group_start(self) -> None:
        try:
            self._group_start()
        except self._error as exc:
            self._raise("ncclGroupStart", exc)

    def group_end(self) -> None:
        try:
            self._group_end()
        except self._error as exc:
            self._raise("ncclGroupEnd", exc)


def enqueue_binding(comm: Any) -> tuple[Any, Any]:
    """``(lib, comm argument)`` for a :class:`~flashoverlap.collectives.NcclStream` on the
    :class:`~flashoverlap.comm.NcclCommunicator` ``comm``: nccl4py's where usable, else
    ``(comm.lib, comm.handle)``."""
    nb = _bindings(comm.lib)
    if nb is None:
        return comm.lib, comm.handle
    return Nccl4pyCalls(nb, comm.lib, comm.handle), nb.Comm(comm.handle)


def _reset_for_tests() -> None:
    with _LOCK:
        _STATE.clear()
