"""Llama prefill under tensor parallelism: torch's DTensor TP vs. the same model patched by flashoverlap.

The model is a Llama decoder with random weights (nothing is downloaded): transformers'
``LlamaForCausalLM`` built from a ``LlamaConfig`` when transformers is installed, else a small
built-in Llama (RMSNorm, RoPE, GQA attention, SwiGLU MLP) with the same module names.  Tensor
parallelism is torch's own: ``parallelize_module`` with ``ColwiseParallel`` on q/k/v/gate/up and
``RowwiseParallel`` on o_proj/down_proj (each rank holds ``heads/W`` attention heads and
``intermediate/W`` MLP columns; embeddings, norms and the LM head are replicated).
``flashoverlap.patch_tensor_parallel`` then makes every o_proj/down_proj run its GEMM+AllReduce
overlapped, keeping the parameters; ``undo()`` restores the original model.

For each variant it measures prefill throughput (``--batch x --seq`` tokens per forward,
``torch.no_grad()``, logits of the last token only, as generation needs): ``--warmup`` calls,
then ``--iters`` (>= 5) timed calls alternating between the two variants, CUDA events, median,
max over ranks.  It compares the full logits of both variants (max abs / relative error),
prints a table and, with ``--out``, appends JSON rows ``bench=e2e`` to
``results/<date>-<machine>/e2e.json`` (or ``DIR/e2e.json`` for ``--out DIR``).

    torchrun --nproc-per-node 4 examples/tp_llama.py --preset 70b --layers 2 --out
    torchrun --nproc-per-node 2 examples/tp_llama.py --preset 8b --seq 8192
    python examples/tp_llama.py --preset 8b                      # TP=1 on one GPU
    torchrun --nproc-per-node 2 examples/tp_llama.py --preset tiny --model builtin   # CPU, gloo

JSON row keys beyond docs/design.md's "Result files": ``M`` = tokens per forward, ``N`` = hidden size, ``K`` = the
full intermediate size (down_proj's K before sharding), ``tokens_per_s``, ``model``,
``preset``, ``layers``, ``max_abs_err``, ``rel_err``, ``flashoverlap_engine`` (the engine the
patched layers resolved to).  ``speedup`` = tokens/s patched / unpatched (1.0 on the torch row).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import flashoverlap as fo
from flashoverlap.dist_utils import init_from_env

PRESETS = {  # Llama 3 shapes; "tiny" for CPU tests (heads and kv heads divisible by 4)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4, vocab_size=256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
}
ROPE_THETA = 500000.0
RMS_EPS = 1e-5


# ------------------------------------------------------------------ built-in Llama (no transformers)
class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + RMS_EPS)).to(x.dtype) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.head_dim = hidden // heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        # -1 heads: under tensor parallelism the projections return this rank's heads only.
        q = self.q_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        groups = q.shape[1] // k.shape[1]  # GQA: the ratio is the same on every rank
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.input_layernorm = RMSNorm(hidden)
        self.self_attn = Attention(hidden, cfg["num_attention_heads"], cfg["num_key_value_heads"])
        self.post_attention_layernorm = RMSNorm(hidden)
        self.mlp = MLP(hidden, cfg["intermediate_size"])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        S, device = input_ids.shape[1], input_ids.device
        inv_freq = ROPE_THETA ** -(torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim)
        angles = torch.outer(torch.arange(S, device=device).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class BuiltinLlama(nn.Module):
    """Same module names as transformers' LlamaForCausalLM (model.layers.N.self_attn.o_proj, ...)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        for p in self.parameters():  # small weights, like an initializer_range of 0.02
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, logits_to_keep: int = 0):
        h = self.model(input_ids)
        h = h[:, -logits_to_keep:] if logits_to_keep else h
        return types.SimpleNamespace(logits=self.lm_head(h))


