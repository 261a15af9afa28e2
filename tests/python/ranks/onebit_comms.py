"""Bytes per step through comms_logger: 1-bit Adam before and after its freeze step."""
import json

import torch

import common
import zeal


def main():
    config = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 1000,
              "optimizer": {"type": "OneBitAdam", "params": {"lr": 0.003, "freeze_step": 3}},
              "comms_logger": {"enabled": True, "prof_all": True}}
    model = common.make_model()
    engine, *_ = zeal.initialize(model=model, config=config)
    rank, world = engine.global_rank, engine.world_size
    before = engine.comms_log_summary(show=False)
    per_step = []
    for step in range(6):
        x, y = common.teacher_batch(step, 4 * world)
        rows = common.micro_slice(step, 0, rank, world, 4)
        engine.backward(common.loss_fn(engine(x[rows]), y[rows]))
        engine.step()
        after = engine.comms_log_summary(show=False)
        per_step.append({op: {k: after[op][k] - before.get(op, {}).get(k, 0) for k in ("calls", "bytes")}
                         for op in after})
        before = after
    if rank == 0:
        print("COMMS " + json.dumps({"steps": per_step, "flat_numel": engine._core.flat_numel,
                                     "params": sum(p.numel() for p in model.parameters())}), flush=True)
        engine.comms_log_summary(show=True)


if __name__ == "__main__":
    main()
