"""Shared pytest setup: GPU markers skip cleanly without GPUs; `tests/` on sys.path for helpers."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Gloo binds to the address the host name resolves to; in CI containers that can be an
# interface peers cannot reach reliably ("Connection closed by peer" in connectFullMesh).
# Every test process group is local, so pin gloo to loopback (inherited by spawned ranks,
# torchrun and mpirun children).
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def pytest_collection_modifyitems(config, items):
    count = _cuda_count()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs two or more CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and count < 1:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and count < 2:
            item.add_marker(skip_multi)
