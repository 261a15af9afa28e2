"""One rank of a training run in which rank --faulty issues one collective wrong mid-training:
--fault skip (it silently drops the next collective the engine issues: the fault-injection hook),
size (it all-reduces 6 elements where the others all-reduce 8), or op (it broadcasts where the
others all-reduce). --mode picks the set-up: dp (ZeRO-2 data parallel), tp (tensor x data),
pipe (a 2-stage pipeline, x data at 4 ranks) or zinit (a model built under zeal.zero.Init, ZeRO-3).
Every rank must fail within two timeouts with the collective mismatch, naming the divergent rank and
both signatures; each prints one RESULT line and leaves without finalizing (the group is broken)."""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import zeal  # noqa: E402
from zeal import tensor_parallel as tp  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--mode", choices=["dp", "tp", "pipe", "zinit"], required=True)
ap.add_argument("--fault", choices=["skip", "size", "op"], required=True)
ap.add_argument("--faulty", type=int, default=1)
ap.add_argument("--timeout", type=float, default=5)
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--reraise", action="store_true", help="leave with the error (as a user's script would)")
ap.add_argument("--local_rank", type=int, default=0, help="passed by the zeal launcher, as by deepspeed")
args = ap.parse_args()

world = zeal.world()
rank = world.rank
config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 1000, "comms_timeout_s": args.timeout,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 2, "reduce_bucket_size": 40}}
torch.manual_seed(0)


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


group = world  # the group the size and op faults use
if args.mode == "dp":
    engine, *_ = zeal.initialize(model=mlp(), config=config)
elif args.mode == "zinit":
    config["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 40}
    with zeal.zero.Init(config_dict_or_path=config):
        model = mlp()
    engine, *_ = zeal.initialize(model=model, config=config)
elif args.mode == "tp":
    tp_group, dp_group, _ = tp.make_groups(2, world)
    group = tp_group

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = tp.ColumnParallelLinear(8, 16, gather_output=False, group=tp_group)
            self.down = tp.RowParallelLinear(16, 4, input_is_parallel=True, group=tp_group)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    config["zero_optimization"] = {"stage": 1, "reduce_bucket_size": 40}
    engine, *_ = zeal.initialize(model=Model(), config=config, data_parallel_group=dp_group)
else:
    from zeal.pipe import LayerSpec, PipelineModule

    module = PipelineModule([LayerSpec(torch.nn.Linear, 8, 16), LayerSpec(torch.nn.ReLU),
                             LayerSpec(torch.nn.Linear, 16, 4)], num_stages=2,
                            loss_fn=lambda out, y: torch.nn.functional.mse_loss(out, y))
    config["gradient_accumulation_steps"] = 2
    config["zero_optimization"] = {"stage": 1, "reduce_bucket_size": 40}
    engine, *_ = zeal.initialize(model=module, config=config)


def train_step(step):
    g = torch.Generator().manual_seed(step)
    if args.mode == "pipe":
        data = [(torch.randn(2, 8, generator=g), torch.randn(2, 4, generator=g)) for _ in range(2)]
        engine.train_batch(iter(data))
    else:
        x = torch.randn(2, 8, generator=g)
        engine.backward(engine(x).square().mean())
        engine.step()


start = None
try:
    for step in range(args.steps):
        if step == 2:
            start = time.monotonic()
            if args.fault == "skip" and rank == args.faulty:
                zeal._zeal.inject_dropped_collective("", 0)
            elif args.fault == "size":
                group.all_reduce(torch.ones(6 if rank == args.faulty else 8), "sum").wait()
            elif args.fault == "op":
                if rank == args.faulty:
                    group.broadcast(torch.ones(8), 0).wait()
                else:
                    group.all_reduce(torch.ones(8), "sum").wait()
        train_step(step)
    print(f"RESULT rank {rank} finished-unexpectedly", flush=True)
except zeal.CommError as e:
    waited = time.monotonic() - start if start else -1
    print(f"RESULT rank {rank} after {waited:.2f}s {type(e).__name__}: {e}", flush=True)
    if args.reraise:
        time.sleep(0.5)
        raise
sys.stdout.flush()
time.sleep(1.0)  # let every rank print before the first to leave makes mpirun stop the rest
os._exit(0)
