"""``scripts/gpu_checks.sh`` answers --help and bad arguments without doing anything.

It used to take ``--help`` as the name of a stage: it created ``./gpu-out/``, imported torch,
ran no stage and exited 0.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from launch_utils import ROOT

SCRIPT = ROOT / "scripts" / "gpu_checks.sh"


def _run(tmp_path, *args):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    return proc, out


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_creates_nothing(tmp_path, flag):
    proc, out = _run(tmp_path, flag)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage")
    for stage in ("tests", "bench", "all"):
        assert f"\n  {stage} " in proc.stdout
    assert not out.exists() and not (tmp_path / "gpu-out").exists()
    assert "GPUs:" not in proc.stdout  # nothing ran


@pytest.mark.parametrize("args", [["bogus"], ["tests", "bench"]])
def test_bad_arguments_are_usage_errors(tmp_path, args):
    proc, out = _run(tmp_path, *args)
    assert proc.returncode == 2
    assert "Usage" in proc.stderr and proc.stdout == ""
    assert not out.exists()


def test_bench_stage_runs_the_acceptance_set(tmp_path):
    """``bench`` on one GPU: issue 14's set (both B layouts, the nine N = 8192 shapes and the
    four others, per dtype of $GEMM_DTYPES) then the summary -- whose missed target (exit 1)
    does not fail the script: speed is reported, not asserted.  python3 is a stub that logs
    its arguments (no GPU, no torch needed)."""
    stub = tmp_path / "bin"
    stub.mkdir()
    log = tmp_path / "calls.log"
    (stub / "python3").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {log}\n'
        'case "$*" in *"-c "*) echo 1 ;; *summarize_gemm*) echo summary; exit 1 ;; esac\n')
    (stub / "python3").chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PATH": f"{stub}:{os.environ['PATH']}",
           "GEMM_DTYPES": "bfloat16 float16"}
    proc = subprocess.run(["bash", str(SCRIPT), "bench"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    bench = [c for c in calls if "bench_gemm.py" in c]
    assert len(bench) == 8
    for dtype in ("bfloat16", "float16"):
        for layout in ("kn", "nk"):
            main = [c for c in bench if f"--dtype {dtype} --b-layout {layout} " in c
                    and c.endswith(f"--name gemm-{dtype}-{layout}-main")]
            extra = [c for c in bench if f"--dtype {dtype} --b-layout {layout} " in c
                     and "--m 6144 11008 --kn 4096x5120,8192x3072" in c
                     and c.endswith(f"--name gemm-{dtype}-{layout}-extra")]
            assert len(main) == len(extra) == 1, (dtype, layout)
    assert all("--repeats 3 --cta-offsets 0,16 --torch-sm-target" in c for c in bench)
    summaries = [c for c in calls if "summarize_gemm.py" in c]
    assert len(summaries) == 3 and "--check 132=1.0/0.95 --check 116=0.95/0.90" in summaries[0]
    assert (out / "gemm-summary.txt").read_text().count("summary") == 3
    assert not any("bench_overlap" in c for c in calls)  # one GPU: no torchrun
