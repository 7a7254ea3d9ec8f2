"""The warp-specialized grouped signal GEMM without a GPU: when it is chosen, and its PTX.

``flashoverlap/kernels/ws_grouped_signal_gemm.py`` runs only on sm_90.  Here: the choice on
CPU tensors (never taken), the stage budget of its two tiles, and the kernel compiled for
sm_90 (Triton's bundled ptxas, no GPU): one release per tile, built as the dense kernel's
(``cp.async.bulk.wait_group 0`` -- the bulk stores' writes performed --,
``fence.proxy.async.global``, ``bar.warp.sync``, lane 0's ``red.release.gpu``) and none
without counters; the short-tile copy stores 16 bytes at a time (a partition's arguments
lose the kernel's alignment facts, so the kernel restates them: without that every element
was stored alone); every single-thread ``mbarrier.arrive`` follows its partition's barrier, so
the C buffer goes back only after every lane of the storer has read it.  The GPU tests
(``tests/gpu/test_all_to_all_gpu.py``) run it and stress its signal.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from flashoverlap.kernels import GemmConfig, default_config
from flashoverlap.kernels import grouped_signal_gemm as gk
from flashoverlap.kernels import ws_grouped_signal_gemm as wg
from sm90_ptx import sm90_ptx


def test_not_taken_on_cpu_or_when_switched_off():
    a = torch.randn(300, 256).to(torch.bfloat16)
    w = torch.randn(4, 256, 384).to(torch.bfloat16)
    send = torch.empty(300, 384, dtype=torch.bfloat16)
    out = torch.empty(100, 384, dtype=torch.bfloat16)
    cfg = default_config(None, torch.bfloat16)
    assert not gk.uses_warp_specialized(a, w, send, out, 128, 256, cfg)
    assert not wg.eligible(a, w, gk._weight_layout(w), send, out, 128, 256,
                           dataclasses.replace(cfg, warp_specialized_kernel=False))


def test_stage_budget_of_both_tiles():
    cfg = GemmConfig(num_stages=8)
    assert wg.stages_for(256, cfg, 2) == 3  # 3 x 48 KB + a 64 KB C buffer
    assert wg.stages_for(128, cfg, 2) == 6  # 6 x 32 KB + 32 KB
    assert wg.stages_for(128, dataclasses.replace(cfg, num_stages=5), 2) == 5
    # (the dense kernel's half-width C buffer is not this kernel's: ignored)
    assert wg.stages_for(256, dataclasses.replace(cfg, epilogue_subtile=True), 2) == 3


def _compile_sm90(b_trans: bool, counters: bool, block_n: int, dtype: str = "bf16") -> str:
    pytest.importorskip("triton")
    if not wg.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon")
    const = dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=64,
                 STAGES=wg.stages_for(block_n, GemmConfig(num_stages=5), 2),
                 B_TRANS=b_trans, HAS_COUNTERS=counters)
    ptrs = {"a_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "send_ptr": f"*{dtype}",
            "out_ptr": f"*{dtype}", "step_ptr": "*i32", "counter_ptr": "*i32"}
    return sm90_ptx(wg.kernel(), ptrs, const, num_warps=8)


@pytest.mark.parametrize("block_n", [128, 256])
@pytest.mark.parametrize("b_trans", [False, True], ids=["w_kn", "w_nk_T"])
def test_compiled_signal_and_short_tile_copy(b_trans, block_n):
    ptx = _compile_sm90(b_trans, counters=True, block_n=block_n)
    releases = [m.start() for m in re.finditer(r"red\.release\.gpu\.global\.add", ptx)]
    assert len(releases) == 1
    block = ptx[ptx.rfind("{", 0, releases[0]):releases[0]]  # the signal's asm block
    order = [block.find(x) for x in ("cp.async.bulk.wait_group 0;", "fence.proxy.async.global",
                                     "bar.warp.sync -1")]
    assert all(i >= 0 for i in order) and order == sorted(order), order
    assert "cp.async.bulk.tensor.2d.global.shared" in ptx  # whole-height tiles
    assert "wgmma.mma_async" in ptx and "setmaxnreg" in ptx
    # the short-tile copy: 16 x 64 chunks (8 rows each here), 16-byte stores only
    vector = re.findall(r"st\.global\.v4\.b32", ptx)
    assert len(vector) == (128 // 8) * (block_n // 64) * 2  # 2 stores per lane per chunk
    assert not re.findall(r"st\.global\.(b16|u16|b32)\b", ptx)
    assert len(re.findall(r"\batom\.", ptx)) == 0
    assert not re.search(r"\bbar\.sync\s+0;", ptx)  # no CTA-wide barrier in a partition


def test_compiled_without_counters_never_releases():
    ptx = _compile_sm90(True, counters=False, block_n=256, dtype="fp16")
    assert "red.release" not in ptx and "cp.async.bulk.tensor.2d.global.shared" in ptx


@pytest.mark.parametrize("block_n", [128, 256])
def test_every_mbarrier_arrive_follows_its_partitions_barrier(block_n):
    """One thread arrives for a whole partition: the storer's ``c_empty`` after a short
    tile's copy must come after a ``bar.warp.sync`` (every lane's shared-memory reads done),
    the MMA partition's after its named 256-thread barrier."""
    ptx = _compile_sm90(False, counters=True, block_n=block_n)
    lines = [ln.strip() for ln in ptx.splitlines() if ln.strip()]
    arrives = [i for i, ln in enumerate(lines)
               if re.search(r"mbarrier\.arrive\.(shared::cta\.|shared\.)?b64 _,", ln)]
    assert len(arrives) >= 4  # stage releases, c_ready, c_empty (bulk path, copy path)
    for i in arrives:
        window = " ".join(lines[max(0, i - 4):i])
        assert re.search(r"bar\.sync\s+\d+,\s*256;|bar\.warp\.sync", window), lines[i - 4:i + 1]
