"""DeepSpeed-MoE's gating and dispatch (deepspeed.moe.sharded_moe) on Zeal's communicators.

Gating follows DeepSpeed 0.19's rules exactly (docs/moe.md "Gating"): top-1 (Random Token
Selection, RSample noise, `used_token`), top-2 (Gumbel sampling of the second expert), top-k
(drop by probability or by position); capacity = ceil(tokens / experts x factor x k) but at least
`min_capacity`; with drop_tokens=False the capacity is the largest expert load over the
expert-parallel group. The random draws are the same calls in the same order as DeepSpeed's, so a
seeded run routes the same tokens.

Every gating function computes one routing: for each of the k routes of each token, the expert,
its slot in that expert's capacity buffer, its weight, and whether it was kept. The public
functions return it either as DeepSpeed's dense tensors (combine_weights [s, e, c], dispatch_mask)
or, with sparse_routes=True, as DeepSpeed's route tuple. MOELayer moves tokens with index copies
over the routes (no [s, e, c] tensor is formed) and exchanges the [experts, capacity, model]
buffer with one all_to_all over the expert-parallel group each way.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module

from .. import _zeal, zero
from ..tensor_parallel import _gather_seq, _split_seq  # a dim's slice per tensor rank, and its gather

# One distribution per device, as DeepSpeed keeps them: the draws go through the same rsample calls.
_gumbel = {}
_uniform = {}
_jitter = {}


def _sampler(cache, device, make):
    sample = cache.get(device)
    if sample is None:
        sample = cache[device] = make()
    return sample


def multiplicative_jitter(x, device, epsilon=1e-2):
    """x times a uniform draw in [1 - epsilon, 1 + epsilon) per element (the 'Jitter' gate policy)."""
    if epsilon == 0:
        return x
    sample = _sampler(_jitter, device, lambda: torch.distributions.uniform.Uniform(
        low=torch.tensor(1.0 - epsilon, device=device), high=torch.tensor(1.0 + epsilon, device=device)).rsample)
    return x * sample(x.shape)


def gumbel_rsample(shape, device):
    sample = _sampler(_gumbel, device, lambda: torch.distributions.gumbel.Gumbel(
        torch.tensor(0.0, device=device), torch.tensor(1.0, device=device)).rsample)
    return sample(shape)


def _uniform_rsample(shape, device):
    sample = _sampler(_uniform, device, lambda: torch.distributions.uniform.Uniform(
        low=torch.tensor(0.0, device=device), high=torch.tensor(1.0, device=device)).rsample)
    return sample(shape)


def _capacity(gates, capacity_factor, min_capacity):
    """ceil(tokens / experts x capacity_factor), at least min_capacity (an int64 0-d tensor)."""
    tokens, experts = gates.shape
    factor = capacity_factor if torch.is_tensor(capacity_factor) else torch.tensor(capacity_factor)
    least = min_capacity if torch.is_tensor(min_capacity) else torch.tensor(min_capacity)
    capacity = torch.ceil((tokens / experts) * factor).to(torch.int64)
    return torch.maximum(capacity, least.to(torch.int64))


def _largest_load(exp_counts, ep_group):
    """drop_tokens=False: every expert takes its whole load, so the capacity is the largest load on
    any rank of the expert-parallel group (the buffers exchanged must be the same size)."""
    load = exp_counts.max().to(torch.int64).reshape(1).cpu()
    if ep_group is not None and ep_group.size > 1:
        ep_group.all_reduce(load, "max").wait()
    return load[0]


class _Routes:
    """k routes per token: expert [k, s], slot [k, s] (its place in the expert's buffer), weight
    [k, s] (fp32; 0 where dropped), kept [k, s]; with l_aux, capacity and the loads before dropping."""

    def __init__(self, l_aux, capacity, num_experts, expert, slot, weight, kept, exp_counts):
        self.l_aux, self.capacity, self.num_experts = l_aux, capacity, num_experts
        self.expert, self.slot, self.weight, self.kept, self.exp_counts = expert, slot, weight, kept, exp_counts

    def dense(self):
        """DeepSpeed's (l_aux, combine_weights [s, e, c], dispatch_mask, exp_counts)."""
        k, s = self.expert.shape
        combine = self.weight.new_zeros(s, self.num_experts, int(self.capacity))
        tokens = torch.arange(s, device=self.expert.device).expand(k, s)
        keep = self.kept
        combine = combine.index_put((tokens[keep], self.expert[keep], self.slot[keep]), self.weight[keep],
                                    accumulate=True)
        return self.l_aux, combine, combine.bool(), self.exp_counts

    def sparse(self):
        """DeepSpeed's sparse_routes tuple: (l_aux, capacity, num_experts, indices [k, s] int32 with -1
        for a dropped route, locations [k, s] int32, gates [k, s], exp_counts)."""
        indices = torch.where(self.kept, self.expert, torch.full_like(self.expert, -1)).to(torch.int32)
        return (self.l_aux, self.capacity, self.num_experts, indices, (self.slot * self.kept).to(torch.int32),
                self.weight, self.exp_counts)


def _arrivals(mask):
    """torch.cumsum(mask, dim=0) for a [tokens, experts] mask: for each (token, expert), how many
    tokens up to this one chose that expert. Scanned along the last dimension of the transposed
    mask: torch's scan over dimension 0 with few experts ran at 2.8 ms for 16384 tokens x 8 experts
    on an H200, about half of the whole layer's step (docs/benchmarks.md "The MoE layer on a GPU")."""
    return torch.cumsum(mask.t().contiguous(), dim=1).t()


def _route_top1(logits, capacity_factor, min_capacity, used_token, noisy_gate_policy, drop_tokens, use_rts,
                ep_group, bias=None):
    noisy = logits + gumbel_rsample(logits.shape, logits.device) if noisy_gate_policy == "RSample" else None
    gates = F.softmax(logits, dim=1)
    tokens, experts = gates.shape
    capacity = _capacity(gates, torch.tensor(capacity_factor), torch.tensor(min_capacity))
    choice = torch.argmax(noisy if noisy is not None else gates if bias is None else gates + bias, dim=1)
    mask = F.one_hot(choice, num_classes=experts)
    if used_token is not None:
        mask = used_token.reshape(-1, 1) * mask
    exp_counts = mask.sum(dim=0).detach()
    if not drop_tokens:
        capacity = torch.minimum(_largest_load(exp_counts, ep_group), torch.tensor(tokens))
    l_aux = torch.sum(gates.mean(dim=0) * mask.float().mean(dim=0)) * experts
    # Which tokens an over-full expert keeps: the top `capacity` by a uniform draw (Random Token
    # Selection), or torch.topk's choice among equal scores without it.
    scores = mask * _uniform_rsample(mask.shape, logits.device) if use_rts else mask
    if tokens < min_capacity:
        raise _zeal.ConfigError(f"MoE top-1 gating got {tokens} tokens, fewer than min_capacity {min_capacity}: "
                                "set min_capacity to 0 or feed more tokens")
    chosen = torch.topk(scores, k=int(min(int(capacity), tokens)), dim=0)[1]
    mask = mask * torch.zeros_like(mask).scatter_(0, chosen, 1)
    slot = ((_arrivals(mask) - 1) * mask).sum(dim=1)
    weight = (gates * mask.float()).sum(dim=1)
    kept = mask.sum(dim=1) > 0
    return _Routes(l_aux, capacity, experts, choice.unsqueeze(0), slot.unsqueeze(0), weight.unsqueeze(0),
                   kept.unsqueeze(0), exp_counts)


def _route_top2(logits, capacity_factor, min_capacity, drop_tokens, ep_group, top2_2nd_expert_sampling, bias=None):
    gates = F.softmax(logits, dim=1)
    experts = gates.shape[1]
    scores = gates if bias is None else gates + bias  # the bias steers selection only (aux-loss-free balancing)
    first = torch.argmax(scores, dim=1)
    mask1 = F.one_hot(first, num_classes=experts)
    if top2_2nd_expert_sampling:  # the Gumbel-max trick: the second expert is sampled
        logits = logits + gumbel_rsample(logits.shape, logits.device)
    second = torch.argmax((logits if bias is None else scores).masked_fill(mask1.bool(), float("-inf")), dim=1)
    mask2 = F.one_hot(second, num_classes=experts)
    # Second choices queue behind every first choice of the same expert.
    where1 = _arrivals(mask1) - 1
    where2 = _arrivals(mask2) - 1 + mask1.sum(dim=0, keepdim=True)
    l_aux = torch.mean(gates.mean(dim=0) * mask1.float().mean(dim=0)) * experts * experts
    exp_counts = (mask1 + mask2).sum(dim=0).detach()
    if drop_tokens:
        capacity = _capacity(gates, torch.tensor(capacity_factor * 2), torch.tensor(min_capacity))
        mask1 = mask1 * torch.lt(where1, capacity)
        mask2 = mask2 * torch.lt(where2, capacity)
    else:
        capacity = _largest_load(exp_counts, ep_group)
    weight1 = (gates * mask1.float()).sum(dim=1)
    weight2 = (gates * mask2.float()).sum(dim=1)
    total = torch.clamp(weight1 + weight2, min=torch.finfo(weight1.dtype).eps)
    return _Routes(l_aux, capacity, experts, torch.stack([first, second]),
                   torch.stack([(where1 * mask1).sum(dim=1), (where2 * mask2).sum(dim=1)]),
                   torch.stack([weight1 / total, weight2 / total]),
                   torch.stack([mask1.sum(dim=1) > 0, mask2.sum(dim=1) > 0]), exp_counts)


def _route_topk(logits, k, capacity_factor, min_capacity, drop_tokens, ep_group, drop_policy, bias=None):
    gates = F.softmax(logits, dim=1)
    tokens, experts = gates.shape
    if bias is None:
        top_gate, top_idx = torch.topk(gates, k=k, dim=1)
    else:  # selected by gate + bias, weighted by the gate alone
        top_idx = torch.topk(gates + bias, k=k, dim=1)[1]
        top_gate = gates.gather(1, top_idx)
    mask = torch.zeros_like(gates, dtype=torch.bool).scatter_(1, top_idx, True)
    exp_counts = mask.sum(dim=0).detach()
    l_aux = torch.mean(gates.mean(dim=0) * mask.float().mean(dim=0)) * experts * experts / k
    if drop_tokens:
        capacity = _capacity(gates, torch.tensor(capacity_factor * k), torch.tensor(min_capacity))
        if drop_policy == "probs":  # an over-full expert keeps its most probable tokens
            chosen = torch.zeros_like(gates).scatter(1, top_idx, top_gate)
            _, keep = torch.topk(chosen, k=int(min(int(capacity), tokens)), dim=0, sorted=False)
            mask = mask & torch.zeros_like(mask).scatter_(0, keep, True)
            where = _arrivals(mask) - 1
        elif drop_policy == "position":  # an over-full expert keeps its first tokens
            where = _arrivals(mask) - 1
            mask = mask & torch.lt(where, capacity)
        else:
            raise _zeal.ConfigError(f"topkgating drop_policy: expected 'probs' or 'position', got {drop_policy!r}")
    else:
        capacity = _largest_load(exp_counts, ep_group)
        where = _arrivals(mask) - 1
    masked = gates * mask
    masked = masked / torch.clamp(masked.sum(dim=-1, keepdim=True), min=torch.finfo(masked.dtype).eps)
    kept = mask.gather(1, top_idx)
    return _Routes(l_aux, capacity, experts, top_idx.t().contiguous(), (where.gather(1, top_idx) * kept).t(),
                   masked.gather(1, top_idx).t(), kept.t(), exp_counts)


def top1gating(logits: Tensor, capacity_factor: float, min_capacity: int, used_token: Tensor = None,
               noisy_gate_policy: Optional[str] = None, drop_tokens: bool = True, use_rts: bool = True,
               ep_group=None, sparse_routes: bool = False, use_tutel: bool = False):
    routes = _route_top1(logits, capacity_factor, min_capacity, used_token, noisy_gate_policy, drop_tokens, use_rts,
                         ep_group)
    return routes.sparse() if sparse_routes else routes.dense()


def top2gating(logits: Tensor, capacity_factor: float, min_capacity: int, drop_tokens: bool = True, ep_group=None,
               top2_2nd_expert_sampling: bool = True, sparse_routes: bool = False):
    routes = _route_top2(logits, capacity_factor, min_capacity, drop_tokens, ep_group, top2_2nd_expert_sampling)
    return routes.sparse() if sparse_routes else routes.dense()


def topkgating(logits: Tensor, k: int, capacity_factor: float, min_capacity: int, drop_tokens: bool = True,
               ep_group=None, drop_policy: str = "probs", sparse_routes: bool = False):
    routes = _route_topk(logits, k, capacity_factor, min_capacity, drop_tokens, ep_group, drop_policy)
    return routes.sparse() if sparse_routes else routes.dense()


class TopKGate(Module):
    """The router: a bias-free fp32 linear map to expert logits, then top-1, top-2 or top-k gating
    with the training or the eval capacity factor."""

    def __init__(self, model_dim: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0, min_capacity: int = 8, noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True, use_rts: bool = True, ep_group=None,
                 top2_2nd_expert_sampling: bool = True, expert_bias_update_rate: float = 0.0,
                 router_z_loss_coef: float = 0.0) -> None:
        super().__init__()
        self.wg = torch.nn.Linear(model_dim, num_experts, bias=False)
        # Zeal's additions (docs/moe.md "Beyond DeepSpeed"); both off by default.
        self.expert_bias_update_rate = expert_bias_update_rate
        self.router_z_loss_coef = router_z_loss_coef
        self.bias_group = None  # the ranks sharing this router: their loads move the bias alike
        self.dropless = False  # MoE(dropless=True): no capacity, so no all-reduce of the largest load
        if expert_bias_update_rate:
            if k == 1 and noisy_gate_policy == "RSample" or k == 2 and top2_2nd_expert_sampling:
                raise _zeal.ConfigError("MoE: expert_bias_update_rate (aux-loss-free balancing) selects experts by "
                                        "gate + bias; it does not combine with sampled selection (noisy_gate_policy="
                                        "'RSample', top2_2nd_expert_sampling=True)")
            self.register_buffer("expert_bias", torch.zeros(num_experts))
        # forward reads wg's weight without calling wg (in fp32 whatever the model's dtype): ZeRO-3
        # gathers it around this module's forward.
        zero.register_external_parameter(self, self.wg.weight)
        self.ep_group = ep_group
        self.k = k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.noisy_gate_policy = noisy_gate_policy
        self.drop_tokens = drop_tokens
        self.use_rts = use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling
        self.wall_clock_breakdown = False
        self.gate_time = 0.0

    def _set_ep_group(self, ep_group):
        self.ep_group = ep_group

    def _routes(self, input, used_token=None):
        x = input.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            x = multiplicative_jitter(x, device=input.device)
        logits = F.linear(x, weight=self.wg.weight.float(), bias=None)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        bias = getattr(self, "expert_bias", None)
        ep_group = None if self.dropless else self.ep_group  # the capacity's all-reduce (unused dropless)
        if self.k == 1:
            routes = _route_top1(logits, factor, self.min_capacity, used_token,
                                 self.noisy_gate_policy if self.training else None, self.drop_tokens, self.use_rts,
                                 ep_group, bias)
        elif self.k == 2:
            routes = _route_top2(logits, factor, self.min_capacity, self.drop_tokens, ep_group,
                                 self.top2_2nd_expert_sampling, bias)
        else:
            routes = _route_topk(logits, self.k, factor, self.min_capacity, self.drop_tokens, ep_group, "probs",
                                 bias)
        if self.router_z_loss_coef:  # ST-MoE's router z-loss: keeps the logits small
            routes.l_aux = routes.l_aux + self.router_z_loss_coef * torch.logsumexp(logits, dim=1).square().mean()
        if bias is not None and self.training:
            self._update_bias(routes.exp_counts)
        return routes

    @torch.no_grad()
    def _update_bias(self, exp_counts):
        """Aux-loss-free balancing (DeepSeek-V3): after each training forward every expert's bias
        moves by the rate towards balance, up when the expert got fewer routes than the mean over
        the router's ranks, down when more. The counts are summed over those ranks first, so every
        replica of the router keeps the same bias."""
        load = exp_counts.to(torch.float32).cpu()
        if self.bias_group is not None and self.bias_group.size > 1:
            self.bias_group.all_reduce(load, "sum").wait()
        self.expert_bias.add_(torch.sign(load.mean() - load).to(self.expert_bias.device),
                              alpha=self.expert_bias_update_rate)

    def forward(self, input: Tensor, used_token: Tensor = None, sparse_routes: bool = False, use_tutel: bool = False):
        routes = self._routes(input, used_token)
        return routes.sparse() if sparse_routes else routes.dense()


class _AllToAll(torch.autograd.Function):
    """Chunk j of dim 0 to expert rank j and back; its gradient is the same exchange."""

    @staticmethod
    def forward(ctx, group, input):
        ctx.group = group
        input = input.contiguous()
        output = torch.empty_like(input)
        group.all_to_all(output, input, site="moe all_to_all").wait()
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return None, _AllToAll.apply(ctx.group, grad_output)


def _grouped_layout(*tensors):
    """Whether torch's grouped GEMM takes these operands: fp32 or bf16, each last dim a multiple of
    16 bytes (its row strides must be)."""
    return hasattr(torch, "_grouped_mm") and all(
        t.dtype in (torch.float32, torch.bfloat16) and (t.shape[-1] * t.element_size()) % 16 == 0 and
        (t.shape[-2] * t.element_size()) % 16 == 0 for t in tensors)


def _group_mm(x, w, counts, ends):
    """Rows counts[i] of x (grouped in order) times w[i]: one grouped GEMM where the layout allows, a
    loop of matmuls otherwise."""
    if _grouped_layout(x, w):
        return torch._grouped_mm(x, w, offs=ends)
    return torch.cat([piece @ w[i] for i, piece in enumerate(x.split(counts))])


def _group_outer(x, g, counts, ends):
    """[groups, K, N]: x's rows of group i, transposed, times g's rows of group i."""
    if _grouped_layout(x, g):
        return torch._grouped_mm(x.t(), g, offs=ends)
    return torch.stack([a.t() @ b for a, b in zip(x.split(counts), g.split(counts))])


class _GroupedMM(torch.autograd.Function):
    """y[rows of group i] = x[rows of group i] @ w[i], for groups of `counts` consecutive rows."""

    @staticmethod
    def forward(ctx, x, w, counts):
        ends = torch.tensor(counts, dtype=torch.int32, device=x.device).cumsum(0, dtype=torch.int32)
        ctx.save_for_backward(x, w, ends)
        ctx.counts = counts
        return _group_mm(x, w, counts, ends)

    @staticmethod
    def backward(ctx, grad):
        x, w, ends = ctx.saved_tensors
        grad = grad.contiguous()
        return (_group_mm(grad, w.transpose(1, 2).contiguous(), ctx.counts, ends),
                _group_outer(x, grad, ctx.counts, ends), None)


def _mlp_experts(experts):
    """(first linears, activation, second linears) when every local expert is Sequential(Linear,
    a parameter-free activation, Linear) of one shape and holds its weights (not partitioned by
    ZeRO-3, whose hooks gather around each expert's own call); None otherwise."""
    parts = []
    for e in experts:
        if not (isinstance(e, torch.nn.Sequential) and len(e) == 3 and type(e[0]) is torch.nn.Linear and
                type(e[2]) is torch.nn.Linear and not list(e[1].parameters())):
            return None
        if any(hasattr(p, "ds_numel") for p in e.parameters()):
            return None
        parts.append(e)
    first = parts[0]
    if any(p[0].weight.shape != first[0].weight.shape or p[2].weight.shape != first[2].weight.shape or
           (p[0].bias is None) != (first[0].bias is None) or (p[2].bias is None) != (first[2].bias is None)
           for p in parts):
        return None
    return [p[0] for p in parts], first[1], [p[2] for p in parts]


class _DropTokens(torch.autograd.Function):
    """Duplicate Token Dropping (DeepSpeed-TED): the tensor-parallel ranks hold the same tokens, so
    each keeps only its 1/t of `dim` before the all-to-all; the gradient is gathered back."""

    @staticmethod
    def forward(ctx, input, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split_seq(input, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _GatherTokens.apply(grad, ctx.group, ctx.dim), None, None


class _GatherTokens(torch.autograd.Function):
    """The inverse: every tensor-parallel rank's slice of `dim`, in rank order; each rank's gradient
    is its own slice (the gathered tokens are used alike on every rank)."""

    @staticmethod
    def forward(ctx, input, group, dim):
        ctx.group, ctx.dim = group, dim
        return _gather_seq(input, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _DropTokens.apply(grad, ctx.group, ctx.dim), None, None


class _AllToAllV(torch.autograd.Function):
    """Rows of dim 0 in uneven chunks: input_splits[j] rows to expert rank j, output_splits[r] rows
    from rank r; its gradient is the exchange the other way."""

    @staticmethod
    def forward(ctx, group, input, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        input = input.contiguous()
        output = input.new_empty((sum(output_splits),) + tuple(input.shape[1:]))
        group.all_to_all(output, input, output_splits, input_splits, site="moe dropless all_to_all").wait()
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return None, _AllToAllV.apply(ctx.group, grad_output, ctx.input_splits, ctx.output_splits), None, None


class MOELayer(Module):
    """Gate, dispatch to the experts over the expert-parallel group, expert compute, combine."""

    def __init__(self, gate: Module, experts: Module, ep_group_name, ep_size, num_local_experts: int,
                 use_tutel: bool = False) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.ep_group = None
        self.ep_size = ep_size
        self.ep_group_name = ep_group_name
        self.num_local_experts = num_local_experts
        self.use_tutel = False  # Zeal's dispatch is its own (docs/compatibility.md)
        self.wall_clock_breakdown = False
        self.time_falltoall = self.time_salltoall = self.time_moe = 0.0
        self.l_aux = None
        self.exp_counts = None
        self.dropless = False  # Zeal's dropless dispatch (MoE(dropless=True)); see _forward_dropless
        # The tensor-parallel group when the mesh has a tensor axis (DeepSpeed-TED): its ranks hold
        # the same tokens; each sends 1/t of the slots (Duplicate Token Dropping). expert_tensor:
        # the experts themselves are split over it, so the slots are gathered again around them.
        self.tensor_group = None
        self.expert_tensor = False
        self.all_to_all_bytes = 0  # what the last forward's two all-to-alls sent from this rank
        # Dropless: experts of the Sequential(Linear, activation, Linear) shape as two grouped GEMMs
        # over all their rows (torch._grouped_mm) instead of one after another. None: on device
        # tensors only; on the CPU the loop measured faster and leaner (docs/benchmarks.md "The MoE
        # layer"). True / False force either.
        self.grouped_gemm = None

    def _set_ep_group(self, ep_group):
        self.ep_group = ep_group
        self.gate._set_ep_group(ep_group)

    def forward(self, *input: Tensor, **kwargs) -> Tensor:
        if self.dropless:
            return self._forward_dropless(*input)
        x = input[0]
        d_model = x.shape[-1]
        tokens = x.reshape(-1, d_model)
        # Through the gate module's call, so ZeRO-3's hooks gather its weight.
        self.l_aux, capacity, experts, indices, locations, weights, self.exp_counts = self.gate(
            tokens, input[1] if len(input) > 1 else None, True)
        capacity = int(capacity)
        k, s = indices.shape
        # The kept routes (route r = j * s + token), found once: every later step reads only them.
        kept = (indices >= 0).reshape(-1).nonzero().squeeze(1)
        sources = kept % s
        # With a tensor axis the slots are padded to a multiple of its size (never filled: the
        # capacity that decides what drops is unchanged).
        tp = self.tensor_group.size if self.tensor_group is not None else 1
        capacity = -(-capacity // tp) * tp
        slots = (indices.long() * capacity + locations.long()).reshape(-1).index_select(0, kept)  # rows of [e * c]

        # Dispatch: each kept route copies its token into its expert's slot; empty slots stay zero.
        buffer = tokens.new_zeros(experts * capacity, d_model).index_copy(0, slots, tokens.index_select(0, sources))
        dispatched = buffer.view(experts, capacity, d_model)
        if tp > 1:
            dispatched = _DropTokens.apply(dispatched, self.tensor_group, 1)
        self.all_to_all_bytes = 2 * dispatched.numel() * dispatched.element_size() if self.ep_size > 1 else 0
        if self.ep_size > 1:
            dispatched = _AllToAll.apply(self.ep_group, dispatched)
        if tp > 1 and self.expert_tensor:
            dispatched = _GatherTokens.apply(dispatched, self.tensor_group, 1)
        # From each expert rank, this rank's experts' slots: [ep, local experts, capacity, model].
        out = self.experts(dispatched.reshape(self.ep_size, self.num_local_experts, -1, d_model))
        out = out.reshape(experts, -1, d_model)
        if tp > 1 and self.expert_tensor:
            out = _DropTokens.apply(out, self.tensor_group, 1)
        if self.ep_size > 1:
            out = _AllToAll.apply(self.ep_group, out)
        if tp > 1:
            out = _GatherTokens.apply(out, self.tensor_group, 1)

        # Combine in fp32: each kept route reads its own slot, weighted by its gate, and is added into
        # its token (in route order: a token's first route, then its second). A dropped route reads
        # nothing, so nothing of another token's can leak in. Every slot is read at most once, so the
        # gradient goes back to the slots without two routes adding into one row (on a GPU, atomic
        # adds that contend; docs/benchmarks.md "The MoE layer on a GPU").
        gate = weights.reshape(-1).index_select(0, kept).unsqueeze(1)
        routed = out.reshape(experts * capacity, d_model).index_select(0, slots).float()
        combined = torch.zeros(s, d_model, dtype=torch.float32, device=out.device).index_add(0, sources, routed * gate)
        return combined.to(x.dtype).reshape(x.shape)

    def _forward_dropless(self, *input: Tensor) -> Tensor:
        """Every route computed, nothing padded: routes sorted by expert, one uneven all_to_all of
        just those rows to the expert ranks (the counts exchanged first), each local expert run once
        on its rows (every local expert is called, with 0 rows if need be, so ZeRO-3's gathers pair
        up on every rank; experts of the Linear-activation-Linear shape run instead as two grouped
        GEMMs over all their rows), and the uneven exchange back. The gating is the configured top-k with no
        capacity: the same routes and weights as drop_tokens=False."""
        x = input[0]
        d_model = x.shape[-1]
        tokens = x.reshape(-1, d_model)
        self.l_aux, _, experts, indices, _, weights, self.exp_counts = self.gate(
            tokens, input[1] if len(input) > 1 else None, True)
        k, s = indices.shape
        keep = indices >= 0  # all kept, unless used_token masked a token out
        expert_of = torch.where(keep, indices.long(), experts).reshape(-1)  # masked routes sort last
        order = torch.argsort(expert_of, stable=True)
        counts = torch.bincount(expert_of, minlength=experts + 1)[:experts]
        routed = int(counts.sum())
        order = order[:routed]
        rows = tokens.index_select(0, order % s)  # route r = j * s + token
        local = self.num_local_experts
        if self.ep_size > 1:
            # Rows this rank sends each expert rank, and (exchanged) rows it receives per (source, local expert).
            received = torch.empty_like(counts.cpu())
            self.ep_group.all_to_all(received, counts.cpu().contiguous(), site="moe dropless counts").wait()
            send = counts.view(self.ep_size, local).sum(dim=1).tolist()
            recv_grid = received.view(self.ep_size, local)
            rows = _AllToAllV.apply(self.ep_group, rows, recv_grid.sum(dim=1).tolist(), send)
        else:
            recv_grid = counts.cpu().view(1, local)
        # Received rows are ordered by source rank, then local expert: group them by local expert
        # (already so with one source rank or one local expert).
        per_expert = recv_grid.sum(dim=0).tolist()
        regroup = recv_grid.shape[0] > 1 and local > 1
        if regroup:
            starts = torch.cumsum(recv_grid.reshape(-1), 0) - recv_grid.reshape(-1)
            pieces = [torch.arange(int(starts[src * local + e]), int(starts[src * local + e] + recv_grid[src, e]))
                      for e in range(local) for src in range(recv_grid.shape[0])]
            by_expert = torch.cat(pieces).to(rows.device)
            grouped = rows.index_select(0, by_expert)
        else:
            grouped = rows
        grouped_gemm = rows.is_cuda if self.grouped_gemm is None else self.grouped_gemm
        mlp = _mlp_experts(self.experts.deepspeed_experts) if grouped_gemm else None
        if mlp is not None:
            first, act, second = mlp
            # Each row's expert as a one-hot [rows, local experts]: the biases are added as
            # one_hot @ bias, whose gradient is one_hot^T @ grad, a GEMM (an index_select's would be
            # an index_add of every row into local-experts rows: atomic adds that contend on a GPU).
            which = torch.repeat_interleave(torch.arange(local), torch.tensor(per_expert)).to(rows.device)
            one_hot = torch.nn.functional.one_hot(which, local).to(grouped.dtype)
            h = _GroupedMM.apply(grouped, torch.stack([l.weight for l in first]).transpose(1, 2).contiguous(),
                                 per_expert)
            if first[0].bias is not None:
                h = torch.addmm(h, one_hot, torch.stack([l.bias for l in first]))
            out = _GroupedMM.apply(act(h), torch.stack([l.weight for l in second]).transpose(1, 2).contiguous(),
                                   per_expert)
            if second[0].bias is not None:
                out = torch.addmm(out, one_hot, torch.stack([l.bias for l in second]))
        else:
            outs = []
            for chunk, expert in zip(grouped.split(per_expert), self.experts.deepspeed_experts):
                y = expert(chunk)
                outs.append(y[0] if isinstance(y, tuple) else y)
            out = torch.cat(outs) if outs else grouped
        if regroup:
            out = out.new_zeros(out.shape).index_copy(0, by_expert, out)  # back to received order
        if self.ep_size > 1:
            out = _AllToAllV.apply(self.ep_group, out, send, recv_grid.sum(dim=1).tolist())
        # Each token sums its routes times their gates, in fp32, added straight from the sorted
        # rows (no [k * s, model] copy in route order).
        gate_of_row = torch.where(keep, weights, 0.0).reshape(-1).index_select(0, order)
        combined = torch.zeros(s, d_model, dtype=torch.float32, device=out.device).index_add(
            0, order % s, out.float() * gate_of_row.unsqueeze(1))
        return combined.to(x.dtype).reshape(x.shape)
