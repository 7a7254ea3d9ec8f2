"""No process group outlives ``destroy_process_group`` because of flashoverlap (issue 12).

Processes that used the ops sometimes died with "terminate called without an active
exception" at exit: the library's memo tables kept the destroyed gloo group alive, so its
worker threads were still running during interpreter finalisation (see ``dist_utils``).  The
abort itself is a race (a few percent of runs), so these tests check the mechanism, which is
deterministic: after the ops ran and the group was destroyed, the group object is gone by the
time the interpreter finalises, and a new world releases the old one at once.

The script runs every op family on every CPU engine, their autograd path and ``torch.compile``
of each (Dynamo first imported after ``init_process_group``): a memo that forgot to register
(``all_gather_gemm``'s and the AllToAll's did), a compiled graph that takes the group as an
input, or torch's own ``group=group.WORLD`` default arguments imported with a live group each
kept the group alive and failed this test before they were fixed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from launch_utils import ROOT, cpu_launch_env

def _run_script(path, text: str) -> subprocess.CompletedProcess:
    """Run ``text`` as a fresh interpreter (CPU environment); it must exit normally."""
    path.write_text(text)
    proc = subprocess.run([sys.executable, str(path)], cwd=ROOT, env=cpu_launch_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    return proc


# The checker is registered with atexit *before* flashoverlap is imported, so it runs after
# the library's own exit handler (atexit is last in, first out) and sees what finalisation
# will see.
_SCRIPT = textwrap.dedent('''
    import atexit, gc, os, sys, tempfile, weakref
    import torch
    import torch.distributed as dist

    refs = []

    def report():  # no gc.collect() here: what is alive now is alive in Py_FinalizeEx
        alive = sum(r() is not None for r in refs)
        print(f"groups alive at exit: {alive} of {len(refs)}", flush=True)

    atexit.register(report)
    gc.disable()  # collections only where asked for: the cycle below stays until exit

    def hold_in_a_cycle(group):
        try:
            raise RuntimeError("a failed call, kept for inspection")
        except RuntimeError as exc:
            kept = exc  # noqa: F841 - frame -> kept -> traceback -> frame: a cycle holding `group`
        return None

    import flashoverlap as fo

    def run_everything(seed):
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randn(12, 5, generator=g), torch.randn(5, 7, generator=g)
        for name in ("reference", "sequential", None):
            y = fo.gemm_all_reduce(a, b, engine=name)
            torch.testing.assert_close(y, a @ b)
            res = torch.randn(12, 7, generator=g)
            z = fo.gemm_reduce_scatter(a, b, engine=name, residual=res)
            torch.testing.assert_close(z, a @ b + res)
            cfg = fo.PlanConfig(block_m=4, block_n=4, num_ctas=2, group_m=1)  # several groups
            y = fo.gemm_all_reduce(a, b, engine="reference", config=cfg)
            torch.testing.assert_close(y, a @ b)
            torch.testing.assert_close(fo.all_gather_gemm(a, b, engine=name), a @ b)
            w = torch.randn(2, 5, 7, generator=g)  # two experts of 6 rows each
            z = fo.grouped_gemm_all_to_all(a, w, [[6], [6]], [12], engine=name)
            torch.testing.assert_close(z, torch.cat([a[:6] @ w[0], a[6:] @ w[1]]))
        # the autograd path (the torch.library ops, by group name) and torch.compile of each
        # family: a traced group=None once made the default group a graph input for good
        ag = a.clone().requires_grad_()
        for op in (fo.gemm_all_reduce, fo.gemm_reduce_scatter, fo.all_gather_gemm):
            eager = op(ag, b, engine="reference").square().sum()
            eager.backward()
            f = torch.compile(lambda x, y, op=op: op(x, y, engine="reference").square().sum(),
                              fullgraph=True, backend="aot_eager")
            compiled = f(ag, b)
            torch.testing.assert_close(compiled, eager)
            compiled.backward()

    tmp = tempfile.mkdtemp()
    for generation in range(2):
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store{generation}",
                                rank=0, world_size=1)
        refs.append(weakref.ref(dist.group.WORLD))
        run_everything(generation)
        dist.destroy_process_group()
    gc.collect()
    hold_in_a_cycle(refs[1]())
    # The second world's first call released the first world's group.
    print(f"first world alive after re-init: {refs[0]() is not None}", flush=True)
''')


def test_destroyed_group_is_released_by_exit_and_by_a_new_world(tmp_path):
    proc = _run_script(tmp_path / "teardown.py", _SCRIPT)
    assert "first world alive after re-init: False" in proc.stdout, proc.stdout
    assert "groups alive at exit: 0 of 2" in proc.stdout, proc.stdout


# The other order: the group first, then flashoverlap.  Importing flashoverlap must not pin
# the live group itself (torch.distributed.nn.functional's defaults would, if imported now).
_LATE_IMPORT_SCRIPT = textwrap.dedent('''
    import atexit, tempfile, weakref
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/s", rank=0,
                            world_size=1)
    ref = weakref.ref(dist.group.WORLD)
    atexit.register(lambda: print(f"group alive at exit: {ref() is not None}", flush=True))
    import flashoverlap as fo

    a, b = torch.randn(6, 4), torch.randn(4, 3)
    torch.testing.assert_close(fo.gemm_all_reduce(a, b, engine="reference"), a @ b)
    dist.destroy_process_group()
''')


def test_importing_flashoverlap_after_init_does_not_pin_the_group(tmp_path):
    proc = _run_script(tmp_path / "late_import.py", _LATE_IMPORT_SCRIPT)
    assert "group alive at exit: False" in proc.stdout, proc.stdout


_RETIRE_SCRIPT = textwrap.dedent('''
    import tempfile, time
    import torch
    import torch.distributed as dist
    from flashoverlap import dist_utils

    dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/s", rank=0,
                            world_size=1)
    for _ in range(200):  # the worker lets go a moment after wait(): retire waits for it
        mine = torch.arange(6)
        gathered = [torch.empty_like(mine)]
        work = dist.all_gather(gathered, mine, async_op=True)
        work.wait()
        del work
        assert dist_utils.retire_cpu_tensors([mine, *gathered])
        assert mine._use_count() == 1 and gathered[0]._use_count() == 1
    # a tensor something else in C++ still holds: not retired in time, kept for good
    held = torch.arange(3.0).requires_grad_()
    product = held * held  # its autograd node saves `held`: a C++ reference
    assert held._use_count() > 1
    t0 = time.monotonic()
    assert not dist_utils.retire_cpu_tensors([held], timeout_s=0.05)
    assert time.monotonic() - t0 < 5 and dist_utils._UNRETIRED[-1][0] is held
    print("retire ok", flush=True)
    dist.destroy_process_group()
''')


def test_retire_waits_for_the_gloo_worker_to_let_go_of_a_works_tensors(tmp_path):
    """``dist_utils.retire_cpu_tensors``: after ``wait()`` and ``del work`` the worker may
    still hold the work for a moment; retire returns once it has let go (C++ use count 1), so
    Python, not the worker, frees the tensors -- the cause of the exit aborts a core dump
    showed (``~AsyncAllgatherWork`` on the worker taking the GIL during finalisation)."""
    proc = _run_script(tmp_path / "retire.py", _RETIRE_SCRIPT)
    assert "retire ok" in proc.stdout