# ------------------------------------------------------------------ model, parallelism
def build_model(kind: str, cfg: dict, seq: int, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """Random-init model on ``device`` in ``dtype``; identical on every rank (same seed)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in dtype: a 70B layer in float32 is 7 GB
    try:
        with torch.device(device):
            if kind == "hf":
                from transformers import LlamaConfig, LlamaForCausalLM

                config = LlamaConfig(**cfg, max_position_embeddings=max(8192, seq))
                config._attn_implementation = "sdpa"
                return LlamaForCausalLM(config).eval(), "hf-llama"
            return BuiltinLlama(cfg).eval(), "builtin-llama"
    finally:
        torch.set_default_dtype(previous)


def parallelize(model: nn.Module, mesh) -> None:
    """Megatron-style TP of every decoder layer with torch's own parallel styles."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {
        "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)


# ------------------------------------------------------------------ measuring
class Timer:
    """Milliseconds of one call: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _logit_errors(got: torch.Tensor, want: torch.Tensor, rows: int = 1024) -> list[float]:
    """[max abs error, norm-relative error], in float32 over row chunks (logits can be GBs)."""
    got, want = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    max_abs, diff_sq, ref_sq = 0.0, 0.0, 0.0
    for lo in range(0, got.shape[0], rows):
        g, w = got[lo : lo + rows].float(), want[lo : lo + rows].float()
        max_abs = max(max_abs, float((g - w).abs().max()))
        diff_sq += float((g - w).square().sum())
        ref_sq += float(w.square().sum())
    return [max_abs, (diff_sq / max(ref_sq, 1e-30)) ** 0.5]


def _machine_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace(" ", "")
    for tag in ("h200", "h100", "b200", "a100", "l40s", "gh200"):
        if tag in name:
            return tag
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def _provenance(device: torch.device) -> dict:
    from flashoverlap.cli import nccl_version

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, nccl=nccl_version() if device.type == "cuda" else None,
        triton=triton_version, date=datetime.date.today().isoformat(),
        p2p=os.environ.get("NCCL_P2P_DISABLE", "0") != "1",
    )


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="8b")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=None, help="prompt length (default 4096; tiny: 64)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--model", choices=["auto", "hf", "builtin"], default="auto",
                   help="auto: transformers' LlamaForCausalLM if installed, else the built-in one")
    p.add_argument("--engine", choices=fo.ENGINES, default=None, help="flashoverlap engine (default: best)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10, help="timed calls per variant (>= 5)")
    p.add_argument("--out", nargs="?", const="", default=None, metavar="DIR",
                   help="append JSON rows to DIR/e2e.json (no DIR: results/<date>-<machine>)")
    args = p.parse_args(argv)
    if args.iters < 5:
        p.error("--iters must be >= 5 (the median of at least 5 timed calls)")
    if args.seq is None:
        args.seq = 64 if args.preset == "tiny" else 4096
    return args


def main(argv=None) -> int:
    args = _parse_args(argv)
    rank, world = init_from_env()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = dict(PRESETS[args.preset], num_hidden_layers=args.layers)
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if cfg[key] % world:
            raise SystemExit(f"{key}={cfg[key]} of preset {args.preset} is not divisible by TP={world}")
    kind = args.model
    if kind == "auto":
        try:
            import transformers  # noqa: F401

            kind = "hf"
        except ImportError:
            kind = "builtin"

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    model, model_name = build_model(kind, cfg, args.seq, device, dtype)
    parallelize(model, mesh)
    torch.manual_seed(1)  # the same prompt on every rank
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq), device=device)

    def prefill(logits_to_keep: int = 1) -> torch.Tensor:
        return model(input_ids=ids, use_cache=False, logits_to_keep=logits_to_keep).logits

    timer = Timer(device)
    times: dict[str, list[float]] = {"torch": [], "flashoverlap": []}
    with torch.no_grad():
        logits_ref = prefill(0)
        patch = fo.patch_tensor_parallel(model, engine=args.engine)
        logits_fo = prefill(0)
        patch.undo()
        patched = len(patch)
        errs = _max_over_ranks(_logit_errors(logits_fo, logits_ref), device)
        del logits_ref, logits_fo  # free them before timing
        for i in range(args.warmup + args.iters):
            for variant in ("torch", "flashoverlap"):  # alternate: drift hits both alike
                patch = fo.patch_tensor_parallel(model, engine=args.engine) if variant == "flashoverlap" else None
                dist.barrier()
                ms = timer(prefill)
                if patch is not None:
                    patch.undo()
                if i >= args.warmup:
                    times[variant].append(ms)

    med = dict(zip(times, _max_over_ranks([statistics.median(v) for v in times.values()], device)))
    tokens = args.batch * args.seq
    tps = {k: tokens / (v / 1e3) for k, v in med.items()}
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    ok = errs[1] <= tol
    if rank == 0:
        from flashoverlap.ops import resolve_engine

        fo_engine = resolve_engine(args.engine, device, mesh.get_group())
        prov = _provenance(device)
        print(f"{model_name} preset={args.preset} layers={args.layers} TP={world} {prov['gpu']} "
              f"dtype={str(dtype)[6:]} tokens={args.batch}x{args.seq} flashoverlap engine={fo_engine}; "
              f"patched {patched} row-parallel linears")
        print(f"{'variant':<14}{'median ms':>12}{'tokens/s':>14}{'speedup':>10}")
        for variant in times:
            print(f"{variant:<14}{med[variant]:>12.3f}{tps[variant]:>14.0f}{tps[variant] / tps['torch']:>10.3f}")
        print(f"logits vs unpatched: max abs err {errs[0]:.3e}, rel err {errs[1]:.3e} (tol {tol:g})")
        if args.out is not None:
            folder = Path(args.out) if args.out else Path("results") / f"{prov['date']}-{_machine_tag(device)}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "e2e.json"
            rows = json.loads(path.read_text()) if path.exists() else []
            for variant in times:
                rows.append(dict(
                    bench="e2e", op="all_reduce", M=tokens, N=cfg["hidden_size"], K=cfg["intermediate_size"],
                    dtype=str(dtype)[6:], world_size=world, engine=variant, median_ms=med[variant],
                    tokens_per_s=tps[variant], speedup=tps[variant] / tps["torch"], model=model_name,
                    preset=args.preset, layers=args.layers, batch=args.batch, seq=args.seq,
                    max_abs_err=errs[0], rel_err=errs[1], flashoverlap_engine=fo_engine, **prov))
            path.write_text(json.dumps(rows, indent=1) + "\n")
            print(f"wrote {path}")
        print("RESULT: OK" if ok else "RESULT: MISMATCH")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
