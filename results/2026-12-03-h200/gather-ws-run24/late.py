import sys, time, torch, dataclasses
sys.path.insert(0, '.')
from flashoverlap.gather_plan import GatherProblem, make_gather_plan
from flashoverlap.kernels import config_for_tile, default_config
from flashoverlap.kernels.gather_gemm import GatherGemmLauncher
from flashoverlap.plan import PlanConfig
mode = sys.argv[1]
dev = torch.device("cuda", 0)
cfg = config_for_tile(default_config(dev), 128, 256)
if "pipe" in mode:
    cfg = dataclasses.replace(cfg, warp_specialized_kernel=False)
W, rank, m, N, K = 4, 1, 512, 1024, 2048
sms = torch.cuda.get_device_properties(0).multi_processor_count
pc = PlanConfig(block_m=128, block_n=256, num_ctas=sms - 16, group_m=4)
plan = make_gather_plan(GatherProblem(m, N, K, "bfloat16", W), pc)
table = torch.from_numpy(plan.step_table(rank).copy()).cuda()
flags = torch.zeros(W, device="cuda", dtype=torch.int32)
launch = GatherGemmLauncher(table, flags, block_m=128, block_n=256, num_ctas=pc.num_ctas,
                            config=cfg, full_tiles=plan.full_tiles)
src = torch.randn(m * W, K, device="cuda", dtype=torch.bfloat16)
b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16).t()
want = src.float() @ b.float()
a = torch.full((m * W, K), float("nan"), device="cuda", dtype=torch.bfloat16)
out = torch.full((m * W, N), float("nan"), device="cuda", dtype=torch.bfloat16)
side = torch.cuda.Stream(priority=-5) if "hi" in mode else torch.cuda.Stream()
torch.cuda._sleep(1000)
flags.fill_(1); flags[0:1].fill_(1); a.copy_(src); a[0:m].copy_(src[0:m])
launch(src, b, out)
torch.cuda.synchronize()
print(mode, "warm ok", flush=True)
for r in range(5):
    a.fill_(float("nan")); out.fill_(float("nan")); flags.zero_()
    if "precopy" in mode:
        a.copy_(src)
    side.wait_stream(torch.cuda.current_stream())
    launch(a, b, out)
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000)
        for j in range(W):
            rows = slice(((rank - j) % W) * m, ((rank - j) % W + 1) * m)
            if "precopy" not in mode:
                a[rows].copy_(src[rows])
            flags[j:j + 1].fill_(1)
    torch.cuda.current_stream().wait_stream(side)
    ev = torch.cuda.Event(); ev.record(); t0 = time.monotonic()
    while not ev.query():
        if time.monotonic() - t0 > 8:
            print(mode, "round", r, "HANG flags", "(cannot read)", flush=True); import os; os._exit(3)
        time.sleep(0.01)
    bad = out.isnan().any().item()
    err = float((out.float() - want).norm() / want.norm())
    print(mode, "round", r, "nan", bad, "err %.1e" % err, "%.1f ms" % ((time.monotonic() - t0) * 1e3), flush=True)
print(mode, "OK")
