"""On-disk cache of tuned plan configs.

Role
----
The tuner (``flashoverlap tune``) measures and searches once per problem and machine; the
engine looks the answer up on every plan build and falls back to the analytic default
(``search.analytic_default``) when there is none.  So lookups must be cheap, and a bad file
must never break a run: it is reported with :func:`warnings.warn` and treated as a miss.

Design
------
* **JSON, never pickle.**  A cache file is data that anyone with write access to the cache
  directory can edit; unpickling it would run code.  JSON is also diffable and portable.
* **One file per key**, named by the SHA-256 of the key's canonical JSON.  A file per key
  makes every write independent (no read-modify-write of a shared index, so concurrent
  tuners of different shapes cannot lose each other's entries) and a lookup is one small
  read.  The file also stores the key itself and a lookup checks it, so even a hash
  collision would read as a miss, never as a wrong config.
* **Atomic writes**: write a temporary file in the same directory, fsync, ``os.replace``.
  Readers see the old entry or the new one, never half of one.
* **The key is everything that changes the answer**: GPU model and SM count, world size,
  the problem (op, dtype, M, N, K), NCCL / torch / Triton versions (kernels and collectives
  change speed between releases), the interconnect signature (NVLink vs PCIe and the NCCL
  environment variables that reroute traffic, e.g. ``NCCL_P2P_DISABLE``), a process-wide
  NCCL CTA limit, the plan format version (a plan format change invalidates configs) and
  flashoverlap's own kernels (:func:`kernels_signature`: a digest of ``flashoverlap/kernels``'
  sources, which hold the GEMM kernels and their per-shape choices -- when the 128 x 128 tile
  moved to the warp-specialized kernel, configs measured on the old one stopped being the
  answer, with no version number to say so).
* **Validation with pydantic v2**, strict and ``extra="forbid"``, with a ``schema_version``.
  An entry of another schema version, a missing field, a wrong type or a truncated file gives
  ``None`` plus a :class:`CacheWarning`; the entry is left on disk for a human to inspect and
  is overwritten by the next ``store``.  Schema 2 stores ``group_bands`` (groups of row
  bands, restore-free plans); schema-1 entries (``group_waves``) are read as such misses.
  They also sit under other file names: the key holds the plan format version, which
  changed with them.

Location: ``$FLASHOVERLAP_CACHE/tuning`` if the variable is set, else
``platformdirs.user_cache_dir("flashoverlap")/tuning``.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flashoverlap.plan import PLAN_FORMAT_VERSION, PlanConfig, Problem, num_bands_for
from flashoverlap.settings import CACHE_ENV, cache_root

# 2: groups are runs of row bands (``group_bands``); 1 grouped waves (``group_waves``).
SCHEMA_VERSION: Literal[2] = 2
# NCCL variables that change which transport or algorithm a collective uses, hence its speed.
INTERCONNECT_ENV = (
    "NCCL_P2P_DISABLE", "NCCL_P2P_LEVEL", "NCCL_SHM_DISABLE", "NCCL_IB_DISABLE",
    "NCCL_NET", "NCCL_NVLS_ENABLE", "NCCL_ALGO", "NCCL_PROTO",
)

__all__ = [
    "CACHE_ENV",
    "SCHEMA_VERSION",
    "CacheEntry",
    "CacheKey",
    "CacheWarning",
    "cache_dir",
    "detect_key",
    "entry_path",
    "interconnect_signature",
    "list_entries",
    "lookup",
    "lookup_entry",
    "make_key",
    "store",
]


class CacheWarning(UserWarning):
    """A cache entry exists but cannot be used (stale schema, malformed, unreadable)."""


_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


@functools.cache
def kernels_signature() -> str:
    """SHA-256 (16 hex digits) of the sources of :mod:`flashoverlap.kernels` (every ``.py``
    file, in name order): changes whenever a kernel or a per-shape choice does.  Read once
    per process; no import of torch or Triton."""
    root = Path(__file__).resolve().parents[1] / "kernels"
    h = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class CacheKey(BaseModel):
    """Everything a tuned config depends on.  Build it with :func:`make_key`."""

    model_config = _STRICT

    gpu_name: str
    num_sms: int = Field(gt=0)
    world_size: int = Field(gt=0)
    op: str
    dtype: str
    M: int = Field(gt=0)
    N: int = Field(gt=0)
    K: int = Field(gt=0)
    nccl_version: str
    torch_version: str
    triton_version: str
    interconnect: str
    nccl_cta_limit: int | None = None
    plan_format: int = PLAN_FORMAT_VERSION
    kernels: str = Field(default_factory=kernels_signature)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of every field (the entry's file name)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True,
                               separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class ConfigModel(BaseModel):
    """The :class:`~flashoverlap.plan.PlanConfig` fields as stored."""

    model_config = _STRICT

    block_m: int
    block_n: int
    num_ctas: int
    group_m: int
    group_bands: tuple[int, ...] | None

    @classmethod
    def from_config(cls, config: PlanConfig) -> ConfigModel:
        return cls(block_m=config.block_m, block_n=config.block_n, num_ctas=config.num_ctas,
                   group_m=config.group_m, group_bands=config.group_bands)

    def to_config(self) -> PlanConfig:
        return PlanConfig(block_m=self.block_m, block_n=self.block_n, num_ctas=self.num_ctas,
                          group_m=self.group_m, group_bands=self.group_bands)


class CacheEntry(BaseModel):
    """One cache file: the key, the tuned config, and what was predicted / measured."""

    model_config = _STRICT

    schema_version: Literal[2]
    key: CacheKey
    config: ConfigModel
    predicted_ms: float
    measured_ms: float | None = None
    sequential_ms: float | None = None
    # False when tuning found sequential faster: the engine should not overlap this shape.
    use_overlap: bool = True
    created: str

    @property
    def plan_config(self) -> PlanConfig:
        return self.config.to_config()


def cache_dir() -> Path:
    """Directory of the tuning entries (see the module docstring)."""
    return Path(cache_root()) / "tuning"


def entry_path(key: CacheKey, directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / f"{key.digest()}.json"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def interconnect_signature(link: str, env: Mapping[str, str] | None = None) -> str:
    """``link`` (e.g. ``"nvlink"``, ``"pcie"``) plus the set NCCL transport variables.

    >>> interconnect_signature("nvlink", {"NCCL_P2P_DISABLE": "1"})
    'nvlink;NCCL_P2P_DISABLE=1'
    """
    values = os.environ if env is None else env
    parts = [link] + [f"{name}={values[name]}" for name in INTERCONNECT_ENV if values.get(name)]
    return ";".join(parts)


def make_key(
    problem: Problem,
    *,
    gpu_name: str,
    num_sms: int,
    interconnect: str,
    nccl_version: str,
    torch_version: str | None = None,
    triton_version: str | None = None,
    nccl_cta_limit: int | None = None,
) -> CacheKey:
    """The cache key of ``problem`` on a machine.

    ``torch_version`` / ``triton_version`` default to the installed distributions (read from
    package metadata, so this never imports torch or triton).  ``interconnect`` is best made
    with :func:`interconnect_signature`.
    """
    return CacheKey(
        gpu_name=gpu_name, num_sms=num_sms, world_size=problem.world_size, op=problem.op,
        dtype=problem.dtype, M=problem.M, N=problem.N, K=problem.K,
        nccl_version=nccl_version,
        torch_version=torch_version if torch_version is not None else _version("torch"),
        triton_version=triton_version if triton_version is not None else _version("triton"),
        interconnect=interconnect, nccl_cta_limit=nccl_cta_limit,
    )


@functools.cache
def _machine(device_index: int) -> tuple[str, int, str, str]:
    """(GPU name, SM count, NCCL version, link) of a CUDA device; queried once per process."""
    import torch

    props = torch.cuda.get_device_properties(device_index)
    try:
        version = torch.cuda.nccl.version()
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    except Exception:  # torch built without NCCL
        nccl = "none"
    return props.name, props.multi_processor_count, nccl, _detect_link(device_index)


def _detect_link(device_index: int) -> str:
    """``"nvlink"`` if the device has an active NVLink, ``"pcie"`` if it has none, else
    ``"unknown"`` (no NVML).  Pass ``link=`` to :func:`detect_key` to override."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                if pynvml.nvmlDeviceGetNvLinkState(handle, link):
                    return "nvlink"
            except pynvml.NVMLError:
                break
        return "pcie"
    except Exception:
        return "unknown"


