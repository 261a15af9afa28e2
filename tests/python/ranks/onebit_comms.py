"""Bytes per step through comms_logger: a compressed optimizer before and after its freeze step."""
import json
import sys

import torch

import common
import zeal


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "OneBitAdam"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    params = {"lr": 0.003, "freeze_step": 3}
    if name == "ZeroOneAdam":  # variance steps 1, 2, 4; local steps from 5, synchronised at 5, 6, 8, 12, 16
        params = {"lr": 0.003, "var_freeze_step": 4, "var_update_scaler": 2, "local_step_scaler": 2,
                  "local_step_clipper": 4}
    config = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 1000,
              "optimizer": {"type": name, "params": params},
              "comms_logger": {"enabled": True, "prof_all": True}}
    model = common.make_model()
    engine, *_ = zeal.initialize(model=model, config=config)
    rank, world = engine.global_rank, engine.world_size
    before = engine.comms_log_summary(show=False)
    per_step = []
    skipped = []
    for step in range(steps):
        x, y = common.teacher_batch(step, 4 * world)
        rows = common.micro_slice(step, 0, rank, world, 4)
        engine.backward(common.loss_fn(engine(x[rows]), y[rows]))
        engine.step()
        after = engine.comms_log_summary(show=False)
        per_step.append({op: {k: after[op][k] - before.get(op, {}).get(k, 0) for k in ("calls", "bytes")}
                         for op in after})
        before = after
        skipped.append(engine.skipped_comm_rounds)
    if rank == 0:
        print("COMMS " + json.dumps({"steps": per_step, "flat_numel": engine._core.flat_numel, "skipped": skipped,
                                     "params": sum(p.numel() for p in model.parameters())}), flush=True)
        engine.comms_log_summary(show=True)


if __name__ == "__main__":
    main()
