"""DeepSpeed-Ulysses for Zeal: attention over a sequence split across the ranks of a sequence group
(arXiv 2309.14509). Each rank holds s/P tokens of every head; one all-to-all gives each rank the
whole sequence of its share of the heads, the local attention runs on that, and a second all-to-all
returns the context to the sequence split. Per link that is 4·N·h/P elements per layer, not 4·N·h.

    attention = DistributedAttention(local_attention, groups.group("sequence"))
    context = attention(q, k, v, batch_dim_idx)      # q, k, v: [s/P, b, heads, d] (batch_dim_idx=1)
                                                     #       or [b, s/P, heads, d] (batch_dim_idx=0)

Heads need not divide by P: ranks get heads in DeepSpeed's order (the first heads % P ranks one more,
zeal.sequence.layer.head_counts). Every exchange is one uneven all_to_all over Zeal's communicator,
so it has the timeout and the collective signature of every op; ranks whose shard lengths disagree
get a CommError naming the ranks, not a silently shifted sequence."""
import torch

from .. import _zeal


def head_counts(num_heads, world):
    """How `num_heads` heads fall on `world` ranks: the first num_heads % world ranks hold one more
    (DeepSpeed's get_shard_size_list)."""
    base, extra = divmod(int(num_heads), int(world))
    return [base + (1 if r < extra else 0) for r in range(world)]


def _exchange(group, x, scatter_dim, gather_dim, scatter_sizes, gather_sizes, site):
    """Piece j of `x` along scatter_dim (scatter_sizes[j] long) goes to rank j; the pieces from every
    rank r (gather_sizes[r] long along gather_dim) are joined along gather_dim in rank order."""
    me = group.rank
    pieces = list(torch.split(x, scatter_sizes, dim=scatter_dim))
    send = torch.cat([p.contiguous().reshape(-1) for p in pieces]) if pieces else x.new_empty(0)
    shape = list(x.shape)
    shape[scatter_dim] = scatter_sizes[me]
    recv_shapes = []
    for g in gather_sizes:
        s = list(shape)
        s[gather_dim] = g
        recv_shapes.append(s)
    recv_counts = [int(torch.Size(s).numel()) for s in recv_shapes]
    out = x.new_empty(sum(recv_counts))
    group.all_to_all(out, send, recv_counts, [p.numel() for p in pieces], site=site).wait()
    return torch.cat([chunk.view(s) for chunk, s in zip(out.split(recv_counts), recv_shapes)], dim=gather_dim)


def hold_mesh(module, group):
    """Tags `module` with the mesh `group` was cut from, so the engine trains on that mesh (as the
    MoE layer's _zeal_groups); a group no Zeal mesh cut leaves it untagged."""
    from .. import mesh

    owner, _ = mesh.owner(group)
    if owner is not None:
        module._zeal_groups = owner


def _head_dim(batch_dim_idx):
    if batch_dim_idx not in (0, 1):
        raise _zeal.ConfigError(f"DistributedAttention: batch_dim_idx must be 0 ([b, s, heads, d]) or 1 "
                                f"([s, b, heads, d]), got {batch_dim_idx!r}")
    return 2


def _gather_head_counts(group, local_heads):
    counts = torch.empty(group.size, dtype=torch.int64)
    group.all_gather(counts, torch.tensor([local_heads], dtype=torch.int64)).wait()
    return counts.tolist()


def seq_to_heads(group, x, seq_dim, head_dim, site="ulysses all_to_all"):
    """[.., s/P, .., heads, ..] -> [.., s, .., heads of this rank, ..]."""
    p = group.size
    heads = x.shape[head_dim]
    if heads < p:
        raise _zeal.ConfigError(f"Number of heads ({heads}) must be larger than sequence parallel size ({p}); "
                                "ring attention (zeal.sequence.ring) splits wider than the head count")
    return _exchange(group, x, head_dim, seq_dim, head_counts(heads, p), [x.shape[seq_dim]] * p, site)


