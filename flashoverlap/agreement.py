"""Cross-rank agreement on a call (placeholder until the agreement module lands)."""

from __future__ import annotations

import hashlib

from torch.distributed import ProcessGroup


def _hash(signature: tuple) -> int:
    return int.from_bytes(hashlib.sha256(repr(signature).encode()).digest()[:8], "little") >> 1


def agree_on_call(group: ProcessGroup, signature: tuple, what: str,
                  timeout_s: float = 60.0) -> None:
    from .comm import exchange_check

    try:
        exchange_check(group, _hash(signature), what, timeout_s)
    except RuntimeError as exc:
        raise ValueError(str(exc)) from exc
