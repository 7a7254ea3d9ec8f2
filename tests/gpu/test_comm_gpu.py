"""GPU tests of the communication layer (one GPU; world size 1).

* NCCL communicators (from a unique id, from a gloo and from an NCCL process group) move the
  right bytes, accept CTA limits, and report their rank/device;
* stream waits (both methods) really wait: the producer is delayed with ``torch.cuda._sleep``
  so a wait that does not block would let the consumer copy stale data;
* the compare is wrap-safe (GEQ modulo 2**32);
* wait + NCCL AllReduce capture into a CUDA graph and replay with changing inputs;
* every built-in collective's raw per-group launch (``Collective.launch_group``, what the
  overlap engine's watcher issues) moves a row range of a larger buffer.

A wait that never releases must not hang the suite: :func:`_finish` polls with a deadline
and, on timeout, releases the waiter by writing the counter from another stream.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from flashoverlap import comm as fo_comm
from flashoverlap import nccl_lib, stream_wait

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

METHODS = ["kernel", "driver"]
SLEEP_CYCLES = 100_000_000  # ~50-70 ms on an H100: far longer than launching the consumer


def _i32(value: int) -> int:
    """The int32 with the same 32 bits as ``value`` (targets may be given as uint32)."""
    return (value + 2**31) % 2**32 - 2**31


def _finish(event: torch.cuda.Event, counter: torch.Tensor, release: int,
            timeout_s: float = 20.0) -> None:
    """Wait for ``event``; if it does not complete in time, unblock the waiter and fail."""
    deadline = time.monotonic() + timeout_s
    while not event.query():
        if time.monotonic() > deadline:
            with torch.cuda.stream(torch.cuda.Stream()):
                counter.fill_(_i32(release))
            torch.cuda.synchronize()
            pytest.fail(f"stream wait did not release within {timeout_s} s")
        time.sleep(0.001)
    torch.cuda.synchronize()


@pytest.fixture(scope="module")
def comm_w1():
    comm = fo_comm.NcclCommunicator.from_unique_id(fo_comm.new_unique_id(), 0, 1, max_ctas=4,
                                                   min_ctas=1)
    yield comm
    torch.cuda.synchronize()
    comm.destroy()


# ---------------------------------------------------------------------------------------
# NCCL
# ---------------------------------------------------------------------------------------


def test_library_and_communicator_info(comm_w1):
    lib = nccl_lib.get_nccl()
    print(f"NCCL {lib.version_string} from {lib.path}; torch {torch.__version__}, "
          f"torch NCCL {torch.cuda.nccl.version()}")
    assert lib.version_code >= nccl_lib.nccl_version_code(2, 17, 0)
    assert lib.comm_count(comm_w1.handle) == 1
    assert lib.comm_user_rank(comm_w1.handle) == 0
    assert lib.comm_cu_device(comm_w1.handle) == torch.cuda.current_device()
    comm_w1.check_async_error()
    assert "NcclCommunicator(rank=0, world_size=1" in repr(comm_w1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int32])
def test_all_reduce_in_place_range(comm_w1, dtype):
    buf = (torch.randn(10_000, device="cuda") * 100).to(dtype)
    expected = buf.clone()
    view = buf[1000:5000]  # a range of a larger buffer, as the engine uses
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    comm_w1.all_reduce(view, stream)
    comm_w1.all_reduce(view, stream, op="max")
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.equal(buf, expected)


def test_reduce_scatter_all_gather_all_to_all(comm_w1):
    send = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    recv = torch.empty_like(send)
    comm_w1.reduce_scatter(send, recv)
    torch.cuda.synchronize()
    assert torch.equal(recv, send)
    recv.zero_()
    comm_w1.all_gather(send, recv)
    torch.cuda.synchronize()
    assert torch.equal(recv, send)
    send2, recv2 = torch.randn(64, 32, device="cuda"), torch.empty(64, 32, device="cuda")
    comm_w1.all_to_all(send2, recv2)
    torch.cuda.synchronize()
    assert torch.equal(recv2, send2)


def test_bad_arguments_raise_before_launch(comm_w1):
    x = torch.randn(16, 16, device="cuda")
    with pytest.raises(ValueError, match="contiguous"):
        comm_w1.all_reduce(x.t())
    with pytest.raises(ValueError, match="cpu"):
        comm_w1.all_reduce(torch.zeros(4))
    with pytest.raises(ValueError, match="reduce_scatter"):
        comm_w1.reduce_scatter(x, torch.empty(3, device="cuda"))
    with pytest.raises(TypeError):
        comm_w1.all_reduce(torch.zeros(4, device="cuda", dtype=torch.complex64))


@pytest.mark.parametrize("config", [dict(max_ctas=1), dict(max_ctas=8, min_ctas=8),
                                    dict(max_ctas=16, min_ctas=2, cga_cluster_size=0),
                                    dict()])
def test_cta_configs_accepted(config):
    comm = fo_comm.NcclCommunicator.from_unique_id(fo_comm.new_unique_id(), 0, 1, **config)
    x = torch.randn(1 << 20, device="cuda")
    y = x.clone()
    comm.all_reduce(y)
    torch.cuda.synchronize()
    assert torch.equal(x, y)
    comm.destroy()
    assert comm.handle is None


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_process_group_bootstrap_and_exchange_check(backend):
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device())
                            if backend == "nccl" else None)
    try:
        comm = fo_comm.get_communicator(None, max_ctas=4)
        assert fo_comm.get_communicator(None, max_ctas=4) is comm
        assert fo_comm.get_communicator(None, max_ctas=8) is not comm
        overlap = fo_comm.overlap_communicator(None, 4)
        assert overlap is not comm and overlap.config.cga_cluster_size == 0
        assert fo_comm.overlap_communicator(None, 4) is overlap
        x = torch.randn(1000, device="cuda")
        y = x.clone()
        comm.all_reduce(y)
        torch.cuda.synchronize()
        assert torch.equal(x, y)
        fo_comm.exchange_check(None, (1 << 62) + 3, "plan hash", timeout_s=30)
    finally:
        fo_comm.destroy_communicators()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# stream waits
# ---------------------------------------------------------------------------------------


def test_report_wait_support():
    print(f"driver wait supported: {stream_wait.driver_wait_supported()}; "
          f"auto method: {stream_wait.resolve_wait_method()}")


def _wait_scenario(method: str, counter: torch.Tensor, start: int, steps: list[int],
                   target: int) -> tuple[torch.Tensor, float]:
    """Waiter enqueues ``wait(counter >= target)`` + a copy *before* the producer, which
    sleeps, then writes ``data = i`` and ``counter = steps[i]`` for each step.  Returns the
    copied data and the value the copy should have seen (the last step's)."""
    data = torch.zeros(1 << 16, device="cuda")
    out = torch.full_like(data, -1.0)
    producer, waiter = torch.cuda.Stream(), torch.cuda.Stream()
    counter.fill_(_i32(start))
    torch.cuda.synchronize()
    stream_wait.wait_counter_geq(counter, target, waiter, method=method)  # enqueued first
    with torch.cuda.stream(waiter):
        out.copy_(data)
        done = torch.cuda.Event()
        done.record()
    with torch.cuda.stream(producer):
        for i, value in enumerate(steps):
            torch.cuda._sleep(SLEEP_CYCLES)
            data.fill_(float(i + 1))
            counter.fill_(value)
    _finish(done, counter, target)
    return out, float(len(steps))


def _warm_scenario(method: str, counter: torch.Tensor, steps: list[int], target: int) -> None:
    """Run the scenario once with the wait already satisfied.

    CUDA lazy loading loads a kernel at its first launch and may synchronize the context to
    do so; if that first launch is the producer's, issued while a wait on it is pending, the
    load waits for the waiter and the waiter for the producer: a deadlock (CUDA programming
    guide, "Lazy Loading", concurrent execution).  The warm run loads every kernel first.
    """
    stream_wait.prepare_wait(method=method)
    _wait_scenario(method, counter, target, steps, target)


@pytest.mark.parametrize("method", METHODS)
def test_wait_blocks_until_producer_signals(method):
    counters = torch.zeros(4, dtype=torch.int32, device="cuda")
    counter = counters[2:3]  # a view into the counter array, as the engine uses
    steps = [2, 3]  # the first step is not enough: the copy must see the second
    _warm_scenario(method, counter, steps, 3)
    out, expected = _wait_scenario(method, counter, 0, steps, 3)
    assert torch.all(out == expected), f"the consumer saw {out[0].item()}, not {expected}"


@pytest.mark.parametrize("method", METHODS)
def test_wait_compare_is_wrap_safe(method):
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    # Target just past the int32 wrap: a plain signed compare (2147483632 >= -2147483643)
    # would pass at once; GEQ modulo 2**32 must wait for the producer.
    start, target = 0x7FFFFFF0, 0x80000005
    wrapped = target - 2**32  # the int32 value of 0x80000005
    _warm_scenario(method, counter, [wrapped], target)
    out, expected = _wait_scenario(method, counter, start, [wrapped], target)
    assert torch.all(out == expected), "the wait did not treat 0x80000005 as after 0x7FFFFFF0"

    # Already satisfied across the wrap, and a negative target: no producer needed.
    waiter = torch.cuda.Stream()
    counter.fill_(wrapped)
    torch.cuda.synchronize()
    stream_wait.wait_counter_geq(counter, 0x7FFFFFF0, waiter, method=method)
    stream_wait.wait_counter_geq(counter, -(2**31) + 1, waiter, method=method)
    with torch.cuda.stream(waiter):
        done = torch.cuda.Event()
        done.record()
    _finish(done, counter, 0x7FFFFFF0 + 10)


@pytest.mark.parametrize("method", METHODS)
def test_graph_capture_wait_and_all_reduce(comm_w1, method):
    stream_wait.prepare_wait(method=method)
    n = 1 << 16
    inp = torch.randn(n, device="cuda")
    buf = torch.empty(n, device="cuda")
    out = torch.empty(n, device="cuda")
    counters = torch.zeros(2, dtype=torch.int32, device="cuda")
    producer, waiter = torch.cuda.Stream(), torch.cuda.Stream()

    def step():
        main = torch.cuda.current_stream()
        stream_wait.reset_counters(counters, main)
        buf.fill_(float("nan"))
        producer.wait_stream(main)
        waiter.wait_stream(main)
        with torch.cuda.stream(producer):
            torch.cuda._sleep(SLEEP_CYCLES // 2)
            buf.copy_(inp)
            counters[1:2].fill_(1)
        stream_wait.wait_counter_geq(counters[1:2], 1, waiter, method=method)
        comm_w1.all_reduce(buf, waiter)
        with torch.cuda.stream(waiter):
            out.copy_(buf)
        main.wait_stream(producer)
        main.wait_stream(waiter)

    # Eager warm-up on a side stream (NCCL and the allocator settle before capture).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(out, inp)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    for _ in range(3):
        inp.copy_(torch.randn(n, device="cuda"))
        out.zero_()
        graph.replay()
        done = torch.cuda.Event()
        done.record()
        _finish(done, counters[1:2], 1)
        assert torch.equal(out, inp), "graph replay consumed stale data"


# ---------------------------------------------------------------------------------------
# collectives: one group's raw launch
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["all_reduce", "reduce_scatter"])
def test_collective_launch_group_moves_a_row_range(comm_w1, name):
    from flashoverlap import collectives
    from flashoverlap.collectives import NcclStream

    coll = collectives.get(name)
    N, lo, hi = 256, 16, 48
    send = torch.randn(64, N, device="cuda", dtype=torch.bfloat16)
    expected = send.clone()
    recv = send if coll.in_place else torch.full_like(send, float("nan"))
    main = torch.cuda.current_stream()
    stream = torch.cuda.Stream()
    stream.wait_stream(main)
    nccl = NcclStream(comm_w1.lib, comm_w1.handle, stream.cuda_stream,
                      nccl_lib.nccl_dtype(torch.bfloat16), nccl_lib.nccl_red_op("sum"), 0, 1)
    offset = lo * N * send.element_size()
    coll.launch_group(nccl, send.data_ptr() + offset, recv.data_ptr() + offset,
                      (hi - lo) * N, (hi - lo) * N)
    main.wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.equal(recv[lo:hi], expected[lo:hi])
    if not coll.in_place:
        assert recv[:lo].isnan().all() and recv[hi:].isnan().all()
    assert torch.equal(send, expected)
