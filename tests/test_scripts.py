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
