"""Stream waits on a GPU counter: the watcher stream's "wait until group g is done".

Role
----
The signal GEMM bumps one int32 counter per tile group (release atomic after a CTA
barrier).  Before the collective on group ``g``, the watcher stream must stall until that
counter reaches the group's tile count.  :func:`wait_counter_geq` enqueues that stall on a
stream; the host never blocks, and the whole sequence stays capturable in a CUDA graph.

Two implementations
-------------------
* ``"driver"`` — ``cuStreamWaitValue32(stream, &counter, target, CU_STREAM_WAIT_VALUE_GEQ)``
  (cuda-bindings).  A *front-end* wait: the stream's command processor polls the word, no SM
  is occupied.  Stream memory operations are on by default since CUDA 11.7 (the "v2" API);
  older drivers need ``NVreg_EnableStreamMemOPs=1``, which the support check detects.
  Captured into a graph as a memory-operation node.
* ``"kernel"`` — a one-thread spin kernel rendered from ``csrc_gen/wait_geq.cu`` and compiled
  by NVRTC through CuPy, launched on the same stream.  Portable, captured as a kernel node,
  but it occupies one CTA slot while it spins (the plan leaves SMs free, so the GEMM is not
  starved).

Both compare wrap-safely: the wait ends when ``(int32)(*counter - target) >= 0``, so epoch
targets (never resetting the counter, raising the target each call) survive 2**32 wraps.

Choice: ``method=`` argument, else ``FLASHOVERLAP_WAIT=driver|kernel``, else ``"driver"``
where stream memory operations are supported and ``"kernel"`` otherwise.

Caveats (inherent to waiting on memory, documented by CUDA): the order established by a
wait is invisible to CUDA's scheduler, so the producer must be able to run while the waiter
is stalled — it must be on another stream, and ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (which
funnels all streams through one hardware queue) would deadlock the driver method.

**Launch (or warm up) the producer before enqueuing a wait on it.**  With CUDA lazy loading
(the default since CUDA 12.2) a kernel's first launch may synchronize the context to load
it; if that first launch is the producer's, issued while a wait on it is pending, the load
waits for the waiter and the waiter for the producer: a host-side deadlock.  We hit exactly
this on an H100 (wait enqueued first, first-ever ``torch.cuda._sleep`` launched after it);
running the same sequence once with the wait already satisfied fixes it, as does
``CUDA_MODULE_LOADING=EAGER``.  The engine's order — arm counters, launch the GEMM, then
enqueue the waits — is safe; kernels launched *after* a wait on the watcher stream only
delay their first call.  Call :func:`prepare_wait` before capturing a graph, so that NVRTC
and module loading do not run during capture.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Literal

import torch

__all__ = [
    "WAIT_METHOD_ENV",
    "WaitMethod",
    "wait_counter_geq",
    "reset_counters",
    "prepare_wait",
    "resolve_wait_method",
    "driver_wait_supported",
]

WAIT_METHOD_ENV = "FLASHOVERLAP_WAIT"
WaitMethod = Literal["driver", "kernel"]
_METHODS = ("driver", "kernel")
_INSTALL_HINT = "install it with `pip install flashoverlap[cuda12]` or `pip install flashoverlap[cuda13]`"


# -- CUDA driver access (cuda-bindings, lazily) ------------------------------------------
@functools.lru_cache(maxsize=1)
def _driver() -> Any:
    try:
        from cuda.bindings import driver  # cuda-bindings >= 12.6
    except ImportError:
        try:
            from cuda import cuda as driver  # older cuda-python
        except ImportError as exc:
            raise RuntimeError(
                f"the 'driver' stream wait needs the cuda-bindings package; {_INSTALL_HINT}, "
                f"or use method='kernel' / {WAIT_METHOD_ENV}=kernel"
            ) from exc
    _check(driver, "cuInit", driver.cuInit(0))
    return driver


def _check(driver: Any, function: str, result: Any) -> Any:
    """Raise on a failed ``CUresult`` (first element of a cuda-bindings return tuple)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        name_err, name = driver.cuGetErrorName(err)
        label = name.decode() if name_err == driver.CUresult.CUDA_SUCCESS else str(err)
        raise RuntimeError(f"{function} failed: {label}")
    return values[0] if len(values) == 1 else values


def driver_wait_supported(device: Any = None) -> bool:
    """Whether ``cuStreamWaitValue32`` works on ``device`` (cuda-bindings installed and
    stream memory operations enabled)."""
    return _driver_wait_supported(_device_index(device))


@functools.lru_cache(maxsize=None)
def _driver_wait_supported(device_index: int) -> bool:
    try:
        driver = _driver()
    except RuntimeError:
        return False
    if _check(driver, "cuDriverGetVersion", driver.cuDriverGetVersion()) >= 11070:
        # The v2 stream memory operations are enabled by default on every platform since
        # CUDA 11.7 (32-bit waits need no device attribute; NOR and 64-bit ops have
        # their own attributes, which a GEQ wait on 32 bits does not use).
        return True
    device = _check(driver, "cuDeviceGet", driver.cuDeviceGet(device_index))
    attrs = driver.CUdevice_attribute
    for name in ("CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1",
                 "CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS"):
        if hasattr(attrs, name):
            value = _check(driver, "cuDeviceGetAttribute",
                           driver.cuDeviceGetAttribute(getattr(attrs, name), device))
            return bool(value)
    return False


