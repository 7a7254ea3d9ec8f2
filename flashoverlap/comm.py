"""NCCL communicators made from ``torch.distributed`` process groups, and the plan check.

Role
----
The overlap engine's watcher stream runs, for every tile group, "wait on the group's
counter, then a collective on the group's range of the comm buffer".  This module provides
that collective: :class:`NcclCommunicator` issues NCCL calls on torch tensor ranges
(``data_ptr`` + ``numel``) on a ``torch.cuda.Stream`` the caller picks, and
:func:`exchange_check` (from :mod:`flashoverlap.agreement`) makes every rank of a group agree
on a 63-bit hash (the plan hash) before the first overlapped call, so that a mismatch raises
instead of hanging.

Why a private NCCL communicator
-------------------------------
* **CTA control per communicator.**  The plan reserves ``r`` SMs for communication: the GEMM
  grid gets ``SMs - r`` CTAs and NCCL must stay within about ``r`` (README, "SM sharing").
  ``ncclConfig_t.maxCTAs/minCTAs`` (and ``nvlsCTAs`` for NVLink SHARP) do that for one
  communicator; ``NCCL_MAX_CTAS`` would hit every communicator of the process and
  is read once.  CuPy's ``cupy.cuda.nccl.NcclCommunicator`` has no config argument at all.
* **No thread-block clusters beside the GEMM.**  NCCL launches its kernels on sm_90+ in
  clusters of 4 CTAs by default (``cgaClusterSize`` 4), and a cluster must find all its
  CTAs' room within one GPC at once.  Measured on one H200 (``scripts/bench_sm_sharing.py``,
  ``results/2026-12-02-h200/sm-run2/``): with the signal GEMM on 116 of 132 SMs, a probe
  kernel of NCCL's CTA shape (640 threads, 96 registers, 82 KB shared memory) in clusters
  of 4 did not start until the GEMM's CTAs retired (the 16 free SMs are spread over the
  GPCs), while the same CTAs without a cluster started at once, 1 us after the launch.  So
  :func:`overlap_communicator` -- the one the overlap engines and the tuner use -- sets
  ``cgaClusterSize`` to 0 (no cluster attribute).  ``NCCL_CGA_CLUSTER_SIZE`` in the
  environment overrides it (NCCL's rule).
* **Issued on our stream, cheaply.**  The wait and the collective must be consecutive on the
  watcher stream.  A c10d ``ProcessGroupNCCL`` (even a dedicated one built with
  ``pg_options`` carrying a CTA config) runs collectives on its own internal stream, so
  each group costs an event round trip plus c10d's per-call bookkeeping (work objects,
  tensor checks, watchdog registration, ``record_stream``) — tens of microseconds of CPU
  per collective, times several groups per GEMM.  Here a collective is a few argument
  checks and one ctypes call.
* **CUDA graphs.**  NCCL collectives are capturable when issued on the capturing stream;
  with no Work objects or side streams in between, the whole op (GEMM, waits,
  NCCL) captures as one graph.

The communicator is bootstrapped through the process group: rank 0 makes the unique id and
broadcasts it (``broadcast_object_list``, so NCCL and gloo groups both work), then every
rank calls ``ncclCommInitRankConfig`` on its current CUDA device.

Caller's duties: tensors handed to a collective must stay alive until the stream has run it
(``record_stream`` or engine-owned buffers); every rank issues the same collectives in the
same order (the plan check enforces the plan part).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from . import nccl_lib
# exchange_check lives in agreement (issue 12); re-exported here for existing callers.
from .agreement import _uses_cuda_tensors as _group_uses_cuda_tensors
from .agreement import exchange_check
from .settings import settings
from .dist_utils import register_group_cache

__all__ = [
    "CommConfig",
    "NcclCommunicator",
    "get_communicator",
    "overlap_communicator",
    "destroy_communicators",
    "new_unique_id",
    "exchange_check",
]


@dataclasses.dataclass(frozen=True)
class CommConfig:
    """Per-communicator NCCL resources (``None`` leaves NCCL's default).

    Attributes:
        max_ctas: upper bound on the CTAs (channels) a collective uses: the SMs left to NCCL.
        min_ctas: lower bound on the CTAs.
        nvls_ctas: CTAs of the NVLink SHARP algorithms, which have their own count; defaults
            to ``max_ctas`` so that a reservation also holds on NVSwitch systems.
        cga_cluster_size: thread-block cluster size of NCCL kernels (Hopper+).
        cta_policy: ``ncclConfig_t.CTAPolicy`` -- 0 default, 1 efficiency (the fewest CTAs
            that still give decent bandwidth: NCCL's setting for overlap with compute), 2
            zero (copy engines wherever NCCL can); NCCL >= 2.27.
    """

    max_ctas: int | None = None
    min_ctas: int | None = None
    nvls_ctas: int | None = None
    cga_cluster_size: int | None = None
    cta_policy: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_ctas", "min_ctas", "nvls_ctas"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(f"CommConfig.{name} must be a positive int or None, got {value!r}")
        cga = self.cga_cluster_size
        if cga is not None and (not isinstance(cga, int) or isinstance(cga, bool) or cga < 0):
            raise ValueError(f"CommConfig.cga_cluster_size must be an int >= 0, got {cga!r}")
        policy = self.cta_policy
        if policy is not None and (not isinstance(policy, int) or isinstance(policy, bool)
                                   or policy not in (0, 1, 2)):
            raise ValueError(f"CommConfig.cta_policy must be 0, 1 or 2 (default, efficiency, "
                             f"zero) or None, got {policy!r}")
        if self.min_ctas is not None and self.max_ctas is not None and self.min_ctas > self.max_ctas:
            raise ValueError(
                f"CommConfig.min_ctas ({self.min_ctas}) exceeds max_ctas ({self.max_ctas})"
            )

    def to_nccl(self, comm_name: str | None = None) -> nccl_lib.ncclConfig_t:
        nvls = self.nvls_ctas if self.nvls_ctas is not None else self.max_ctas
        return nccl_lib.make_config(
            blocking=1,
            max_ctas=self.max_ctas,
            min_ctas=self.min_ctas,
            nvls_ctas=nvls,
            cga_cluster_size=self.cga_cluster_size,
            cta_policy=self.cta_policy,
            comm_name=comm_name,
        )


def _check_supported(lib: Any, config: CommConfig) -> None:
    """Refuse, before any rank blocks, a config field the loaded NCCL does not have: an older
    NCCL would silently ignore it (the versioned struct), which would make a measurement of
    it meaningless."""
    if config.cta_policy is not None and lib.version_code < nccl_lib.nccl_version_code(2, 27, 0):
        raise ValueError(f"CommConfig.cta_policy needs NCCL >= 2.27; this is NCCL "
                         f"{lib.version_string}")


def _resolve_group(group: Any) -> Any:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group() "
            "first (or build the communicator with NcclCommunicator.from_unique_id)"
        )
    group = dist.group.WORLD if group is None else group
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of the given process group")
    return group


def _cuda_device(device: Any) -> torch.device:
    if not torch.cuda.is_available():
        raise RuntimeError("NcclCommunicator needs a CUDA device, and CUDA is not available")
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"NcclCommunicator needs a CUDA device, got {device}")
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


class NcclCommunicator:
    """An NCCL communicator over the ranks of a process group, on one CUDA device.

    Collectives are in place or into caller-provided tensors, issued on ``stream`` (default:
    the device's current stream), asynchronous with respect to the host, and capturable in
    CUDA graphs.  Tensors must be contiguous and on :attr:`device`; checks raise
    ``ValueError``/``TypeError`` before anything is enqueued.

    Creating one is collective: every rank of ``group`` must construct it with the same
    arguments.  Prefer :func:`get_communicator`, which caches one per configuration.
    """

    def __init__(
        self,
        group: Any = None,
        *,
        device: Any = None,
        max_ctas: int | None = None,
        min_ctas: int | None = None,
        nvls_ctas: int | None = None,
        cga_cluster_size: int | None = None,
        cta_policy: int | None = None,
    ):
        config = CommConfig(max_ctas, min_ctas, nvls_ctas, cga_cluster_size, cta_policy)
        group = _resolve_group(group)
        device = _cuda_device(device)
        lib = nccl_lib.get_nccl()  # fail before any rank blocks in the broadcast
        _check_supported(lib, config)
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        with torch.cuda.device(device):
            payload = [lib.get_unique_id().to_bytes() if rank == 0 else None]
            dist.broadcast_object_list(
                payload,
                src=dist.get_global_rank(group, 0),
                group=group,
                device=device if _group_uses_cuda_tensors(group) else None,
            )
        self._setup(lib, payload[0], rank, world_size, device, config)
        self.group = group

    @classmethod
    def from_unique_id(
        cls,
        unique_id: bytes,
        rank: int,
        world_size: int,
        *,
        device: Any = None,
        max_ctas: int | None = None,
        min_ctas: int | None = None,
        nvls_ctas: int | None = None,
        cga_cluster_size: int | None = None,
        cta_policy: int | None = None,
    ) -> NcclCommunicator:
        """A communicator bootstrapped without a process group (``unique_id`` from
        :func:`new_unique_id` on one rank, shipped to the others by any means)."""
        config = CommConfig(max_ctas, min_ctas, nvls_ctas, cga_cluster_size, cta_policy)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self = cls.__new__(cls)
        lib = nccl_lib.get_nccl()
        _check_supported(lib, config)
        self._setup(lib, unique_id, rank, world_size, _cuda_device(device), config)
        self.group = None
        return self

    def _setup(self, lib: nccl_lib.NCCLLibrary, unique_id: bytes, rank: int, world_size: int,
               device: torch.device, config: CommConfig) -> None:
        self.lib = lib
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.config = config
        # Keep the config (and the strings it points at) alive for the communicator's life.
        self._nccl_config = config.to_nccl(comm_name=f"flashoverlap.r{rank}of{world_size}")
        uid = nccl_lib.ncclUniqueId.from_bytes(unique_id)
        with torch.cuda.device(device):
            self.handle: int | None = lib.comm_init_rank_config(
                world_size, uid, rank, self._nccl_config
            )

    # -- properties ---------------------------------------------------------------------
    @property
    def nccl_version(self) -> str:
        return self.lib.version_string

    def __repr__(self) -> str:
        state = "destroyed" if self.handle is None else f"{self.handle:#x}"
        return (f"NcclCommunicator(rank={self.rank}, world_size={self.world_size}, "
                f"device={self.device}, config={self.config}, handle={state})")

    # -- argument checks ----------------------------------------------------------------
    def _comm(self) -> int:
        if self.handle is None:
            raise RuntimeError("this NcclCommunicator has been destroyed")
        return self.handle

    def _stream(self, stream: torch.cuda.Stream | None) -> int:
        if stream is None:
            return torch.cuda.current_stream(self.device).cuda_stream
        if stream.device != self.device:
            raise ValueError(f"stream is on {stream.device}, the communicator on {self.device}")
        return stream.cuda_stream

    def _check(self, tensor: Any, name: str) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != self.device:
            raise ValueError(f"{name} is on {tensor.device}, the communicator on {self.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (NCCL sees data_ptr + numel)")

    def _check_pair(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        self._check(send, "send")
        self._check(recv, "recv")
        if send.dtype != recv.dtype:
            raise TypeError(f"send and recv dtypes differ: {send.dtype} vs {recv.dtype}")

    # -- collectives --------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, stream: torch.cuda.Stream | None = None, *,
                   op: Any = "sum") -> None:
        """In-place AllReduce of ``tensor`` over the ranks."""
        self._check(tensor, "tensor")
        dtype, red = nccl_lib.nccl_dtype(tensor.dtype), nccl_lib.nccl_red_op(op)
        ptr = tensor.data_ptr()
        self.lib.all_reduce(ptr, ptr, tensor.numel(), dtype, red, self._comm(), self._stream(stream))

    def reduce_scatter(self, send: torch.Tensor, recv: torch.Tensor,
                       stream: torch.cuda.Stream | None = None, *, op: Any = "sum") -> None:
        """Rank ``r`` receives chunk ``r`` (``recv.numel()`` elements) of the reduced ``send``."""
        self._check_pair(send, recv)
        if send.numel() != recv.numel() * self.world_size:
            raise ValueError(
                f"reduce_scatter needs send.numel() == recv.numel() * world_size, got "
                f"{send.numel()} vs {recv.numel()} * {self.world_size}"
            )
        dtype, red = nccl_lib.nccl_dtype(send.dtype), nccl_lib.nccl_red_op(op)
        self.lib.reduce_scatter(send.data_ptr(), recv.data_ptr(), recv.numel(), dtype, red,
                                self._comm(), self._stream(stream))

    def all_gather(self, send: torch.Tensor, recv: torch.Tensor,
                   stream: torch.cuda.Stream | None = None) -> None:
        """``recv`` = the ``send`` tensors of all ranks, concatenated in rank order."""
        self._check_pair(send, recv)
        if recv.numel() != send.numel() * self.world_size:
            raise ValueError(
                f"all_gather needs recv.numel() == send.numel() * world_size, got "
                f"{recv.numel()} vs {send.numel()} * {self.world_size}"
            )
        self.lib.all_gather(send.data_ptr(), recv.data_ptr(), send.numel(),
                            nccl_lib.nccl_dtype(send.dtype), self._comm(), self._stream(stream))

    def send_recv(self, sends: Sequence[tuple[torch.Tensor, int]],
                  recvs: Sequence[tuple[torch.Tensor, int]],
                  stream: torch.cuda.Stream | None = None) -> None:
        """Grouped point-to-point: every ``(tensor, peer)`` send and receive, fused by
        ``ncclGroupStart/End`` so that they progress together (no ordering deadlock)."""
        for kind, items in (("send", sends), ("recv", recvs)):
            for tensor, peer in items:
                self._check(tensor, kind)
                nccl_lib.nccl_dtype(tensor.dtype)
                if not isinstance(peer, int) or not 0 <= peer < self.world_size:
                    raise ValueError(f"{kind} peer {peer!r} is outside [0, {self.world_size})")
        comm, handle = self._comm(), self._stream(stream)
        lib = self.lib
        lib.group_start()
        try:
            for tensor, peer in sends:
                lib.send(tensor.data_ptr(), tensor.numel(), nccl_lib.nccl_dtype(tensor.dtype),
                         peer, comm, handle)
            for tensor, peer in recvs:
                lib.recv(tensor.data_ptr(), tensor.numel(), nccl_lib.nccl_dtype(tensor.dtype),
                         peer, comm, handle)
        finally:
            lib.group_end()

    def all_to_all(self, send: torch.Tensor, recv: torch.Tensor,
                   stream: torch.cuda.Stream | None = None, *,
                   send_splits: Sequence[int] | None = None,
                   recv_splits: Sequence[int] | None = None) -> None:
        """Like ``dist.all_to_all_single``: dim-0 slice ``p`` of ``send`` goes to peer ``p``,
        slice ``p`` of ``recv`` comes from peer ``p``; splits count dim-0 rows (equal splits
        when ``None``)."""
        self._check_pair(send, recv)
        peers = range(self.world_size)
        send_rows = self._splits(send, send_splits, "send")
        recv_rows = self._splits(recv, recv_splits, "recv")
        send_parts = [(part, p) for part, p in zip(send.split(send_rows), peers) if part.numel()]
        recv_parts = [(part, p) for part, p in zip(recv.split(recv_rows), peers) if part.numel()]
        self.send_recv(send_parts, recv_parts, stream)

    def _splits(self, tensor: torch.Tensor, splits: Sequence[int] | None, name: str) -> list[int]:
        rows = tensor.shape[0] if tensor.dim() else 1
        if splits is None:
            if rows % self.world_size:
                raise ValueError(
                    f"{name} has {rows} rows, not divisible by world_size {self.world_size}; "
                    f"pass {name}_splits"
                )
            return [rows // self.world_size] * self.world_size
        splits = [int(s) for s in splits]
        if len(splits) != self.world_size or any(s < 0 for s in splits) or sum(splits) != rows:
            raise ValueError(
                f"{name}_splits must be {self.world_size} non-negative row counts summing to "
                f"{rows}, got {splits}"
            )
        return splits

    # -- health and teardown ------------------------------------------------------------
    def check_async_error(self) -> None:
        """Raise if NCCL recorded an asynchronous error (e.g. a peer died)."""
        code = self.lib.comm_get_async_error(self._comm())
        if code not in (nccl_lib.NCCL_SUCCESS, nccl_lib.NCCL_IN_PROGRESS):
            raise nccl_lib.NCCLError("ncclCommGetAsyncError", code, self.lib.error_string(code))

    def destroy(self) -> None:
        """Free the communicator (collective-free; pending work must have finished)."""
        if self.handle is not None:
            handle, self.handle = self.handle, None
            with torch.cuda.device(self.device):
                self.lib.comm_destroy(handle)

    def abort(self) -> None:
        """Abort pending operations and free the communicator (after a failure)."""
        if self.handle is not None:
            handle, self.handle = self.handle, None
            self.lib.comm_abort(handle)
    # No __del__: destroying a communicator during interpreter shutdown can block or crash
    # (CUDA may already be torn down); call destroy() / destroy_communicators() explicitly.


def new_unique_id() -> bytes:
    """A fresh NCCL unique id (128 bytes) for :meth:`NcclCommunicator.from_unique_id`."""
    return nccl_lib.get_nccl().get_unique_id().to_bytes()


_CACHE_LOCK = threading.Lock()
_CACHE: dict[tuple[Any, int, CommConfig], NcclCommunicator] = {}


def get_communicator(group: Any = None, max_ctas: int | None = None,
                     min_ctas: int | None = None, *, device: Any = None,
                     cga_cluster_size: int | None = None,
                     cta_policy: int | None = None) -> NcclCommunicator:
    """The cached communicator for ``(group, device, config)``, created on first use.

    The first call for a key is collective over ``group``: every rank must make it with the
    same arguments, in the same order relative to its other collectives.
    """
    config = CommConfig(max_ctas=max_ctas, min_ctas=min_ctas,
                        cga_cluster_size=cga_cluster_size, cta_policy=cta_policy)
    group = _resolve_group(group)
    device = _cuda_device(device)
    key = (group, device.index, config)
    with _CACHE_LOCK:
        comm = _CACHE.get(key)
        if comm is None or comm.handle is None:
            comm = NcclCommunicator(group, device=device, max_ctas=max_ctas, min_ctas=min_ctas,
                                    cga_cluster_size=cga_cluster_size, cta_policy=cta_policy)
            _CACHE[key] = comm
    return comm


# NCCL's kernels beside a persistent GEMM run without thread-block clusters (module doc).
OVERLAP_CGA_CLUSTER_SIZE = 0


def overlap_communicator(group: Any, reserved_sms: int | None, *,
                         device: Any = None) -> NcclCommunicator:
    """The communicator of collectives that run beside a persistent GEMM leaving
    ``reserved_sms`` SMs free: ``maxCTAs`` = those SMs (``None``/0: NCCL's default -- with
    no SM free the collective waits for the GEMM anyway) and no thread-block clusters
    (:data:`OVERLAP_CGA_CLUSTER_SIZE`), so NCCL's CTAs fit on the free SMs wherever the GPU
    placed them; ``CTAPolicy`` from ``FLASHOVERLAP_NCCL_CTA_POLICY`` where set (not measured
    yet: it needs two GPUs -- the multi-GPU session runs the overlap benchmark with and
    without ``efficiency``).  Same caching and collective contract as
    :func:`get_communicator`."""
    policy = settings().nccl_cta_policy
    extra = {} if policy is None else {"cta_policy": policy}
    return get_communicator(group, max_ctas=reserved_sms or None, device=device,
                            cga_cluster_size=OVERLAP_CGA_CLUSTER_SIZE, **extra)


# Communicators whose group the library let go of (release_process_groups: at exit, or after a
# new world): no longer handed out, still destroyed by destroy_communicators().
_RELEASED: list[NcclCommunicator] = []


def destroy_communicators() -> None:
    """Destroy every cached communicator (call before ``destroy_process_group``)."""
    with _CACHE_LOCK:
        comms = list(_CACHE.values()) + _RELEASED
        _CACHE.clear()
        _RELEASED.clear()
    for comm in comms:
        comm.destroy()


def _release_groups() -> None:
    """Forget the groups of cached communicators (no NCCL call: safe at exit)."""
    with _CACHE_LOCK:
        for comm in _CACHE.values():
            comm.group = None
            _RELEASED.append(comm)
        _CACHE.clear()


register_group_cache(_release_groups)
