"""ZeRO-Infinity at scale on this machine: a model whose fp32 optimizer states (master weights +
Adam's two moments, 12 bytes per parameter) alone exceed the free RAM, trained for a few steps
with the optimizer state and the parameters swapped to files (offload_optimizer and offload_param
{device: nvme}), bf16, ZeRO stage 3, one rank. The same batch every step, so the loss must fall.

Reports the parameter count, the optimizer state size against free RAM, the swap sizes, the peak
RSS (ru_maxrss) and the time of each step; prints a table and writes JSON.

    python3 benchmarks/offload_scale.py --width 4096 --layers 11 --steps 4 --nvme_path /work/nvme-scale
"""
import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples" / "python"))


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def gib(b):
    return b / 2**30


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=11)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-5)  # Adam's first steps move every weight by ~lr: small for width 4096
    ap.add_argument("--sub_group", type=int, default=25_000_000)
    ap.add_argument("--nvme_path", default="/work/nvme-scale")
    ap.add_argument("--out", default="out/bench/offload_scale.json")
    args = ap.parse_args()

    import torch

    import zeal
    from gpt import GPT
    from harness import print_table, write_json

    free_at_start = mem_available()
    Path(args.nvme_path).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vocab = 96
    print(f"building the model in bf16 (width {args.width}, {args.layers} layers) ...", flush=True)
    torch.set_default_dtype(torch.bfloat16)
    model = GPT(vocab, block=args.seq, width=args.width, layers=args.layers, heads=args.heads)
    torch.set_default_dtype(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    states = 12 * n_params
    print(f"{n_params / 1e9:.2f}B parameters; fp32 optimizer states {gib(states):.1f} GiB, free RAM at start "
          f"{gib(free_at_start):.1f} GiB", flush=True)
    config = {"train_micro_batch_size_per_gpu": args.batch, "steps_per_print": 1, "wall_clock_breakdown": True,
              "bf16": {"enabled": True},
              "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.0}},
              "zero_optimization": {
                  "stage": 3, "sub_group_size": args.sub_group, "stage3_param_persistence_threshold": 100_000,
                  "offload_optimizer": {"device": "nvme", "nvme_path": args.nvme_path, "pipeline_read": True,
                                        "pipeline_write": True},
                  "offload_param": {"device": "nvme", "nvme_path": args.nvme_path}},
              "aio": {"block_size": 1048576, "queue_depth": 16, "thread_count": 2}}
    start = time.perf_counter()
    print("zeal.initialize: writing the swap files ...", flush=True)
    engine, *_ = zeal.initialize(model=model, config=config)
    init_s = time.perf_counter() - start
    core = engine._core
    swap_dirs = [d for d in Path(args.nvme_path).iterdir() if d.name.startswith("zeal-swap-")]
    swap_bytes = sum(f.stat().st_size for d in swap_dirs for f in d.iterdir())
    print(f"initialized in {init_s:.0f} s; {gib(swap_bytes):.1f} GiB of swap files", flush=True)

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    y = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    losses, times = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        print(f"step {step + 1}/{args.steps}: loss {losses[-1]:.4f}, {times[-1]:.1f} s, peak RSS "
              f"{gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024):.1f} GiB", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = dict(core.state_bytes)
    rows = [[f"{n_params / 1e9:.2f}B", f"{gib(states):.1f}", f"{gib(free_at_start):.1f}", f"{gib(swap_bytes):.1f}",
             f"{gib(peak):.1f}", f"{init_s:.0f}", " ".join(f"{t:.1f}" for t in times),
             " ".join(f"{v:.3f}" for v in losses)]]
    print_table("ZeRO-Infinity on this machine: bf16 GPT, stage 3, optimizer and parameters on NVMe swap, 1 rank",
                ["params", "fp32 opt states GiB", "free RAM GiB", "swap GiB", "peak RSS GiB", "init s",
                 "step s", "loss"], rows)
    write_json(args.out, {"benchmark": "offload_scale", "params": n_params, "optimizer_state_bytes": states,
                          "free_ram_at_start": free_at_start, "swap_bytes": swap_bytes, "peak_rss": peak,
                          "init_s": init_s, "step_s": times, "losses": losses, "state_bytes_held": held,
                          "config": config, "width": args.width, "layers": args.layers, "seq": args.seq,
                          "batch": args.batch})
    assert losses[-1] < losses[0], "the loss did not fall"


if __name__ == "__main__":
    main()
