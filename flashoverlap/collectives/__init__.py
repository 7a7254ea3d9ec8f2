"""Collectives that flashoverlap overlaps with a GEMM: one module each, one protocol
(:class:`~flashoverlap.collectives.base.Collective`; its module docstring says what a collective
owns).  Built in: :data:`ALL_REDUCE`, :data:`REDUCE_SCATTER`.  Users implement the protocol
and pass the object to :func:`flashoverlap.gemm_collective`."""

from .all_reduce import ALL_REDUCE, AllReduce
from .base import Collective, GroupSpan, NcclStream, ResidualRule, get, register, registered
from .reduce_scatter import REDUCE_SCATTER, ReduceScatter

__all__ = ["ALL_REDUCE", "AllReduce", "Collective", "GroupSpan", "NcclStream", "REDUCE_SCATTER",
           "ReduceScatter", "ResidualRule", "get", "register", "registered"]
