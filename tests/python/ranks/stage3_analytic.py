"""ZeRO-3 on a model whose gradients are known in closed form, checked exactly, per partition.

Two bias-free linear layers with constant weights (W1 = 0.5, W2 = 0.25), loss = sum of the outputs,
and rank r feeding x = (r + 1) everywhere (2 rows). Per rank: h = x W1^T has every entry
0.5 * 5 * (r + 1); dL/dW2[j, k] = sum over rows of h = 5 (r + 1); dL/dW1[k, i] = rows * 3 * 0.25 * (r + 1).
The engine averages over N ranks, so (r + 1) becomes (N + 1) / 2. All values are exact in fp32.
After backward every rank's gradient shard must hold exactly those values at the positions its
fragment table names; after an SGD step (lr 0.5) its parameter shard must hold W - 0.5 * grad."""
import sys

import torch

import zeal


def main():
    world = zeal.world()
    n, rank = world.size, world.rank
    model = torch.nn.Sequential(torch.nn.Linear(5, 7, bias=False), torch.nn.Linear(7, 3, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[1].weight.fill_(0.25)
    engine, *_ = zeal.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 2, "steps_per_print": 1000,
        "optimizer": {"type": "SGD", "params": {"lr": 0.5}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    core = engine._core
    assert all(p.numel() == 0 for p in model.parameters()), "parameters were not partitioned"
    x = torch.full((2, 5), float(rank + 1))
    engine.backward(engine(x).sum())
    assert all(p.numel() == 0 for p in model.parameters()), "backward left a parameter gathered"
    mean = (n + 1) / 2
    want_grad = {0: torch.full((7, 5), 2 * 3 * 0.25 * mean).reshape(-1),   # W1
                 1: torch.full((3, 7), 2 * 0.5 * 5 * mean).reshape(-1)}    # W2
    start = {0: 0.5, 1: 0.25}
    index = {id(p): i for i, p in enumerate(core.parameters)}
    which = {index[id(model[0].weight)]: 0, index[id(model[1].weight)]: 1}
    grad_shard = core.grad_shard.clone()
    covered = 0
    for param, begin, end, local in core.fragments:
        got = grad_shard[local:local + end - begin]
        want = want_grad[which[param]][begin:end]
        assert torch.equal(got, want), (rank, param, got, want)
        covered += end - begin
    engine.step()
    shard = core.param_shard
    for param, begin, end, local in core.fragments:
        want = start[which[param]] - 0.5 * want_grad[which[param]][begin:end]
        assert torch.equal(shard[local:local + end - begin], want), (rank, param)
    # The partitions tile the model exactly once across ranks.
    total = torch.tensor([float(covered)])
    world.all_reduce(total).wait()
    assert total.item() == 35 + 21, total
    print(f"rank {rank}: STAGE3-ANALYTIC-OK", flush=True)


if __name__ == "__main__":
    sys.exit(main())
