"""Engines: three ways to run ``collective(a @ b)`` on a plan, one module each.

* :mod:`~flashoverlap.engine.overlap` -- the overlap engine (CUDA + NCCL): the signal GEMM on
  the caller's stream, each group's collective on a high-priority watcher stream as soon as
  the group's counter completes.
* :mod:`~flashoverlap.engine.reference` -- the same plan run group by group with
  ``torch.matmul`` and asynchronous ``torch.distributed`` calls: any backend (gloo on CPU
  checks the plan end to end), and on CUDA the *decomposition* baseline.
* :mod:`~flashoverlap.engine.sequential` -- GEMM, then one collective: the baseline every
  speedup is quoted against and the overlap engine's fallback (one implementation for both).
* :mod:`~flashoverlap.engine.workspace` -- the overlap engine's per-plan buffers, cached LRU.

Which engine runs, and whether to overlap at all, is decided by :mod:`flashoverlap.policy`;
the engines trust the call record they are given (validated once, in :mod:`flashoverlap.ops`).
"""

from .overlap import run_overlap
from .reference import run_reference
from .sequential import run_sequential
from .workspace import clear_workspaces, get_workspace

__all__ = ["clear_workspaces", "get_workspace", "run_overlap", "run_reference", "run_sequential"]
