"""zeal.zero.Init + GatheredParameters(modifier_rank=...) before and after initialize.

The model is built partitioned; inside GatheredParameters(modifier_rank=0) every rank writes into
the first weight, but only rank 0's values may survive (the others write garbage). After 3 SGD
steps, GatheredParameters(modifier_rank=1) sets the last bias to 0.5 on rank 1 (garbage on the
others), and 3 more steps follow. Rank 0 saves the final parameters; the test replays the same
edits in plain torch."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import zeal  # noqa: E402


def custom_weight(shape):
    return torch.linspace(-0.3, 0.3, shape[0] * shape[1]).reshape(shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--nvme_path", default="", help="offload optimizer and parameters to swap files here")
    args = ap.parse_args()
    config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 1000,
              "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    if args.nvme_path:  # the modifier's values must reach the swapped master weights and shard
        config["zero_optimization"].update(
            sub_group_size=400, offload_optimizer={"device": "nvme", "nvme_path": args.nvme_path},
            offload_param={"device": "nvme", "nvme_path": args.nvme_path})
    rank = zeal.world().rank
    with zeal.zero.Init(config_dict_or_path=config):
        model = common.make_model()
    first, last = model[0].weight, model[5].bias
    with zeal.zero.GatheredParameters(first, modifier_rank=0):
        with torch.no_grad():
            first.copy_(custom_weight(first.shape) if rank == 0 else torch.full(first.shape, 99.0))
    assert first.numel() == 0
    engine, *_ = zeal.initialize(model=model, config=config)
    world = engine.world_size
    for step in range(6):
        if step == 3:
            with zeal.zero.GatheredParameters([last], modifier_rank=1):
                with torch.no_grad():
                    last.fill_(0.5 if rank == 1 else -7.0)
        x, y = common.global_batch(step, 2 * world)
        rows = common.micro_slice(step, 0, rank, world, 2)
        engine.backward(common.loss_fn(engine(x[rows]), y[rows]))
        engine.step()
    common.save_gathered(model, rank, args.out)


if __name__ == "__main__":
    main()
