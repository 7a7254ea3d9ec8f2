"""Thin ctypes binding of the NCCL C API (the subset flashoverlap needs).

Role
----
The overlap engine issues one NCCL collective per tile group from Python, on a stream it
chooses, with a communicator whose CTA count it chooses.  This file is the raw layer: it
finds ``libnccl.so.2``, declares each C function next to its prototype, and turns every
``ncclResult_t`` into an exception that carries NCCL's own message.  The torch-facing
communicator lives in :mod:`flashoverlap.comm`.

Design
------
* **Same library as torch.**  Two copies of NCCL in one process work but waste memory and
  confuse debugging, so the library that is already mapped into the process (torch's CUDA
  build links it) wins; then the ``nvidia-nccl-cu12``/``-cu13`` wheel; then the loader's
  search path.  ``FLASHOVERLAP_NCCL_LIBRARY`` overrides all of them.
* **Lazy.**  Nothing is loaded at import time: ``import flashoverlap`` must work on a CPU
  box without NCCL.  The first :func:`get_nccl` call loads and raises a ``RuntimeError``
  that says what is missing and how to install it.
* **Versioned config struct.**  ``ncclConfig_t`` is append-only and versioned: NCCL copies
  ``min(config.size, sizeof(its ncclConfig_t))`` bytes and resets every field newer than
  ``config.version`` to its default.  We reproduce the NCCL 2.28 layout
  (``ncclConfig_v22800``) exactly and stamp it with ``NCCL_VERSION(2, 28, 0)``, so a newer
  library treats the fields it added as unset and an older one ignores the tail it does
  not know.  Fields we do not set stay at ``NCCL_CONFIG_UNDEF_INT``/``NULL``, exactly like
  ``NCCL_CONFIG_INITIALIZER``.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "NCCL_LIBRARY_ENV",
    "NCCL_CONFIG_UNDEF_INT",
    "NCCL_CONFIG_LAYOUT_VERSION",
    "NCCLError",
    "NCCLLibrary",
    "ncclConfig_t",
    "ncclUniqueId",
    "nccl_version_code",
    "nccl_dtype",
    "nccl_red_op",
    "find_nccl_library",
    "get_nccl",
]

NCCL_LIBRARY_ENV = "FLASHOVERLAP_NCCL_LIBRARY"
INSTALL_HINT = (
    "install it with `pip install flashoverlap[cuda12]` or `pip install flashoverlap[cuda13]` "
    "(matching your torch's CUDA; they bring nvidia-nccl-cu12 / nvidia-nccl-cu13), or point "
    f"{NCCL_LIBRARY_ENV} at a libnccl.so.2"
)


def nccl_version_code(major: int, minor: int, patch: int) -> int:
    """``NCCL_VERSION(X, Y, Z)`` from nccl.h (the encoding changed after 2.8)."""
    if major <= 2 and minor <= 8:
        return major * 1000 + minor * 100 + patch
    return major * 10000 + minor * 100 + patch


# -- types (nccl.h, NCCL 2.28) ----------------------------------------------------------
# typedef int ncclResult_t; typedef int ncclDataType_t; typedef int ncclRedOp_t;
ncclResult_t = ctypes.c_int
ncclDataType_t = ctypes.c_int
ncclRedOp_t = ctypes.c_int
# typedef struct ncclComm* ncclComm_t;
ncclComm_t = ctypes.c_void_p
# cudaStream_t is a pointer to an opaque struct.
cudaStream_t = ctypes.c_void_p
buffer_type = ctypes.c_void_p

NCCL_UNIQUE_ID_BYTES = 128
NCCL_CONFIG_UNDEF_INT = -(2**31)  # INT_MIN
NCCL_API_MAGIC = 0xCAFEBEEF
NCCL_CONFIG_LAYOUT_VERSION = nccl_version_code(2, 28, 0)

# ncclResult_t values, for messages when ncclGetErrorString itself is unavailable.
NCCL_RESULT_NAMES = {
    0: "ncclSuccess",
    1: "ncclUnhandledCudaError",
    2: "ncclSystemError",
    3: "ncclInternalError",
    4: "ncclInvalidArgument",
    5: "ncclInvalidUsage",
    6: "ncclRemoteError",
    7: "ncclInProgress",
    8: "ncclTimeout",
}
NCCL_SUCCESS = 0
NCCL_IN_PROGRESS = 7


class ncclUniqueId(ctypes.Structure):
    # typedef struct { char internal[NCCL_UNIQUE_ID_BYTES]; } ncclUniqueId;
    _fields_ = [("internal", ctypes.c_byte * NCCL_UNIQUE_ID_BYTES)]

    def to_bytes(self) -> bytes:
        return ctypes.string_at(ctypes.addressof(self), NCCL_UNIQUE_ID_BYTES)

    @classmethod
    def from_bytes(cls, data: bytes) -> "ncclUniqueId":
        if len(data) != NCCL_UNIQUE_ID_BYTES:
            raise ValueError(f"an ncclUniqueId has {NCCL_UNIQUE_ID_BYTES} bytes, got {len(data)}")
        return cls.from_buffer_copy(data)


class ncclConfig_t(ctypes.Structure):
    """``struct ncclConfig_v22800`` (nccl.h of NCCL 2.28), field for field.

    Build one with :func:`make_config`, which fills the header and the ``UNDEF`` defaults
    the way ``NCCL_CONFIG_INITIALIZER`` does.
    """

    _fields_ = [
        # attributes that users should never touch.
        ("size", ctypes.c_size_t),  # size_t size;
        ("magic", ctypes.c_uint),  # unsigned int magic;
        ("version", ctypes.c_uint),  # unsigned int version;
        # attributes that users are able to customize.
        ("blocking", ctypes.c_int),  # int blocking;
        ("cgaClusterSize", ctypes.c_int),  # int cgaClusterSize;
        ("minCTAs", ctypes.c_int),  # int minCTAs;
        ("maxCTAs", ctypes.c_int),  # int maxCTAs;
        ("netName", ctypes.c_char_p),  # const char *netName;
        ("splitShare", ctypes.c_int),  # int splitShare;
        ("trafficClass", ctypes.c_int),  # int trafficClass;
        ("commName", ctypes.c_char_p),  # const char *commName;
        ("collnetEnable", ctypes.c_int),  # int collnetEnable;
        ("CTAPolicy", ctypes.c_int),  # int CTAPolicy;
        ("shrinkShare", ctypes.c_int),  # int shrinkShare;
        ("nvlsCTAs", ctypes.c_int),  # int nvlsCTAs;
        ("nChannelsPerNetPeer", ctypes.c_int),  # int nChannelsPerNetPeer;
        ("nvlinkCentricSched", ctypes.c_int),  # int nvlinkCentricSched;
    ]


_CONFIG_KWARGS = {
    # python keyword -> ncclConfig_t field (int fields only; strings handled separately)
    "blocking": "blocking",
    "cga_cluster_size": "cgaClusterSize",
    "min_ctas": "minCTAs",
    "max_ctas": "maxCTAs",
    "split_share": "splitShare",
    "traffic_class": "trafficClass",
    "collnet_enable": "collnetEnable",
    "cta_policy": "CTAPolicy",
    "shrink_share": "shrinkShare",
    "nvls_ctas": "nvlsCTAs",
    "n_channels_per_net_peer": "nChannelsPerNetPeer",
    "nvlink_centric_sched": "nvlinkCentricSched",
}


def make_config(
    *,
    net_name: str | None = None,
    comm_name: str | None = None,
    **fields: int | None,
) -> ncclConfig_t:
    """An ``ncclConfig_t`` as ``NCCL_CONFIG_INITIALIZER`` makes it, with ``fields`` set.

    Keywords: ``blocking, cga_cluster_size, min_ctas, max_ctas, split_share, traffic_class,
    collnet_enable, cta_policy, shrink_share, nvls_ctas, n_channels_per_net_peer,
    nvlink_centric_sched`` (``None`` = unset), ``net_name``, ``comm_name``.  The returned
    struct references the encoded strings; keep it alive until the init call returns.
    """
    config = ncclConfig_t()
    config.size = ctypes.sizeof(ncclConfig_t)
    config.magic = NCCL_API_MAGIC
    config.version = NCCL_CONFIG_LAYOUT_VERSION
    for field in _CONFIG_KWARGS.values():
        setattr(config, field, NCCL_CONFIG_UNDEF_INT)
    config.netName = None if net_name is None else net_name.encode()
    config.commName = None if comm_name is None else comm_name.encode()
    for key, value in fields.items():
        if key not in _CONFIG_KWARGS:
            raise TypeError(f"make_config() got an unexpected keyword {key!r}")
        if value is None:
            continue
        if not isinstance(value, int):  # bool is accepted for the 0/1 flags
            raise TypeError(f"ncclConfig_t {key} must be an int, got {value!r}")
        setattr(config, _CONFIG_KWARGS[key], int(value))
    return config


# -- dtype / op enums -------------------------------------------------------------------
# typedef enum { ncclInt8 = 0, ncclUint8 = 1, ncclInt32 = 2, ncclUint32 = 3, ncclInt64 = 4,
#   ncclUint64 = 5, ncclFloat16 = 6, ncclFloat32 = 7, ncclFloat64 = 8, ncclBfloat16 = 9,
#   ncclFloat8e4m3 = 10, ncclFloat8e5m2 = 11 } ncclDataType_t;
_DTYPES: dict[torch.dtype, int] = {
    torch.int8: 0,
    torch.uint8: 1,
    torch.int32: 2,
    torch.int64: 4,
    torch.float16: 6,
    torch.float32: 7,
    torch.float64: 8,
    torch.bfloat16: 9,
}
for _name, _code in (("uint32", 3), ("uint64", 5), ("float8_e4m3fn", 10), ("float8_e5m2", 11)):
    if hasattr(torch, _name):  # older torch lacks some of these dtypes
        _DTYPES[getattr(torch, _name)] = _code

# typedef enum { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 } ncclRedOp_t;
_RED_OPS = {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}


def nccl_dtype(dtype: torch.dtype) -> int:
    """``ncclDataType_t`` of a torch dtype; ``TypeError`` for dtypes NCCL cannot move."""
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise TypeError(
            f"NCCL has no data type for {dtype}; supported: {sorted(map(str, _DTYPES))}"
        ) from None


def nccl_red_op(op: Any) -> int:
    """``ncclRedOp_t`` of ``"sum" | "prod" | "max" | "min" | "avg"`` or a ``dist.ReduceOp``."""
    name = op if isinstance(op, str) else getattr(op, "name", str(op).split(".")[-1])
    try:
        return _RED_OPS[str(name).lower()]
    except KeyError:
        raise ValueError(f"unsupported reduction {op!r}; use one of {list(_RED_OPS)}") from None


# -- errors -----------------------------------------------------------------------------
class NCCLError(RuntimeError):
    """A NCCL call returned an error; ``code`` is the ``ncclResult_t``."""

    def __init__(self, function: str, code: int, message: str):
        self.function = function
        self.code = code
        super().__init__(f"{function} failed: {NCCL_RESULT_NAMES.get(code, code)} ({code}): {message}")


# -- function table ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Function:
    name: str
    restype: Any
    argtypes: tuple[Any, ...]


_FUNCTIONS = (
    # const char* ncclGetErrorString(ncclResult_t result);
    _Function("ncclGetErrorString", ctypes.c_char_p, (ncclResult_t,)),
    # const char* ncclGetLastError(ncclComm_t comm);
    _Function("ncclGetLastError", ctypes.c_char_p, (ncclComm_t,)),
    # ncclResult_t ncclGetVersion(int *version);
    _Function("ncclGetVersion", ncclResult_t, (ctypes.POINTER(ctypes.c_int),)),
    # ncclResult_t ncclGetUniqueId(ncclUniqueId* uniqueId);
    _Function("ncclGetUniqueId", ncclResult_t, (ctypes.POINTER(ncclUniqueId),)),
    # ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId commId,
    #                                     int rank, ncclConfig_t* config);
    _Function(
        "ncclCommInitRankConfig",
        ncclResult_t,
        (ctypes.POINTER(ncclComm_t), ctypes.c_int, ncclUniqueId, ctypes.c_int,
         ctypes.POINTER(ncclConfig_t)),
    ),
    # ncclResult_t ncclCommDestroy(ncclComm_t comm);
    _Function("ncclCommDestroy", ncclResult_t, (ncclComm_t,)),
    # ncclResult_t ncclCommAbort(ncclComm_t comm);
    _Function("ncclCommAbort", ncclResult_t, (ncclComm_t,)),
    # ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *asyncError);
    _Function("ncclCommGetAsyncError", ncclResult_t, (ncclComm_t, ctypes.POINTER(ncclResult_t))),
    # ncclResult_t ncclCommCount(const ncclComm_t comm, int* count);
    _Function("ncclCommCount", ncclResult_t, (ncclComm_t, ctypes.POINTER(ctypes.c_int))),
    # ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int* device);
    _Function("ncclCommCuDevice", ncclResult_t, (ncclComm_t, ctypes.POINTER(ctypes.c_int))),
    # ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank);
    _Function("ncclCommUserRank", ncclResult_t, (ncclComm_t, ctypes.POINTER(ctypes.c_int))),
    # ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count,
    #   ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream);
    _Function(
        "ncclAllReduce",
        ncclResult_t,
        (buffer_type, buffer_type, ctypes.c_size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t,
         cudaStream_t),
    ),
    # ncclResult_t ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount,
    #   ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream);
    _Function(
        "ncclReduceScatter",
        ncclResult_t,
        (buffer_type, buffer_type, ctypes.c_size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t,
         cudaStream_t),
    ),
    # ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount,
    #   ncclDataType_t datatype, ncclComm_t comm, cudaStream_t stream);
    _Function(
        "ncclAllGather",
        ncclResult_t,
        (buffer_type, buffer_type, ctypes.c_size_t, ncclDataType_t, ncclComm_t, cudaStream_t),
    ),
    # ncclResult_t ncclSend(const void* sendbuff, size_t count, ncclDataType_t datatype,
    #   int peer, ncclComm_t comm, cudaStream_t stream);
    _Function(
        "ncclSend",
        ncclResult_t,
        (buffer_type, ctypes.c_size_t, ncclDataType_t, ctypes.c_int, ncclComm_t, cudaStream_t),
    ),
    # ncclResult_t ncclRecv(void* recvbuff, size_t count, ncclDataType_t datatype,
    #   int peer, ncclComm_t comm, cudaStream_t stream);
    _Function(
        "ncclRecv",
        ncclResult_t,
        (buffer_type, ctypes.c_size_t, ncclDataType_t, ctypes.c_int, ncclComm_t, cudaStream_t),
    ),
    # ncclResult_t ncclGroupStart();
    _Function("ncclGroupStart", ncclResult_t, ()),
    # ncclResult_t ncclGroupEnd();
    _Function("ncclGroupEnd", ncclResult_t, ()),
)


# -- finding the library ----------------------------------------------------------------
def _loaded_nccl_paths() -> list[str]:
    """libnccl files already mapped into this process (torch's CUDA build links one)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libnccl.so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.isfile(p))


def _wheel_nccl_paths() -> list[str]:
    """``libnccl.so.2`` shipped by the nvidia-nccl-cu12 / -cu13 wheels."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    found: list[str] = []
    for root in spec.submodule_search_locations:
        # nvidia/nccl/lib (cu12 and cu13 NCCL wheels); nvidia/cu1X/lib (cu13 toolkit layout).
        for pattern in ("nccl/lib/libnccl.so*", "cu1*/lib/libnccl.so*"):
            found.extend(sorted(glob.glob(os.path.join(root, pattern))))
    return found


def find_nccl_library() -> list[str]:
    """Candidates for ``libnccl.so.2``, best first (see the module docstring)."""
    override = os.environ.get(NCCL_LIBRARY_ENV)
    if override:
        return [override]
    candidates = _loaded_nccl_paths() + _wheel_nccl_paths() + ["libnccl.so.2"]
    return list(dict.fromkeys(candidates))  # de-duplicate, keep order


# -- the library ------------------------------------------------------------------------
class NCCLLibrary:
    """Loaded ``libnccl`` with typed, error-checked wrappers.

    Collective wrappers take raw integers (device pointers, stream handles, the
    communicator handle) so the hot path is one ctypes call; argument checks belong to the
    caller (:class:`flashoverlap.comm.NcclCommunicator`).
    """

    def __init__(self, path: str):
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as exc:
            raise RuntimeError(f"could not load the NCCL library {path!r}: {exc}") from exc
        self.path = path
        self._fn: dict[str, Any] = {}
        missing = []
        for spec in _FUNCTIONS:
            try:
                fn = getattr(self.lib, spec.name)
            except AttributeError:
                missing.append(spec.name)
                continue
            fn.restype = spec.restype
            fn.argtypes = list(spec.argtypes)
            self._fn[spec.name] = fn
        if missing:
            raise RuntimeError(f"{path} lacks NCCL functions {missing}; {INSTALL_HINT}")
        self.version_code = self.get_version()
        if self.version_code < nccl_version_code(2, 17, 0):
            # Before 2.17 ncclConfig_t has no minCTAs/maxCTAs: SM reservation cannot work.
            raise RuntimeError(
                f"NCCL {self.version_string} at {path} is too old: flashoverlap needs NCCL "
                f">= 2.17 (per-communicator CTA limits); {INSTALL_HINT}"
            )

    # -- errors -------------------------------------------------------------------------
    def error_string(self, code: int) -> str:
        return self._fn["ncclGetErrorString"](code).decode(errors="replace")

    def last_error(self, comm: int | None) -> str:
        """``ncclGetLastError``: NCCL's text about the last failure (on ``comm``)."""
        return self._fn["ncclGetLastError"](comm).decode(errors="replace")

    def _check(self, function: str, code: int, comm: int | None = None) -> None:
        if code == NCCL_SUCCESS:
            return
        message = self.error_string(code)
        last = self._fn["ncclGetLastError"](comm).decode(errors="replace")
        if last:
            message = f"{message}; last error: {last}"
        raise NCCLError(function, code, message)

    # -- versions and ids ---------------------------------------------------------------
    def get_version(self) -> int:
        version = ctypes.c_int()
        self._check("ncclGetVersion", self._fn["ncclGetVersion"](ctypes.byref(version)))
        return version.value

    @property
    def version_string(self) -> str:
        code = self.version_code
        if code < nccl_version_code(2, 9, 0):
            return f"{code // 1000}.{code % 1000 // 100}.{code % 100}"
        return f"{code // 10000}.{code % 10000 // 100}.{code % 100}"

    def get_unique_id(self) -> ncclUniqueId:
        uid = ncclUniqueId()
        self._check("ncclGetUniqueId", self._fn["ncclGetUniqueId"](ctypes.byref(uid)))
        return uid

    # -- communicators ------------------------------------------------------------------
    def comm_init_rank_config(
        self, nranks: int, unique_id: ncclUniqueId, rank: int, config: ncclConfig_t
    ) -> int:
        """``ncclCommInitRankConfig`` on the current CUDA device; returns the handle."""
        comm = ncclComm_t()
        code = self._fn["ncclCommInitRankConfig"](
            ctypes.byref(comm), nranks, unique_id, rank, ctypes.byref(config)
        )
        self._check("ncclCommInitRankConfig", code)
        return int(comm.value)

    def comm_destroy(self, comm: int) -> None:
        self._check("ncclCommDestroy", self._fn["ncclCommDestroy"](comm))

    def comm_abort(self, comm: int) -> None:
        self._check("ncclCommAbort", self._fn["ncclCommAbort"](comm))

    def comm_get_async_error(self, comm: int) -> int:
        result = ncclResult_t()
        self._check(
            "ncclCommGetAsyncError",
            self._fn["ncclCommGetAsyncError"](comm, ctypes.byref(result)),
            comm,
        )
        return result.value

    def _comm_int(self, name: str, comm: int) -> int:
        out = ctypes.c_int()
        self._check(name, self._fn[name](comm, ctypes.byref(out)), comm)
        return out.value

    def comm_count(self, comm: int) -> int:
        return self._comm_int("ncclCommCount", comm)

    def comm_cu_device(self, comm: int) -> int:
        return self._comm_int("ncclCommCuDevice", comm)

    def comm_user_rank(self, comm: int) -> int:
        return self._comm_int("ncclCommUserRank", comm)

    # -- collectives (raw pointers / handles) --------------------------------------------
    def all_reduce(self, send: int, recv: int, count: int, dtype: int, op: int, comm: int,
                   stream: int) -> None:
        code = self._fn["ncclAllReduce"](send, recv, count, dtype, op, comm, stream)
        if code:
            self._check("ncclAllReduce", code, comm)

    def reduce_scatter(self, send: int, recv: int, recv_count: int, dtype: int, op: int,
                       comm: int, stream: int) -> None:
        code = self._fn["ncclReduceScatter"](send, recv, recv_count, dtype, op, comm, stream)
        if code:
            self._check("ncclReduceScatter", code, comm)

    def all_gather(self, send: int, recv: int, send_count: int, dtype: int, comm: int,
                   stream: int) -> None:
        code = self._fn["ncclAllGather"](send, recv, send_count, dtype, comm, stream)
        if code:
            self._check("ncclAllGather", code, comm)

    def send(self, buf: int, count: int, dtype: int, peer: int, comm: int, stream: int) -> None:
        code = self._fn["ncclSend"](buf, count, dtype, peer, comm, stream)
        if code:
            self._check("ncclSend", code, comm)

    def recv(self, buf: int, count: int, dtype: int, peer: int, comm: int, stream: int) -> None:
        code = self._fn["ncclRecv"](buf, count, dtype, peer, comm, stream)
        if code:
            self._check("ncclRecv", code, comm)

    def group_start(self) -> None:
        self._check("ncclGroupStart", self._fn["ncclGroupStart"]())

    def group_end(self) -> None:
        self._check("ncclGroupEnd", self._fn["ncclGroupEnd"]())


_LOCK = threading.Lock()
_LIBRARY: NCCLLibrary | None = None


def get_nccl() -> NCCLLibrary:
    """The process-wide :class:`NCCLLibrary`, loaded on first use.

    Raises ``RuntimeError`` naming every path tried and how to install NCCL.
    """
    global _LIBRARY
    if _LIBRARY is not None:
        return _LIBRARY
    with _LOCK:
        if _LIBRARY is None:
            errors = []
            for path in find_nccl_library():
                try:
                    _LIBRARY = NCCLLibrary(path)
                    break
                except RuntimeError as exc:
                    errors.append(str(exc))
            else:
                raise RuntimeError(
                    "NCCL is not available: " + "; ".join(errors) + f". {INSTALL_HINT}."
                )
    return _LIBRARY
