"""Optional timeline hook: CUDA events at the steps of one overlapped call.

The overlap engine's interesting behaviour -- does collective ``g`` start while the GEMM is
still running, how long does the watcher wait -- happens on two
streams inside one op, where a profiler trace is heavy and an outside timer sees only the
whole call.  This module lets the engine drop a CUDA event at each step *only while someone
is recording*::

    from flashoverlap.timeline import record_timeline

    origin = torch.cuda.Event(enable_timing=True); origin.record()
    with record_timeline() as rec:
        gemm_all_reduce(a, b, engine="overlap")
    torch.cuda.synchronize()
    for span in rec.spans(origin):
        print(span.lane, span.name, span.group, span.start_ms, span.end_ms)

Engine side (``flashoverlap.engine.overlap.run_overlap``): ``timeline.mark(stream, label, group)`` after each step,
with the labels of :data:`MARKS`.  When no recorder is active, :func:`mark` is one global read
and a return, so the hook costs well under a microsecond per call and nothing on the GPU.
Marks are skipped during CUDA graph capture (an event with timing cannot be captured usefully).

Spans derived from the marks (lane, name)::

    compute : GEMM        gemm_start -> gemm_end         (the signal GEMM on the caller's stream)
    watcher : wait        wait_start[g] -> wait_end[g]   (stream blocked on group g's counter)
    watcher : collective  wait_end[g] -> comm_end[g]     (NCCL on group g's range)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

MARKS = ("gemm_start", "gemm_end", "wait_start", "wait_end", "comm_end")

# (lane, span name, first mark, last mark); GEMM marks carry no group, watcher marks do.
_SPAN_RULES = (
    ("compute", "GEMM", "gemm_start", "gemm_end"),
    ("watcher", "wait", "wait_start", "wait_end"),
    ("watcher", "collective", "wait_end", "comm_end"),
)


@dataclasses.dataclass(frozen=True)
class Span:
    """One bar of a timeline: ``[start_ms, end_ms)`` on ``lane``; ``group`` for watcher spans."""

    lane: str
    name: str
    group: int | None
    start_ms: float
    end_ms: float

    @property
    def duration_ms(self) -> float:
        return self.end_ms - self.start_ms


class TimelineRecorder:
    """Collects ``(label, group, event)`` marks; turn them into times after a synchronize."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, int | None, Any]] = []

    def __len__(self) -> int:
        return len(self.marks)

    def mark(self, stream: Any, label: str, group: int | None = None) -> None:
        if label not in MARKS:
            raise ValueError(f"unknown timeline mark {label!r}; expected one of {MARKS}")
        if torch.cuda.is_current_stream_capturing():
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        self.marks.append((label, group, event))

    def times_ms(self, origin: Any = None) -> dict[tuple[str, int | None], float]:
        """Time of every mark in ms after ``origin`` (an event recorded before the call; by
        default the earliest mark).  The events must have completed (synchronize first)."""
        if not self.marks:
            return {}
        ref = origin if origin is not None else self.marks[0][2]
        times = {(label, group): ref.elapsed_time(event) for label, group, event in self.marks}
        if origin is None:  # marks on two streams: the first recorded need not be the earliest
            first = min(times.values())
            times = {key: t - first for key, t in times.items()}
        return times

    def spans(self, origin: Any = None) -> list[Span]:
        """The spans of :data:`_SPAN_RULES` whose two marks were both recorded."""
        times = self.times_ms(origin)
        groups = sorted({g for (_, g) in times if g is not None})
        out = []
        for lane, name, first, last in _SPAN_RULES:
            for g in ([None] if lane == "compute" else groups):
                if (first, g) in times and (last, g) in times:
                    out.append(Span(lane, name, g, times[(first, g)], times[(last, g)]))
        return out


_ACTIVE: TimelineRecorder | None = None


def mark(stream: Any, label: str, group: int | None = None) -> None:
    """Record ``label`` on ``stream`` if a recorder is active; otherwise do nothing."""
    recorder = _ACTIVE
    if recorder is not None:
        recorder.mark(stream, label, group)


def active_recorder() -> TimelineRecorder | None:
    return _ACTIVE


@contextlib.contextmanager
def record_timeline(recorder: TimelineRecorder | None = None) -> Iterator[TimelineRecorder]:
    """Make ``recorder`` (a new one by default) receive the engine's marks inside the block."""
    global _ACTIVE
    previous = _ACTIVE
    _ACTIVE = recorder if recorder is not None else TimelineRecorder()
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = previous
