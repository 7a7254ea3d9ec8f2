"""The demo under real launchers: ``torchrun`` and ``mpirun`` with 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from launch_utils import cpu_launch_env, free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "examples" / "demo.py")


def _check(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=cpu_launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RESULT: OK" in proc.stdout
    assert "world_size=2" in proc.stdout


def test_torchrun_demo():
    _check([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(free_port()), DEMO, "--tokens", "100", "--out-features", "72", "--in-features", "40"])


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no MPI runtime (mpirun) installed")
def test_mpirun_demo():
    _check(["mpirun", "-n", "2", "--oversubscribe", "-x", f"MASTER_PORT={free_port()}",
            sys.executable, DEMO, "--tokens", "65", "--out-features", "96", "--in-features", "33"])


def test_cli_info_runs_on_cpu():
    from flashoverlap.cli import main

    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output and "overlap engine:" in result.output


@pytest.mark.parametrize("env,expected", [("1", "direct"), ("0", "through the Triton JIT")])
def test_cli_info_reports_the_launch_path(env, expected):
    """``direct_launch.ENABLED`` is read at import, so each setting runs in a fresh process."""
    pytest.importorskip("triton")
    import triton

    if expected == "direct" and tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 4):
        expected = "through the Triton JIT"
    proc = subprocess.run(
        [sys.executable, "-m", "flashoverlap.cli", "info"], capture_output=True, text=True,
        timeout=120, check=False,
        env={**os.environ, "FLASHOVERLAP_DIRECT_LAUNCH": env, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("kernel launches:"))
    assert expected in line, line


def test_cli_info_prints_the_whole_nccl_error(monkeypatch, tmp_path):
    """The NCCL row was cut at 80 characters, mid-word (``...libnccl.s)``)."""
    import torch

    from flashoverlap import nccl_lib
    from flashoverlap.cli import main

    if torch.cuda.is_available():
        pytest.skip("torch reports its own NCCL here")
    missing = tmp_path / "a-directory-with-a-long-name-that-does-not-exist" / "libnccl.so.2"
    monkeypatch.setenv(nccl_lib.NCCL_LIBRARY_ENV, str(missing))
    monkeypatch.setattr(nccl_lib, "_LIBRARY", None)
    with pytest.raises(RuntimeError) as info:
        nccl_lib.get_nccl()
    want = " ".join(str(info.value).split())
    assert len(want) > 80 and str(missing) in want
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("NCCL "))
    assert row.split(None, 1)[1] == f"not loadable ({want})"
