"""Can the overlap engine run here?  One place that answers, with the reason when it can't.

Used by the engine choice (``engine=None``) and by ``flashoverlap info``.  Only imports what it
probes, and only when asked, so ``import flashoverlap`` stays light on CPU-only machines.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def missing_packages() -> list[str]:
    """GPU-side Python packages the overlap engine needs and this environment lacks."""
    missing = []
    for module, package in (("triton", "triton"), ("cupy", "cupy-cuda12x / cupy-cuda13x"),
                            ("cuda.bindings", "cuda-bindings")):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


def overlap_unavailable_reason(
    device: torch.device | None = None, group: ProcessGroup | None = None
) -> str | None:
    """``None`` if the overlap engine can run on ``device`` with ``group``, else why not.

    Answered once per (device, backend): the probes touch the file system and the dynamic
    loader, far too slow for every call of an op whose GPU time can be 0.2 ms.
    """
    if device is not None and device.type != "cuda":
        return f"tensors are on {device}, the overlap engine needs CUDA tensors"
    backend = None
    if group is not None and dist.is_initialized():
        backend = str(dist.get_backend(group)).lower()
    index = device.index if device is not None else None
    return _unavailable_reason(index, backend)


@functools.lru_cache(maxsize=None)
def _unavailable_reason(device_index: int | None, backend: str | None) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    major, _ = torch.cuda.get_device_capability(device_index)
    if major < 8:
        return f"compute capability {major}.x < 8.0 (the signal GEMM needs sm_80 or newer)"
    missing = missing_packages()
    if missing:
        return "missing packages: " + ", ".join(missing)
    if backend is not None:
        if "nccl" not in backend:
            return f"the group's backend is {backend!r}; the overlap engine needs an NCCL group"
    try:
        from .nccl_lib import get_nccl
    except ImportError as exc:  # pragma: no cover - module missing in a broken install
        return f"flashoverlap.nccl_lib cannot be imported: {exc}"
    try:
        get_nccl()
    except Exception as exc:  # noqa: BLE001 - any failure to load is a reason to fall back
        return f"NCCL library not loadable: {exc}"
    return None
