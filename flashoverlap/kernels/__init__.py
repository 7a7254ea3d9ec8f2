"""Triton kernels of flashoverlap: the signal GEMM (plan-ordered persistent matmul with per-tile signals).

This package's ``__init__`` needs only torch: it holds the kernel configuration
(:class:`GemmConfig`, :func:`default_config`, :func:`default_block_shape`, which planners
use on any device) and exposes the kernels lazily, so ``import flashoverlap.kernels`` works
where Triton is not installed.  The kernels themselves live in
:mod:`flashoverlap.kernels.signal_gemm`.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch

__all__ = [
    "GemmConfig",
    "config_for_capability",
    "default_block_shape",
    "default_config",
    "signal_gemm",
    "signal_gemm_ref",
]

_LAZY = {
    "signal_gemm": "flashoverlap.kernels.signal_gemm",
    "signal_gemm_ref": "flashoverlap.kernels.signal_gemm",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Compile-time shape of the signal GEMM.

    Attributes:
        block_m, block_n: tile shape; must equal the plan's ``block_m``/``block_n``.
        block_k: K step of the main loop.
        num_warps, num_stages: Triton launch options (``num_stages`` = pipeline depth).
        use_tma: read A and B through TMA descriptors (sm_90+; falls back to pointer loads
            per call when an operand is not 16-byte aligned).
        flatten: flatten the persistent loop with the K loop (prefetch across tiles).
        epilogue_subtile: store the tile as two ``BLOCK_M x BLOCK_N/2`` halves (halves the
            shared-memory scratch of the epilogue's layout conversion).
        acc_multibuffer: let Triton double-buffer the accumulator across tiles of the
            flattened loop (``tl.range(disallow_acc_multi_buffer=not ...)``).
    """

    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    use_tma: bool = True
    flatten: bool = True
    epilogue_subtile: bool = False
    acc_multibuffer: bool = True

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GemmConfig.{name} must be a positive int, got {value!r}")
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"GemmConfig.{name} must be a power of two, got {value}")
        if self.block_m < 16 or self.block_n < 16 or self.block_k < 16:
            raise ValueError("GemmConfig blocks must be at least 16 (tl.dot minimum)")


def _capability(device: torch.device | str | None) -> tuple[int, int] | None:
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def default_config(device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> GemmConfig:
    """Kernel configuration for ``device`` (tuned on sm_90; sensible elsewhere).

    Non-CUDA devices get the sm_90 tile shape, so plans made on a CPU (reference engine,
    tests) match the ones the GPU engine makes; the interpreter ignores the rest.
    """
    return config_for_capability(_capability(device), dtype)


def config_for_capability(capability: tuple[int, int] | None,
                          dtype: torch.dtype = torch.bfloat16) -> GemmConfig:
    """Kernel configuration for a compute capability (None: no GPU, the sm_90 shape).

    Separate from :func:`default_config` so that the sm_80 configuration can be compiled
    and tested on a Hopper GPU too (it uses no Hopper-only feature).
    """
    if capability is None or capability[0] in (9, 10):
        # Hopper / datacenter Blackwell: 228 KB shared memory per SM.
        if dtype == torch.float32:  # only for tests: fp32 tiles are twice the bytes
            return GemmConfig(block_k=16, num_stages=2, use_tma=False, flatten=False)
        return GemmConfig()
    # Ampere/Ada/consumer parts (<= 164 KB shared memory): cp.async pointer loads.
    if dtype == torch.float32:
        return GemmConfig(block_n=128, block_k=16, num_warps=4, num_stages=2, use_tma=False,
                          flatten=False)
    return GemmConfig(block_m=128, block_n=128, block_k=32, num_warps=4, num_stages=4,
                      use_tma=False, flatten=False)


def default_block_shape(device: torch.device | str | None = None) -> tuple[int, int]:
    """``(block_m, block_n)`` the engine must put in its plans for ``device``."""
    config = default_config(device)
    return config.block_m, config.block_n
