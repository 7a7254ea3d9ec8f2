"""A Hopper signal GEMM in thread-block clusters with TMA multicast of B, in CUDA C (sm_90).

Role
----
Issue 14 asks the signal GEMM for cuBLAS's speed on 116 of 132 SMs.  Measured before (README,
"Signal GEMM vs cuBLAS"): under the H200's 700 W cap cuBLAS on 116 SMs runs a 1.7-3.2 %
higher clock than the signal GEMM at the same power, with kernels in clusters of 2-8 CTAs --
TMA multicast reads a B tile from L2 once for the whole cluster.  Triton 3.6's Gluon cannot
multicast and 3.9's lowering costs 27-33 % (``scripts/multicast_probe.py``), so the lever is
built here, outside Gluon: ``csrc_gen/cluster_gemm.cu`` (the kernel and its protocol notes)
rendered per :class:`ClusterGemmConfig`, compiled by NVRTC for ``sm_90a`` and launched
through ``cuda.bindings`` (no nvcc on the user's machine, no build step).  It keeps the
signal GEMM's contract -- a plan's step table, tiles at ``dest_row``, one release per tile on
its group's counter -- so :class:`~flashoverlap.kernels.signal_gemm.SignalGemmLauncher` can
run it where ``GemmConfig.cluster_ctas`` asks (:func:`eligible`, :func:`kernel_for`).

Measured on one H200 (``results/2026-12-03-h200/cluster-run36..38``): clusters of 4 with
multicast take 1.5-2.7 % less time than the same kernel without clusters at P = 116 on large
shapes (clusters of 2: 0.2-1.2 %), but the first kernel trailed the Gluon warp-specialized one
by 1-2 %.  Nsight Compute (``counters-run42``, 8192^3) found it issuing 1.67x the Gluon
kernel's instructions: the consumers rebuilt both wgmma descriptors every K step from the
thread's warpgroup index (a vector value, moved to uniform registers by ``R2UR`` before every
``HGMMA``) and took ring slots as ``it % 3``.  ``lean_loop`` (``lean-run46``) derives the
warpgroup index through a lane-0 shuffle (warp-uniform to the compiler), moves the ring position
on incrementally and adds offsets to the stage-0 descriptors -- ~40 SASS a K step instead of
~70 --: 1.017x the kernel without it (median of 20 rows), 0.995 of the Gluon kernel without
clusters.  Through the product path (``ab-run47``) clusters of 4 then ran 1.012x the Gluon
kernel's efficiency on the 16 of issue 14's 26 rows they can take at P = 116, so
``kernels.GEMM_RULES`` asks for them at P in [112, 121) on sm_90 and :func:`kernel_for`
compiles :data:`PRODUCT_KNOBS`.  Knobs measured against the same kernel without them and left
off (``verify-run40``, ``stsm-run41``, ``hint-run43``; medians over 8-20 rows): no L2 promotion
(``l2_promotion=0``) 1.000 -- it removes most of the extra L2 bytes the counters saw (9.6 ->
8.2 GB on 8192^3, the Gluon kernel 7.9), at no change in time --, B in one box
(``b_one_box``) 1.003, a try_wait suspend-time hint (``wait_hint_ns``) 1.003; ``stmatrix``
(1.003) is on in the product.  Also left off (one H200, P = 116, ``valid-run50`` and
``stages-run51``): ``mixed_columns`` 1.4-3.6 % slower than the product's variant on every shape
both run (the consumers' SASS is identical; its producer chooses boxes by a runtime modulo),
and no better than the Gluon kernel on the 11008-row shapes only it can run; a fourth ring
stage (``stages=4`` with ``half_epilogue``) -0.5 to +0.5 % row by row in clusters of 4 and
1.6-2.6 % slower without clusters -- with three stages a slot has about two K steps between
its release and its next use, and that is not what limits the kernel.  A release at cluster scope
(``mbarrier.arrive.release.cluster``) compiles to ``MEMBAR.ALL.GPU`` and made the first
version 20-30 % slower; the slot release is a plain remote arrive.  An H200 holds 30
clusters of 4 at once (66 of 2): :meth:`ClusterGemm.fits` keeps a persistent grid
co-resident.

Why ``cuda.bindings`` and not CuPy (which :mod:`csrc_gen.generate` uses for the spin-wait
kernel): the kernel needs ``-arch=sm_90a`` (wgmma, setmaxnreg), three 128-byte
``CUtensorMap`` parameters passed by value and 200+ KB of dynamic shared memory -- all direct
in the driver API.  GPU modules are imported lazily: on a CPU machine the source renders and,
where NVRTC is installed, compiles (``tests/test_cluster_gemm_cpu.py``).
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from . import b_transposed, tail_split, tma_addressable

BM, BN, BK = 128, 256, 64
NUM_THREADS = 384
_A_STAGE, _B_STAGE, _C_STAGING = BM * BK * 2, BN * BK * 2, BM * BN * 2
MAX_DYNAMIC_SMEM = 227 * 1024  # sm_90 per-block opt-in limit
KERNEL_NAME = "flashoverlap_cluster_gemm"
_PARAM_CACHE = 16  # operand sets whose tensor maps a loaded kernel keeps
_PTX_TYPE = {"bfloat16": "bf16", "float16": "f16"}


@dataclasses.dataclass(frozen=True)
class ClusterGemmConfig:
    """One compiled variant.

    ``cluster``: CTAs per cluster, stacked along M (they share every B tile); ``multicast``:
    each CTA of a cluster loads ``1/cluster`` of the B tile and TMA writes it into all of
    them; ``b_kmajor``: B given as ``weight.t()`` (K contiguous) rather than row-major
    ``[K, N]``.  The tile order (and the L2 swizzle) is the plan's step table.
    ``b_one_box`` (K-major B only): a CTA loads its share of the B tile as one TMA box (one
    256-row box without multicast) instead of 64-row boxes; ``l2_promotion``: the tensor
    maps' L2 promotion in bytes (0: none); ``stmatrix``: the epilogue writes the C staging
    with ``stmatrix`` (16 a thread, as the Gluon kernel's) instead of 64 4-byte stores;
    ``wait_hint_ns``: the suspend-time hint of every ``mbarrier.try_wait`` (0: none);
    ``lean_loop``: the consumers' main loop with incremental ring positions and descriptors in
    uniform registers; ``mixed_columns``: a cluster's CTAs may stand in different tile
    columns (any band height), the CTAs of each column multicasting its B tile among
    themselves -- measured slower (``valid-run50``), so not in :data:`PRODUCT_KNOBS`;
    ``half_epilogue`` (needs ``stmatrix``): the C staging in 16 KB halves per consumer
    warpgroup, which leaves room for ``stages=4``."""

    cluster: int = 2
    multicast: bool = True
    b_kmajor: bool = True
    dtype: str = "bfloat16"
    stages: int = 3
    b_one_box: bool = False
    l2_promotion: int = 256
    stmatrix: bool = False
    wait_hint_ns: int = 0
    lean_loop: bool = False
    mixed_columns: bool = False
    half_epilogue: bool = False

    def __post_init__(self) -> None:
        if self.cluster not in (1, 2, 4):
            raise ValueError(f"cluster must be 1, 2 or 4, got {self.cluster}")
        if self.multicast and self.cluster == 1:
            raise ValueError("multicast needs a cluster of 2 or 4")
        if self.b_one_box and not self.b_kmajor:
            raise ValueError("b_one_box needs a K-major B (a row-major B tile is four "
                             "64-wide boxes under the 128-byte swizzle)")
        if self.mixed_columns and (not self.multicast or self.b_one_box):
            raise ValueError("mixed_columns needs multicast and B in 64-wide boxes "
                             "(b_one_box off)")
        if self.half_epilogue and not self.stmatrix:
            raise ValueError("half_epilogue needs stmatrix (its stores are written that way)")
        if self.l2_promotion not in (0, 64, 128, 256):
            raise ValueError(f"l2_promotion must be 0, 64, 128 or 256, got {self.l2_promotion}")
        if not 0 <= self.wait_hint_ns < 2**31:
            raise ValueError(f"wait_hint_ns must be in [0, 2**31), got {self.wait_hint_ns}")
        if self.dtype not in _PTX_TYPE:
            raise ValueError(f"dtype must be one of {sorted(_PTX_TYPE)}, got {self.dtype!r}")
        if self.smem_bytes > MAX_DYNAMIC_SMEM:
            raise ValueError(f"{self.stages} stages need {self.smem_bytes} bytes of shared "
                             f"memory, more than {MAX_DYNAMIC_SMEM}")

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory: the ring, C staging, barriers, 1 KB alignment slack."""
        # half_epilogue: 16 KB of staging a consumer warpgroup and a barrier pair each
        staging = _C_STAGING // 2 if self.half_epilogue else _C_STAGING
        barriers = 16 * self.stages + (32 if self.half_epilogue else 16)
        return self.stages * (_A_STAGE + _B_STAGE) + staging + barriers + 1024

    @property
    def b_boxes(self) -> int:
        """TMA boxes per B tile (a cluster's CTAs load every ``cluster``-th one)."""
        return (self.cluster if self.multicast else 1) if self.b_one_box else 4

    @property
    def name(self) -> str:
        kind = "multicast" if self.multicast else ("cluster" if self.cluster > 1 else "single")
        return f"{kind}{self.cluster if self.cluster > 1 else ''}"


def _wgmma_fn(ptx_type: str, trans_b: int) -> str:
    """``wgmma_m64n256k16(acc, desc_a, desc_b, scale_d)``: 128 fp32 accumulators per thread."""
    regs = ", ".join(f"%{i}" for i in range(128))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(128))
    return (
        "__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], u64 da, u64 db, "
        "u32 scale_d) {\n"
        '  asm volatile("{\\n.reg .pred p;\\nsetp.ne.b32 p, %130, 0;\\n"\n'
        f'    "wgmma.mma_async.sync.aligned.m64n256k16.f32.{ptx_type}.{ptx_type} "\n'
        f'    "{{{regs}}}, %128, %129, p, 1, 1, 0, {trans_b};\\n}}\\n"\n'
        f"    : {outs}\n"
        '    : "l"(da), "l"(db), "r"(scale_d));\n'
        "}\n")


