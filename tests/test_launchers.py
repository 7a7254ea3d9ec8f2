"""The demo under real launchers: ``torchrun`` and ``mpirun`` with 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "examples" / "demo.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU gloo run even on a GPU machine
    env["OMPI_ALLOW_RUN_AS_ROOT"] = env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    return env


def _check(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RESULT: OK" in proc.stdout
    assert "world_size=2" in proc.stdout


def test_torchrun_demo():
    _check([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(_free_port()), DEMO, "--tokens", "100", "--out-features", "72", "--in-features", "40"])


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no MPI runtime (mpirun) installed")
def test_mpirun_demo():
    _check(["mpirun", "-n", "2", "--oversubscribe", "-x", f"MASTER_PORT={_free_port()}",
            sys.executable, DEMO, "--tokens", "65", "--out-features", "96", "--in-features", "33"])


def test_cli_info_runs_on_cpu():
    from flashoverlap.cli import main

    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output and "overlap engine:" in result.output
