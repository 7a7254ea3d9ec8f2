"""Cross-rank agreement: every rank of a group checks that the others make the same call.

Why
---
A collective is only correct when every rank issues the same one.  When ranks disagree
(``M=8`` on one rank and ``M=9`` on another, a different dtype, a different plan from a
per-machine tuning cache), nothing in the ops would notice: gloo either returns per-rank
garbage (equal byte counts) or aborts the whole process from its transport thread
(``gloo::EnforceNotMet ... Received data size doesn't match``), and NCCL hangs.
:func:`agree_on_call` makes the ranks compare their calls first and raise a clear
``ValueError`` on every rank, with the process still alive.

Fixed-size exchange
-------------------
What is exchanged never depends on the call: one int64 row of :data:`WORDS` elements per
rank (a magic word, a kind, and the 256-bit sha256 of a canonical text of the signature —
not Python's ``hash()``, which is salted per process), all-gathered over the group itself, on
the group's device (CPU tensors for gloo/MPI groups, a CUDA tensor on the current device for
NCCL groups).  So however the ranks' calls differ, the exchange itself always matches in
size and dtype, and the comparison happens before any call-dependent collective.  Only when
every rank has seen the mismatch (they all hold the same gathered rows) do they make a second,
also agreed, exchange of the readable signatures to name the fields and ranks that differ.

Timeout without threads
-----------------------
The all-gather is issued asynchronously and waited on with ``Work.wait(timeout)``; the wait
happens inside c10d, so no Python thread is started and none is left behind.  The effective
limit is the smaller of ``timeout_s`` and the group's own timeout
(``init_process_group(timeout=...)``), after which the backend fails the collective itself.
When the wait gives up first, the all-gather is still pending on the group: the group cannot
be used for anything else (its next collective would pair with the pending one), so the
error says to destroy it; ``destroy_process_group`` then returns once the backend's own
timeout has failed the pending collective.

What a skipped call on another rank looks like
----------------------------------------------
The exchange runs on the first call of each signature (the ops memoise validated calls).  If
rank 1 skips a call that rank 0 makes:

* and rank 1's next call is also a first call, the two exchanges pair up and both ranks get
  a ``ValueError`` showing rank 0's signature next to rank 1's (the skipped call is the one
  rank 1 lacks);
* and rank 1 issues no further collective, rank 0 gets a ``RuntimeError`` ("not every rank
  joined ... within N s") after the timeout above;
* and rank 1 died or raised and left, rank 0 gets a ``RuntimeError`` as soon as the backend
  notices (gloo: "Connection closed by peer", immediately);
* and rank 1 is in a collective that is not an agreement exchange, the magic word does not
  match (or the sizes differ and the backend reports it); a memoised call on the other rank
  issues no exchange, so a divergence after the first calls of a signature is not caught.
"""

from __future__ import annotations

import enum
import hashlib
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .dist_utils import resolve_group, retire_cpu_tensors

__all__ = ["agree_on_call", "exchange_check", "join_after_local_error", "canonical_repr", "signature_words",
           "RankMismatchError", "AgreementTimeoutError", "DEFAULT_TIMEOUT_S", "WORDS"]

MAGIC = int.from_bytes(b"FlOvAgr1", "little", signed=True)
_KIND_CALL = 1  # agree_on_call: payload = sha256 of the signature
_KIND_VALUE = 2  # exchange_check: payload = the value, then zeros
WORDS = 6  # magic, kind, 4 x 64 bits of payload
DEFAULT_TIMEOUT_S = 300.0
_DERIVED = frozenset({"plan"})  # signature fields that follow from the others


class RankMismatchError(ValueError, RuntimeError):
    """The ranks of a group made different calls (a ``ValueError``; also a ``RuntimeError``
    for callers of the older :func:`exchange_check`)."""


class AgreementTimeoutError(RuntimeError):
    """Not every rank joined the agreement exchange in time, or a peer failed."""