# -- method selection ------------------------------------------------------------------
def resolve_wait_method(device: Any = None, method: str | None = None) -> WaitMethod:
    """The implementation :func:`wait_counter_geq` uses for ``method`` on ``device``."""
    if method is None:
        method = os.environ.get(WAIT_METHOD_ENV) or None
        source = f"{WAIT_METHOD_ENV}={method!r}"
    else:
        source = f"method={method!r}"
    if method is None:
        return "driver" if _driver_wait_supported(_device_index(device)) else "kernel"
    if method not in _METHODS:
        raise ValueError(f"unknown stream wait method {source}; use one of {_METHODS}")
    return method  # type: ignore[return-value]


def prepare_wait(device: Any = None, method: str | None = None) -> WaitMethod:
    """Resolve the method and do its one-time work (driver init, NVRTC compile and module
    load) now; call it before CUDA graph capture.  Returns the method."""
    index = _device_index(device)
    resolved = resolve_wait_method(index, method)
    if resolved == "driver":
        if not _driver_wait_supported(index):
            raise RuntimeError(
                f"cuStreamWaitValue32 is not usable on cuda:{index} (cuda-bindings missing or "
                f"stream memory operations disabled); use method='kernel'"
            )
    else:
        _wait_kernel(index)
    return resolved


def _device_index(device: Any) -> int:
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"stream waits need a CUDA device, got {device}")
    return torch.cuda.current_device() if device.index is None else device.index


@functools.lru_cache(maxsize=None)
def _wait_kernel(device_index: int) -> Any:
    """The spin-wait ``cupy.RawKernel``, compiled and loaded on ``device_index``."""
    from csrc_gen import WAIT_GEQ_KERNEL, cupy_kernel, wait_geq_source

    import cupy

    kernel = cupy_kernel(wait_geq_source(), WAIT_GEQ_KERNEL)
    with cupy.cuda.Device(device_index):
        kernel.max_threads_per_block  # forces NVRTC + module load on this device now
    return kernel


# -- the public ops ----------------------------------------------------------------------
def _check_counter(counter: Any, name: str, single: bool) -> None:
    if not isinstance(counter, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(counter).__name__}")
    if counter.device.type != "cuda":
        raise ValueError(f"{name} must be on a CUDA device, got {counter.device}")
    if counter.dtype != torch.int32 and counter.dtype != getattr(torch, "uint32", None):
        raise TypeError(f"{name} must be int32, got {counter.dtype}")
    if single and counter.numel() != 1:
        raise ValueError(f"{name} must be a single element (a view like counters[g:g+1]), "
                         f"got {counter.numel()} elements")


def _resolve_stream(stream: torch.cuda.Stream | None, device: torch.device) -> torch.cuda.Stream:
    if stream is None:
        return torch.cuda.current_stream(device)
    if stream.device != device:
        raise ValueError(f"stream is on {stream.device}, the counter on {device}")
    return stream


def wait_counter_geq(counter: torch.Tensor, target: int,
                     stream: torch.cuda.Stream | None = None, *,
                     method: str | None = None) -> None:
    """Make ``stream`` (default: current) wait until ``counter >= target`` (wrap-safe).

    ``counter`` is a one-element int32 CUDA tensor (a view into the counter array);
    ``target`` an int in ``[-2**31, 2**32)``, compared modulo 2**32 as
    ``(int32)(*counter - target) >= 0``.  Returns immediately; work enqueued on ``stream``
    afterwards runs once the producer has bumped the counter far enough.
    """
    _check_counter(counter, "counter", single=True)
    if isinstance(target, bool) or not isinstance(target, int) or not -(2**31) <= target < 2**32:
        raise ValueError(f"target must be an int in [-2**31, 2**32), got {target!r}")
    stream = _resolve_stream(stream, counter.device)
    index = counter.device.index
    resolved = resolve_wait_method(index, method)
    target_u32 = target & 0xFFFFFFFF
    if resolved == "driver":
        _driver_wait(counter.data_ptr(), target_u32, stream.cuda_stream, index)
    else:
        _kernel_wait(counter.data_ptr(), target_u32, stream.cuda_stream, index)


def _driver_wait(address: int, target_u32: int, stream_handle: int, device_index: int) -> None:
    driver = _driver()
    flags = int(driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)
    # The driver call uses the thread's current context: make it the counter's device.
    with torch.cuda.device(device_index):
        _check(driver, "cuStreamWaitValue32",
               driver.cuStreamWaitValue32(driver.CUstream(stream_handle),
                                          driver.CUdeviceptr(address), target_u32, flags))


@functools.lru_cache(maxsize=64)
def _cupy_stream(stream_handle: int, device_index: int) -> Any:
    """CuPy's wrapper of a torch stream handle, built once per stream (a wrapper holds only
    the handle).  CuPy 14 deprecates ``ExternalStream`` in favour of ``Stream.from_external``
    on objects with ``__cuda_stream__``; the old class still works on every CuPy this
    supports, so it is kept, and its warning silenced here instead of on every wait."""
    import cupy

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ExternalStream is deprecated",
                                category=DeprecationWarning)
        return cupy.cuda.ExternalStream(stream_handle, device_index)


def _kernel_wait(address: int, target_u32: int, stream_handle: int, device_index: int) -> None:
    import cupy
    import numpy as np

    kernel = _wait_kernel(device_index)
    with cupy.cuda.Device(device_index), _cupy_stream(stream_handle, device_index):
        kernel((1,), (1,), (np.uint64(address), np.uint32(target_u32)))


def reset_counters(counters: torch.Tensor, stream: torch.cuda.Stream | None = None) -> None:
    """Zero ``counters`` on ``stream`` (default: current), ordered with that stream's work."""
    _check_counter(counters, "counters", single=False)
    with torch.cuda.stream(_resolve_stream(stream, counters.device)):
        counters.zero_()
