"""Prints, on rank 0, the bytes of training state the engine holds after one step at --stage
(bf16 + AdamW, a 1.1M-parameter model), as JSON."""
import argparse
import json

import torch

import zeal


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512))


def config(stage):
    return {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "steps_per_print": 1000,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 100_000,
                                  "stage3_param_persistence_threshold": 0}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True)
    args = ap.parse_args()
    model = make_model()
    engine, *_ = zeal.initialize(model=model, config=config(args.stage))
    x = torch.randn(2, 512, dtype=torch.bfloat16)
    engine.backward(engine(x).float().pow(2).mean())
    engine.step()
    if engine.global_rank == 0:
        print("MEMORY " + json.dumps(dict(engine._core.state_bytes)), flush=True)


if __name__ == "__main__":
    main()