def source(config: ClusterGemmConfig, kernel_name: str = KERNEL_NAME) -> str:
    """The CUDA C of ``config`` (``csrc_gen/cluster_gemm.cu`` with its placeholders filled)."""
    from csrc_gen.generate import render

    c = config
    defines = "\n".join(f"#define {k} {int(v)}" for k, v in (
        ("CL", c.cluster), ("MULTICAST", c.multicast), ("B_KMAJOR", c.b_kmajor),
        ("STAGES", c.stages), ("B_BOXES", c.b_boxes), ("STMATRIX", c.stmatrix),
        ("WAIT_HINT_NS", c.wait_hint_ns), ("LEAN_LOOP", c.lean_loop),
        ("MIXED_COLUMNS", c.mixed_columns), ("HALF_EPILOGUE", c.half_epilogue)))
    ptx = _PTX_TYPE[c.dtype]
    return render("cluster_gemm", defines=defines, kernel_name=kernel_name,
                  cluster_attr=f"__cluster_dims__({c.cluster}, 1, 1)" if c.cluster > 1 else "",
                  cvt=f"cvt.rn.{ptx}x2.f32", wgmma_fn=_wgmma_fn(ptx, 0 if c.b_kmajor else 1))


def _check(result: Any, what: str) -> Any:
    """``cuda.bindings`` calls return ``(err, *values)``: raise on an error, return values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err!r}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def cubin_path(src: bytes, opts: list[bytes]) -> Path:
    """Where the cubin of ``src`` compiled with ``opts`` is kept: ``cubin/`` under
    :func:`flashoverlap.settings.cache_root`, named by a hash of the source, the options and
    NVRTC's version (any change compiles anew)."""
    from cuda.bindings import nvrtc

    from ..settings import cache_root

    version = ".".join(map(str, _check(nvrtc.nvrtcVersion(), "nvrtcVersion")))
    digest = hashlib.sha256(b"\0".join([src, *opts, version.encode()])).hexdigest()[:40]
    return Path(cache_root()) / "cubin" / f"{KERNEL_NAME}-{digest}.cubin"


