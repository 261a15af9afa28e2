"""DeepSpeed's activation checkpointing (zeal.checkpointing): gradients bitwise equal to the run
without checkpointing in fp32, dropout included (the RNG state is replayed); partitioned over a
tensor group of 2 real ranks each rank keeps half the inputs; CPU checkpointing keeps them in host
memory; the config section is read with DeepSpeed's precedence."""
import pytest
import torch

import zeal
from conftest import run_mpi
from zeal import checkpointing


class Block(torch.nn.Module):
    def __init__(self, width=24):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, x, scale=1.0, mask=None):
        h = torch.nn.functional.dropout(torch.nn.functional.gelu(self.fc1(self.norm(x))), 0.2, training=True)
        out = x + scale * self.fc2(h)
        return out if mask is None else out * mask


def grads_of(blocks, x, checkpointed, **kwargs):
    torch.manual_seed(5)
    h = x
    for b in blocks:
        h = checkpointing.checkpoint(b, h, **kwargs) if checkpointed else b(h, **kwargs)
    held = checkpointing.saved_bytes()
    h.pow(2).mean().backward()
    out = [p.grad.clone() for b in blocks for p in b.parameters()] + [x.grad.clone()]
    for b in blocks:
        b.zero_grad(set_to_none=True)
    x.grad = None
    return out, held


@pytest.mark.parametrize("cpu", [False, True])
def test_gradients_are_bitwise_those_without_checkpointing(cpu):
    torch.manual_seed(0)
    blocks = [Block() for _ in range(4)]
    x = torch.randn(6, 24, requires_grad=True)
    mask = (torch.rand(6, 24) > 0.1).float()
    checkpointing.configure(None, checkpoint_in_cpu=cpu)
    want, _ = grads_of(blocks, x, False, scale=0.5, mask=mask)
    got, held = grads_of(blocks, x, True, scale=0.5, mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    # four checkpoints each keep their input (and the mask, a floating kwarg) until backward
    assert sum(held.values()) == 4 * 2 * 6 * 24 * 4
    assert checkpointing.saved_bytes() == {"device": 0, "host": 0}


def test_non_tensor_outputs_and_single_outputs_come_back_as_deepspeed_returns_them():
    b = Block()
    x = torch.randn(3, 24, requires_grad=True)
    out = checkpointing.checkpoint(lambda t: (b(t), 7, t.sum()), x)
    assert isinstance(out, tuple) and out[1] == 7 and out[0].requires_grad
    (out[0].sum() + out[2]).backward()
    assert x.grad is not None
    single = checkpointing.checkpoint(b, x)
    assert torch.is_tensor(single)


def test_config_section_precedence_and_errors():
    checkpointing.configure(None, {"train_micro_batch_size_per_gpu": 1,
                                   "activation_checkpointing": {"cpu_checkpointing": True, "profile": False}},
                            profile=True)
    assert checkpointing.is_configured()
    assert checkpointing._settings.cpu and checkpointing._settings.profile  # argument beats the file
    with pytest.raises(zeal.ConfigError, match="activation_checkpointing.partition_activation'"):
        checkpointing.configure(None, {"activation_checkpointing": {"partition_activation": True}})
    with pytest.raises(zeal.ConfigError, match="contiguous_memory_optimization needs partition_activations"):
        checkpointing.configure(None, contiguous_checkpointing=True)
    with pytest.raises(zeal.ConfigError, match="number_checkpoints"):
        checkpointing.configure(None, partition_activations=True, contiguous_checkpointing=True)
    checkpointing.configure(None)


def test_partitioned_over_a_tensor_group_of_two_ranks():
    proc = run_mpi(2, "checkpointing_tp.py")
    assert proc.stdout.count("CHECKPOINTING OK") == 2, proc.stdout + proc.stderr
