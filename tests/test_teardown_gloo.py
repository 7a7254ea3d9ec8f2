"""No process group outlives ``destroy_process_group`` because of flashoverlap (issue 12).

Processes that used the ops sometimes died with "terminate called without an active
exception" at exit: the library's memo tables kept the destroyed gloo group alive, so its
worker threads were still running during interpreter finalisation (see ``dist_utils``).  The
abort itself is a race (a few percent of runs), so these tests check the mechanism, which is
deterministic: after the ops ran and the group was destroyed, the group object is gone by the
time the interpreter finalises, and a new world releases the old one at once.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from launch_utils import ROOT, cpu_launch_env

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
    script = tmp_path / "teardown.py"
    script.write_text(_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=cpu_launch_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    assert "first world alive after re-init: False" in proc.stdout, proc.stdout
    assert "groups alive at exit: 0 of 2" in proc.stdout, proc.stdout