@functools.lru_cache(maxsize=None)
def compile_cubin(config: ClusterGemmConfig, arch: str = "sm_90a") -> bytes:
    """NVRTC-compiled cubin of ``config`` for ``arch`` (raises with NVRTC's log on error).

    Kept on disk (:func:`cubin_path`): NVRTC takes 1.1-1.4 s a variant (a 2-core CPU), which
    every process -- every rank of every job -- would pay at its first launch.  Written
    atomically (a temporary file, ``os.replace``); a file that is not an ELF image is compiled
    over, and a cache that cannot be read or written is skipped, never an error."""
    from cuda.bindings import nvrtc

    src = source(config).encode()
    opts = [f"-arch={arch}".encode(), b"-std=c++17", b"-default-device"]
    path = cubin_path(src, opts)
    try:
        cubin = path.read_bytes()
        if cubin.startswith(b"\x7fELF"):  # anything else (a stray file) is compiled over
            return cubin
    except OSError:
        pass
    cubin = _nvrtc_compile(nvrtc, config, src, opts)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return cubin


def _nvrtc_compile(nvrtc, config: ClusterGemmConfig, src: bytes, opts: list[bytes]) -> bytes:
    """One NVRTC compile of ``src`` to a cubin (raises with NVRTC's log on error)."""
    prog = _check(nvrtc.nvrtcCreateProgram(src, b"cluster_gemm.cu", 0, [], []),
                  "nvrtcCreateProgram")
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    if int(err) != 0:
        raise RuntimeError(f"NVRTC could not compile {config}:\n{log.decode(errors='replace')}")
    size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
    cubin = b" " * size
    _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    nvrtc.nvrtcDestroyProgram(prog)
    return cubin


