"""CPU tests of the communication layer: no GPU, no NCCL needed.

* importing the modules pulls in neither CuPy, cuda-bindings nor NCCL;
* ``ncclConfig_t`` has NCCL 2.28's C layout (checked against a C compiler when there is one,
  and against offsets worked out by hand from the LP64 alignment rules);
* the CUDA C generator renders complete sources;
* a missing NCCL library gives an actionable error;
* ``exchange_check`` over a 2-process gloo group passes, raises naming the ranks, and does not
  hang when a rank is missing.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import pytest
import torch

import csrc_gen
from flashoverlap import comm, nccl_lib, stream_wait

# ---------------------------------------------------------------------------------------
# imports
# ---------------------------------------------------------------------------------------


def test_import_is_lazy():
    code = textwrap.dedent(
        """
        import sys
        import torch  # torch >= 2.13 imports cuda.bindings itself where it is installed
        before = set(sys.modules)
        import flashoverlap.comm, flashoverlap.nccl_lib, flashoverlap.stream_wait, csrc_gen
        import flashoverlap.kernels.cluster_gemm
        heavy = [m for m in ("cupy", "cuda.bindings", "cuda.bindings.nvrtc", "cuda.cuda")
                 if m in sys.modules and m not in before]
        assert not heavy, heavy
        assert flashoverlap.nccl_lib._LIBRARY is None
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


# ---------------------------------------------------------------------------------------
# ncclConfig_t layout
# ---------------------------------------------------------------------------------------

# Field order of struct ncclConfig_v22800 in nccl.h (NCCL 2.28).
CONFIG_FIELDS = [
    "size", "magic", "version", "blocking", "cgaClusterSize", "minCTAs", "maxCTAs", "netName",
    "splitShare", "trafficClass", "commName", "collnetEnable", "CTAPolicy", "shrinkShare",
    "nvlsCTAs", "nChannelsPerNetPeer", "nvlinkCentricSched",
]

# Worked out by hand for LP64 (size_t and pointers 8 bytes, aligned to 8; int 4): the two
# pointers land on 8-byte boundaries with no padding needed, and 17 fields end at 80.
EXPECTED_OFFSETS_LP64 = {
    "size": 0, "magic": 8, "version": 12, "blocking": 16, "cgaClusterSize": 20, "minCTAs": 24,
    "maxCTAs": 28, "netName": 32, "splitShare": 40, "trafficClass": 44, "commName": 48,
    "collnetEnable": 56, "CTAPolicy": 60, "shrinkShare": 64, "nvlsCTAs": 68,
    "nChannelsPerNetPeer": 72, "nvlinkCentricSched": 76,
}
EXPECTED_SIZE_LP64 = 80

# The struct as nccl.h 2.28 declares it.
C_PROGRAM = r"""
#include <stddef.h>
#include <stdio.h>
typedef struct ncclConfig_v22800 {
  size_t size;
  unsigned int magic;
  unsigned int version;
  int blocking;
  int cgaClusterSize;
  int minCTAs;
  int maxCTAs;
  const char *netName;
  int splitShare;
  int trafficClass;
  const char *commName;
  int collnetEnable;
  int CTAPolicy;
  int shrinkShare;
  int nvlsCTAs;
  int nChannelsPerNetPeer;
  int nvlinkCentricSched;
} ncclConfig_t;
typedef struct { char internal[128]; } ncclUniqueId;
#define F(name) printf(#name " %zu\n", offsetof(ncclConfig_t, name));
int main(void) {
  printf("sizeof %zu\n", sizeof(ncclConfig_t));
  printf("uid %zu\n", sizeof(ncclUniqueId));
  F(size) F(magic) F(version) F(blocking) F(cgaClusterSize) F(minCTAs) F(maxCTAs) F(netName)
  F(splitShare) F(trafficClass) F(commName) F(collnetEnable) F(CTAPolicy) F(shrinkShare)
  F(nvlsCTAs) F(nChannelsPerNetPeer) F(nvlinkCentricSched)
  return 0;
}
"""


def _ctypes_offsets() -> dict[str, int]:
    return {name: getattr(nccl_lib.ncclConfig_t, name).offset for name, _ in
            nccl_lib.ncclConfig_t._fields_}


def test_config_fields_in_header_order():
    assert [name for name, _ in nccl_lib.ncclConfig_t._fields_] == CONFIG_FIELDS


