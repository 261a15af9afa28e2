"""Activation memory of the demo GPT (examples/python/gpt.py) with and without DeepSpeed-style
activation checkpointing (zeal.checkpointing), one process: what a training step holds for
backward at the end of its forward, and the time of forward + backward.

    held by autograd   the tensors autograd saved for backward (unique storages, counted with
                       torch.autograd.graph.saved_tensors_hooks)
    held by checkpoints  zeal.checkpointing.saved_bytes(): the inputs the checkpoints keep
                       (on the host with cpu_checkpointing)

Partitioning over a tensor group (partition_activations) keeps 1/t of the checkpoints' part; the
suite measures it on 2 ranks (tests/python/ranks/checkpointing_tp.py).

    python benchmarks/activation_checkpointing.py --out out/bench/activation_checkpointing.json
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples" / "python"))

from gpt import GPT  # noqa: E402

from zeal import checkpointing  # noqa: E402


def forward(model, idx, targets, checkpointed):
    t = idx.shape[1]
    x = model.tok(idx) + model.pos(torch.arange(t, device=idx.device))
    for block in model.blocks:
        x = checkpointing.checkpoint(block, x) if checkpointed else block(x)
    logits = model.head(model.ln(x))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def measure(model, idx, targets, mode, repeats):
    checkpointing.configure(None, checkpoint_in_cpu=(mode == "checkpoint + cpu_checkpointing"))
    checkpointed = mode != "none"
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward(model, idx, targets, checkpointed)
    held_autograd, held_ckpt = sum(storages.values()), checkpointing.saved_bytes()
    loss.backward()
    model.zero_grad(set_to_none=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(model, idx, targets, checkpointed).backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return {"mode": mode, "held_by_autograd_mb": held_autograd / 2**20,
            "held_by_checkpoints_mb": (held_ckpt["device"] + held_ckpt["host"]) / 2**20,
            "of_which_host_mb": held_ckpt["host"] / 2**20 if mode.endswith("cpu_checkpointing") else 0.0,
            "fwd_bwd_ms": 1e3 * statistics.median(times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="out/bench/activation_checkpointing.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(vocab=96, block=args.block, width=args.width, layers=args.layers)
    idx = torch.randint(0, 96, (args.batch, args.block))
    targets = torch.randint(0, 96, (args.batch, args.block))
    rows = [measure(model, idx, targets, mode, args.repeats)
            for mode in ("none", "checkpoint every block", "checkpoint + cpu_checkpointing")]
    print(f"demo GPT: {args.layers} layers, width {args.width}, batch {args.batch} x {args.block} tokens, fp32, CPU")
    print(f"{'mode':<32}{'autograd (MB)':>15}{'checkpoints (MB)':>18}{'on host (MB)':>14}{'fwd+bwd (ms)':>14}")
    for r in rows:
        print(f"{r['mode']:<32}{r['held_by_autograd_mb']:>15.1f}{r['held_by_checkpoints_mb']:>18.1f}"
              f"{r['of_which_host_mb']:>14.1f}{r['fwd_bwd_ms']:>14.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
