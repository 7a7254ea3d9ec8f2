"""Which binding enqueues NCCL calls (flashoverlap.nccl_enqueue), on CPU with a stand-in
nccl4py: the checks that decide it, and nccl4py's errors turned into flashoverlap's."""

from __future__ import annotations

import sys
import types

import pytest

from flashoverlap import nccl_enqueue
from flashoverlap.nccl_lib import NCCLError


class FakeLib:
    version_code = 22809

    def __init__(self):
        self.calls = []

    def last_error(self, comm):
        return f"peer vanished (comm {comm:#x})"

    def all_reduce(self, *args):
        self.calls.append(("all_reduce", args))


def _fake_nccl4py(version=22809, fail=None):
    nb = types.ModuleType("nccl.bindings.nccl")
    nb.calls = []

    class NCCLError(Exception):
        def __init__(self, status):
            super().__init__(f"NCCL_ERROR {status}")
            self.status = status

    class Comm:
        def __init__(self, ptr):
            self.ptr = ptr

    def make(name):
        def fn(*args):
            if fail == name:
                raise NCCLError(6)
            nb.calls.append((name, args))
        return fn

    for name in ("all_reduce", "reduce_scatter", "all_gather", "send", "recv", "group_start",
                 "group_end"):
        setattr(nb, name, make(name))
    nb.get_version = lambda: version
    nb.Comm, nb.NCCLError = Comm, NCCLError
    pkg, sub = types.ModuleType("nccl"), types.ModuleType("nccl.bindings")
    pkg.bindings, sub.nccl = sub, nb
    return {"nccl": pkg, "nccl.bindings": sub, "nccl.bindings.nccl": nb}


class FakeComm:
    def __init__(self):
        self.lib, self.handle = FakeLib(), 0xABC


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    nccl_enqueue._reset_for_tests()
    monkeypatch.delenv("FLASHOVERLAP_NCCL4PY", raising=False)
    yield
    nccl_enqueue._reset_for_tests()


def _install(monkeypatch, modules, files=("/site/nvidia/nccl/lib/libnccl.so.2",)):
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(nccl_enqueue, "_mapped_nccl_files", lambda: set(files))


def test_nccl4py_serves_when_it_maps_the_same_library(monkeypatch):
    mods = _fake_nccl4py()
    _install(monkeypatch, mods)
    comm = FakeComm()
    lib, arg = nccl_enqueue.enqueue_binding(comm)
    assert isinstance(lib, nccl_enqueue.Nccl4pyCalls)
    assert isinstance(arg, mods["nccl.bindings.nccl"].Comm) and arg.ptr == 0xABC
    lib.reduce_scatter(1, 2, 3, 9, 0, arg, 77)
    lib.group_start()
    lib.send(1, 2, 9, 1, arg, 77)
    lib.group_end()
    assert [c[0] for c in mods["nccl.bindings.nccl"].calls] == [
        "reduce_scatter", "group_start", "send", "group_end"]
    assert mods["nccl.bindings.nccl"].calls[0][1] == (1, 2, 3, 9, 0, arg, 77)
    assert comm.lib.calls == []  # nothing went through ctypes
    assert nccl_enqueue.binding_status().startswith("nccl4py")


@pytest.mark.parametrize("case, expect", [
    ("disabled", "FLASHOVERLAP_NCCL4PY=0"),
    ("missing", "not importable"),
    ("two_libraries", "2 libnccl files mapped"),
    ("other_version", "nccl4py reports NCCL 22707"),
])
def test_ctypes_serves_otherwise(monkeypatch, case, expect):
    if case == "disabled":
        monkeypatch.setenv("FLASHOVERLAP_NCCL4PY", "0")
        _install(monkeypatch, _fake_nccl4py())
    elif case == "missing":
        monkeypatch.setitem(sys.modules, "nccl", None)  # import raises ImportError
    elif case == "two_libraries":
        _install(monkeypatch, _fake_nccl4py(), files=("/a/libnccl.so.2", "/b/libnccl.so.2"))
    else:
        _install(monkeypatch, _fake_nccl4py(version=22707))
    comm = FakeComm()
    lib, arg = nccl_enqueue.enqueue_binding(comm)
    assert lib is comm.lib and arg == comm.handle
    assert expect in nccl_enqueue.binding_status()


def test_nccl4py_errors_become_flashoverlap_errors(monkeypatch):
    _install(monkeypatch, _fake_nccl4py(fail="all_reduce"))
    lib, arg = nccl_enqueue.enqueue_binding(FakeComm())
    with pytest.raises(NCCLError, match=r"ncclAllReduce failed: .*peer vanished") as info:
        lib.all_reduce(1, 1, 8, 9, 0, arg, 0)
    assert info.value.code == 6 and info.value.function == "ncclAllReduce"
