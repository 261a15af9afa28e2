"""The demo: a small GPT trained data parallel with Zeal (with --tensor T, tensor parallel over
groups of T ranks and data parallel across them).

    zeal --num_procs 2 examples/python/train_gpt.py --config configs/gpt_dp.json --out out/demo
    zeal --num_procs 4 examples/python/train_gpt.py --config configs/gpt_dp.json --tensor 2

Rank 0 prints a line per step (loss, tokens/s), and at the end writes OUT/loss.csv and
OUT/loss.png (the loss curve) and a sample of generated text.
"""
import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt import GPT, CharDataset, TensorParallelGPT, corpus_text  # noqa: E402

import zeal  # noqa: E402
import zeal.mesh  # noqa: E402


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], lw=1, alpha=0.5, label="loss (rank 0 micro batch)")
    window = 10
    smooth = [sum(r["loss"] for r in rows[max(0, i - window + 1): i + 1]) / min(window, i + 1) for i in range(len(rows))]
    ax.plot(steps, smooth, lw=2, label=f"moving average ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title("Zeal demo: char-level GPT, data parallel")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@torch.no_grad()
def sample(model, dataset, prompt="The ", length=200):
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(1)  # the same text on every rank
    idx = torch.tensor([[dataset.stoi.get(c, 0) for c in prompt]], device=device)
    for _ in range(length):
        logits = model(idx[:, -dataset.block:])[:, -1, :len(dataset.chars)].float()  # without vocab padding
        nxt = torch.multinomial(torch.softmax(logits / 0.8, dim=-1), 1)
        idx = torch.cat([idx, nxt], dim=1)
    model.train()
    return "".join(dataset.chars[i] for i in idx[0].tolist())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/gpt_dp.json")
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's schedule)")
    ap.add_argument("--save_dir", default=None,
                    help="checkpoint here every --save_every steps and at the end; resume from it if it has one")
    ap.add_argument("--save_every", type=int, default=100)
    ap.add_argument("--tensor", type=int, default=1,
                    help="tensor-parallel size: the model cut over groups of this many ranks (TensorParallelGPT)")
    ap.add_argument("--moe", type=int, default=0, help="experts per MoE layer (every block's MLP becomes one; top-2)")
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel size (ranks the experts are spread over)")
    ap.add_argument("--seq_parallel", type=int, default=1,
                    help="Ulysses degree: each sequence split over this many ranks (docs/long_sequences.md)")
    ap.add_argument("--block", type=int, default=128, help="sequence length (a long-context run: --block 2048)")
    ap.add_argument("--seed", type=int, default=0, help="the model's initialization")
    ap.add_argument("--local_rank", type=int, default=-1, help="passed by the zeal / deepspeed launchers")
    args = ap.parse_args()

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", "1"))))
    torch.manual_seed(args.seed)
    config = json.loads(Path(args.config).read_text())
    steps = args.steps or config.get("scheduler", {}).get("params", {}).get("total_num_steps", 200)
    block = args.block
    dataset = CharDataset(corpus_text(), block)
    # One GPU per rank when GPUs are present (LOCAL_RANK picks it); the CPU otherwise.
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    groups = {}
    if args.tensor > 1:  # the vocabulary padded to a multiple of the tensor size, as Megatron-LM does
        from zeal import tensor_parallel as tp

        tp_group, dp_group, _ = tp.make_groups(args.tensor)
        vocab = -(-len(dataset.chars) // args.tensor) * args.tensor
        model = TensorParallelGPT(GPT(vocab, block=block), tp_group).to(device)
        groups = {"data_parallel_group": dp_group}
    elif args.seq_parallel > 1:  # the mesh's sequence axis; the engine trains on it
        seq_group = zeal.mesh.build(sequence=args.seq_parallel).group("sequence")
        model = GPT(len(dataset.chars), block=block, seq_group=seq_group).to(device)
    else:
        model = GPT(len(dataset.chars), block=block, moe=args.moe, ep=args.ep).to(device)
    shard = _sequence_shard(args.seq_parallel)
    params = model.parameters()
    if args.moe:  # DeepSpeed's MoE recipe: the experts in parameter groups of their own
        from zeal.moe.utils import split_params_into_different_moe_groups_for_optimizer

        params = split_params_into_different_moe_groups_for_optimizer({"params": list(params), "name": "dense"})
    engine, _, loader, _ = zeal.initialize(model=model, model_parameters=params, training_data=dataset, config=config,
                                           **groups)
    rank = engine.global_rank
    tokens_per_step = engine.train_batch_size() * block
    epoch = 0
    if args.save_dir:
        path, client = engine.load_checkpoint(args.save_dir)
        if path is not None:
            epoch = client.get("epoch", 0)
            if rank == 0:
                print(f"demo: resumed from {path} at step {engine.global_steps}", flush=True)
    if rank == 0:
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: partitioned
        layout = f"tensor {args.tensor} x data {engine.dp_world_size}" if args.tensor > 1 else "data parallel"
        if args.moe:
            layout += f"; MoE: {args.moe} experts per layer, top-2, expert-parallel {args.ep}"
        if args.seq_parallel > 1:
            layout = (f"sequence parallel {args.seq_parallel} x data {engine.world_size // args.seq_parallel}: "
                      f"{block // args.seq_parallel} of each {block}-token sequence per rank")
        print(f"demo: {n_params / 1e6:.2f}M parameters per rank on {device}, {len(dataset.data) / 1e3:.0f}K characters, "
              f"vocab {len(dataset.chars)}, {engine.world_size} ranks ({layout}), global batch {engine.train_batch_size()} x {block} tokens, {steps} steps, "
              f"ZeRO stage {config.get('zero_optimization', {}).get('stage', 0)}", flush=True)
    # The model's FLOPs: one micro-batch forward under the FLOPs profiler (every rank runs it: at
    # ZeRO-3 the forward gathers), training ~ 3x forward (backward is twice the forward's work).
    from zeal.profiling.flops_profiler import FlopsProfiler

    x0, y0 = next(iter(loader))
    profiler = FlopsProfiler(engine.module)
    profiler.start_profile()
    with torch.no_grad():
        engine(shard(x0).to(device), shard(y0).to(device))
    profiler.stop_profile()
    flops_per_step = 3 * profiler.get_total_flops() * engine.gradient_accumulation_steps()  # per rank
    profiler.end_profile()
    peak = _peak_flops(device, config)
    if rank == 0:
        print(f"demo: {flops_per_step / engine.gradient_accumulation_steps() / 3 / 1e9:.3f} GFLOPs per micro-batch "
              f"forward (FLOPs profiler), {flops_per_step / 1e9:.2f} GFLOPs per step per rank", flush=True)
    rows, step = [], engine.global_steps
    start = last = time.perf_counter()
    while step < steps:
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            loss = engine(shard(x).to(device), shard(y).to(device))
            engine.backward(loss)
            engine.step()
            if engine.micro_steps % engine.gradient_accumulation_steps() != 0:
                continue
            step = engine.global_steps
            now = time.perf_counter()
            rate = tokens_per_step / (now - last)
            tflops = flops_per_step / (now - last) / 1e12
            last = now
            rows.append({"step": step, "loss": loss.item(), "lr": engine.get_lr()[0], "tokens_per_s": rate,
                         "tflops_per_rank": tflops})
            if rank == 0:
                bar = "#" * int(30 * step / steps)
                mfu = f" | MFU {100 * tflops * 1e12 / peak:.1f}%" if peak and tflops else ""
                print(f"step {step:4d}/{steps} [{bar:<30}] loss {loss.item():.4f} | lr {engine.get_lr()[0]:.2e} | "
                      f"{rate:,.0f} tokens/s | {tflops:.3f} TFLOPS/rank{mfu}", flush=True)
                stats = model.moe_stats() if hasattr(model, "moe_stats") else None
                if stats:
                    rows[-1]["l_aux"] = stats[0]
                    print(f"          moe: l_aux {stats[0]:.4f} | tokens per expert (rank 0, all layers) {stats[1]}",
                          flush=True)
            if args.save_dir and (step % args.save_every == 0 or step >= steps):
                engine.save_checkpoint(args.save_dir, client_state={"epoch": epoch})
            if step >= steps:
                break
        epoch += 1
    elapsed = time.perf_counter() - start
    if not rows:
        if rank == 0:
            print(f"demo: nothing to do, the checkpoint is already at step {engine.global_steps}", flush=True)
        return
    # Every rank samples: at ZeRO stage 3 a forward gathers parameters with collectives. (Not with
    # the sequence split: sampling grows one sequence a token at a time.)
    text = sample(engine, dataset) if args.seq_parallel == 1 else "(no sample with --seq_parallel)"
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "loss.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        plot(rows, out / "loss.png")
        first = sum(r["loss"] for r in rows[:10]) / min(10, len(rows))
        final = sum(r["loss"] for r in rows[-10:]) / min(10, len(rows))
        (out / "sample.txt").write_text(text)
        print(f"demo: loss {first:.3f} -> {final:.3f} (mean of first and last 10 steps) in {elapsed:.0f}s, "
              f"{len(rows) * tokens_per_step / elapsed:,.0f} tokens/s overall", flush=True)
        step_bytes = engine.comms_step_bytes()
        if step_bytes:  # comms_logger on: what the last step sent on this rank's node and off it
            print(f"demo: rank 0's last step sent {step_bytes['intra_node']:,} bytes to its node and "
                  f"{step_bytes['inter_node']:,} to other nodes", flush=True)
        print(f"demo: wrote {out / 'loss.csv'}, {out / 'loss.png'}, {out / 'sample.txt'}", flush=True)
        print("demo: sample: " + text.replace("\n", " ")[:160], flush=True)


def _sequence_shard(degree):
    """Cuts a [batch, block] tensor to this rank's contiguous 1/degree of each sequence (its rank in
    the mesh's sequence group: consecutive ranks)."""
    if degree == 1:
        return lambda t: t
    r = zeal.world().rank % degree

    def cut(t):
        n = t.shape[1] // degree
        return t[:, r * n:(r + 1) * n]
    return cut


def _peak_flops(device, config):
    """Dense bf16/fp16 tensor-core peak of the GPU, for MFU; None on the CPU or an unknown GPU."""
    if not str(device).startswith("cuda") or not (config.get("bf16", {}).get("enabled") or
                                                  config.get("fp16", {}).get("enabled")):
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12)):
        if key in name:
            return peak
    return None


if __name__ == "__main__":
    main()
