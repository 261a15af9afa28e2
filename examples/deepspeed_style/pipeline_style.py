"""A pipeline-parallel model trained the way DeepSpeed's pipeline_parallelism example trains one,
written only against DeepSpeed's public API. The one Zeal line is the import; run it with

    zeal --num_procs 2 examples/deepspeed_style/pipeline_style.py --deepspeed_config examples/deepspeed_style/ds_config.json --pipeline-parallel-size 2

The model is a stack of LayerSpecs cut into stages by parameter count; the second stage starts
with an in-place ReLU. The data is synthetic (a fixed random teacher), so nothing is downloaded.
"""
import argparse

import torch
import torch.nn as nn

import zeal as deepspeed  # the only Zeal-specific line: DeepSpeed's API from here on


def get_args():
    parser = argparse.ArgumentParser(description="pipeline-parallel regression")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    parser.add_argument("--steps", type=int, default=40, help="train_batch() calls")
    parser.add_argument("--pipeline-parallel-size", type=int, default=2, help="pipeline stages")
    parser.add_argument("--backend", type=str, default="mpi", help="distributed backend")
    parser.add_argument("--seed", type=int, default=1138, help="PRNG seed")
    parser.add_argument("--checkpoint_dir", default=None, help="save here after training, then load and check")
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


class Teacher(torch.utils.data.Dataset):
    def __init__(self, size=2048, width=16):
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(size, width, generator=g)
        w = torch.randn(width, 4, generator=torch.Generator().manual_seed(8)) / width ** 0.5
        self.y = torch.tanh(2.0 * self.x @ w)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def layers(width=16, hidden=64):
    return [
        deepspeed.pipe.LayerSpec(nn.Linear, width, hidden),
        deepspeed.pipe.LayerSpec(nn.Tanh),
        deepspeed.pipe.LayerSpec(nn.Linear, hidden, hidden),
        deepspeed.pipe.LayerSpec(nn.ReLU, inplace=True),  # first layer of stage 2 with two stages
        deepspeed.pipe.LayerSpec(nn.Linear, hidden, hidden),
        deepspeed.pipe.LayerSpec(nn.Tanh),
        deepspeed.pipe.LayerSpec(nn.Linear, hidden, 4),
    ]


def build(args):
    net = deepspeed.pipe.PipelineModule(layers=layers(), loss_fn=nn.MSELoss(), num_stages=args.pipeline_parallel_size,
                                        partition_method="parameters", activation_checkpoint_interval=0)
    engine, _, _, _ = deepspeed.initialize(args=args, model=net,
                                           model_parameters=[p for p in net.parameters() if p.requires_grad],
                                           training_data=Teacher())
    return engine


def main():
    args = get_args()
    deepspeed.init_distributed(dist_backend=args.backend)
    torch.manual_seed(args.seed)
    engine = build(args)
    grid = engine.grid
    rank = engine.global_rank
    if rank == 0:
        print(f"{grid.get_pipe_parallel_world_size()} stages x {grid.get_data_parallel_world_size()} data-parallel; "
              f"this rank: stage {grid.get_stage_id()}, data rank {grid.get_data_parallel_rank()}", flush=True)
    losses = []
    for step in range(args.steps):
        loss = engine.train_batch()
        losses.append(float(loss))
        if rank == 0 and (step + 1) % 10 == 0:
            print(f"step {step + 1}: loss {losses[-1]:.5f}", flush=True)
    if rank == 0:
        print(f"first loss {losses[0]:.5f}, last loss {losses[-1]:.5f}", flush=True)
    if args.checkpoint_dir:
        engine.save_checkpoint(args.checkpoint_dir)
        want = float(engine.eval_batch(iter(deepspeed.utils.RepeatingLoader(_eval_loader(engine)))))
        engine2 = build(args)
        engine2.load_checkpoint(args.checkpoint_dir)
        got = float(engine2.eval_batch(iter(deepspeed.utils.RepeatingLoader(_eval_loader(engine2)))))
        if rank == 0:
            print(f"loaded at step {engine2.global_steps}: eval loss {got:.6f} (before saving {want:.6f})", flush=True)


def _eval_loader(engine):
    """The same micro-batches on every data-parallel rank's first and last stage."""
    data = Teacher(size=256)
    return torch.utils.data.DataLoader(data, batch_size=engine.train_micro_batch_size_per_gpu())


if __name__ == "__main__":
    main()
