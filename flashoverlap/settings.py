"""Environment switches of the engine, read in one place.

=============================== ==========================================================
``FLASHOVERLAP_WORKSPACE_MB``   send-buffer bytes the cached workspaces of one GPU may hold
                                (MiB, default 1024)
``FLASHOVERLAP_WAIT``           how the watcher waits on a counter: ``driver``
                                (``cuStreamWaitValue32``, no SM) or ``kernel`` (a spin
                                kernel); default: driver where the device supports it
``FLASHOVERLAP_DIRECT_LAUNCH``  ``0`` relaunches compiled kernels through Triton's JIT
                                instead of directly (read when the kernels are imported)
``FLASHOVERLAP_CACHE``          flashoverlap's cache directory: tuned configurations
                                (``tuning/``, ``flashoverlap.tuning.cache``) and NVRTC-compiled
                                CUDA C kernels (``cubin/``, ``flashoverlap.kernels.cluster_gemm``)
``FLASHOVERLAP_NCCL_LIBRARY``   path of ``libnccl.so`` to load (``flashoverlap.nccl_lib``)
``FLASHOVERLAP_NCCL4PY``        ``0`` enqueues NCCL calls through the ctypes binding even
                                where nccl4py is usable (``flashoverlap.nccl_enqueue``)
``FLASHOVERLAP_NCCL_CTA_POLICY`` ``ncclConfig_t.CTAPolicy`` of the engines' communicators:
                                ``default``, ``efficiency`` or ``zero`` (NCCL >= 2.27;
                                unset: NCCL's default; ``flashoverlap.comm``)
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
NCCL_CTA_POLICY_ENV = "FLASHOVERLAP_NCCL_CTA_POLICY"
ALL = (WORKSPACE_MB_ENV, WAIT_ENV, DIRECT_LAUNCH_ENV, CACHE_ENV, NCCL_LIBRARY_ENV, NCCL4PY_ENV,
       NCCL_CTA_POLICY_ENV)
# ncclConfig_t.CTAPolicy values (nccl.h: NCCL_CTA_POLICY_DEFAULT / _EFFICIENCY / _ZERO)
CTA_POLICIES = {"default": 0, "efficiency": 1, "zero": 2}

_DEFAULT_WORKSPACE_MB = 1024


def cache_root() -> str:
    """``$FLASHOVERLAP_CACHE``, else platformdirs' user cache directory for flashoverlap
    (the XDG default where platformdirs is not installed, e.g. a tree run uninstalled)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return root
    try:
        import platformdirs
    except ImportError:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return os.path.join(base, "flashoverlap")
    return platformdirs.user_cache_dir("flashoverlap")


@dataclasses.dataclass(frozen=True)
class Settings:
    workspace_bytes: int
    wait_method: str | None
    direct_launch: bool
    nccl4py: bool
    nccl_cta_policy: int | None = None  # CTA_POLICIES value; None: NCCL's default


def settings() -> Settings:
    """The current values (raises ``ValueError`` on a malformed one)."""
    value = os.environ.get(WORKSPACE_MB_ENV)
    try:
        mb = float(value) if value is not None else _DEFAULT_WORKSPACE_MB
    except ValueError:
        raise ValueError(f"{WORKSPACE_MB_ENV} must be a number of MiB, got {value!r}") from None
    policy = os.environ.get(NCCL_CTA_POLICY_ENV, "").strip().lower() or None
    if policy is not None and policy not in CTA_POLICIES:
        raise ValueError(f"{NCCL_CTA_POLICY_ENV} must be one of {', '.join(CTA_POLICIES)}, "
                         f"got {policy!r}")
    return Settings(
        workspace_bytes=int(mb * 2**20),
        wait_method=os.environ.get(WAIT_ENV) or None,
        direct_launch=os.environ.get(DIRECT_LAUNCH_ENV, "1").lower() not in ("0", "false", "no"),
        nccl4py=os.environ.get(NCCL4PY_ENV, "1").lower() not in ("0", "false", "no"),
        nccl_cta_policy=None if policy is None else CTA_POLICIES[policy],
    )
