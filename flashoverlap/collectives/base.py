"""The Collective protocol: everything that differs between one overlapped collective and another.

flashoverlap runs one overlap core for every collective.  The planner cuts the GEMM's output
into *groups* of whole row bands; the signal GEMM writes each tile where the collective wants
it and bumps the group's counter; the watcher stream waits for a group and hands it to the
collective.  Nothing outside :mod:`flashoverlap.collectives` branches on which collective runs:
the planner, the engines, the ops, the custom ops, the layers and the tuner ask the
:class:`Collective` object.

What a collective owns
----------------------
* **semantics**: the ``torch.distributed`` call it replaces (the spec every engine is checked
  against), the result's rows (:meth:`Collective.result_rows`) and the problems it accepts
  (:meth:`Collective.check_problem`);
* **layout**: :attr:`Collective.row_blocks` -- how many row blocks the GEMM output is split into
  (one per destination rank for a ReduceScatter; tiles never straddle two blocks, and a group
  holds the same band of every block, packed by block) -- and :attr:`Collective.in_place`:
  whether the GEMM writes the result tensor itself and the collective works on its rows in
  place (AllReduce), or writes a packed send buffer that the collective reads (ReduceScatter);
* **one group's communication**: :meth:`Collective.launch_group` from raw pointers on a CUDA
  stream (NCCL through :mod:`flashoverlap.nccl_lib`; grouped send/recv allowed), and
  :meth:`Collective.torch_group`, the same with ``torch.distributed`` for the reference engine
  and the CPU;
* **cost**: :meth:`Collective.bus_bytes` -- the bytes per rank that cross the interconnect for a
  send range of so many bytes (what the tuner's bandwidth model divides);
* **residual**: :meth:`Collective.residual_rule` -- where ``result + residual`` is formed
  without an extra pass (in the GEMM epilogue of one block, or after each group);
* **backward**: :meth:`Collective.backward` -- the gradient of the local GEMM output from the
  gradient of the result, under tensor-parallel conventions (DTensor / Megatron).

A group is described by a :class:`GroupSpan`: the rows of the send side (the result for an
in-place collective, else the packed send buffer) and the rows of the result it produces.
Counts are in elements; every row has ``N`` elements.

Users implement the protocol in their own code (``examples/pipeline_send.py``) and pass the
object to :func:`flashoverlap.gemm_collective`; :func:`register` gives it a name so that the
``torch.library`` op and the cross-rank plan check can refer to it.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.distributed import ProcessGroup

__all__ = ["Collective", "GroupSpan", "NcclStream", "ResidualRule", "get", "register",
           "registered"]


@dataclasses.dataclass(frozen=True)
class GroupSpan:
    """Rows of one group: ``[send_lo, send_hi)`` of the send side and ``[recv_lo, recv_hi)``
    of the result.  For an in-place collective the two coincide."""

    index: int
    send_lo: int
    send_hi: int
    recv_lo: int
    recv_hi: int

    @property
    def send_rows(self) -> int:
        return self.send_hi - self.send_lo

    @property
    def recv_rows(self) -> int:
        return self.recv_hi - self.recv_lo


@dataclasses.dataclass(frozen=True)
class NcclStream:
    """What a collective needs to enqueue NCCL work: the library (``nccl_lib.NCCLLibrary``),
    the communicator handle, the CUDA stream handle, the element type's NCCL code, the sum
    operator's code, and this rank's place in the communicator."""

    lib: Any
    comm: int
    stream: int
    dtype: int
    sum_op: int
    rank: int
    world_size: int


@dataclasses.dataclass(frozen=True)
class ResidualRule:
    """How ``result + residual`` is formed on one rank.

    ``epilogue_block``: the GEMM adds ``residual`` to the tiles of this row block before they
    are stored (the residual's row ``i`` meets the block's row ``i``); the collective then
    carries it (a ReduceScatter's owning rank: the sum contains it once).  ``after_group``:
    each group's result rows get the residual added after the group's collective.  Neither:
    another rank adds it (a replicated residual added once, by one rank, before an AllReduce).
    """

    epilogue_block: int | None = None
    after_group: bool = False


class Collective(abc.ABC):
    """A collective that consumes a GEMM's output group by group (see the module docstring).

    Instances must be immutable and hashable (they key plans and caches); subclasses are
    usually frozen dataclasses.  ``name`` identifies the collective across ranks and in the
    tuning cache.
    """

    name: ClassVar[str]
    in_place: ClassVar[bool] = False
    #: At world size 1 the result is the GEMM output itself (the collective moves nothing),
    #: so the default call runs the plain GEMM.
    trivial_at_one_rank: ClassVar[bool] = False

    # -- semantics -----------------------------------------------------------------------
    def row_blocks(self, world_size: int) -> int:
        """Row blocks of the GEMM output (tiles never straddle two); 1 unless the result is
        scattered by rows."""
        return 1

    def result_rows(self, M: int, world_size: int) -> int:
        """Rows of this rank's result for a GEMM output of ``M`` rows."""
        return M // self.row_blocks(world_size)

    def in_place_for(self, world_size: int) -> bool:
        """Whether, at this world size, the GEMM writes the result itself and the collective
        runs in place on its rows (default: :attr:`in_place`).  A collective whose send and
        result layouts coincide at some world size (ReduceScatter at one rank) says so here,
        and the engines then skip the send buffer and NCCL's copy."""
        return self.in_place

    def check_problem(self, M: int, N: int, world_size: int) -> None:
        """Raise ``ValueError`` for a GEMM output this collective cannot take."""
        blocks = self.row_blocks(world_size)
        if M % blocks:
            raise ValueError(f"{self.name} needs M divisible by {blocks}: M={M}")

    def describe(self) -> str:
        """What it computes, for error messages and docs."""
        return self.name

    # -- communication -------------------------------------------------------------------
    @abc.abstractmethod
    def launch_group(self, nccl: NcclStream, send_ptr: int, recv_ptr: int, send_count: int,
                     recv_count: int) -> None:
        """Enqueue one group's NCCL call(s) on ``nccl.stream``: ``send_count`` elements at
        ``send_ptr`` (the group's send rows), ``recv_count`` at ``recv_ptr`` (its result rows).
        Called on the host hot path: no checks, no allocation."""

    @abc.abstractmethod
    def torch_group(self, send: torch.Tensor, recv: torch.Tensor,
                    group: ProcessGroup) -> Callable[[], None]:
        """Start one group's ``torch.distributed`` call(s) asynchronously (``send`` is the
        group's send rows, ``recv`` its result rows; the same tensor when in place) and
        return a function that waits for it and finishes ``recv``."""

    # -- cost ----------------------------------------------------------------------------
    def bus_bytes(self, send_bytes: float, world_size: int) -> float:
        """Bytes per rank on the interconnect for a group whose send range has
        ``send_bytes`` (the tuner's bandwidth curves are in these units)."""
        return send_bytes

    # -- residual and backward -----------------------------------------------------------
    def residual_rule(self, rank: int, world_size: int, replicated: bool) -> ResidualRule:
        """Where this rank adds its residual (default: after each group's collective)."""
        return ResidualRule(after_group=True)

    def backward(self, grad_result: torch.Tensor, group_name: str,
                 world_size: int) -> torch.Tensor:
        """Gradient of this rank's GEMM output (``[M, N]``) from the gradient of its result.

        Must be traceable by ``torch.compile`` (``torch.ops._c10d_functional``).  The default
        refuses: a collective without a backward rule cannot be trained through.
        """
        raise NotImplementedError(f"collective {self.name!r} defines no backward")

    def backward_gemms(self, grad_result: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       group_name: str, world_size: int, engine: str,
                       needs: tuple[bool, bool]) -> tuple[torch.Tensor | None,
                                                          torch.Tensor | None]:
        """``(grad_a, grad_b)`` of ``collective(a @ b)`` from the result gradient.

        Default: :meth:`backward`, then ``grad_a = g @ b.T`` and ``grad_b = a.T @ g``.  A
        collective whose backward communication can itself overlap the gradient GEMM
        overrides this (ReduceScatter: AllGather + GEMM).  Must be traceable.
        """
        g = self.backward(grad_result, group_name, world_size)
        return (g @ b.t() if needs[0] else None, a.t() @ g if needs[1] else None)


# -- registry ------------------------------------------------------------------------------
_LOCK = threading.Lock()
_REGISTRY: dict[str, Collective] = {}


def register(collective: Collective) -> Collective:
    """Make ``collective`` known by its name (idempotent for an equal object).

    The ``torch.library`` op and plans refer to collectives by name, so a name stands for one
    collective: registering a different object under a taken name raises ``ValueError``.
    """
    name = getattr(collective, "name", None)
    if isinstance(name, str) and _REGISTRY.get(name) is collective:
        return collective  # registered already: no lock (and traceable by torch.compile)
    if not isinstance(collective, Collective):
        raise TypeError(f"expected a flashoverlap Collective, got {type(collective).__name__}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{type(collective).__name__}.name must be a non-empty string")
    try:
        hash(collective)
    except TypeError:
        raise TypeError(f"collective {name!r} must be hashable (a frozen dataclass)") from None
    with _LOCK:
        known = _REGISTRY.get(name)
        if known is not None and known != collective:
            raise ValueError(f"a different collective is already registered as {name!r}: "
                             f"{known!r}")
        _REGISTRY.setdefault(name, collective)
    return _REGISTRY[name]


def get(name: str) -> Collective:
    """The collective registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown collective {name!r}; registered: {sorted(_REGISTRY)}") from None


def registered() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))
