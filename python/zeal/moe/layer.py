"""DeepSpeed's deepspeed.moe.layer.MoE on Zeal: the same arguments, submodule names and return
values (docs/moe.md). Its expert-parallel group is the expert axis of the mesh
`zeal.mesh.build(expert=ep_size)`, created when the layer is built (collective over the world:
every rank builds its MoE layers in the same order)."""
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .. import _zeal
from ..utils import groups, log_dist
from .experts import Experts
from .sharded_moe import MOELayer, TopKGate

_NOISE_POLICIES = (None, "None", "Jitter", "RSample")


class MoE(nn.Module):
    """A Mixture-of-Experts layer.

    hidden_size: the model dimension (input and output); expert: the module every expert copies;
    num_experts: experts in the layer; ep_size: expert-parallel ranks (num_experts / ep_size experts
    live on each); k: experts per token; capacity_factor / eval_capacity_factor / min_capacity: the
    per-expert buffer, ceil(tokens / num_experts x factor x k), at least min_capacity;
    use_residual: PR-MoE (a dense MLP mixed in by a learned 2-way coefficient); noisy_gate_policy:
    None, 'Jitter' or 'RSample'; drop_tokens: False gives every expert its whole load; use_rts:
    Random Token Selection; top2_2nd_expert_sampling: Gumbel-sample the second expert.
    Zeal's additions, off by default: expert_bias_update_rate > 0 balances the experts without an
    auxiliary loss (a per-expert bias on the selection scores, moved by the load after every training
    forward, as DeepSeek-V3); router_z_loss_coef > 0 adds ST-MoE's router z-loss to l_aux;
    dropless=True computes every route with no capacity (only the routed rows travel, in an uneven
    all-to-all), the routes and weights being drop_tokens=False's.
    forward returns (output, l_aux, exp_counts)."""

    def __init__(self, hidden_size: int, expert: nn.Module, num_experts: int = 1, ep_size: int = 1, k: int = 1,
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 use_residual: bool = False, noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True,
                 use_rts: bool = True, use_tutel: bool = False, enable_expert_tensor_parallelism: bool = False,
                 top2_2nd_expert_sampling: bool = True, expert_bias_update_rate: float = 0.0,
                 router_z_loss_coef: float = 0.0, dropless: bool = False) -> None:
        super().__init__()
        if num_experts < 1 or ep_size < 1 or num_experts % ep_size:
            raise _zeal.ConfigError(f"MoE: num_experts ({num_experts}) must be a positive multiple of ep_size "
                                    f"({ep_size})")
        if k < 1 or k > num_experts:
            raise _zeal.ConfigError(f"MoE: k must be between 1 and num_experts ({num_experts}), got {k}")
        if noisy_gate_policy not in _NOISE_POLICIES:
            raise _zeal.ConfigError(f"MoE: noisy_gate_policy must be None, 'Jitter' or 'RSample', got "
                                    f"{noisy_gate_policy!r}")
        self.use_residual = use_residual
        self.enable_expert_tensor_parallelism = enable_expert_tensor_parallelism
        self.ep_size = ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size
        log_dist(f"Creating MoE layer with num_experts: {num_experts} | num_local_experts: "
                 f"{self.num_local_experts} | expert_parallel_size: {ep_size}", [0])
        experts = Experts(expert, self.num_local_experts, self.expert_group_name)
        gate = TopKGate(hidden_size, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                        noisy_gate_policy, drop_tokens, use_rts, None, top2_2nd_expert_sampling,
                        expert_bias_update_rate, router_z_loss_coef)
        self.deepspeed_moe = MOELayer(gate, experts, self.expert_group_name, ep_size, self.num_local_experts,
                                      use_tutel=use_tutel)
        if dropless:
            gate.drop_tokens = False  # the same routes and weights as DeepSpeed's drop_tokens=False
            gate.dropless = True
            self.deepspeed_moe.dropless = True
        if use_residual:
            self.mlp = expert
            self.coefficient = nn.Linear(hidden_size, 2)
        self.set_deepspeed_parallelism()

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        self._create_process_groups(use_data_before_expert_parallel_)

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        self._zeal_groups = groups._create_expert_and_data_parallel(
            self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        self.deepspeed_moe._set_ep_group(groups._get_expert_parallel_group(self.expert_group_name))
        mesh = self._zeal_groups.mesh
        if mesh.axis_size("tensor") > 1:  # tensor-expert-data parallelism (DeepSpeed-TED)
            tensor = self._zeal_groups.group("tensor")
            if self.deepspeed_moe.dropless:
                raise _zeal.ConfigError("MoE: dropless=True does not combine with a tensor axis yet (tensor-expert-"
                                        "data parallelism uses the capacity dispatch)")
            self.deepspeed_moe.tensor_group = tensor
            self.deepspeed_moe.expert_tensor = self.enable_expert_tensor_parallelism
            experts = [p for p in self.deepspeed_moe.experts.parameters()]
            if self.enable_expert_tensor_parallelism:
                # Each tensor rank computes every slot, with its slice of a tensor-parallel expert.
                for m in self.deepspeed_moe.experts.modules():
                    if getattr(m, "tensor_parallel_layer", False) and m.group != tensor:
                        raise _zeal.ConfigError("MoE: with enable_expert_tensor_parallelism the expert's "
                                                "zeal.tensor_parallel layers must use the mesh's tensor group")
            else:
                # Experts whole on every tensor rank, each rank computing its 1/t of the slots:
                # their gradients are summed over the tensor group.
                from ..tensor_parallel import _sum_gradient_over

                for p in experts:
                    _sum_gradient_over(p, tensor)
        # The router is replicated over the ranks dense weights reduce over: its bias moves with their loads.
        self.deepspeed_moe.gate.bias_group = self._zeal_groups.group(_zeal.reduction_axes(self._zeal_groups.mesh))

    @property
    def expert_parallel_rank(self):
        return self.deepspeed_moe.ep_group.rank

    def global_expert_ids(self):
        """The global ids of this rank's experts, in local order (expert rank x local experts + i)."""
        first = self.expert_parallel_rank * self.num_local_experts
        return list(range(first, first + self.num_local_experts))

    def global_names(self, prefix=""):
        """{local parameter name: its name under the global expert id} for this rank's experts:
        'deepspeed_moe.experts.deepspeed_experts.<local>.' becomes '...<global>.', as DeepSpeed's
        expert checkpoints name them. The engine saves experts under these names, so a checkpoint
        holds each expert once and loads at any expert-parallel size."""
        base = f"{prefix}." if prefix else ""
        out = {}
        for local, gid in zip(range(self.num_local_experts), self.global_expert_ids()):
            before = f"{base}deepspeed_moe.experts.deepspeed_experts.{local}."
            after = f"{base}deepspeed_moe.experts.deepspeed_experts.{gid}."
            for name, _ in self.deepspeed_moe.experts.deepspeed_experts[local].named_parameters(prefix=before[:-1]):
                out[name] = after + name[len(before):]
        return out

    def forward(self, hidden_states: torch.Tensor,
                used_token: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        output = self.deepspeed_moe(hidden_states, used_token)
        if self.use_residual:
            dense = self.mlp(hidden_states)
            if isinstance(dense, tuple):
                dense = dense[0]
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + dense * coef[..., 1:]
        return output, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts
