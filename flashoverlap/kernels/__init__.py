"""Triton kernels of flashoverlap: the signal GEMM (a plan-ordered persistent matmul that
signals each finished tile).

This package's ``__init__`` needs only torch: it holds the kernel configuration
(:class:`GemmConfig`, :func:`default_config`, :func:`default_block_shape`, which planners
use on any device) and exposes the kernels lazily, so ``import flashoverlap.kernels`` works
where Triton is not installed.  The kernels themselves live in
:mod:`flashoverlap.kernels.signal_gemm`.

Per-shape choices are pure functions of the problem and the CTA count, so a plan made on a
CPU matches the GPU engine's: :func:`tail_split` (which last waves split along K),
:func:`gemm_config_for` (measured :data:`GEMM_RULES`, then :func:`wave_tile`: 128 x 128
tiles where 128 x 256 ones would leave a poor last wave) and :func:`config_for_tile` (a
plan's tile with its measured pipeline depth).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import NamedTuple

import torch

__all__ = [
    "DEFAULT_GROUP_M",
    "DTYPE_ALIASES",
    "GEMM_RULES",
    "GemmChoice",
    "GemmConfig",
    "GemmRule",
    "config_for_capability",
    "config_for_tile",
    "default_block_shape",
    "default_config",
    "gemm_config_for",
    "plan_gemm_config",
    "grouped_gemm_config_for",
    "GROUPED_GEMM_RULES",
    "signal_gemm",
    "signal_gemm_ref",
    "tail_split",
    "tail_programs",
    "TAIL_SPLIT_MAX",
    "TAIL_MIN_SAVED_K_TILES",
    "TILE_RATES",
    "TILE_STAGES",
    "GEMM_FLOPS",
    "GEMM_LAUNCH_S",
    "GEMM_POWER_EXPONENT",
    "GEMM_REF_SMS",
    "signal_gemm_time",
    "SPLIT_FIXUP_S",
    "SPLIT_PER_PART_S",
    "SPLIT_SLOWDOWN",
    "wave_lengths",
    "wave_times",
    "wave_tile",
    "b_transposed",
    "tma_addressable",
    "WAVE_TILE_MIN_GAIN",
]

_LAZY = {
    "signal_gemm": "flashoverlap.kernels.signal_gemm",
    "signal_gemm_ref": "flashoverlap.kernels.signal_gemm",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# A last wave that leaves SMs idle is split along K into at most this many parts per tile,
# each of at least TAIL_MIN_K_TILES K steps (a shorter part is mostly pipeline fill) ...
TAIL_SPLIT_MAX = 4
TAIL_MIN_K_TILES = 4
# ... and only where the split takes at least this many K steps off the last wave (a tile's
# K steps minus its longest part's).  A split has a fixed price -- each part stores an fp32
# partial, the last one reads the others back, and every MMA warp takes a ticket -- that
# the saved K steps must pay for.  Measured on one H200 (bf16, block_k 64, both B layouts,
# scripts/gemm_sweep.py candidates with and without the split, results/2026-12-02-h200/
# splitcost-run14): saving 4-14 K steps made the GEMM 1-23 % slower (2048/4096 x 4096 x
# 512-1792 at P = 116), 16-24 -2.4 to +3.7 %, 28 0.4-2.2 % faster, 42 (3584 = 56 steps in 4
# parts) 10 % faster; earlier (wssplit-run2), 64 (6144 x 3072 x 8192 at P = 132, 2 parts)
# 4.5 % faster and 21 (16384 x 8192 x 2048 at P = 116, 3 parts) 1.3 % slower.  The count is
# in K steps of the tuned block_k (64 on sm_90).
TAIL_MIN_SAVED_K_TILES = 32


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
        warp_specialize: ask Triton to warp-specialize the persistent loop
            (``tl.range(warp_specialize=True)``).  Checked on the compiled kernel before its
            first launch: a kernel whose signal protocol did not survive (Triton 3.6 on sm_90
            drops the release atomic; a partitioned loop cannot use the CTA barrier) raises
            ``NotImplementedError`` instead of launching.  Kept for newer Triton versions.
        split_tail: split the tiles of a last, partial wave along K, in both kernels (see
            :func:`tail_split`): up to :data:`TAIL_SPLIT_MAX` programs share one such tile and
            the last one to finish sums the parts in a fixed order (deterministic) and stores
            and signals it.
        split_min_saved_k_tiles: split only where that takes at least this many K steps off
            the last wave (:data:`TAIL_MIN_SAVED_K_TILES`, measured; 0 splits wherever the
            wave allows it, which tests use to reach the split path with short K).
        max_registers: cap on registers per thread (Triton's ``maxnreg``); ``None`` leaves
            the choice to ptxas.  A lower cap leaves room in the register file for another
            kernel's CTAs beside a GEMM CTA (``scripts/bench_sm_sharing.py``) at the price of
            spills.  Measured on one H200 (128 x 256 tiles, Triton 3.6): 168 fits tiny
            kernels beside each GEMM CTA but no NCCL-shaped one (640 or 256 threads x 96
            registers), and the split-last-wave variant then spills 116 registers (~3-4 %
            slower); ptxas refuses caps below about 154 for this tile (a compile error at the
            first launch).  Off by default.
        warp_specialized_kernel: on sm_90, run the Gluon warp-specialized kernel
            (:mod:`flashoverlap.kernels.ws_signal_gemm`: a TMA loader warp, two MMA
            warpgroups, a TMA store + signal warp) wherever the launch allows it (whole
            tiles, no residual, bf16/fp16, TMA-aligned operands, a tile of
            :data:`WARP_SPECIALIZED_TILES`); the pipelined kernel runs the rest, and
            everything when ``use_tma`` is off or ``max_registers`` is set.  It uses
            ``num_stages`` (capped by shared memory) and ``epilogue_subtile`` (a half-width
            C buffer: room for a fourth stage, measured slower), not ``num_warps``,
            ``flatten``, ``acc_multibuffer`` or ``split_tail``.
        cluster_ctas: on sm_90, run the CUDA C cluster GEMM
            (:mod:`flashoverlap.kernels.cluster_gemm`: thread-block clusters of this many
            CTAs that TMA-multicast each B tile) where it can run -- through
            :class:`~flashoverlap.kernels.signal_gemm.SignalGemmLauncher`, for 128 x 256 x 64
            tiles of a plan whose clusters share B tiles, whole tiles, no residual, no split
            last wave, TMA-addressable operands, NVRTC installed; 0 (the field's default)
            never.  :data:`GEMM_RULES` sets 4 at P in [112, 121) on sm_90, and the engines
            take the table's choice (:func:`plan_gemm_config`).
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
    warp_specialize: bool = False
    split_tail: bool = True
    split_min_saved_k_tiles: int = TAIL_MIN_SAVED_K_TILES
    max_registers: int | None = None
    warp_specialized_kernel: bool = True
    cluster_ctas: int = 0

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GemmConfig.{name} must be a positive int, got {value!r}")
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"GemmConfig.{name} must be a power of two, got {value}")
        saved = self.split_min_saved_k_tiles
        if not isinstance(saved, int) or isinstance(saved, bool) or saved < 0:
            raise ValueError(f"GemmConfig.split_min_saved_k_tiles must be an int >= 0, "
                             f"got {saved!r}")
        regs = self.max_registers
        if regs is not None and (not isinstance(regs, int) or isinstance(regs, bool)
                                 or not 24 <= regs <= 255):
            raise ValueError(f"GemmConfig.max_registers must be None or an int in [24, 255], "
                             f"got {regs!r}")
        if self.cluster_ctas not in (0, 2, 4):
            raise ValueError(f"GemmConfig.cluster_ctas must be 0, 2 or 4, got "
                             f"{self.cluster_ctas!r}")
        if self.block_m < 16 or self.block_n < 16 or self.block_k < 16:
            raise ValueError("GemmConfig blocks must be at least 16 (tl.dot minimum)")


def b_transposed(b: torch.Tensor) -> bool:
    """``b`` ([K, N]) is the transposed view of a row-major ``[N, K]`` weight (K-major)."""
    return b.stride(0) == 1 and b.stride(1) != 1


def tma_addressable(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> bool:
    """TMA can address ``a``, ``b`` (either layout) and ``out``: unit inner stride,
    16-byte aligned bases and row strides (the sm_90 kernels' condition)."""
    b_rows = b.T if b_transposed(b) else b
    return all(t.stride(1) == 1 and t.data_ptr() % 16 == 0
               and (t.stride(0) * t.element_size()) % 16 == 0 for t in (a, b_rows, out))


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


# int32 tickets per split tile: the pipelined kernel uses the first, the warp-specialized one
# a ticket per MMA warp (8) and a count of finished warps (9th); both leave them zero.
TICKETS_PER_TILE = 16


# Compile options every GEMM launch passes (merged into each launch's keyword arguments).
# FP contraction (FMA) is named, not left to Triton's default: every measurement and test so
# far ran with it on (the default through Triton 3.9), Triton 3.10 turns the default off, and
# 3.9 warns once per process when it is unset.  The kernels' float arithmetic outside the
# tensor cores is small (the split tail's part sums, the residual add), so this pins the
# compiled code across Triton versions rather than buying speed.
LAUNCH_OPTIONS: dict[str, bool] = {"enable_fp_fusion": True}


# The tiles (BLOCK_M, BLOCK_N, BLOCK_K) the warp-specialized kernels
# (flashoverlap.kernels.ws_signal_gemm, ws_grouped_signal_gemm) run: two warpgroups of
# 64 x BLOCK_N, 128-byte K boxes.  128 x 256 is the dense default; 128 x 128 is the grouped
# default (GROUPED_GEMM_RULES) and what small dense problems take where 128 x 256 tiles leave
# a poor last wave (flashoverlap.kernels.wave_tile).
WARP_SPECIALIZED_TILES = ((128, 256, 64), (128, 128, 64))

# Per-tile measurements on sm_90 (one H200, Triton 3.6, bf16, B = w.t(), the warp-specialized
# kernel, scripts/gemm_sweep.py, results/2026-12-02-h200/tiles-run17/sweep-tiles):
# TILE_RATES is a tile's FLOP rate per SM against 128 x 256's where both fill the same number
# of waves -- 128 x 128 with 5 stages took 1 / 0.925 of the time on the median of the 12 such
# (shape, P = 132) rows (0.880-0.965: smaller tiles read more operand bytes per FLOP);
# TILE_STAGES the pipeline depth a tile takes when a plan asks for it without a configuration
# (5 stages over 4 for 128 x 128: +3.3 % in the median, faster on 24 of 26 rows; 5 x 32 KB +
# a 32 KB C buffer fit in shared memory).  WAVE_TILE_MIN_GAIN: the modelled saving a switch
# to the smaller tile must reach (:func:`wave_tile`; the model's time error is ~2 % rms).
TILE_RATES: dict[tuple[int, int], float] = {(128, 256): 1.0, (128, 128): 0.92}
TILE_STAGES: dict[tuple[int, int], int] = {(128, 128): 5}
WAVE_TILE_MIN_GAIN = 0.03


def config_for_tile(config: GemmConfig, block_m: int, block_n: int) -> GemmConfig:
    """``config`` with the tile ``block_m x block_n``; on the warp-specialized path (TMA, one
    of :data:`WARP_SPECIALIZED_TILES`) also with the tile's measured :data:`TILE_STAGES`."""
    if (config.block_m, config.block_n) == (block_m, block_n):
        return config
    changes: dict[str, int] = {"block_m": block_m, "block_n": block_n}
    if (config.use_tma and (block_m, block_n, config.block_k) in WARP_SPECIALIZED_TILES
            and (block_m, block_n) in TILE_STAGES):
        changes["num_stages"] = TILE_STAGES[(block_m, block_n)]
    return dataclasses.replace(config, **changes)


# The signal GEMM's time model on sm_90 (one H200), in seconds; the tuner's AnalyticModel takes
# these as its defaults.  GEMM_FLOPS: dense throughput of the whole GPU (132 SMs) as the
# warp-specialized signal GEMM reaches it on 128 x 256 tiles, and GEMM_POWER_EXPONENT how the
# per-SM rate grows when fewer CTAs run: fitted by scripts/fit_gemm_model.py to the acceptance
# runs (7 runs x 26 bf16 shapes x P in {132, 116}, results/2026-12-02-h200), the fixed times
# below taken off each row -- 710 TFLOP/s and 0.345, 2.0 % rms error in time (0.36 before the
# split slowdown below).  The exponent is the power cap's: the board runs these GEMMs at 700 W,
# so idle SMs leave the others power for clock (clock-run3: +4.7-6.3 % MHz at 116 of 132); a
# GPU below its power limit has 0.  fp16 (676 TFLOP/s) is ~4 % slower than bf16, as is
# torch.matmul's.
# GEMM_LAUNCH_S: the first wave's start.  A split last wave: its longest part runs
# 1 + SPLIT_SLOWDOWN times as long as its K steps take in a whole wave (alone at the end, a
# part no longer shares its A and B K steps through L2 with CTAs walking K in step), and
# SPLIT_FIXUP_S + SPLIT_PER_PART_S * parts * area come on top -- the tickets, and each part's
# fp32 slot written and read back by the last part (``area``: the tile's size against
# 128 x 256, since those bytes scale with it).  The fixed line is fitted, with the slowdown
# taken off first, to 16 split / no-split pairs with 128 x 256 tiles (splitcost-run14: every
# pair within 1.5 us of it, whatever K); scaling the per-part term with the tile area fitted
# the 66 128 x 128 / 128 x 256 pairs of tiles-run17 and results/2026-12-03-h200/final-run22
# to 3.8 % rms in the time ratio, against 5.1 % unscaled and 19 % with no split cost at all.
# SPLIT_SLOWDOWN (0.25; before 2026-12-03 none, the line then 6.2 + 2.8 us per part) was
# proposed from the 140 committed pairs, where it cut the missed 128 x 128 gains from 3 to
# 2, then checked on 128 pairs measured for it (results/2026-12-03-h200/split-model-run28
# and -run29: 48 + 80 rows, each tile forced, 3 repeats): the rule without it missed 16 gains
# of 5-20 %, with it 8; on the 29 rows where the two rules differ the new choice took 1.028x
# less time in the median (0.958-1.255x, better on 21); each rule switched one row the wrong
# way (0.6 % and 0.7 % slower).
# Where the model is wrong, measured: it counts a partial last wave as a whole one, so it
# predicts that fewer programs than the SM budget, filling whole waves, save time (1.1 % for
# 1,024-4,096 tiles on 128 programs instead of 132).  They do not: under the power cap a
# partly idle last wave runs at a higher clock.  results/2026-12-03-h200/gather-pfit-run26
# (bench_gemm, 3 repeats): time at P = 128 over P = 132 on the nine N = 8192 shapes median
# 1.006 (B = w.t()) and 0.998 (row-major), 0.988-1.025; 114 over 116 median 1.001-1.002; on
# the four N != 8192 shapes every P in {129, 128, 124, 120} slower than 132 (1.005-1.071).
# So a plan's P is the SMs minus NCCL's reservation (the tuner searches reservations for
# NCCL's sake), never cut further to fill whole waves.
GEMM_FLOPS: dict[str, float] = {"bfloat16": 710e12, "float16": 676e12,
                                "float32": 300e12}  # float32 via TF32
GEMM_POWER_EXPONENT = 0.345
GEMM_REF_SMS = 132
GEMM_LAUNCH_S = 6e-6
SPLIT_SLOWDOWN = 0.25
SPLIT_FIXUP_S = 4.0e-6
SPLIT_PER_PART_S = 2.96e-6


def wave_lengths(tiles: int, num_ctas: int, k_tiles: int, split_tail: bool = True,
                 min_saved_k_tiles: int = TAIL_MIN_SAVED_K_TILES) -> tuple[list[float], int]:
    """``(lengths, parts)``: each wave of a persistent GEMM of ``tiles`` tiles on ``num_ctas``
    programs in tile times -- whole waves 1.0 (a partial one too: wave quantization), a last
    wave split along K (:func:`tail_split`) its longest part, ``ceil(k_tiles / parts) /
    k_tiles`` -- and the split's part count (1: none).  The wave shape under
    :func:`wave_times`."""
    lengths = [1.0] * -(-tiles // num_ctas)
    parts = (tail_split(tiles, num_ctas, k_tiles, min_saved_k_tiles)[1] if split_tail
             else 1)
    if parts > 1:
        lengths[-1] = -(-k_tiles // parts) / k_tiles
    return lengths, parts


def wave_times(tiles: int, num_ctas: int, K: int, block_m: int, block_n: int, *,
               flops: float = GEMM_FLOPS["bfloat16"], block_k: int = 64,
               split_tail: bool = True, min_saved_k_tiles: int = TAIL_MIN_SAVED_K_TILES,
               ref_sms: int = GEMM_REF_SMS, power_exponent: float = GEMM_POWER_EXPONENT,
               tile_rates: Mapping[tuple[int, int], float] | None = None,
               launch_s: float = GEMM_LAUNCH_S, split_fixup_s: float = SPLIT_FIXUP_S,
               split_per_part_s: float = SPLIT_PER_PART_S,
               split_slowdown: float = SPLIT_SLOWDOWN) -> list[float]:
    """Modelled seconds of each wave of the persistent signal GEMM: ``tiles`` tiles of
    ``block_m x block_n`` over ``K`` on ``num_ctas`` programs.  A tile costs ``2*BM*BN*K`` FLOPs
    at ``flops / ref_sms`` per SM, times ``(ref_sms / P) ** power_exponent`` (power-capped
    clocks), times the tile's :data:`TILE_RATES`; waves as :func:`wave_lengths`; a split last
    wave takes ``1 + split_slowdown`` times its longest part and adds ``split_fixup_s +
    split_per_part_s * parts * area``; the first wave ``launch_s``.  The one GEMM model of the
    package: :func:`wave_tile` sums it, the tuner's ``AnalyticModel.wave_times`` calls it with
    its own fields."""
    rates = TILE_RATES if tile_rates is None else tile_rates
    per_sm = flops / ref_sms * (ref_sms / num_ctas) ** power_exponent \
        * rates.get((block_m, block_n), 1.0)
    tile_s = 2.0 * block_m * block_n * K / per_sm
    lengths, parts = wave_lengths(tiles, num_ctas, -(-K // block_k), split_tail,
                                  min_saved_k_tiles)
    times = [tile_s * x for x in lengths]
    if parts > 1:
        area = block_m * block_n / (128 * 256)
        times[-1] = times[-1] * (1.0 + split_slowdown) + split_fixup_s \
            + split_per_part_s * parts * area
    times[0] += launch_s
    return times


def signal_gemm_time(M: int, N: int, K: int, num_ctas: int, config: GemmConfig,
                     dtype: torch.dtype | str = "bfloat16") -> float:
    """Modelled seconds of the persistent signal GEMM with ``config`` on ``num_ctas``
    programs (:func:`wave_times` summed; its tile count, K step and split as ``config``)."""
    bm, bn = config.block_m, config.block_n
    return sum(wave_times(-(-M // bm) * -(-N // bn), num_ctas, K, bm, bn,
                          flops=GEMM_FLOPS[_dtype_name(dtype)], block_k=config.block_k,
                          split_tail=config.split_tail,
                          min_saved_k_tiles=config.split_min_saved_k_tiles))


def wave_tile(M: int, N: int, K: int, num_ctas: int, config: GemmConfig,
              dtype: torch.dtype | str = "bfloat16") -> GemmConfig:
    """``config``, or its 128 x 128 form (:func:`config_for_tile`) where that tile saves at
    least :data:`WAVE_TILE_MIN_GAIN` of :func:`signal_gemm_time` -- few tiles on fewer
    programs than SMs, e.g. 2048 x 4096 (256 tiles of 128 x 256: 3 waves on 116 CTAs, 512 of
    128 x 128: 5 half-size ones), or a 128 x 256 grid whose last wave needs a split that
    costs more than the finer tile's waves.  Only from the 128 x 256 TMA configuration.

    Measured on one H200 (bf16, B = ``w.t()``).  ``results/2026-12-02-h200/tiles-run17``
    (``gemm_sweep.py``, 13 shapes) set the first rule (without the split's fix-up in the
    model): at P = 116 the 128 x 128 tile was 4.5-12 % faster on 2048 x 4096 x {512, 1024,
    2048}; ``wave-run18`` (``bench_gemm.py``, 3 repeats, M in {512, 1024, 2048}) then showed
    the 14 (shape, P) rows it switched 1.05-1.37x faster (median 1.16x).  That model credited
    a split last wave with its longest part alone: ``results/2026-12-03-h200/final-run22``
    (``gemm_sweep.py``, 20 shapes x P = 132 / 116 where charging the fix-up changes the
    choice) found it switching 7 rows that ran 0.4-4.3 % slower with 128 x 128 and keeping
    128 x 256 on 22 that ran 4-29 % faster with 128 x 128 (512 x 4096 x 4096 at P = 132:
    41 us -> 29 us).  With the fix-up (per part scaled by tile area) the model switches none
    of the 66 measured pairs the wrong way and misses two gains (4 % and 4.3 %).  A split
    part's slowdown (:data:`SPLIT_SLOWDOWN`, 2026-12-03) then halved the missed gains on 128
    pairs measured for it (``split-model-run28``/``-run29``: 16 -> 8, one row switched 0.7 %
    the wrong way, as before).
    """
    if (config.block_m, config.block_n, config.block_k) != (128, 256, 64) or not config.use_tma:
        return config
    # the cluster kernel runs 128 x 256 tiles only: the finer tile is the Gluon kernel's
    small = dataclasses.replace(config_for_tile(config, 128, 128), cluster_ctas=0)
    if signal_gemm_time(M, N, K, num_ctas, small, dtype) <= (1 - WAVE_TILE_MIN_GAIN) * \
            signal_gemm_time(M, N, K, num_ctas, config, dtype):
        return small
    return config


def tail_split(num_steps: int, num_ctas: int, k_tiles: int,
               min_saved_k_tiles: int = TAIL_MIN_SAVED_K_TILES) -> tuple[int, int]:
    """``(num_main, parts)``: the persistent GEMM runs steps ``[0, num_main)`` whole and splits
    each of the remaining ``r`` steps -- a last wave of ``r < P`` tiles -- into ``parts``
    ranges of its K steps, one per program, so that the last wave takes about ``1 / parts``
    of a tile's time instead of a whole one.  ``parts = min(TAIL_SPLIT_MAX, P // r,
    k_tiles // TAIL_MIN_K_TILES)``; ``(num_steps, 1)`` (no split) when that is below 2 or
    when the split saves fewer than ``min_saved_k_tiles`` K steps (``k_tiles`` minus the
    longest part's: :data:`TAIL_MIN_SAVED_K_TILES`, what a split costs).

    Why only the last wave, and at most 4 parts: the tile's last part to finish reads the
    other parts back (fp32, ``BLOCK_M x BLOCK_N`` each) and sums them in part order, so the
    result does not depend on timing; that read is what one program pays for the split.
    Last waves more than half full stay whole: a stream-K tail for them (the last two waves'
    K steps cut into ``P`` equal ranges) and a filled last wave (each tile cut at one K step,
    the short parts on the idle programs) were built and measured slower on one H200 (module
    docstring of :mod:`flashoverlap.kernels.signal_gemm`).
    """
    T, P = num_steps, num_ctas
    r = T % P if T >= P else T
    if r == 0:
        return T, 1
    parts = min(TAIL_SPLIT_MAX, P // r, k_tiles // TAIL_MIN_K_TILES)
    if parts < 2 or k_tiles - -(-k_tiles // parts) < min_saved_k_tiles:
        return T, 1
    return T - r, parts


def tail_programs(num_steps: int, num_ctas: int, num_main: int, parts: int) -> int:
    """Programs of a launch with :func:`tail_split`'s ``(num_main, parts)``: at most
    ``num_ctas``, enough for every step and for one piece of a split tail per program."""
    return min(num_ctas, max(num_steps, (num_steps - num_main) * parts))


def default_block_shape(device: torch.device | str | None = None) -> tuple[int, int]:
    """``(block_m, block_n)`` the engine must put in its plans for ``device``."""
    config = default_config(device)
    return config.block_m, config.block_n


# --------------------------------------------------------------------------------------
# Per-shape selection
# --------------------------------------------------------------------------------------

DEFAULT_GROUP_M = 8  # == PlanConfig.group_m's default and flashoverlap.defaults.DEFAULT_GROUP_M

_BIG = 1 << 62
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
# Short names a Problem may carry (the tuner accepts them too) -> torch's names.
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                 "float": "float32"}


class GemmChoice(NamedTuple):
    """What :func:`gemm_config_for` picks: the kernel options and the plan's band height.

    ``config.block_m``/``config.block_n`` must be the plan's ``block_m``/``block_n``;
    ``group_m`` is the L2 swizzle width the GEMM prefers (``PlanConfig.group_m``), an upper
    bound a planner may lower to keep enough bands for the overlap.
    """

    config: GemmConfig
    group_m: int


@dataclasses.dataclass(frozen=True)
class GemmRule:
    """One row of :data:`GEMM_RULES`: where it applies and what it changes.

    Ranges are half-open ``(lo, hi)``: a problem matches when ``lo <= value < hi`` for each
    of ``M``, ``N``, ``K`` and ``num_ctas``, its dtype is in ``dtypes`` and the capability's
    major version in ``arch`` (no GPU counts as ``9``, as in :func:`config_for_capability`).
    ``overrides`` are :class:`GemmConfig` fields replaced in the capability's default
    configuration; ``group_m`` the band height.  ``note`` says where the rule came from.
    """

    overrides: tuple[tuple[str, object], ...] = ()
    group_m: int = DEFAULT_GROUP_M
    arch: tuple[int, ...] = (9,)
    dtypes: tuple[str, ...] = ("bfloat16", "float16")
    m: tuple[int, int] = (1, _BIG)
    n: tuple[int, int] = (1, _BIG)
    k: tuple[int, int] = (1, _BIG)
    num_ctas: tuple[int, int] = (1, _BIG)
    note: str = ""

    def __post_init__(self) -> None:
        fields = {f.name for f in dataclasses.fields(GemmConfig)}
        overrides = tuple((str(k), v) for k, v in dict(self.overrides).items())
        unknown = [k for k, _ in overrides if k not in fields]
        if unknown:
            raise ValueError(f"GemmRule overrides unknown GemmConfig fields {unknown}")
        object.__setattr__(self, "overrides", overrides)
        if not isinstance(self.group_m, int) or isinstance(self.group_m, bool) \
                or self.group_m < 1:
            raise ValueError(f"GemmRule.group_m must be a positive int, got {self.group_m!r}")
        GemmConfig(**dict(overrides))  # the overrides alone must make a valid config

    def matches(self, M: int, N: int, K: int, dtype: str, num_ctas: int, major: int) -> bool:
        return (major in self.arch and dtype in self.dtypes
                and self.m[0] <= M < self.m[1] and self.n[0] <= N < self.n[1]
                and self.k[0] <= K < self.k[1]
                and self.num_ctas[0] <= num_ctas < self.num_ctas[1])


# First match wins; no match: config_for_capability() and DEFAULT_GROUP_M (sm_90: 128x256x64,
# 8 warps, 3 stages, TMA, flattened loop, accumulator multi-buffering, group_m 8).
#
# How the rows are measured: ``scripts/gemm_sweep.py`` on one H200 (132 SMs), bf16 (fp16 on a
# subset), B row-major and ``w.t()``, P = 132 and 116, signals on (counters re-zeroed before
# every call, outside the timed window), three or more input sets rotated so that the L2 does
# not hold the operands, CUDA events per call, median of >= 20 calls after warm-up, against
# torch.matmul timed the same way in the same process (mean of a timing before and after the
# candidates); every candidate checked once against torch.matmul (NaN-poisoned destination,
# counters equal to the plan's group tile counts).  A rule is added only where the best
# candidate beats the default by more than the run-to-run noise (~1%) for both B layouts and
# both P; the script prints such suggestions as GemmRule(...) lines.
#
# Measured and not added (2026-12-02, one H200, the warp-specialized kernel): group_m 16
# instead of 8 on the six shapes with M in {8192, 16384}, N = 8192 (results/2026-12-02-h200/
# ws-run4, one repeat, and ws-run5, three repeats, both B layouts, P = 132 and 116).  The time
# ratio was +0.8 % in the median of 24 pairs in ws-run5, but 1.000 for B row-major at P = 132
# and single pairs ran from -3 % to +7 %: not above the noise for both layouts and both P.
# (Its K = 2048 part was resolved by longer, clock-settled phases: the rule below.)
#
# Band height under the power cap (2026-12-02, results/2026-12-02-h200/clock-gm-run4 and
# clock-gm-run5, scripts/gemm_clock_probe.py: 1.2-1.5 s of back-to-back calls per variant,
# two interleaved rounds, both B layouts, P = 132 and 116): with K = 2048, group_m 16 took
# 1.0-1.8 % less time than 8 on 11 of 12 (shape, layout, P) means -- 4096, 8192 and 16384 x
# 8192 x 2048 -- and 0.3 % on the twelfth, at a 0.6-3.5 % higher SM clock:
# the H200 runs these GEMMs at its power cap, and a band of 16 tile rows reads B from HBM
# half as often (at K = 2048 a 16-row band of A is 8 MB, well inside the L2).  At K = 4096
# (6144x5120, 11008x5120) group_m 16 was within -1.1/+0.6 % and 32 up to 1.4 % slower:
# hence the rule stops below K = 4096.  group_m is the planners' upper bound
# (flashoverlap.defaults.band_group_m lowers it to keep MIN_BANDS bands for the overlap).
#
# Clusters of 4 with TMA multicast at reduced P (2026-12-03, results/2026-12-03-h200/ab-run47,
# bench_gemm.py, issue 14's 13 bf16 shapes x both B layouts, 3 repeats, the default and
# ``--cluster-ctas 4`` alternated per layout and shape set): at P = 116 the CUDA C cluster
# kernel (:mod:`flashoverlap.kernels.cluster_gemm`, with its lean main loop) took the 16 rows it
# can run (bands of a multiple of 4 tile rows, no split last wave) at 1.012x the Gluon
# kernel's efficiency (median, 0.985-1.044), the 10 it cannot run falling back to the Gluon
# kernel (0.974-1.023 between the two passes: the noise of one row); the 26 rows' median went
# 0.946 -> 0.958.  Clusters of 2 at P = 132 (4 cannot be co-resident: 30 clusters of 4 on an
# H200) 0.999 (16 rows, 0.941-1.023), at P = 116 1.003: not added.  Measured at P = 116 only,
# hence the narrow num_ctas range (a P that is not a multiple of 4 runs the Gluon kernel).
_CLUSTER4 = (("cluster_ctas", 4),)
_CLUSTER4_NOTE = ("H200 bench_gemm A/B, 2026-12-03: clusters of 4 with multicast at P = 116 "
                  "1.012x the Gluon kernel on the 16 rows they run (ab-run47)")
GEMM_RULES: tuple[GemmRule, ...] = (
    GemmRule(overrides=_CLUSTER4, group_m=16, k=(1, 4096), num_ctas=(112, 121),
             note=_CLUSTER4_NOTE + "; group_m 16 at K = 2048 as below"),
    GemmRule(overrides=_CLUSTER4, num_ctas=(112, 121), note=_CLUSTER4_NOTE),
    GemmRule(group_m=16, k=(1, 4096),
             note="H200 gemm_clock_probe, 2026-12-02: group_m 16 over 8 at K = 2048, "
                  "1.0-1.8 % less time on 11 of 12 means (clock-gm-run4/5)"),
)


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES:
            raise TypeError(f"unsupported dtype {dtype}")
        return _DTYPE_NAMES[dtype]
    name = str(dtype).removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in _DTYPE_NAMES.values():
        raise TypeError(f"unsupported dtype {dtype!r}")
    return name


def gemm_config_for(M: int, N: int, K: int, dtype: torch.dtype | str = torch.bfloat16,
                    num_ctas: int = 132, capability: tuple[int, int] | None = None,
                    rules: tuple[GemmRule, ...] | None = None,
                    wave_tiles: bool = True) -> GemmChoice:
    """Kernel configuration and band height for one GEMM shape (pure Python, no GPU needed).

    Args:
        M, N, K: ``[M, K] @ [K, N]`` (``M`` as the plan sees it: all rows of the GEMM).
        dtype: ``torch.bfloat16``/``float16``/``float32`` or its name.
        num_ctas: ``P``, CTAs of the persistent GEMM.
        capability: ``torch.cuda.get_device_capability()``; ``None`` (no GPU) is treated as
            sm_90, so that plans made on a CPU match the GPU engine's.
        rules: the table to use (default :data:`GEMM_RULES`; for tests and sweeps).
        wave_tiles: on sm_90, let :func:`wave_tile` trade 128 x 256 tiles for 128 x 128 ones
            where the last wave would leave many of the ``num_ctas`` programs idle.

    The first matching rule's overrides are applied to :func:`config_for_capability`'s
    configuration; without a match that configuration is returned as is, with
    :data:`DEFAULT_GROUP_M`; then :func:`wave_tile`.  fp32 (tests only) never takes a rule.
    Plans must be built with ``block_m=choice.config.block_m, block_n=choice.config.block_n``
    (see :class:`GemmChoice`).
    See :data:`GEMM_RULES` for how the table was measured.
    """
    for name, value in (("M", M), ("N", N), ("K", K), ("num_ctas", num_ctas)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    name = _dtype_name(dtype)
    base = config_for_capability(capability, getattr(torch, name))
    if name == "float32":
        return GemmChoice(base, DEFAULT_GROUP_M)
    major = 9 if capability is None else int(capability[0])
    choice = GemmChoice(base, DEFAULT_GROUP_M)
    for rule in GEMM_RULES if rules is None else rules:
        if rule.matches(M, N, K, name, num_ctas, major):
            choice = GemmChoice(dataclasses.replace(base, **dict(rule.overrides)), rule.group_m)
            break
    if wave_tiles and major == 9:
        choice = choice._replace(config=wave_tile(M, N, K, num_ctas, choice.config, name))
    return choice


def plan_gemm_config(M: int, N: int, K: int, dtype: torch.dtype | str, num_ctas: int,
                     block_m: int, block_n: int,
                     capability: tuple[int, int] | None = None) -> GemmConfig:
    """The kernel configuration an engine runs a plan's signal GEMM with: the table's choice
    for the shape and ``P`` (:func:`gemm_config_for` without the wave-tile rule, which chose
    the plan's tile already) with the plan's tile -- so the engines get what the benchmarks
    measure, e.g. the cluster kernel at P in [112, 121) on sm_90.  A tile other than the
    table's (a plan made with its own tile) takes that tile's stages and no clusters (the
    cluster kernel runs 128 x 256 tiles only)."""
    config = gemm_config_for(M, N, K, dtype, num_ctas, capability, wave_tiles=False).config
    if (config.block_m, config.block_n) != (block_m, block_n):
        config = dataclasses.replace(config_for_tile(config, block_m, block_n), cluster_ctas=0)
    return config


# The grouped signal GEMM (MoE experts, :mod:`flashoverlap.kernels.grouped_signal_gemm`) takes
# its own rows: a rule's ``m`` range applies to the mean rows per expert (``M // E``), which is
# what decides how many tiles end short of a segment.  Measured with
# ``scripts/bench_all_to_all.py --sweep all`` on one H200 (E in {8, 16, 64}, K = N in {2048,
# 4096, 7168}, 16384 uneven rows, weights as w.transpose(1, 2)), against torch._grouped_mm,
# CUDA events, calls back to back, 3 input sets rotated, median of 30.  There 128x128 tiles,
# 8 warps, 5 stages beat the signal GEMM's 128x256x3 default on all nine problems
# (efficiency 1.01-1.23x torch._grouped_mm against 0.90-1.17x): half-width tiles waste less
# on segments that end mid-tile and give the 132 CTAs ~2x the tiles to balance.
GROUPED_GEMM_RULES: tuple[GemmRule, ...] = (
    GemmRule(overrides=(("block_n", 128), ("num_stages", 5)),
             note="H200 bench_all_to_all --sweep, 2026-12-01: 128x128 w8 s5 best on 9/9 "
                  "(pipelined); 2026-12-02: on sm_90 the warp-specialized grouped kernel "
                  "runs it, 17/18 rows faster than the pipelined one (grouped-run2)"),
)


def grouped_gemm_config_for(M: int, N: int, K: int, E: int,
                            dtype: torch.dtype | str = torch.bfloat16, num_ctas: int = 132,
                            capability: tuple[int, int] | None = None,
                            rules: tuple[GemmRule, ...] | None = None) -> GemmConfig:
    """Kernel configuration of the grouped signal GEMM for ``M`` rows over ``E`` experts.

    As :func:`gemm_config_for`, with :data:`GROUPED_GEMM_RULES` matched on ``M // E`` (the
    mean rows per expert); plans must use the returned ``block_m``/``block_n``.
    """
    if not isinstance(E, int) or isinstance(E, bool) or E < 1:
        raise ValueError(f"E must be a positive int, got {E!r}")
    rows = max(1, M // E) if isinstance(M, int) and M > 0 else M
    return gemm_config_for(rows, N, K, dtype, num_ctas, capability,
                           GROUPED_GEMM_RULES if rules is None else rules,
                           wave_tiles=False).config