def canonical_repr(value: Any) -> str:
    """A text that is the same in every process for equal values (no ids, no salted hashes)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return repr(value)
    if isinstance(value, (tuple, list, torch.Size)):
        return "(" + "".join(canonical_repr(v) + "," for v in value) + ")"
    if isinstance(value, torch.dtype):
        return repr(value)
    if isinstance(value, torch.device):
        return f"device({str(value)!r})"
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    raise TypeError(
        f"agreement signatures hold None, bool, int, float, str, bytes, tuples, torch dtypes "
        f"and devices; got {type(value).__name__}")


def signature_words(signature: tuple) -> list[int]:
    """The sha256 of the canonical text of ``signature``, as four signed 64-bit words."""
    digest = hashlib.sha256(canonical_repr(signature).encode()).digest()
    return [int.from_bytes(digest[i:i + 8], "little", signed=True) for i in range(0, 32, 8)]


def _uses_cuda_tensors(group: Any) -> bool:
    """Whether the group's collectives need CUDA tensors (a pure NCCL group) or CPU ones."""
    backend = str(dist.get_backend(group)).lower()
    return not any(name in backend for name in ("gloo", "mpi", "cpu:"))


def _exchange(group: Any, kind: int, payload: list[int], what: str,
              timeout_s: float) -> list[tuple[int, ...]]:
    """All-gather one fixed-size int64 row per rank; rows in group rank order."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    world_size = dist.get_world_size(group)
    device = (torch.device("cuda", torch.cuda.current_device()) if _uses_cuda_tensors(group)
              else torch.device("cpu"))
    mine = torch.tensor([MAGIC, kind, *payload], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    try:
        work = dist.all_gather(gathered, mine, group=group, async_op=True)
        work.wait(timeout=timedelta(seconds=timeout_s))
        del work
        retire_cpu_tensors([mine, *gathered])  # (a gloo worker must not free them)
    except RuntimeError as exc:
        raise AgreementTimeoutError(
            f"{what}: not every rank of the group joined the agreement exchange within "
            f"{timeout_s:g} s (or the group's own timeout, if shorter), or a peer failed "
            f"({exc}). A rank is missing, has raised or "
            f"exited, or is in a different collective. This group may still have the "
            f"exchange pending: do not use it again; destroy it "
            f"(torch.distributed.destroy_process_group) and start a new one."
        ) from exc
    rows = [tuple(int(x) for x in t.tolist()) for t in gathered]
    strangers = [r for r, row in enumerate(rows) if row[0] != MAGIC]
    if strangers:
        raise AgreementTimeoutError(
            f"{what}: group ranks {strangers} answered the agreement exchange from a different "
            f"collective (it is not a flashoverlap agreement): the ranks' calls are out of "
            f"order. Do not use this group again.")
    return rows


def _ranks_by(values: list) -> dict:
    by_value: dict = {}
    for rank, v in enumerate(values):
        by_value.setdefault(v, []).append(rank)
    return by_value


def _labelled(signature: tuple) -> list[tuple[str, str]]:
    """``(name, value)`` pairs when the signature is made of them, else positions."""
    if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in signature):
        return [(name, canonical_repr(v)) for name, v in signature]
    return [(f"[{i}]", canonical_repr(v)) for i, v in enumerate(signature)]


def agree_on_call(group: Any, signature: tuple, what: str,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Raise on every rank of ``group`` unless all of them pass an equal ``signature``.

    Collective: every rank must call it (at the same point of its sequence of collectives).
    ``signature`` is a tuple of plain values (ints, strs, dtypes, nested tuples); made of
    ``(name, value)`` pairs, the error names the differing fields.  Raises
    :class:`RankMismatchError` (a ``ValueError``) on every rank when the signatures differ,
    :class:`AgreementTimeoutError` (a ``RuntimeError``) when not every rank joined within
    ``timeout_s`` (or the group's own timeout, if shorter) or a peer failed.  Starts no
    thread; a group of one rank returns at once.
    """
    if not isinstance(signature, tuple):
        raise TypeError(f"signature must be a tuple, got {type(signature).__name__}")
    words = signature_words(signature)  # TypeError for unsupported values, before any collective
    group = resolve_group(group)
    if dist.get_world_size(group) == 1:
        return
    rows = _exchange(group, _KIND_CALL, words, what, timeout_s)
    if len(set(rows)) == 1:
        return
    rank = dist.get_rank(group)
    if any(row[1] != _KIND_CALL for row in rows):
        others = [r for r, row in enumerate(rows) if row[1] != _KIND_CALL]
        raise RankMismatchError(
            f"{what}: group ranks {others} are checking something else at this point "
            f"(this is group rank {rank}); every rank must make the same calls in the same "
            f"order.")
    # Every rank saw the same mismatch, so every rank makes this second exchange too.
    mine = _labelled(signature)
    labelled: list = [None] * len(rows)
    try:
        dist.all_gather_object(labelled, mine, group=group)
    except RuntimeError:
        labelled = None
    raise RankMismatchError(_mismatch_message(what, rank, rows, labelled))