def detect_key(problem: Problem, *, device: int | None = None, link: str | None = None) -> CacheKey:
    """The key of ``problem`` on this process's GPU (CUDA only; imports torch lazily).

    The engine's lookup and the tuner's store both go through here, so they agree.  The NCCL
    CTA limit is the process-wide ``NCCL_MAX_CTAS``, if set.
    """
    import torch

    index = torch.cuda.current_device() if device is None else device
    gpu_name, num_sms, nccl, detected = _machine(index)
    cta_env = os.environ.get("NCCL_MAX_CTAS")
    return make_key(problem, gpu_name=gpu_name, num_sms=num_sms, nccl_version=nccl,
                    torch_version=torch.__version__,
                    interconnect=interconnect_signature(link or detected),
                    nccl_cta_limit=int(cta_env) if cta_env and cta_env.isdigit() else None)


def _read(path: Path) -> CacheEntry | None:
    """Parse and validate one file; a warning and ``None`` for anything unusable."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        warnings.warn(f"flashoverlap cache: cannot read {path}: {exc}", CacheWarning,
                      stacklevel=3)
        return None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        warnings.warn(f"flashoverlap cache: {path} is not valid JSON ({exc}); ignoring it",
                      CacheWarning, stacklevel=3)
        return None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        warnings.warn(f"flashoverlap cache: {path} has schema version {version!r}, this "
                      f"flashoverlap reads {SCHEMA_VERSION}; ignoring it (re-run "
                      f"`flashoverlap tune`)", CacheWarning, stacklevel=3)
        return None
    try:
        entry = CacheEntry.model_validate_json(text)
        entry.config.to_config()  # PlanConfig's own checks (powers of two, positive ...)
    except (ValidationError, ValueError, TypeError) as exc:
        warnings.warn(f"flashoverlap cache: {path} is malformed; ignoring it:\n{exc}",
                      CacheWarning, stacklevel=3)
        return None
    return entry


def _plan_mismatch(entry: CacheEntry) -> str | None:
    """Why the entry's config cannot make a plan for its key's problem (``None``: it can)."""
    k = entry.key
    try:
        problem = Problem(k.M, k.N, k.K, k.dtype, k.world_size, k.op)
        config = entry.plan_config
        bands = config.group_bands
        if bands is not None and sum(bands) != num_bands_for(problem, config):
            return (f"group_bands {bands} do not sum to the plan's "
                    f"{num_bands_for(problem, config)} bands")
    except ValueError as exc:
        return str(exc)
    return None


def lookup_entry(key: CacheKey, *, directory: Path | None = None) -> CacheEntry | None:
    """The full entry for ``key`` (config, predictions, overlap decision), or ``None``.

    Besides the schema, the config is checked against the key's problem (its bands must add
    up), so a hand-edited or stale entry reads as a miss instead of failing the op."""
    path = entry_path(key, directory)
    entry = _read(path)
    if entry is not None and entry.key != key:
        warnings.warn(f"flashoverlap cache: {path} holds another key "
                      f"(hash collision or edited file); ignoring it", CacheWarning,
                      stacklevel=2)
        return None
    if entry is not None and (why := _plan_mismatch(entry)) is not None:
        warnings.warn(f"flashoverlap cache: {path} does not fit its problem ({why}); "
                      f"ignoring it", CacheWarning, stacklevel=2)
        return None
    return entry


def lookup(key: CacheKey, *, directory: Path | None = None) -> PlanConfig | None:
    """The tuned :class:`PlanConfig` for ``key``, or ``None`` (use the analytic default)."""
    entry = lookup_entry(key, directory=directory)
    return None if entry is None else entry.plan_config


def store(
    key: CacheKey,
    config: PlanConfig,
    *,
    predicted_ms: float,
    measured_ms: float | None = None,
    sequential_ms: float | None = None,
    use_overlap: bool = True,
    directory: Path | None = None,
) -> Path:
    """Write (or replace) the entry of ``key`` atomically; returns its path."""
    entry = CacheEntry(
        schema_version=SCHEMA_VERSION, key=key, config=ConfigModel.from_config(config),
        predicted_ms=float(predicted_ms),
        measured_ms=None if measured_ms is None else float(measured_ms),
        sequential_ms=None if sequential_ms is None else float(sequential_ms),
        use_overlap=use_overlap,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    path = entry_path(key, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(entry.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Never leave temporaries behind, whatever interrupted the write.
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def list_entries(*, directory: Path | None = None) -> list[CacheEntry]:
    """Every valid entry, sorted by problem; unusable files warn and are skipped."""
    directory = directory or cache_dir()
    if not directory.is_dir():
        return []
    entries = [e for p in sorted(directory.glob("*.json")) if (e := _read(p)) is not None]
    entries.sort(key=lambda e: (e.key.gpu_name, e.key.op, e.key.world_size, e.key.dtype,
                                e.key.M, e.key.N, e.key.K))
    return entries
