"""Long sequences on one GPU: the longest sequence a ~1.1B-parameter Llama-shaped model trains on
(TinyLlama's shape: hidden 2048, 22 layers, 32 heads, 4 key/value heads, MLP 5632, vocab 32000;
bf16 weights, Zeal's engine with AdamW), doubling the sequence from 4096 until the device runs out
of memory, for ALST's memory savers one by one:

    plain        every activation kept
    ckpt         activation checkpointing per layer (torch's non-reentrant checkpoint)
    ckpt+offload the same, each layer's checkpointed input kept in pinned host memory
                 (torch.autograd.graph.save_on_cpu: what transformers' offload=True does)
    +tiled       and the MLPs as zeal's TiledMLP, the logits and loss as TiledFusedLogitsLoss
                 (tiles of 4096 positions): neither the MLP intermediate nor the logits is whole

Each trial runs in its own process (an out-of-memory error leaves the allocator fragmented); the
table gives the longest sequence that trained, its step time, tokens/s and peak device memory. Each
variant saves more memory than the one before, so its search starts at the previous variant's
longest. A trial times its second step, unless its first took over --slow_s (then that one); with
--budget_s no trial starts after that many seconds, and a variant cut short says so ("budget").
The JSON is rewritten after every trial, so a run stopped from outside keeps what it measured.

    python3 benchmarks/long_seq_gpu.py --out out/bench/long_seq_gpu.json
    python3 benchmarks/long_seq_gpu.py --device cpu --small     # a smoke run without a GPU
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import print_table, write_json  # noqa: E402

BIG = dict(hidden=2048, layers=22, heads=32, kv_heads=4, ffn=5632, vocab=32000)
SMALL = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=256)
VARIANTS = ["plain", "ckpt", "ckpt+offload", "ckpt+offload+tiled"]
TILE = 4096


def build(shape, tiled):
    import torch
    import torch.nn.functional as F
    from torch import nn

    h, heads, kv, d = shape["hidden"], shape["heads"], shape["kv_heads"], shape["hidden"] // shape["heads"]

    def rope(x, pos):  # x [b, s, heads, d]
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
        ang = pos[:, None].float() * inv[None]
        cos, sin = ang.cos()[None, :, None].to(x.dtype), ang.sin()[None, :, None].to(x.dtype)
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up = nn.Linear(h, shape["ffn"], bias=False), nn.Linear(h, shape["ffn"], bias=False)
            self.down = nn.Linear(shape["ffn"], h, bias=False)

        def forward(self, x):
            if tiled:
                from zeal.sequence.ulysses_sp import TiledMLP

                return TiledMLP.apply(lambda m, t: m.down(F.silu(m.gate(t)) * m.up(t)), self, x,
                                      max(1, math.ceil(x.shape[-2] / TILE)), None)
            return self.down(F.silu(self.gate(x)) * self.up(x))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2 = nn.RMSNorm(h), nn.RMSNorm(h)
            self.q, self.k = nn.Linear(h, h, bias=False), nn.Linear(h, kv * d, bias=False)
            self.v, self.o = nn.Linear(h, kv * d, bias=False), nn.Linear(h, h, bias=False)
            self.mlp = MLP()

        def forward(self, x, pos):
            b, s, _ = x.shape
            y = self.n1(x)
            q = rope(self.q(y).view(b, s, heads, d), pos).transpose(1, 2)
            k = rope(self.k(y).view(b, s, kv, d), pos).transpose(1, 2)
            v = self.v(y).view(b, s, kv, d).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, s, h))
            return x + self.mlp(self.n2(x))

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(shape["vocab"], h)
            self.layers = nn.ModuleList([Layer() for _ in range(shape["layers"])])
            self.norm, self.head = nn.RMSNorm(h), nn.Linear(h, shape["vocab"], bias=False)
            self.checkpoint = self.offload = False

        def forward(self, tokens, labels):
            import torch.utils.checkpoint as cp

            pos = torch.arange(tokens.shape[1], device=tokens.device)
            x = self.embed(tokens)
            for layer in self.layers:
                if self.checkpoint:
                    ctx = torch.autograd.graph.save_on_cpu(pin_memory=x.is_cuda) if self.offload else _null()
                    with ctx:
                        x = cp.checkpoint(layer, x, pos, use_reentrant=False)
                else:
                    x = layer(x, pos)
            x = self.norm(x)
            if tiled:
                from zeal.sequence.ulysses_sp import TiledFusedLogitsLoss

                def ce(head, t, y):
                    return F.cross_entropy(head(t).float(), y, reduction="sum")

                total = TiledFusedLogitsLoss.apply(ce, self.head, x, labels, None,
                                                   max(1, math.ceil(x.shape[1] / TILE)), None, "sum")
                return total / labels.numel()
            return F.cross_entropy(self.head(x).float().view(-1, shape["vocab"]), labels.view(-1))

    return Llama()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def trial(variant, seq, device, small, slow_s):
    import torch

    import zeal

    shape = SMALL if small else BIG
    torch.manual_seed(0)
    with torch.device(device):  # built in place: a 1.1B model initialised on the host takes a while
        model = build(shape, "tiled" in variant)
    model.checkpoint = "ckpt" in variant
    model.offload = "offload" in variant
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model.to(device=device, dtype=dtype)
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "bf16": {"enabled": device == "cuda"}}
    engine, *_ = zeal.initialize(model=model, config=cfg)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, shape["vocab"], (1, seq + 1), generator=g).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    times = []
    try:
        for _ in range(2):  # the first step warms up; a slow one is timed alone
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if times[0] > slow_s:
                break
    except torch.OutOfMemoryError:
        return {"ok": False}
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return {"ok": True, "step_s": times[-1], "steps_timed": len(times), "peak_gib": peak / 2**30, "loss": loss.item()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--start", type=int, default=4096)
    ap.add_argument("--max_seq", type=int, default=1 << 20)
    ap.add_argument("--budget_s", type=float, default=float("inf"), help="start no trial after this many seconds")
    ap.add_argument("--grace_s", type=float, default=60.0, help="a trial may run this long past the budget")
    ap.add_argument("--slow_s", type=float, default=10.0, help="a first step slower than this is the one timed")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="out/bench/long_seq_gpu.json")
    ap.add_argument("--trial")
    ap.add_argument("--seq", type=int)
    args = ap.parse_args()
    if args.trial:
        print("RESULT " + json.dumps(trial(args.trial, args.seq, args.device, args.small, args.slow_s)), flush=True)
        return
    import torch

    shape = SMALL if args.small else BIG
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    began = time.perf_counter()
    seq, longest, trials = (256 if args.small else args.start), {}, []
    for variant in args.variants.split(","):
        best, stop = None, "out of memory"
        while True:
            if seq > args.max_seq:
                stop = f"cap {args.max_seq}"
                break
            if time.perf_counter() - began > args.budget_s:
                stop = "budget"
                break
            print(f"long_seq_gpu: {variant} sequence {seq} ...", flush=True)
            cmd = [sys.executable, __file__, "--trial", variant, "--seq", str(seq), "--device", args.device,
                   "--slow_s", str(args.slow_s)]
            left = args.budget_s - (time.perf_counter() - began) + args.grace_s
            try:
                proc = subprocess.run(cmd + (["--small"] if args.small else []), capture_output=True, text=True,
                                      timeout=None if math.isinf(left) else left,
                                      env={**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
            except subprocess.TimeoutExpired:  # too slow to finish inside the budget: not a measurement
                print(f"long_seq_gpu: {variant} sequence {seq}: stopped after {left:.0f} s", flush=True)
                stop = f"time ({seq} not finished)"
                break
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:  # a crash other than a caught OOM: say so and stop this variant
                print(proc.stdout[-2000:] + proc.stderr[-4000:], flush=True)
                stop = "crashed"
                break
            result = json.loads(line[len("RESULT "):])
            trials.append({"variant": variant, "seq": seq, **result})
            print(f"long_seq_gpu: {variant} sequence {seq}: {result}", flush=True)
            write_json(args.out, {"benchmark": "long_seq_gpu", "device": name, "shape": shape, "trials": trials,
                                  "longest": longest})
            if not result["ok"]:
                break
            best, seq = (seq, result), seq * 2
        longest[variant] = {"stopped_by": stop, **({} if best is None else {"seq": best[0], **best[1]})}
        if best is not None:
            seq = best[0]  # the next variant saves more memory: it starts where this one ended
    rows = []
    for variant, r in longest.items():
        if "seq" in r:
            more = "" if r["stopped_by"] == "out of memory" else f" (>=, {r['stopped_by']})"
            rows.append([variant, f"{r['seq']}{more}", f"{r['peak_gib']:.1f}", f"{r['step_s']:.2f}",
                         f"{r['seq'] / r['step_s']:,.0f}"])
        else:
            rows.append([variant, f"none ({r['stopped_by']})", "-", "-", "-"])
    print_table(f"Longest sequence, one {name}, Llama-shaped {shape}, batch 1, Zeal engine + AdamW",
                ["variant", "longest seq", "peak GiB", "step s", "tokens/s"], rows)
    write_json(args.out, {"benchmark": "long_seq_gpu", "device": name, "shape": shape, "trials": trials,
                          "longest": longest})


if __name__ == "__main__":
    main()
