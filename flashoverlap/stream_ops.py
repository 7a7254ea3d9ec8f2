"""The overlap engine's per-call stream bookkeeping as raw CUDA driver calls.

Every overlapped call may wait for the previous call on its workspace, zeroes the group
counters, records an event and makes a stream wait on it (plus an ``armed`` event under graph
capture): a few small CUDA calls around the GEMM and the watcher loop.  Through torch
(``Tensor.zero_``, ``Event.record``, ``Stream.wait_event``) each costs 5-13 us of host time on
an H100 host, because each goes through torch's dispatcher or its Python wrappers; through
cuda-bindings (:class:`DriverStreamOps`, the default) each is one driver call.  Where
cuda-bindings is missing, :class:`LibcudaStreamOps` makes the same calls through ctypes on
``libcuda.so.1``, and without that :class:`TorchStreamOps` goes through torch.  The CUDA
semantics are the ones torch uses (``cuMemsetD32Async``, ``cuEventRecord``,
``cuStreamWaitEvent`` with flags 0), captured into CUDA graphs the same way.

Measured on the H200 host (``scripts/host_breakdown.py``, six problems, medians of 40 x 10
calls): ``cuMemsetD32Async`` 1.8-3.1 us through cuda-bindings against 2.2-4.9 through ctypes,
``cuStreamWaitValue32`` 1.7-6.8 against 2.2-7.0: cuda-bindings was as fast or faster in 11 of
12 pairs, so it stays first (a ctypes call converts its arguments in Python too).  The
watcher's counter waits go through the same binding (``engine.workspace._wait_enqueuer``).

Events are ``torch.cuda.Event`` objects (torch owns their lifetime); torch creates the CUDA
event lazily at the first record, so ``bind_event`` records it once.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch


class TorchStreamOps:
    """The bookkeeping through torch (the fallback)."""

    def __init__(self, counters: torch.Tensor) -> None:
        self.counters = counters

    def bind_event(self, event: torch.cuda.Event, stream: torch.cuda.Stream) -> Any:
        return event

    def bind_stream(self, stream: torch.cuda.Stream) -> Any:
        return stream

    def bind_current(self, handle: int, device: torch.device) -> Any:
        """The current stream of ``device`` (raw ``handle``), bound."""
        return torch.cuda.current_stream(device)

    def zero_counters(self, stream: Any) -> None:
        with torch.cuda.stream(stream):
            self.counters.zero_()

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)


class DriverStreamOps:
    """The bookkeeping through cuda-bindings: bound events and streams are driver handles."""

    def __init__(self, counters: torch.Tensor, driver: Any) -> None:
        self._driver = driver
        self._counters_ptr = driver.CUdeviceptr(counters.data_ptr())
        self._counters_n = counters.numel()
        self._streams: dict[int, Any] = {}

    def bind_event(self, event: torch.cuda.Event, stream: torch.cuda.Stream) -> Any:
        """The driver handle of ``event``, created now by a first record on ``stream``."""
        if not event.cuda_event:
            event.record(stream)
        return self._driver.CUevent(event.cuda_event)

    def bind_stream(self, stream: torch.cuda.Stream) -> Any:
        return self._driver.CUstream(stream.cuda_stream)

    def bind_current(self, handle: int, device: torch.device) -> Any:
        """The current stream of ``device`` (raw ``handle``), bound; the driver handle objects
        are kept per raw handle (a call's caller stream is almost always the same one)."""
        bound = self._streams.get(handle)
        if bound is None:
            if len(self._streams) > 64:
                self._streams.clear()
            bound = self._streams[handle] = self._driver.CUstream(handle)
        return bound

    def _ok(self, name: str, result: Any) -> None:
        if result[0] if isinstance(result, tuple) else result:  # CUDA_SUCCESS is 0
            from .stream_wait import _check

            _check(self._driver, name, result)

    def zero_counters(self, stream: Any) -> None:
        self._ok("cuMemsetD32Async",
                 self._driver.cuMemsetD32Async(self._counters_ptr, 0, self._counters_n, stream))

    def record(self, event: Any, stream: Any) -> None:
        self._ok("cuEventRecord", self._driver.cuEventRecord(event, stream))

    def wait(self, stream: Any, event: Any) -> None:
        self._ok("cuStreamWaitEvent", self._driver.cuStreamWaitEvent(stream, event, 0))


class _Libcuda:
    """The four driver entry points, from the ``libcuda.so.1`` the process already maps."""

    CU_STREAM_WAIT_VALUE_GEQ = 0x0

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        vp, u32, u64, uint = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint

        def fn(names: tuple[str, ...], argtypes: list) -> Any:
            for name in names:  # the _v2 symbol is what cuda.h maps the name to since 12.0
                f = getattr(lib, name, None)
                if f is not None:
                    f.restype, f.argtypes = ctypes.c_int, argtypes
                    return f
            raise OSError(f"libcuda has none of {names}")

        # CUresult cuMemsetD32Async(CUdeviceptr, unsigned int, size_t, CUstream)
        self.memset_d32_async = fn(("cuMemsetD32Async",), [u64, uint, ctypes.c_size_t, vp])
        # CUresult cuEventRecord(CUevent, CUstream)
        self.event_record = fn(("cuEventRecord",), [vp, vp])
        # CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned int)
        self.stream_wait_event = fn(("cuStreamWaitEvent",), [vp, vp, uint])
        # CUresult cuStreamWaitValue32(CUstream, CUdeviceptr, cuuint32_t, unsigned int)
        self.stream_wait_value32 = fn(("cuStreamWaitValue32_v2", "cuStreamWaitValue32"),
                                      [vp, u64, u32, uint])
        self._error_string = lib.cuGetErrorString
        self._error_string.restype = ctypes.c_int
        self._error_string.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]

    def fail(self, name: str, code: int) -> None:
        text = ctypes.c_char_p()
        self._error_string(code, ctypes.byref(text))
        message = text.value.decode(errors="replace") if text.value else "unknown error"
        raise RuntimeError(f"{name} failed: CUresult {code} ({message})")


