"""Ranks that make different calls get a clear ValueError on every rank (issue 12, item 3).

Before ``flashoverlap.agreement``, ``M=8`` on one rank and ``M=9`` on another returned a
per-rank result on the CPU engines, and a dtype that differed aborted the process inside gloo.
Here every rank of a 2- and 3-process gloo group makes calls whose M, N, K or dtype differ on
one randomly chosen rank: every rank must raise ``ValueError`` naming the field and the ranks,
quickly, and a matching call afterwards must still work (the processes and the group are
alive), checked against a float64 sum of every rank's ``a @ b``.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import flashoverlap as fo
from dist_harness import run_distributed
from flashoverlap.agreement import (
    RankMismatchError,
    agree_on_call,
    canonical_repr,
    signature_words,
)


# ------------------------------------------------------------------ hashing (no processes)
def test_signature_words_are_sha256_of_the_canonical_text_in_any_process():
    """The same signature gives the same words in a fresh interpreter with another hash seed
    (Python's hash() would not), and they are the sha256 of the canonical text."""
    import hashlib

    sig = (("op", "all_reduce"), ("M", 8), ("dtype", torch.bfloat16), ("shape", torch.Size([3, 4])),
           ("flags", (True, None, 1.5, "x")))
    text = canonical_repr(sig)
    digest = hashlib.sha256(text.encode()).digest()
    want = [int.from_bytes(digest[i:i + 8], "little", signed=True) for i in range(0, 32, 8)]
    assert signature_words(sig) == want
    code = ("import torch; from flashoverlap.agreement import signature_words as w; "
            "print(w((('op', 'all_reduce'), ('M', 8), ('dtype', torch.bfloat16), "
            "('shape', torch.Size([3, 4])), ('flags', (True, None, 1.5, 'x')))))")
    from launch_utils import cpu_launch_env

    for seed in ("1", "2"):
        env = {**cpu_launch_env(), "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120, check=True).stdout
        assert out.strip() == str(want)
    # every field matters; types are told apart
    assert signature_words((("M", 8),)) != signature_words((("M", 9),))
    assert signature_words((1,)) != signature_words((True,)) != signature_words(("1",))


def test_signatures_refuse_values_without_a_stable_text():
    with pytest.raises(TypeError, match="agreement signatures hold"):
        signature_words((object(),))  # its repr holds an address
    with pytest.raises(TypeError, match="must be a tuple"):
        agree_on_call(None, [1, 2], "x")


# ------------------------------------------------------------------ mismatches on gloo
def _inputs(seed: int, rank: int, M: int, N: int, K: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(M, K, generator=g).to(dtype), torch.randn(K, N, generator=g).to(dtype)


def _mismatches(rank: int, world_size: int) -> None:
    rng = torch.Generator().manual_seed(20250 + world_size)
    engines = ("reference", "sequential")
    for case in range(8):
        engine = engines[case % 2]
        field = ("M", "N", "K", "dtype")[case // 2]
        odd = int(torch.randint(0, world_size, (1,), generator=rng))  # the rank that differs
        M = world_size * int(torch.randint(1, 12, (1,), generator=rng))
        N = int(torch.randint(1, 40, (1,), generator=rng))
        K = int(torch.randint(1, 20, (1,), generator=rng))
        dims = {"M": M, "N": N, "K": K}
        dtype = torch.float32
        if rank == odd:
            if field == "dtype":
                dtype = torch.bfloat16
            else:  # M stays a multiple of the group size: the difference is the only problem
                dims[field] += world_size if field == "M" else 1
        op = (fo.gemm_all_reduce, fo.gemm_reduce_scatter)[case % 3 == 0]
        a, b = _inputs(case, rank, dims["M"], dims["N"], dims["K"], dtype)
        t0 = time.monotonic()
        with pytest.raises(ValueError) as info:
            op(a, b, engine=engine)
        seconds = time.monotonic() - t0
        assert isinstance(info.value, RankMismatchError)
        message = str(info.value)
        assert "differs across ranks" in message, message
        assert f"{field}: " in message and f"on group ranks [{odd}]" in message, message
        others = [r for r in range(world_size) if r != odd]
        assert f"on group ranks {others}" in message, message
        assert seconds < 10, seconds

        # the group is still usable: a matching call works and is right
        a, b = _inputs(case + 100, rank, M, N, K, torch.float32)
        got = op(a, b, engine=engine)
        want = sum(x.double() @ y.double() for x, y in
                   (_inputs(case + 100, r, M, N, K, torch.float32) for r in range(world_size)))
        if op is fo.gemm_reduce_scatter:
            want = want[rank * (M // world_size):(rank + 1) * (M // world_size)]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world_size", [2, 3])
def test_mismatched_calls_raise_on_every_rank(world_size):
    run_distributed(_mismatches, world_size)


def _local_error_on_one_rank(rank: int, world_size: int) -> None:
    """M not divisible by the group on one rank only: that rank raises its own error, the
    others a mismatch naming it -- nobody waits for a collective that never comes."""
    M = 4 * world_size + (1 if rank == world_size - 1 else 0)
    a, b = _inputs(5, rank, M, 6, 3, torch.float32)
    t0 = time.monotonic()
    with pytest.raises(ValueError) as info:
        fo.gemm_reduce_scatter(a, b, engine="reference")
    assert time.monotonic() - t0 < 10
    if rank == world_size - 1:
        assert "M divisible by the group size" in str(info.value)
    else:
        assert "differs across ranks" in str(info.value)
        assert "M divisible by the group size" in str(info.value)  # the other rank's reason
    # a direct agree_on_call: equal signatures pass, the group stays in step
    agree_on_call(dist.group.WORLD, (("step", 2), ("dtype", torch.float32)), "step")


def test_a_local_error_on_one_rank_is_reported_to_every_rank():
    run_distributed(_local_error_on_one_rank, 3)