@pytest.mark.skipif(ctypes.sizeof(ctypes.c_void_p) != 8, reason="offsets worked out for LP64")
def test_config_layout_hand_computed():
    assert ctypes.sizeof(nccl_lib.ncclConfig_t) == EXPECTED_SIZE_LP64
    assert _ctypes_offsets() == EXPECTED_OFFSETS_LP64
    assert ctypes.sizeof(nccl_lib.ncclUniqueId) == 128


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_config_layout_matches_c_compiler(tmp_path):
    src, exe = tmp_path / "layout.c", tmp_path / "layout"
    src.write_text(C_PROGRAM)
    subprocess.run(["cc", "-O0", "-o", str(exe), str(src)], check=True, timeout=120)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    c_values = dict((k, int(v)) for k, v in (line.split() for line in lines if line.strip()))
    assert c_values.pop("sizeof") == ctypes.sizeof(nccl_lib.ncclConfig_t)
    assert c_values.pop("uid") == ctypes.sizeof(nccl_lib.ncclUniqueId)
    assert c_values == _ctypes_offsets()


def test_make_config_is_initializer_plus_fields():
    cfg = nccl_lib.make_config(blocking=1, max_ctas=8, min_ctas=2, comm_name="x")
    assert cfg.size == ctypes.sizeof(nccl_lib.ncclConfig_t)
    assert cfg.magic == 0xCAFEBEEF
    assert cfg.version == 22800 == nccl_lib.nccl_version_code(2, 28, 0)
    assert (cfg.blocking, cfg.maxCTAs, cfg.minCTAs, cfg.commName) == (1, 8, 2, b"x")
    undef = nccl_lib.NCCL_CONFIG_UNDEF_INT
    assert undef == -(2**31)
    for name in ("cgaClusterSize", "splitShare", "trafficClass", "collnetEnable", "CTAPolicy",
                 "shrinkShare", "nvlsCTAs", "nChannelsPerNetPeer", "nvlinkCentricSched"):
        assert getattr(cfg, name) == undef, name
    assert cfg.netName is None
    with pytest.raises(TypeError):
        nccl_lib.make_config(bogus=1)


def test_comm_config_sets_ctas_and_validates():
    cfg = comm.CommConfig(max_ctas=16, min_ctas=4).to_nccl()
    assert (cfg.maxCTAs, cfg.minCTAs, cfg.nvlsCTAs, cfg.blocking) == (16, 4, 16, 1)
    assert comm.CommConfig().to_nccl().maxCTAs == nccl_lib.NCCL_CONFIG_UNDEF_INT
    with pytest.raises(ValueError, match="exceeds"):
        comm.CommConfig(max_ctas=2, min_ctas=4)
    with pytest.raises(ValueError):
        comm.CommConfig(max_ctas=0)


def test_overlap_communicator_reserves_ctas_without_clusters(monkeypatch):
    """The engines' communicator: maxCTAs = the SMs the GEMM leaves (None when it leaves
    none) and cgaClusterSize 0 -- NCCL's default clusters of 4 did not fit on the free SMs
    beside the persistent GEMM (comm module docstring)."""
    calls = []
    monkeypatch.setattr(comm, "get_communicator", lambda group, **kw: calls.append((group, kw)))
    comm.overlap_communicator("g", 16, device="cuda:1")
    comm.overlap_communicator("g", None, device="cuda:1")
    comm.overlap_communicator("g", 0, device="cuda:1")
    assert calls == [("g", dict(max_ctas=16, device="cuda:1", cga_cluster_size=0)),
                     ("g", dict(max_ctas=None, device="cuda:1", cga_cluster_size=0)),
                     ("g", dict(max_ctas=None, device="cuda:1", cga_cluster_size=0))]
    cfg = comm.CommConfig(max_ctas=16, cga_cluster_size=comm.OVERLAP_CGA_CLUSTER_SIZE).to_nccl()
    assert (cfg.maxCTAs, cfg.cgaClusterSize) == (16, 0)
    assert comm.CommConfig().to_nccl().cgaClusterSize == nccl_lib.NCCL_CONFIG_UNDEF_INT


def test_version_code_macro():
    assert nccl_lib.nccl_version_code(2, 28, 9) == 22809
    assert nccl_lib.nccl_version_code(2, 8, 4) == 2804  # the pre-2.9 encoding


