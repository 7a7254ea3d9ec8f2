"""What a wheel of the project ships: the PEP 561 marker and the CUDA sources (issue 12).

Builds a wheel from a copy of the source tree (no network: ``--no-build-isolation`` uses
the setuptools already installed) and reads its file list.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from launch_utils import ROOT


def test_wheel_ships_py_typed_and_every_module(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "results"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("flashoverlap-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "flashoverlap/py.typed" in names
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "flashoverlap").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert any(n.startswith("csrc_gen/") and n.endswith(".cu") for n in names)
