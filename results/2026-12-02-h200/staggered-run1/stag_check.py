"""Quick GPU check of the staggered variant: against matmul (float64), counters complete, NaN
poison, both B layouts, P 132/116/7, whole-tile shapes."""
import dataclasses, torch
from flashoverlap.kernels import default_config, signal_gemm as sg
from flashoverlap.kernels import ws_signal_gemm as ws
from flashoverlap.plan import PlanConfig, Problem, make_plan
dev = torch.device("cuda")
ok = True
for (M, N, K) in [(4096, 8192, 2048), (1024, 512, 640), (2048, 1024, 4096), (128, 256, 64)]:
    for b_trans in (False, True):
        for P in (132, 116, 7):
            cfg = dataclasses.replace(default_config(dev, torch.bfloat16), staggered_epilogue=True, split_tail=False)
            plan = make_plan(Problem(M, N, K, "bfloat16", 1, "all_reduce"), PlanConfig(block_m=128, block_n=256, num_ctas=P))
            a = torch.randn(M, K, device=dev).to(torch.bfloat16)
            b = (torch.randn(N, K, device=dev).to(torch.bfloat16).T if b_trans else torch.randn(K, N, device=dev).to(torch.bfloat16))
            out = torch.full((M, N), float("nan"), device=dev, dtype=torch.bfloat16)
            cnt = torch.zeros(plan.num_groups, device=dev, dtype=torch.int32)
            table = torch.from_numpy(plan.step_table.copy()).to(dev)
            fn, *_ , meta = sg._choose_launch(a, b, out, table, 128, 256, P, cnt, None, 0, None, cfg, plan.full_tiles)
            assert fn is ws._ws_staggered_kernel, fn
            for rep in range(3):
                out.fill_(float("nan")); cnt.zero_()
                sg.signal_gemm(a, b, out, step_table=table, block_m=128, block_n=256, num_ctas=P, counters=cnt, config=cfg, full_tiles=plan.full_tiles)
                torch.cuda.synchronize()
                ref = a.double() @ b.double()
                rel = ((out.double() - ref).norm() / ref.norm()).item()
                good = rel < 1e-2 and not out.isnan().any().item() and cnt.tolist() == plan.group_tile_counts.tolist()
                ok &= good
            print(M, N, K, b_trans, P, "rel %.2e" % rel, "OK" if good else "BAD")
# launcher path (direct launch) too
cfg = dataclasses.replace(default_config(dev, torch.bfloat16), staggered_epilogue=True, split_tail=False)
M, N, K = 2048, 2048, 1024
plan = make_plan(Problem(M, N, K, "bfloat16", 1, "all_reduce"), PlanConfig(block_m=128, block_n=256, num_ctas=132))
table = torch.from_numpy(plan.step_table.copy()).to(dev)
cnt = torch.zeros(plan.num_groups, device=dev, dtype=torch.int32)
L = sg.SignalGemmLauncher(table, cnt, block_m=128, block_n=256, num_ctas=132, config=cfg, full_tiles=plan.full_tiles)
for i in range(4):
    a = torch.randn(M, K, device=dev).to(torch.bfloat16); b = torch.randn(K, N, device=dev).to(torch.bfloat16)
    out = torch.full((M, N), float("nan"), device=dev, dtype=torch.bfloat16); cnt.zero_()
    L(a, b, out); torch.cuda.synchronize()
    rel = ((out.double() - a.double() @ b.double()).norm() / (a.double() @ b.double()).norm()).item()
    good = rel < 1e-2 and cnt.tolist() == plan.group_tile_counts.tolist(); ok &= good
    print("launcher", i, "rel %.2e" % rel, "OK" if good else "BAD")
print("ALL OK" if ok else "SOME BAD")
