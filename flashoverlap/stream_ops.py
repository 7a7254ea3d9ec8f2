"""The overlap engine's per-call stream bookkeeping as raw CUDA driver calls.

Every overlapped call may wait for the previous call on its workspace, records an event and
makes a stream wait on it (a call under graph capture also zeroes its counters and records
``armed``): a few small CUDA calls around the GEMM and the watcher loop.  Through torch
(``Tensor.zero_``, ``Event.record``, ``Stream.wait_event``) each costs 5-13 us of host time on
an H100 host, because each goes through torch's dispatcher or its Python wrappers; through
cuda-bindings (:class:`DriverStreamOps`) each is one driver call.  Where cuda-bindings is
missing, :class:`TorchStreamOps` does the same through torch.  The CUDA semantics are the ones
torch uses (``cuMemsetD32Async``, ``cuEventRecord``, ``cuStreamWaitEvent`` with flags 0),
captured into CUDA graphs the same way.

Rejected: the same calls through ctypes on ``libcuda.so.1``.  Measured on the H200 host
(``scripts/host_breakdown.py``, six problems, medians of 40 x 10 calls;
``results/2026-12-01-h200/host-breakdown-run3.txt``): ``cuMemsetD32Async`` 1.8-3.1 us through
cuda-bindings against 2.2-4.9 through ctypes, ``cuStreamWaitValue32`` 1.7-6.8 against 2.2-7.0:
cuda-bindings was as fast or faster in 11 of 12 pairs (a ctypes call converts its arguments in
Python too).

Events are ``torch.cuda.Event`` objects (torch owns their lifetime); torch creates the CUDA
event lazily at the first record, so ``bind_event`` records it once.
"""

from __future__ import annotations

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


def stream_ops_for(counters: torch.Tensor) -> TorchStreamOps | DriverStreamOps:
    """Driver calls where cuda-bindings imports, torch's otherwise."""
    try:
        from .stream_wait import _driver

        return DriverStreamOps(counters, _driver())
    except (RuntimeError, ImportError):
        return TorchStreamOps(counters)
