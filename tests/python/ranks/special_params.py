"""Frozen, tied, never-used parameters and ranks taking different branches in the same step.
Rank r runs branch r % 2 on its slice of each global batch; rank 0 saves the final parameters."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import zeal  # noqa: E402


class Special(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.unused = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight  # tied input and output embedding

    def forward(self, idx, branch):
        h = self.frozen(self.emb(idx).mean(1))
        h = torch.tanh(self.a(h) if branch == 0 else self.b(h))
        return self.head(h)


def make_model():
    torch.manual_seed(0)
    return Special()


def batch(step, size):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 10, (size, 5), generator=g), torch.randint(0, 10, (size,), generator=g)


def reference(steps, world, micro, lr=0.1):
    model = make_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    for step in range(steps):
        x, y = batch(step, world * micro)
        opt.zero_grad()
        loss = sum(torch.nn.functional.cross_entropy(model(x[r * micro:(r + 1) * micro], r % 2),
                                                     y[r * micro:(r + 1) * micro]) for r in range(world)) / world
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--persist", type=int, default=100000, help="stage3_param_persistence_threshold")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    micro = 3
    model = make_model()
    engine, *_ = zeal.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": micro, "steps_per_print": 1000, "comms_timeout_s": 30,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
        "zero_optimization": {"stage": args.stage, "reduce_bucket_size": 40,
                              "stage3_param_persistence_threshold": args.persist}})
    rank, world = engine.global_rank, engine.world_size
    for step in range(args.steps):
        x, y = batch(step, world * micro)
        rows = slice(rank * micro, (rank + 1) * micro)
        loss = torch.nn.functional.cross_entropy(engine(x[rows], rank % 2), y[rows])
        engine.backward(loss)
        engine.step()
    common.save_gathered(model, rank, args.out)


if __name__ == "__main__":
    main()
