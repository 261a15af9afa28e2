"""fp16 training on 2 ranks with overflows injected on rank 1 only (--inject_rank): both ranks must skip the same
steps (the all-reduce spreads the inf), leave the weights untouched on a skipped step, and follow
DeepSpeed's loss-scale trajectory. Rank 0 writes the trajectory to OUT as JSON."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import zeal  # noqa: E402

OVERFLOW_STEPS = {3, 4, 5, 9}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--inject_rank", type=int, default=1, help="the rank whose loss becomes inf on the overflow steps")
    ap.add_argument("--device", default="cpu", help="cuda: the model on this rank's GPU (the CUDA unscale and check)")
    args = ap.parse_args()
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
        "fp16": {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 3, "hysteresis": 2,
                 "min_loss_scale": 1},
        "steps_per_print": 1000,
        "comms_timeout_s": 60,
        "zero_optimization": {"stage": args.stage, "reduce_bucket_size": 200},
    }
    model = common.make_model().to(args.device)
    engine, optimizer, _, _ = zeal.initialize(model=model, config=config)
    rank = engine.global_rank
    trajectory = []
    for step in range(12):
        x, y = common.global_batch(step, 8)
        rows = common.micro_slice(step, 0, rank, engine.world_size, 4)
        loss = common.loss_fn(engine(x[rows].to(args.device).half()), y[rows].to(args.device))
        if rank == args.inject_rank and step in OVERFLOW_STEPS:
            loss = loss * float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        engine.backward(loss)
        engine.step()
        changed = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        trajectory.append({"step": step, "scale": engine.loss_scale, "skipped": engine.skipped_steps,
                           "changed": changed})
    assert optimizer.loss_scale == engine.loss_scale
    if rank == 0:
        Path(args.out).write_text(json.dumps(trajectory))


if __name__ == "__main__":
    main()