def heads_to_seq(group, x, seq_dim, head_dim, num_heads=None, site="ulysses all_to_all"):
    """[.., s, .., heads of this rank, ..] -> [.., s/P, .., heads, ..]; `num_heads`, the total head
    count, when the caller knows it (else the ranks' counts are gathered)."""
    p = group.size
    seq = x.shape[seq_dim]
    if seq % p:
        raise _zeal.ConfigError(f"the sequence ({seq} positions) must divide by the sequence parallel size ({p})")
    counts = head_counts(num_heads, p) if num_heads is not None else _gather_head_counts(group, x.shape[head_dim])
    if counts[group.rank] != x.shape[head_dim]:
        raise _zeal.ConfigError(f"this sequence rank holds {x.shape[head_dim]} heads, but {num_heads} heads over "
                                f"{p} ranks give it {counts[group.rank]}")
    return _exchange(group, x, seq_dim, head_dim, [seq // p] * p, counts, site)


class _SeqAllToAll(torch.autograd.Function):
    """DeepSpeed's _SeqAllToAll: scatter_idx >= 2 splits the heads and gathers the sequence (the
    way in); scatter_idx < 2 the reverse (the way out). Its gradient is the other direction."""

    @staticmethod
    def forward(ctx, group, input, scatter_idx, gather_idx, batch_dim_idx=1, stream=None, handle=None, type=None,
                is_fwd=True, num_heads=None):
        head_dim = _head_dim(batch_dim_idx)
        seq_dim = 1 - batch_dim_idx
        ctx.group, ctx.seq_dim, ctx.head_dim = group, seq_dim, head_dim
        ctx.to_heads = scatter_idx >= 2
        if ctx.to_heads:
            ctx.num_heads = input.shape[head_dim]
            return seq_to_heads(group, input, seq_dim, head_dim)
        out = heads_to_seq(group, input, seq_dim, head_dim, num_heads)
        ctx.num_heads = out.shape[head_dim]
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if ctx.to_heads:
            back = heads_to_seq(ctx.group, grad, ctx.seq_dim, ctx.head_dim, ctx.num_heads)
        else:
            back = seq_to_heads(ctx.group, grad, ctx.seq_dim, ctx.head_dim)
        return (None, back) + (None,) * 8


def single_all_to_all(input, scatter_idx, gather_idx, batch_dim_idx, group, async_op=False, handle=None, type=None):
    """DeepSpeed's single_all_to_all (no autograd): see _SeqAllToAll."""
    if async_op:
        raise _zeal.ConfigError("single_all_to_all: async_op=True is not supported (Zeal's exchange is one "
                                "blocking uneven all_to_all)")
    head_dim = _head_dim(batch_dim_idx)
    if scatter_idx >= 2:
        return seq_to_heads(group, input, 1 - batch_dim_idx, head_dim)
    return heads_to_seq(group, input, 1 - batch_dim_idx, head_dim)


class _DimZeroAllToAll(torch.autograd.Function):
    """Equal chunks of dim 0 (its size is the group's) to each rank; its gradient is the same exchange."""

    @staticmethod
    def forward(ctx, group, input):
        if input.shape[0] != group.size:
            raise _zeal.ConfigError(f"Dim 0 {input.shape[0]} is not world size")
        ctx.group = group
        out = torch.empty_like(input)
        group.all_to_all(out, input.contiguous(), site="ulysses dim-0 all_to_all").wait()
        return out

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty_like(grad)
        ctx.group.all_to_all(out, grad.contiguous(), site="ulysses dim-0 all_to_all").wait()
        return None, out


class DistributedAttention(torch.nn.Module):
    """DeepSpeed's DistributedAttention: q, k, v split over the sequence group on the sequence dim
    ([s/P, b, heads, d], or [b, s/P, heads, d] with batch_dim_idx=0) go to `local_attention` as the
    whole sequence of this rank's heads; its output comes back split over the sequence.

    scatter_idx / gather_idx: DeepSpeed's (2 and 0); the layout follows batch_dim_idx as in
    DeepSpeed. sp_stream (a CUDA stream overlapping the exchanges) is accepted and unused."""

    def __init__(self, local_attention, sequence_process_group, scatter_idx=2, gather_idx=0, sp_stream=None):
        super().__init__()
        self.local_attn = local_attention
        self.spg = sequence_process_group
        self.scatter_idx = scatter_idx
        self.gather_idx = gather_idx
        self.sp_stream = sp_stream
        self.all_to_all_bytes = 0  # what the last forward's four exchanges sent to other ranks (backward: the same)
        hold_mesh(self, sequence_process_group)

    def forward(self, query, key, value, batch_dim_idx, rotary_pos_emb=None, *args, **kwargs):
        if rotary_pos_emb is not None:
            raise _zeal.ConfigError("DistributedAttention: rotary_pos_emb= is not supported yet; apply the rotary "
                                    "embedding (with global positions) to q and k before the call")
        spg, s, g = self.spg, self.scatter_idx, self.gather_idx
        heads = query.shape[_head_dim(batch_dim_idx)]
        p, me = spg.size, spg.rank
        kept = {n: head_counts(n, p)[me] / n for n in (heads, key.shape[2])}  # the share each rank keeps
        self.all_to_all_bytes = sum(int(t.numel() * t.element_size() * (1 - kept[t.shape[2]]))
                                    for t in (query, key, value)) + \
            int(query.numel() * p * kept[heads] * query.element_size() * (1 - 1 / p))  # the context, back
        q = _SeqAllToAll.apply(spg, query, s, g, batch_dim_idx)
        k = _SeqAllToAll.apply(spg, key, s, g, batch_dim_idx)
        v = _SeqAllToAll.apply(spg, value, s, g, batch_dim_idx)
        context = self.local_attn(q, k, v, *args, **kwargs)
        if isinstance(context, tuple):
            context = context[0]
        if context.dim() == 3:  # [.., .., heads*d] from a local attention that merged its heads
            context = context.unflatten(2, (q.shape[2], -1))
        return _SeqAllToAll.apply(spg, context, g, s, batch_dim_idx, None, None, None, True, heads)