def shares_b_tiles(step_table, num_ctas: int, cluster: int) -> bool:
    """Whether a cluster of ``cluster`` programs can share B tiles on this step table: the
    kernel's cluster ``c`` runs steps ``c * cluster + i * P + [0, cluster)`` together, so every
    aligned run of ``cluster`` steps must have one tile column (true when every band of the
    swizzled order has a multiple of ``cluster`` rows).  ``step_table``: ``[T, 7]`` (numpy)."""
    import numpy as np

    if num_ctas % cluster:
        return False
    cols = np.asarray(step_table)[:, 2]
    pad = (-len(cols)) % cluster  # steps past the end follow their cluster's first step
    runs = np.concatenate([cols, np.full(pad, -1)]).reshape(-1, cluster)
    first = runs[:, :1]
    return bool(((runs == first) | (runs == -1)).all())


def runs_table(config: ClusterGemmConfig, step_table, num_ctas: int) -> bool:
    """Whether variant ``config`` can run this step table on ``num_ctas`` programs: whole
    clusters, and a cluster's steps in one tile column (:func:`shares_b_tiles`) unless the
    variant takes ``mixed_columns``."""
    if config.mixed_columns:
        return num_ctas % config.cluster == 0
    return shares_b_tiles(step_table, num_ctas, config.cluster)  # checks whole clusters too


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """``cuda.bindings`` with a loadable NVRTC (what compiling this kernel needs)."""
    try:
        import importlib

        importlib.import_module("cuda.bindings.driver")
        from cuda.bindings import nvrtc

        return int(nvrtc.nvrtcVersion()[0]) == 0
    except Exception:  # not installed, or no NVRTC library to load
        return False


