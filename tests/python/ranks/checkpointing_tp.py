"""Activation checkpointing with tensor parallelism on 2 real ranks (one tensor group of 2):
blocks of ColumnParallelLinear -> GELU -> dropout on the model-parallel RNG stream ->
RowParallelLinear, each checkpointed with partition_activations (and with cpu_checkpointing),
against the same blocks without checkpointing: bitwise-equal gradients. While the checkpoints
are alive each rank holds half of every kept input (padded), measured by saved_bytes(). The
tracked stream is seed + 2718 + tensor rank, the default stream alike on both ranks."""
import sys

import torch

import zeal
from zeal import checkpointing
from zeal.tensor_parallel import ColumnParallelLinear, RowParallelLinear, make_groups

HIDDEN, BLOCKS, ROWS = 16, 3, 5  # 5 x 16 = 80 elements per input: 40 per rank


def check(ok, message):
    if not ok:
        raise AssertionError(message)


class MPU:
    def __init__(self, group):
        self.group = group

    def get_tensor_model_parallel_group(self):
        return self.group

    def get_tensor_model_parallel_rank(self):
        return self.group.rank

    def get_tensor_model_parallel_world_size(self):
        return self.group.size


class Block(torch.nn.Module):
    def __init__(self, group):
        super().__init__()
        self.up = ColumnParallelLinear(HIDDEN, 4 * HIDDEN, gather_output=False, group=group)
        self.down = RowParallelLinear(4 * HIDDEN, HIDDEN, input_is_parallel=True, group=group)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.up(x))
        with checkpointing.get_cuda_rng_tracker().fork():
            h = torch.nn.functional.dropout(h, 0.3, training=True)
        return x + self.down(h)


def run(blocks, x, checkpointed):
    checkpointing.model_parallel_cuda_manual_seed(1234)
    h = x
    for b in blocks:
        h = checkpointing.checkpoint(b, h) if checkpointed else b(h)
    held = checkpointing.saved_bytes()
    h.square().sum().backward()
    grads = [p.grad.clone() for b in blocks for p in b.parameters()]
    for b in blocks:
        b.zero_grad(set_to_none=True)
    return grads, held


def main():
    tp, _, _ = make_groups(tensor=2)
    torch.manual_seed(0)
    blocks = [Block(tp) for _ in range(BLOCKS)]
    x = torch.randn(ROWS, HIDDEN)

    checkpointing.configure(MPU(tp), partition_activations=False)
    # the two streams: default alike on both ranks, the tracked one per tensor rank
    checkpointing.model_parallel_cuda_manual_seed(99)
    with checkpointing.get_cuda_rng_tracker().fork():
        tracked = torch.rand(4)
    default = torch.rand(4)
    check(torch.equal(tracked, torch.rand(4, generator=torch.Generator().manual_seed(99 + 2718 + tp.rank))),
          "the model-parallel stream is seed + 2718 + tensor rank")
    check(torch.equal(default, torch.rand(4, generator=torch.Generator().manual_seed(99))),
          "the default stream is the seed on every rank")

    want, _ = run(blocks, x, checkpointed=False)
    whole, held_whole = run(blocks, x, checkpointed=True)
    check(all(torch.equal(a, b) for a, b in zip(want, whole)), "checkpointed gradients differ")
    input_bytes = ROWS * HIDDEN * 4
    check(sum(held_whole.values()) == BLOCKS * input_bytes, f"kept inputs: {held_whole}")

    checkpointing.configure(MPU(tp), {"train_micro_batch_size_per_gpu": 1,
                                      "activation_checkpointing": {"partition_activations": True}})
    part, held_part = run(blocks, x, checkpointed=True)
    check(all(torch.equal(a, b) for a, b in zip(want, part)), "partitioned checkpoint gradients differ")
    check(sum(held_part.values()) == BLOCKS * input_bytes // 2, f"partitioned: {held_part} vs whole {held_whole}")

    checkpointing.configure(MPU(tp), partition_activations=True, checkpoint_in_cpu=True)
    cpu, held_cpu = run(blocks, x, checkpointed=True)
    check(all(torch.equal(a, b) for a, b in zip(want, cpu)), "cpu-checkpointed gradients differ")
    check(held_cpu["host"] == BLOCKS * input_bytes // 2, f"cpu checkpointing: {held_cpu}")
    check(checkpointing.saved_bytes() == {"device": 0, "host": 0}, "backward releases what checkpoints held")
    print(f"CHECKPOINTING OK rank {zeal.world().rank}")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
