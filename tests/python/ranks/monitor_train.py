"""DeepSpeed's monitors on real ranks: tensorboard + csv_monitor (+ wall_clock_breakdown, with a
WarmupLR so the lr moves), GAS 2. Rank 0 records, per step, what the events must say: the mean
of the losses it passed to backward, its lr after the step, global_samples; the test reads the
event file and the CSV files back against it. argv: OUT_DIR PRECISION(fp32|fp16)"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import zeal  # noqa: E402

MICRO, GAS, STEPS = 2, 2, 5


def main():
    out, precision = Path(sys.argv[1]), sys.argv[2]
    config = {
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS, "wall_clock_breakdown": True,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01,
                                                     "warmup_num_steps": 4, "warmup_type": "linear"}},
        "tensorboard": {"enabled": True, "output_path": str(out / "tb"), "job_name": "run1"},
        "csv_monitor": {"enabled": True, "output_path": str(out / "csv"), "job_name": "run1"},
        "zero_optimization": {"stage": 1},
    }
    if os.environ.get("WANDB_MODE") == "offline":  # the test asks for wandb when the package is there
        config["wandb"] = {"enabled": True, "project": "zeal-monitor-test", "group": "g1"}
    if precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 8}
    model = common.make_model()
    engine, _, _, _ = zeal.initialize(model=model, model_parameters=model.parameters(), config=config)
    world, rank = engine.dp_world_size, engine.global_rank
    expect = []
    for step in range(STEPS):
        x, y = common.global_batch(step, MICRO * GAS * world)
        losses = []
        for m in range(GAS):
            rows = common.micro_slice(step, m, rank, world, MICRO)
            xb = x[rows].half() if precision == "fp16" else x[rows]
            loss = common.loss_fn(engine(xb), y[rows])
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        expect.append({"step": engine.global_samples, "train_loss": sum(losses) / len(losses),
                       "lr": engine.get_lr()[0], "loss_scale": engine.optimizer.loss_scale})
    if rank == 0:
        (out / "expect.json").write_text(json.dumps(expect))
    engine.destroy()


if __name__ == "__main__":
    main()