@functools.lru_cache(maxsize=1)
def libcuda() -> _Libcuda | None:
    """The ctypes driver entry points, or None where libcuda cannot be loaded."""
    try:
        return _Libcuda()
    except (OSError, AttributeError):
        return None


class LibcudaStreamOps:
    """The bookkeeping through ctypes on libcuda (handles are plain ints): the fallback where
    cuda-bindings is not installed, cheaper than torch's wrappers."""

    def __init__(self, counters: torch.Tensor, lib: _Libcuda) -> None:
        self._lib = lib
        self._memset, self._record = lib.memset_d32_async, lib.event_record
        self._wait_event, self._wait_value = lib.stream_wait_event, lib.stream_wait_value32
        self._counters_ptr = counters.data_ptr()
        self._counters_n = counters.numel()

    def bind_event(self, event: torch.cuda.Event, stream: torch.cuda.Stream) -> int:
        if not event.cuda_event:
            event.record(stream)
        return event.cuda_event

    def bind_stream(self, stream: torch.cuda.Stream) -> int:
        return stream.cuda_stream

    def bind_current(self, handle: int, device: torch.device) -> int:
        return handle

    def zero_counters(self, stream: int) -> None:
        code = self._memset(self._counters_ptr, 0, self._counters_n, stream)
        if code:
            self._lib.fail("cuMemsetD32Async", code)

    def record(self, event: int, stream: int) -> None:
        code = self._record(event, stream)
        if code:
            self._lib.fail("cuEventRecord", code)

    def wait(self, stream: int, event: int) -> None:
        code = self._wait_event(stream, event, 0)
        if code:
            self._lib.fail("cuStreamWaitEvent", code)

    def wait_value_geq(self, stream: int, address: int, value: int) -> None:
        """Stall ``stream`` until the int32 at ``address`` >= ``value`` (wrap-safe GEQ)."""
        code = self._wait_value(stream, address, value, _Libcuda.CU_STREAM_WAIT_VALUE_GEQ)
        if code:
            self._lib.fail("cuStreamWaitValue32", code)


def stream_ops_for(counters: torch.Tensor) -> TorchStreamOps | DriverStreamOps | LibcudaStreamOps:
    """cuda-bindings' driver calls where that imports, else ctypes on libcuda where it loads,
    else torch's."""
    try:
        from .stream_wait import _driver

        return DriverStreamOps(counters, _driver())
    except (RuntimeError, ImportError):
        pass
    lib = libcuda()
    if lib is not None:
        return LibcudaStreamOps(counters, lib)
    return TorchStreamOps(counters)