def test_dtype_and_op_enums():
    assert nccl_lib.nccl_dtype(torch.bfloat16) == 9
    assert nccl_lib.nccl_dtype(torch.float16) == 6
    assert nccl_lib.nccl_dtype(torch.float32) == 7
    assert nccl_lib.nccl_dtype(torch.int64) == 4
    with pytest.raises(TypeError):
        nccl_lib.nccl_dtype(torch.complex64)
    assert nccl_lib.nccl_red_op("sum") == 0
    assert nccl_lib.nccl_red_op(torch.distributed.ReduceOp.MAX) == 2
    assert nccl_lib.nccl_red_op("avg") == 4
    with pytest.raises(ValueError):
        nccl_lib.nccl_red_op("xor")


def test_unique_id_round_trip():
    raw = bytes(range(128))
    assert nccl_lib.ncclUniqueId.from_bytes(raw).to_bytes() == raw
    with pytest.raises(ValueError):
        nccl_lib.ncclUniqueId.from_bytes(b"short")


# ---------------------------------------------------------------------------------------
# missing library
# ---------------------------------------------------------------------------------------


def test_missing_nccl_library_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(nccl_lib.NCCL_LIBRARY_ENV, "/nonexistent/libnccl.so.2")
    monkeypatch.setattr(nccl_lib, "_LIBRARY", None)
    assert nccl_lib.find_nccl_library() == ["/nonexistent/libnccl.so.2"]
    with pytest.raises(RuntimeError) as info:
        nccl_lib.get_nccl()
    message = str(info.value)
    assert "/nonexistent/libnccl.so.2" in message
    assert "flashoverlap[cuda12]" in message and "flashoverlap[cuda13]" in message
    assert nccl_lib._LIBRARY is None


def test_communicator_needs_distributed():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(RuntimeError, match="init_process_group"):
        comm.NcclCommunicator(max_ctas=4)


# ---------------------------------------------------------------------------------------
# stream wait: argument checks that need no GPU
# ---------------------------------------------------------------------------------------


def test_wait_rejects_bad_arguments_before_launch(monkeypatch):
    with pytest.raises(ValueError, match="CUDA"):
        stream_wait.wait_counter_geq(torch.zeros(1, dtype=torch.int32), 1)
    with pytest.raises(TypeError):
        stream_wait.wait_counter_geq([0], 1)
    with pytest.raises(ValueError, match="unknown stream wait method"):
        stream_wait.resolve_wait_method(0, "spin")
    monkeypatch.setenv(stream_wait.WAIT_METHOD_ENV, "bogus")
    with pytest.raises(ValueError, match="FLASHOVERLAP_WAIT"):
        stream_wait.resolve_wait_method(0)
    monkeypatch.setenv(stream_wait.WAIT_METHOD_ENV, "kernel")
    assert stream_wait.resolve_wait_method(0) == "kernel"
    assert stream_wait.resolve_wait_method(0, "driver") == "driver"  # argument beats env


# ---------------------------------------------------------------------------------------
# CUDA C generator
# ---------------------------------------------------------------------------------------


def _balanced(source: str) -> bool:
    return source.count("{") == source.count("}") and source.count("(") == source.count(")")


def test_wait_kernel_source():
    src = csrc_gen.wait_geq_source()
    assert f'extern "C" __global__ void {csrc_gen.WAIT_GEQ_KERNEL}(' in src
    assert "ld.acquire.gpu.global.u32" in src and "__nanosleep" in src
    assert "static_cast<int>(value - target) >= 0" in src  # wrap-safe GEQ
    assert "$" not in src and _balanced(src)
    assert "my_wait(" in csrc_gen.wait_geq_source(kernel_name="my_wait")
    with pytest.raises(ValueError):
        csrc_gen.wait_geq_source(kernel_name="not a name")


def test_generator_errors():
    assert "wait_geq" in csrc_gen.template_names()
    with pytest.raises(ValueError, match="no CUDA template"):
        csrc_gen.render("nope")
    with pytest.raises(ValueError, match="needs parameter"):
        csrc_gen.render("wait_geq", kernel_name="k")


