"""Rank 1 skips one backward (and so its gradient all-reduce). Rank 0's backward must fail with
zeal.TimeoutError naming rank 1 instead of hanging."""
import os
import time

import torch

import zeal

torch.manual_seed(0)
model = torch.nn.Linear(8, 4)
engine, *_ = zeal.initialize(model=model, config={
    "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
    "comms_timeout_s": 3, "steps_per_print": 1000})
rank = engine.global_rank
for step in range(4):
    if rank == 1 and step == 2:
        time.sleep(6)
        print("RESULT rank 1 skipped", flush=True)
        os._exit(0)
    try:
        engine.backward(engine(torch.randn(2, 8)).sum())
        engine.step()
    except zeal.TimeoutError as e:
        print(f"RESULT rank {rank} step {step}: {e}", flush=True)
        time.sleep(1)
        os._exit(0)
print(f"RESULT rank {rank} finished-unexpectedly", flush=True)
