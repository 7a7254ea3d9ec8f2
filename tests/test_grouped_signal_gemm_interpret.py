"""The grouped signal GEMM (MoE AllToAll plans) under the Triton interpreter (CPU).

As in ``test_signal_gemm_interpret.py``: run normally, one test re-runs this module in a child
pytest process with ``TRITON_INTERPRET=1`` (Triton reads it at import), where the kernel tests
run against :func:`grouped_signal_gemm_ref`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_REPO = Path(__file__).resolve().parents[1]
_INTERPRET_SESSION = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

if not _INTERPRET_SESSION:

    def test_grouped_kernel_under_interpreter():
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__],
            env=env, cwd=_REPO, capture_output=True, text=True, timeout=600, check=False)
        lines = proc.stdout.strip().splitlines()
        summary = lines[-1] if lines else "(no output)"
        if re.fullmatch(r"\d+ skipped in .*", summary):
            pytest.skip(summary)
        assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
        assert re.search(r"\d+ passed", summary) and "failed" not in summary

else:
    triton = pytest.importorskip("triton")
    import numpy as np

    from flashoverlap.all_to_all_plan import AllToAllProblem, make_all_to_all_plan
    from flashoverlap.kernels import grouped_signal_gemm as gk
    from flashoverlap.plan import PlanConfig

    def _problem(seed, W, E, rank, K, N, dtype):
        rng = np.random.default_rng(seed)
        c = rng.integers(0, 23, size=(W, E, W))
        c[rng.random(c.shape) < 0.3] = 0
        return AllToAllProblem(c[rank].tolist(), c[:, :, rank].sum(1).tolist(), N, K,
                               str(dtype).removeprefix("torch."), rank, W)

    @pytest.mark.parametrize("W,E,rank,transposed,dtype", [
        (1, 3, 0, False, torch.float32),
        (2, 2, 1, True, torch.float32),
        (3, 3, 2, False, torch.bfloat16),
        (2, 1, 0, True, torch.bfloat16),
    ])
    def test_grouped_kernel_matches_reference(W, E, rank, transposed, dtype):
        K, N = 24, 40
        p = _problem(W * 10 + E, W, E, rank, K, N, dtype)
        plan = make_all_to_all_plan(p, PlanConfig(block_m=16, block_n=16, num_ctas=3,
                                                  group_m=2))
        assert plan.num_tiles > 0
        g = torch.Generator().manual_seed(rank)
        a = torch.randn(p.M, K, generator=g).to(dtype)
        w = (torch.randn(E, N, K, generator=g).to(dtype).transpose(1, 2) if transposed
             else torch.randn(E, K, N, generator=g).to(dtype))
        table = torch.from_numpy(plan.step_table.copy())
        send = torch.full((p.M, N), float("nan"), dtype=dtype)
        out = torch.full((p.recv_rows, N), float("nan"), dtype=dtype)
        counters = torch.zeros(plan.num_groups, dtype=torch.int32)
        gk.grouped_signal_gemm(a, w, send, out, step_table=table, block_m=16, block_n=16,
                               num_ctas=3, counters=counters,
                               config=gk.GemmConfig(block_m=16, block_n=16, block_k=16,
                                                    use_tma=False, flatten=False))
        send_ref = torch.full_like(send, float("nan"))
        out_ref = torch.full_like(out, float("nan"))
        counters_ref = torch.zeros_like(counters)
        gk.grouped_signal_gemm_ref(a, w, send_ref, out_ref, table, counters_ref)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(send, send_ref, equal_nan=True, **tol)
        torch.testing.assert_close(out, out_ref, equal_nan=True, **tol)
        assert torch.equal(counters, counters_ref)
        assert counters.tolist() == plan.group_tile_counts.tolist()
        # the self block landed in out: exactly this rank's rows from itself
        lo = sum(p.recv_splits[:rank])
        assert not out[lo:lo + p.recv_splits[rank]].isnan().any()

    def test_launcher_matches_reference_and_chooses_once():
        """The workspace launcher: the same results as the function, two calls with fresh
        buffers, one kernel choice per argument signature (the pipelined kernel off sm_90)."""
        W, E, rank, K, N, dtype = 2, 3, 0, 24, 40, torch.float32
        p = _problem(7, W, E, rank, K, N, dtype)
        plan = make_all_to_all_plan(p, PlanConfig(block_m=16, block_n=16, num_ctas=3,
                                                  group_m=2))
        table = torch.from_numpy(plan.step_table.copy())
        counters = torch.zeros(plan.num_groups, dtype=torch.int32)
        cfg = gk.GemmConfig(block_m=16, block_n=16, block_k=16, use_tma=False, flatten=False)
        launch = gk.GroupedSignalGemmLauncher(table, counters, block_m=16, block_n=16,
                                              num_ctas=3, config=cfg)
        for seed in (0, 1):
            g = torch.Generator().manual_seed(seed)
            a = torch.randn(p.M, K, generator=g)
            w = torch.randn(E, K, N, generator=g)
            send = torch.full((p.M, N), float("nan"))
            out = torch.full((p.recv_rows, N), float("nan"))
            counters.zero_()
            launch(a, w, send, out)
            send_ref, out_ref = torch.full_like(send, float("nan")), torch.full_like(
                out, float("nan"))
            gk.grouped_signal_gemm_ref(a, w, send_ref, out_ref, table)
            torch.testing.assert_close(send, send_ref, equal_nan=True, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out, out_ref, equal_nan=True, rtol=1e-5, atol=1e-5)
            assert counters.tolist() == plan.group_tile_counts.tolist()
        assert list(launch._seen.values()) == [False]