# ---------------------------------------------------------------------------------------
# exchange_check over a 2-process gloo group
# ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exchange_worker(rank: int, world_size: int, port: int, values: list[int | None],
                     queue) -> None:
    import torch.distributed as dist

    from flashoverlap.comm import exchange_check

    try:
        # A short group timeout bounds the teardown after a timed-out check: the pending
        # all-gather fails at the group's timeout, then destroy_process_group returns.
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=4))
        value = values[rank]
        t0 = time.monotonic()
        if value is None:  # this rank never joins the check
            time.sleep(6.0)
            queue.put((rank, "absent", "", 0.0))
        else:
            try:
                exchange_check(None, value, "plan hash", timeout_s=2.0)
                queue.put((rank, "ok", "", time.monotonic() - t0))
            except RuntimeError as exc:
                queue.put((rank, "error", str(exc), time.monotonic() - t0))
    except Exception as exc:  # noqa: BLE001 - report anything to the parent
        queue.put((rank, "crash", repr(exc), 0.0))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_exchange(values: list[int | None]) -> dict[int, tuple[str, str, float]]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_exchange_worker, args=(r, len(values), port, values, queue))
             for r in range(len(values))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    # every rank tears down normally (no os._exit), and does not abort at exit
    assert [p.exitcode for p in procs] == [0] * len(procs)
    results = {}
    while not queue.empty():
        rank, status, message, seconds = queue.get()
        results[rank] = (status, message, seconds)
    return results


def test_exchange_check_equal_values_pass():
    value = (1 << 62) + 12345
    results = _run_exchange([value, value])
    assert results == {0: ("ok", "", results[0][2]), 1: ("ok", "", results[1][2])}


def test_exchange_check_mismatch_names_ranks():
    results = _run_exchange([7, 9])
    for rank in (0, 1):
        status, message, seconds = results[rank]
        assert status == "error", results
        assert "plan hash differs" in message
        assert re.search(r"0x0+7 on group ranks \[0\]", message)
        assert re.search(r"0x0+9 on group ranks \[1\]", message)
        assert seconds < 10


def test_exchange_check_missing_rank_times_out():
    results = _run_exchange([5, None])
    status, message, seconds = results[0]
    assert status == "error", results
    assert "within 2 s" in message
    assert seconds < 10


def test_watcher_priority_is_the_greatest(monkeypatch):
    """``torch.cuda.Stream.priority_range()`` is ``(least, greatest)`` and lower numbers are
    higher priorities: the watcher (and the benchmarks' side stream) must take the minimum,
    not the first element (which is torch's default priority, 0)."""
    from flashoverlap.engine.workspace import highest_stream_priority

    monkeypatch.setattr(torch.cuda.Stream, "priority_range", staticmethod(lambda: (0, -5)), raising=False)
    assert highest_stream_priority() == -5
    monkeypatch.setattr(torch.cuda.Stream, "priority_range", staticmethod(lambda: (0, 0)), raising=False)
    assert highest_stream_priority() == 0  # a GPU without priorities


def test_cta_policy_reaches_the_config_and_is_checked(monkeypatch):
    """``FLASHOVERLAP_NCCL_CTA_POLICY`` -> ``ncclConfig_t.CTAPolicy`` of the engines'
    communicator (unset: the field stays undefined and the cache key unchanged); bad values
    and an NCCL older than 2.27 (which would ignore the field) raise before anything."""
    from flashoverlap import settings as st

    assert comm.CommConfig().to_nccl().CTAPolicy == nccl_lib.NCCL_CONFIG_UNDEF_INT
    assert comm.CommConfig(cta_policy=1).to_nccl().CTAPolicy == 1
    for bad in (3, -1, True, "efficiency"):
        with pytest.raises(ValueError, match="cta_policy"):
            comm.CommConfig(cta_policy=bad)
    calls = []
    monkeypatch.setattr(comm, "get_communicator", lambda group, **kw: calls.append(kw))
    monkeypatch.delenv(st.NCCL_CTA_POLICY_ENV, raising=False)
    comm.overlap_communicator("g", 16)
    monkeypatch.setenv(st.NCCL_CTA_POLICY_ENV, "Efficiency")
    comm.overlap_communicator("g", 16)
    monkeypatch.setenv(st.NCCL_CTA_POLICY_ENV, "zero")
    comm.overlap_communicator("g", 16)
    assert [c.get("cta_policy") for c in calls] == [None, 1, 2]
    assert "cta_policy" not in calls[0]
    monkeypatch.setenv(st.NCCL_CTA_POLICY_ENV, "fast")
    with pytest.raises(ValueError, match="default, efficiency, zero"):
        comm.overlap_communicator("g", 16)

    class OldNccl:
        version_code = nccl_lib.nccl_version_code(2, 26, 2)
        version_string = "2.26.2"

    comm._check_supported(OldNccl(), comm.CommConfig(max_ctas=8))
    with pytest.raises(ValueError, match="2.27"):
        comm._check_supported(OldNccl(), comm.CommConfig(cta_policy=1))