def _mismatch_message(what: str, rank: int, rows: list, labelled: list | None) -> str:
    groups = _ranks_by(rows)
    head = (f"{what} differs across ranks (this is group rank {rank}, agreeing with group "
            f"ranks {groups[rows[rank]]}). ")
    tail = (" Every rank must make the same calls in the same order, with the same shapes, "
            "dtypes and options; otherwise their collectives would not match (gloo aborts "
            "or returns garbage, NCCL hangs).")
    if labelled is None or any(x is None for x in labelled):
        detail = "; ".join(f"signature hash {row[2] & (2**64 - 1):#018x}... on group ranks "
                           f"{ranks}" for row, ranks in groups.items())
        return head + detail + "." + tail
    names = [name for name, _ in labelled[0]]
    if all([n for n, _ in sig] == names for sig in labelled):
        parts = {}
        for i, name in enumerate(names):
            by_value = _ranks_by([sig[i][1] for sig in labelled])
            if len(by_value) > 1:
                parts[name] = f"{name}: " + ", ".join(f"{v} on group ranks {ranks}"
                                                      for v, ranks in by_value.items())
        if len(parts) > 1:  # derived fields (a plan hash) only matter when nothing else differs
            for name in _DERIVED.intersection(parts):
                del parts[name]
        if parts:
            return head + "Differing: " + "; ".join(parts.values()) + "." + tail
    detail = "; ".join(
        f"group ranks {ranks}: " + ", ".join(f"{n}={v}" for n, v in labelled[ranks[0]])
        for ranks in _ranks_by([tuple(sig) for sig in labelled]).values())
    return head + detail + "." + tail


def exchange_check(group: Any, value: int, what: str, timeout_s: float = 60.0) -> None:
    """Check that every rank of ``group`` passes the same int64 ``value`` (e.g. a plan hash).

    Same fixed-size exchange as :func:`agree_on_call` (so the two can never pair up with
    mismatched sizes).  Raises :class:`RankMismatchError` (also a ``RuntimeError``) naming the
    ranks that differ, or :class:`AgreementTimeoutError` when some rank has not joined within
    ``timeout_s`` seconds — never a silent hang.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
        raise ValueError(f"exchange_check value must be an int64, got {value!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    group = resolve_group(group)
    rows = _exchange(group, _KIND_VALUE, [value, 0, 0, 0], f"exchange_check({what!r})",
                     timeout_s)
    if len(set(rows)) == 1:
        return
    rank = dist.get_rank(group)
    values = [row[2] if row[1] == _KIND_VALUE else None for row in rows]
    by_value = _ranks_by(values)
    detail = "; ".join(
        (f"{v & (2**64 - 1):#018x}" if v is not None else "another kind of check")
        + f" on group ranks {ranks}" for v, ranks in by_value.items())
    raise RankMismatchError(
        f"{what} differs across ranks (this is group rank {rank}, agreeing with ranks "
        f"{by_value[value]}): {detail}. Every rank must build the same plan (same shapes, "
        f"dtype, config and library version); otherwise their collectives would not match "
        f"and NCCL would hang."
    )


def _describe_operand(x: Any) -> tuple:
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), str(x.dtype).removeprefix("torch."))
    return (type(x).__name__,)


def join_after_local_error(op: str, a: Any, b: Any, group: Any, exc: Exception) -> None:
    """Join the exchange with this rank's error as the signature (the peers are waiting)."""
    try:
        resolved = resolve_group(group)
        if dist.get_world_size(resolved) == 1:
            return
    except Exception:  # noqa: BLE001 - no usable group: nothing to agree over
        return
    failed = (("op", op), ("a", _describe_operand(a)), ("b", _describe_operand(b)),
              ("local check", f"{type(exc).__name__}: {exc}"))
    try:
        agree_on_call(resolved, failed, f"gemm_{op}")
    except (RankMismatchError, AgreementTimeoutError):
        pass  # this rank's own error is the one to report
