"""Environment switches of the engine, read in one place.

=============================== ==========================================================
``FLASHOVERLAP_WORKSPACE_MB``   send-buffer bytes the cached workspaces of one GPU may hold
                                (MiB, default 1024)
``FLASHOVERLAP_WAIT``           how the watcher waits on a counter: ``driver``
                                (``cuStreamWaitValue32``, no SM) or ``kernel`` (a spin
                                kernel); default: driver where the device supports it
``FLASHOVERLAP_DIRECT_LAUNCH``  ``0`` relaunches compiled kernels through Triton's JIT
                                instead of directly (read when the kernels are imported)
``FLASHOVERLAP_CACHE``          directory of the tuning cache (``flashoverlap.tuning.cache``)
``FLASHOVERLAP_NCCL_LIBRARY``   path of ``libnccl.so`` to load (``flashoverlap.nccl_lib``)
``FLASHOVERLAP_NCCL4PY``        ``0`` enqueues NCCL calls through the ctypes binding even
                                where nccl4py is usable (``flashoverlap.nccl_enqueue``)
=============================== ==========================================================

Read on use, not at import, except ``FLASHOVERLAP_DIRECT_LAUNCH`` (fixed for the process once
the kernel module is imported: compiled kernels are cached by launch path).
"""

from __future__ import annotations

import dataclasses
import os

WORKSPACE_MB_ENV = "FLASHOVERLAP_WORKSPACE_MB"
WAIT_ENV = "FLASHOVERLAP_WAIT"
DIRECT_LAUNCH_ENV = "FLASHOVERLAP_DIRECT_LAUNCH"
CACHE_ENV = "FLASHOVERLAP_CACHE"
NCCL_LIBRARY_ENV = "FLASHOVERLAP_NCCL_LIBRARY"
NCCL4PY_ENV = "FLASHOVERLAP_NCCL4PY"
ALL = (WORKSPACE_MB_ENV, WAIT_ENV, DIRECT_LAUNCH_ENV, CACHE_ENV, NCCL_LIBRARY_ENV, NCCL4PY_ENV)

_DEFAULT_WORKSPACE_MB = 1024


@dataclasses.dataclass(frozen=True)
class Settings:
    workspace_bytes: int
    wait_method: str | None
    direct_launch: bool
    nccl4py: bool


def settings() -> Settings:
    """The current values (raises ``ValueError`` on a malformed one)."""
    value = os.environ.get(WORKSPACE_MB_ENV)
    try:
        mb = float(value) if value is not None else _DEFAULT_WORKSPACE_MB
    except ValueError:
        raise ValueError(f"{WORKSPACE_MB_ENV} must be a number of MiB, got {value!r}") from None
    return Settings(
        workspace_bytes=int(mb * 2**20),
        wait_method=os.environ.get(WAIT_ENV) or None,
        direct_launch=os.environ.get(DIRECT_LAUNCH_ENV, "1").lower() not in ("0", "false", "no"),
        nccl4py=os.environ.get(NCCL4PY_ENV, "1").lower() not in ("0", "false", "no"),
    )