def eligible(a, b, out, config, residual, full_tiles: bool, host_table,
             num_ctas: int) -> bool:
    """Whether a signal-GEMM launch can run this kernel (no device work, no sync).

    ``config``: the launch's :class:`~flashoverlap.kernels.GemmConfig` (its
    ``cluster_ctas``); ``host_table``: the plan's step table on the host (numpy), or None.
    Assumes the signal GEMM's own checks passed (shapes, devices, layouts)."""
    import torch

    cl = config.cluster_ctas
    if (cl not in (2, 4) or not full_tiles or residual is not None or host_table is None
            or (config.block_m, config.block_n, config.block_k) != (BM, BN, BK)
            or a.dtype not in (torch.bfloat16, torch.float16)
            or torch.cuda.get_device_capability(a.device) != (9, 0)):
        return False
    # row-strided views are fine: the tensor maps carry each operand's row stride
    # (engine-run49 sent a row-strided A here before they did; test_row_strided_operands)
    if not tma_addressable(a, b, out):
        return False
    b_kmajor = b_transposed(b)
    k_tiles = -(-a.shape[1] // BK)
    if config.split_tail and tail_split(len(host_table), num_ctas, k_tiles,
                                        config.split_min_saved_k_tiles)[1] > 1:
        return False  # the Gluon kernel splits this last wave; this one cannot
    # whole clusters and a pairing of tiles by column, as the product's variant needs
    return runs_table(product_variant(cl, b_kmajor, a.dtype), host_table, num_ctas) \
        and available()


# the base-kernel knobs the product path compiles (kernel_for): lean-run46 measured lean_loop
# 1.017x the same kernel's efficiency without it (median of 20 rows, 1.006-1.030; with
# stmatrix on in both), which brought the kernel without clusters to 0.995 of the Gluon one
PRODUCT_KNOBS = dict(stmatrix=True, lean_loop=True)

_LOADED: dict = {}


def product_variant(cluster: int, b_kmajor: bool, dtype) -> ClusterGemmConfig:
    """The variant the product path runs for clusters of ``cluster``, a B layout and a torch
    dtype (bf16 / fp16): multicast with :data:`PRODUCT_KNOBS`."""
    import torch

    return ClusterGemmConfig(cluster=cluster, multicast=True, b_kmajor=b_kmajor,
                             dtype="bfloat16" if dtype == torch.bfloat16 else "float16",
                             **PRODUCT_KNOBS)


def kernel_for(a, b, config, num_ctas: int, may_load: bool = True) -> "ClusterGemm | None":
    """The loaded kernel of a launch that :func:`eligible` accepted (one per variant and
    device, loaded at first use), or None where the device cannot hold ``num_ctas`` CTAs in
    such clusters at once -- or, with ``may_load`` off (a stream capture: loading compiles,
    loads a module and synchronizes), where this variant is not loaded yet -- or where it
    could not be loaded (an NVRTC or driver error: warned once, then the Gluon kernel)."""
    import torch

    cfg = product_variant(config.cluster_ctas, b_transposed(b), a.dtype)
    key = (cfg, a.device.index)
    if key not in _LOADED:
        if not may_load:
            return None
        try:
            with torch.cuda.device(a.device):
                _LOADED[key] = ClusterGemm(cfg)
        except RuntimeError as exc:  # NVRTC or the driver refused it: the Gluon kernel runs
            _LOADED[key] = None
            warnings.warn(f"flashoverlap: the cluster GEMM {cfg.name} could not be loaded on "
                          f"{a.device} ({exc}); the warp-specialized Gluon kernel runs instead",
                          RuntimeWarning, stacklevel=2)
    kernel = _LOADED[key]
    return kernel if kernel is not None and kernel.fits(num_ctas) else None


def cluster_gemm_ref(a, b):
    """The reference: ``a @ b`` in fp32, cast to ``a``'s dtype."""
    return (a.float() @ b.float()).to(a.dtype)


class ClusterGemm:
    """A loaded variant on the current device: ``gemm(a, b, c, num_ctas)`` writes ``a @ b``
    into ``c`` on the current stream.  ``a``: ``[M, K]`` row-major; ``b``: ``[K, N]``,
    row-major or (``b_kmajor``) the transpose of a row-major ``[N, K]``; ``c``: ``[M, N]``
    row-major, same dtype; rows may be strided (16-byte aligned bases and row strides,
    :func:`~flashoverlap.kernels.tma_addressable`).  ``num_ctas`` must be a whole number of
    clusters."""

    def __init__(self, config: ClusterGemmConfig) -> None:
        import torch
        from cuda.bindings import driver

        self.config, self._driver, self._torch = config, driver, torch
        torch.cuda.init()
        torch.cuda.current_stream().synchronize()  # makes the primary context current
        self._module = _check(driver.cuModuleLoadData(compile_cubin(config)), "cuModuleLoadData")
        self._fn = _check(driver.cuModuleGetFunction(self._module, KERNEL_NAME.encode()),
                          "cuModuleGetFunction")
        _check(driver.cuFuncSetAttribute(
            self._fn, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            config.smem_bytes), "cuFuncSetAttribute")
        # launch parameters (three tensor maps) per operand set, the most recent few kept
        self._params: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self._fits: dict[int, bool] = {}

    @property
    def num_regs(self) -> int:
        """Registers per thread of the loaded kernel (the driver's count; the consumers'
        ``setmaxnreg`` moves them between warpgroups at run time)."""
        d = self._driver
        return int(_check(d.cuFuncGetAttribute(
            d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NUM_REGS, self._fn), "cuFuncGetAttribute"))

    def max_active_clusters(self, num_ctas: int) -> int:
        """How many clusters of this variant the device holds at once (the driver's count)."""
        d = self._driver
        cfg = d.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = num_ctas, 1, 1
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = NUM_THREADS, 1, 1
        cfg.sharedMemBytes = self.config.smem_bytes
        cfg.numAttrs = 0
        return int(_check(d.cuOccupancyMaxActiveClusters(self._fn, cfg),
                          "cuOccupancyMaxActiveClusters"))

    def fits(self, num_ctas: int) -> bool:
        """Whether the device holds all ``num_ctas // cluster`` clusters at once (a
        persistent grid must be co-resident; an H200 holds 66 clusters of 2, 30 of 4)."""
        if self.config.cluster == 1:
            return True
        if num_ctas not in self._fits:
            self._fits[num_ctas] = (self.max_active_clusters(num_ctas) * self.config.cluster
                                    >= num_ctas)
        return self._fits[num_ctas]

    def _tensor_map(self, t, rows: int, cols: int, box_cols: int, box_rows: int):
        """The 2-D tensor map of ``t`` (``rows x cols``, unit inner stride, its own row
        stride: a row-strided view is addressed in place, as TMA allows)."""
        d = self._driver
        dtype = (d.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                 if self.config.dtype == "bfloat16"
                 else d.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16)
        return _check(d.cuTensorMapEncodeTiled(
            dtype, 2, t.data_ptr(), [d.cuuint64_t(cols), d.cuuint64_t(rows)],
            [d.cuuint64_t(t.stride(0) * t.element_size())],
            [d.cuuint32_t(box_cols), d.cuuint32_t(box_rows)],
            [d.cuuint32_t(1), d.cuuint32_t(1)],
            d.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
            d.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
            getattr(d.CUtensorMapL2promotion, "CU_TENSOR_MAP_L2_PROMOTION_" + (
                f"L2_{self.config.l2_promotion}B" if self.config.l2_promotion else "NONE")),
            d.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE), "cuTensorMapEncodeTiled")

    def _launch_params(self, a, b, out, steps, counters) -> Any:
        M, K = a.shape
        N = b.shape[1]
        key = (a.data_ptr(), b.data_ptr(), out.data_ptr(), steps.data_ptr(),
               0 if counters is None else counters.data_ptr(), M, N, K, out.shape[0],
               a.stride(0), b.stride(1) if self.config.b_kmajor else b.stride(0), out.stride(0))
        params = self._params.get(key)
        if params is not None:
            self._params.move_to_end(key)
        else:
            if self.config.b_kmajor:  # weight [N, K]
                b_map = self._tensor_map(b.t(), N, K, 64, BN // self.config.b_boxes)
            else:
                b_map = self._tensor_map(b, K, N, 64, 64)
            maps = (self._tensor_map(a, M, K, 64, BM), b_map,
                    self._tensor_map(out, out.shape[0], N, 64, 64))
            scalars = [ctypes.c_void_p(steps.data_ptr()), ctypes.c_int(steps.shape[0]),
                       ctypes.c_void_p(0 if counters is None else counters.data_ptr()),
                       ctypes.c_int(M), ctypes.c_int(K)]
            ptrs = [m.getPtr() for m in maps] + [ctypes.addressof(v) for v in scalars]
            arr = (ctypes.c_void_p * len(ptrs))(*ptrs)
            params = (maps, scalars, arr)
            self._params[key] = params
            if len(self._params) > _PARAM_CACHE:
                self._params.popitem(last=False)
        return params

    def __call__(self, a, b, out, steps, counters, num_ctas: int,
                 stream: int | None = None) -> None:
        """Run the steps of ``steps`` (a plan's int32 ``[T, 7]`` step table on the GPU) on
        ``num_ctas`` programs: tile ``a[row_start:, :] @ b[:, col_start:]`` stored at
        ``out[dest_row:, col_start:]``; with ``counters`` (int32, one per group) each stored
        tile adds one to its group's counter (release, after the stores are performed).
        Every step must be a whole 128 x 256 tile of ``out`` (TMA writes whole boxes) and the
        table must pass :func:`runs_table` for this variant (checked by the caller:
        once per plan, not per call).  ``stream``: a raw stream handle (default: the
        current stream)."""
        cfg = self.config
        M, K = a.shape
        N = b.shape[1]
        if (b.shape[0] != K or out.shape[1] != N or not a.dtype == b.dtype == out.dtype
                or K % 8 or N % 8):
            raise ValueError(f"bad operands a {tuple(a.shape)} b {tuple(b.shape)} "
                             f"out {tuple(out.shape)} (K and N multiples of 8, one dtype)")
        if b_transposed(b) != cfg.b_kmajor or not tma_addressable(a, b, out):
            raise ValueError("a and out must be row-major and b "
                             + ("weight.t()" if cfg.b_kmajor else "row-major")
                             + ", with 16-byte aligned bases and row strides (TMA)")
        if num_ctas % cfg.cluster:
            raise ValueError(f"num_ctas {num_ctas} is not a multiple of the cluster "
                             f"{cfg.cluster}")
        maps, scalars, arr = self._launch_params(a, b, out, steps, counters)
        if stream is None:
            stream = self._torch.cuda.current_stream().cuda_stream
        stream = self._driver.CUstream(stream)
        _check(self._driver.cuLaunchKernel(self._fn, num_ctas, 1, 1, NUM_THREADS, 1, 1,
                                           cfg.smem_bytes, stream, ctypes.addressof(arr), 0),
               "cuLaunchKernel")
