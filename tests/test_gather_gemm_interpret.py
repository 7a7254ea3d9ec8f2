"""The gather GEMM (AllGather + GEMM's kernel) under the Triton interpreter (CPU, small shapes).

Same arrangement as ``test_signal_gemm_interpret.py``: run normally, the module holds one
test that re-runs it in a child pytest process with ``TRITON_INTERPRET=1``, where the kernel
tests below run: the kernel with and without flag waits against ``gather_gemm_ref`` and
float64 for every rank's step table of W = 1..3 (odd chunk rows, both ``b`` layouts, fp32
and bf16, P smaller and larger than the tile count), outputs poisoned with NaN so unwritten
tiles fail; the launcher's direct path; the ref refusing a tile whose flag is unset.
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

    def test_gather_kernel_under_interpreter():
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__],
            env=env, cwd=_REPO, capture_output=True, text=True, timeout=600, check=False)
        lines = proc.stdout.strip().splitlines()
        summary = lines[-1] if lines else "(no output)"
        if re.fullmatch(r"\d+ skipped in .*", summary):
            reasons = [line for line in lines if line.startswith("SKIPPED")]
            pytest.skip(reasons[0] if reasons else summary)
        assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
        assert re.search(r"\d+ passed", summary) and "failed" not in summary

else:
    triton = pytest.importorskip("triton")

    from flashoverlap.gather_plan import GatherProblem, make_gather_plan
    from flashoverlap.kernels import GemmConfig
    from flashoverlap.kernels import gather_gemm as gg
    from flashoverlap.plan import PlanConfig

    BM = BN = BK = 16
    CONFIG = GemmConfig(block_m=BM, block_n=BN, block_k=BK, num_warps=4, num_stages=2,
                        use_tma=False)

    def _operands(m, N, K, W, dtype, transposed, seed):
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(m * W, K, generator=g).to(dtype)
        b = (torch.randn(N, K, generator=g).to(dtype).t() if transposed
             else torch.randn(K, N, generator=g).to(dtype))
        return a, b

    @pytest.mark.parametrize("W,m,N,K,P", [(1, 20, 24, 16, 3), (2, 9, 40, 24, 2),
                                           (3, 17, 16, 40, 7), (3, 5, 33, 8, 64)])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("transposed", [False, True])
    def test_gather_gemm_matches_ref_on_every_rank(W, m, N, K, P, dtype, transposed):
        plan = make_gather_plan(GatherProblem(m, N, K, str(dtype)[6:], W),
                                PlanConfig(block_m=BM, block_n=BN, num_ctas=P, group_m=2))
        a, b = _operands(m, N, K, W, dtype, transposed, seed=W * 100 + m)
        want = (a.double() @ b.double()).to(dtype)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for rank in range(W):
            table = torch.tensor(plan.step_table(rank))
            flags = torch.ones(W, dtype=torch.int32)
            for wait in (True, False):
                out = torch.full((m * W, N), float("nan"), dtype=dtype)
                gg.gather_gemm(a, b, out, step_table=table, block_m=BM, block_n=BN,
                               num_ctas=P, flags=flags if wait else None, config=CONFIG)
                torch.testing.assert_close(out.double(), want.double(), rtol=tol, atol=tol)
            ref = torch.full((m * W, N), float("nan"), dtype=dtype)
            gg.gather_gemm_ref(a, b, ref, table, flags)
            torch.testing.assert_close(ref, want, rtol=0, atol=0)
            assert torch.equal(flags, torch.ones(W, dtype=torch.int32))  # read, not changed

    def test_launcher_reuses_its_kernel_and_ref_refuses_unset_flags():
        W, m, N, K = 2, 7, 20, 16
        plan = make_gather_plan(GatherProblem(m, N, K, "float32", W),
                                PlanConfig(block_m=BM, block_n=BN, num_ctas=3, group_m=1))
        table = torch.tensor(plan.step_table(1))
        flags = torch.ones(W, dtype=torch.int32)
        launch = gg.GatherGemmLauncher(table, flags, block_m=BM, block_n=BN, num_ctas=3,
                                       config=CONFIG)
        for seed in (1, 2):
            a, b = _operands(m, N, K, W, torch.float32, False, seed)
            out = torch.full((m * W, N), float("nan"))
            launch(a, b, out)
            torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-5)
        flags[0] = 0
        with pytest.raises(RuntimeError, match="flag 0"):
            gg.gather_gemm_ref(a, b, out, table, flags)
        with pytest.raises(ValueError, match="flags"):
            gg.gather_gemm(a, b, out, step_table=table, block_m=BM, block_n=BN, num_ctas=3,
                           flags=flags.to(torch.int64))
