"""GPU test fixtures: a world of one NCCL rank on GPU 0."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(scope="module")
def world1(tmp_path_factory):
    """An NCCL process group of one rank (module scope), torn down with flashoverlap's caches.

    With one rank NCCL still runs every engine step: counters, waits, collectives on the
    watcher stream.
    """
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.cuda.set_device(0)
    init = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("nccl", init_method=f"file://{init}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    yield
    from flashoverlap.comm import destroy_communicators
    from flashoverlap.engine import clear_workspaces

    clear_workspaces()
    destroy_communicators()
    dist.destroy_process_group()
