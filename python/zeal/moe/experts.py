"""DeepSpeed's deepspeed.moe.experts: the local experts of one MoE layer."""
import copy

import torch
from torch import nn


_PLACEMENT_ATTRS = ("tensor_parallel", "partition_dim", "partition_offset", "full_shape", "zeal_split_axes")


class Experts(nn.Module):
    """`num_local_experts` copies of `expert` (deep copies: they start equal, as DeepSpeed's do).

    Each copy's parameters are marked as expert parameters the way DeepSpeed marks them
    (`allreduce = False`, `group_name`) and placed on the mesh's expert axis
    (`zeal_split_axes = ("expert",)`): the engine reduces their gradients over the ranks holding the
    same experts (Note [Expert gradients]) and partitions them over those ranks under ZeRO."""

    def __init__(self, expert: nn.Module, num_local_experts: int = 1, expert_group_name=None) -> None:
        super().__init__()
        # A tensor-parallel expert's layers hold their communicator: the copies share it.
        shared = {id(m.group): m.group for m in expert.modules() if getattr(m, "tensor_parallel_layer", False)}
        self.deepspeed_experts = nn.ModuleList([copy.deepcopy(expert, dict(shared)) for _ in range(num_local_experts)])
        # torch's deepcopy of a Parameter drops its attributes: carry over where it sits (a
        # tensor-parallel slice's dim, offset and full shape).
        for local in self.deepspeed_experts:
            for src, dst in zip(expert.parameters(), local.parameters()):
                for attr in _PLACEMENT_ATTRS:
                    if hasattr(src, attr):
                        setattr(dst, attr, getattr(src, attr))
        self.num_local_experts = num_local_experts
        for local in self.deepspeed_experts:
            for param in local.parameters():
                param.allreduce = False
                param.group_name = expert_group_name
                param.zeal_split_axes = ("expert",)

    def forward(self, inputs):
        """inputs [ep, local experts, capacity, model]: local expert i takes slice i of dim 1."""
        outputs = []
        for chunk, expert in zip(inputs.chunk(self.num_local_experts, dim=1), self.deepspeed_experts):
            out = expert(chunk)
            outputs.append(out[0] if isinstance(out, tuple) else out)  # (output, bias): the output
        return torch.cat(outputs, dim=1)
