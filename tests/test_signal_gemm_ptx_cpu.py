"""The pipelined signal GEMMs compiled for sm_90 on the CPU: their release protocol in the PTX.

The pipelined kernel (``flashoverlap.kernels.signal_gemm._signal_gemm_kernel``) publishes a
finished tile by storing it (``st.global``), meeting the whole CTA at a barrier
(``bar.sync 0``) and adding to the group counter with a release atomic at GPU scope.  The
interpreter tests check the values; these check the order the compiler emits, which is what
a watcher spinning on the counter relies on.  Triton 3.6 emits ``atom....release``, 3.9
``red....release``; both count.  The split last wave's tickets are ``acq_rel`` atomics and
are not releases of a tile.
"""

from __future__ import annotations

import re
import sys

import pytest

from launch_utils import ROOT
from sm90_ptx import sm90_ptx

sys.path.insert(0, str(ROOT / "scripts"))
import kernel_ptx  # noqa: E402 -- scripts/kernel_ptx.py: the variants' compile specs

_RELEASE = re.compile(r"\b(red|atom)\.global\.gpu\.release\.")


def _compile(variant) -> str:
    fn, ptrs, const, options = variant
    return sm90_ptx(fn, ptrs, const, **options)


def _compile_grouped_sm90(use_tma: bool, w_trans: bool) -> str:
    return _compile(kernel_ptx.grouped_variant(use_tma, w_trans))


def _compile_sm90(use_tma: bool, split: bool, b_trans: bool = False) -> str:
    return _compile(kernel_ptx.signal_variant(use_tma, split, b_trans))


def _check_release_order(lines: list[str]) -> None:
    releases = [i for i, ln in enumerate(lines) if _RELEASE.search(ln)]
    # One epilogue per loop version (the flattened loop keeps a peeled copy), one more for
    # the split tile's last part.
    assert 1 <= len(releases) <= 4, len(releases)
    for i in releases:
        stores = [j for j in range(i) if re.search(r"\bst\.global\b", lines[j])]
        assert stores, "a release with no tile store before it"
        between = lines[stores[-1] + 1:i]
        assert any(re.search(r"\bbar\.sync\s+0;", ln) for ln in between), \
            "no CTA barrier between the tile's last store and its release"
    # Nothing weaker than a release publishes a tile: no relaxed atomics on counters.
    assert not any(re.search(r"\b(red|atom)\.global\.(gpu\.)?(relaxed\.)?add\.", ln)
                   and "release" not in ln and "acq_rel" not in ln for ln in lines)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split_tail"])
@pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "pointers"])
def test_every_tile_release_follows_its_stores_and_a_cta_barrier(use_tma, split):
    _check_release_order([ln.strip() for ln in _compile_sm90(use_tma, split).splitlines()])


@pytest.mark.parametrize("w_trans", [False, True], ids=["w_kn", "w_nk_T"])
@pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "pointers"])
def test_grouped_kernel_releases_follow_stores_and_a_cta_barrier(use_tma, w_trans):
    """The pipelined grouped (MoE) kernel -- the fallback of the warp-specialized one -- signals
    the same way, whichever destination (send or out) the tile went to."""
    _check_release_order([ln.strip() for ln in _compile_grouped_sm90(use_tma, w_trans)
                          .splitlines()])


def test_the_check_catches_a_missing_barrier_or_a_relaxed_signal():
    """The order check fails on the same PTX with the barriers taken out, or with the
    release turned into a relaxed add."""
    lines = [ln.strip() for ln in _compile_sm90(True, False).splitlines()]
    _check_release_order(lines)
    with pytest.raises(AssertionError, match="CTA barrier"):
        _check_release_order([ln for ln in lines if not re.search(r"\bbar\.sync\s+0;", ln)])
    with pytest.raises(AssertionError):
        _check_release_order([re.sub(r"\.release\.", ".relaxed.", ln) for ln in lines])
