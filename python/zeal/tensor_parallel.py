"""Megatron-style tensor parallelism: layers whose weights are split over the ranks of a tensor
group, and a vocabulary-parallel cross-entropy.

Each layer's communication is a pair of autograd functions whose forward and backward mirror each
other: copy (identity forward, all-reduce of the gradient backward) against reduce (all-reduce
forward, identity backward), and split against gather along the last dim. A ColumnParallelLinear
followed by a RowParallelLinear (input_is_parallel=True) costs one all-reduce forward and one
backward, as in Megatron-LM.

Sequence parallelism (Megatron-LM's, optional per layer): between a RowParallelLinear and the next
ColumnParallelLinear the activations are the same on every rank, so the LayerNorms and residual
adds there can work on each rank's part of the sequence instead. RowParallelLinear(...,
sequence_parallel=True) reduce-scatters along the sequence dim instead of all-reducing, and
ColumnParallelLinear(..., sequence_parallel=True) all-gathers the sequence first (its backward
reduce-scatters): the same bytes on the wire as the all-reduces, and 1/t of the activation memory
in the region. Parameters used inside the region (the LayerNorms', the row-parallel bias) see only
their rank's tokens, so sequence_parallel_parameters() hooks their gradients to be summed over the
group. Dropout inside the region would need a per-rank RNG stream; it is not provided.

Initialisation: every layer builds its full weight with torch's own initialisation from the
current RNG state, the same on every rank of the group, and keeps its slice: a model built under
the same seed is the single-process model, cut. Sharded parameters carry `tensor_parallel = True`
(`partition_dim` says along which dim, `partition_offset` where the slice starts, `full_shape`
the whole tensor's shape: checkpoints save each slice under the full parameter's name with that
place, and load at any tensor-parallel size); replicated ones (RowParallelLinear's bias, and every
ordinary layer beside them) do not, and count in the gradient norm on the group's first rank only.

The group is any Zeal communicator: `make_groups(tensor=2)` cuts the world into tensor groups of
consecutive ranks and data groups across them (zeal.mesh: axes data x tensor).
"""
import torch
import torch.nn.functional as F

from . import _zeal, mesh


def make_groups(tensor, world=None):
    """(tensor group, data group, mesh) for a grid of world.size / tensor data replicas of
    `tensor` ranks each, cut once from the job's mesh (zeal.mesh); every rank of the world calls it."""
    world = world or _zeal.world()
    if tensor < 1 or world.size % tensor:
        raise ValueError(f"tensor-parallel size {tensor} must divide the world size {world.size}")
    groups = mesh.build(tensor=tensor, world=world)
    return groups.group("tensor"), groups.group("data"), groups.mesh


def copy_to_tensor_region(x, group):
    """Identity forward; all-reduce of the gradient backward (the input of column-parallel work)."""
    return _Copy.apply(x, group)


def gather_from_tensor_region(x, group):
    """All-gather along the last dim forward (each rank's slice, e.g. of the vocabulary, joined);
    this rank's slice of the gradient backward."""
    return _Gather.apply(x, group)


def _all_reduce(x, group):
    x = x.contiguous().clone()
    group.all_reduce(x, "sum").wait()
    return x


def _gather_last(x, group):
    x = x.contiguous()
    out = x.new_empty((group.size, *x.shape))
    group.all_gather(out, x).wait()
    return torch.cat(out.unbind(0), dim=-1)


def _split_last(x, group):
    size = x.shape[-1] // group.size
    return x[..., group.rank * size:(group.rank + 1) * size].contiguous()


def _seq_first(x, dim):
    return (x.transpose(0, dim) if dim else x).contiguous()


def _gather_seq(x, group, dim):
    x = _seq_first(x, dim)
    out = x.new_empty((group.size, *x.shape))
    group.all_gather(out, x).wait()
    out = out.reshape(group.size * x.shape[0], *x.shape[1:])
    return out.transpose(0, dim) if dim else out


def _reduce_scatter_seq(x, group, dim):
    _check_divides("the sequence length", x.shape[dim], group)
    x = _seq_first(x, dim)
    out = x.new_empty((x.shape[0] // group.size, *x.shape[1:]))
    group.reduce_scatter(out, x, "sum").wait()
    return out.transpose(0, dim) if dim else out


def _split_seq(x, group, dim):
    _check_divides("the sequence length", x.shape[dim], group)
    size = x.shape[dim] // group.size
    return x.narrow(dim, group.rank * size, size).contiguous()


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    """This rank's part of the sequence forward; the parts gathered backward."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split_seq(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group, ctx.dim), None, None


class _GatherFromSequence(torch.autograd.Function):
    """All-gather of the sequence forward; reduce-scatter of the gradient backward (each rank's
    gradient of the whole sequence is a partial sum: it came through that rank's weight slice)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _gather_seq(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Sum of the partial products, each rank keeping its part of the sequence, forward; the
    gradient's parts gathered backward."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter_seq(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group, ctx.dim), None, None


def scatter_to_sequence_region(x, group, seq_dim=1):
    """Enter a sequence-parallel region from a replicated tensor: each rank keeps its part of
    dim seq_dim (gathered again backward)."""
    return _ScatterToSequence.apply(x, group, seq_dim)


def gather_from_sequence_region(x, group, seq_dim=1):
    """Leave a sequence-parallel region: the whole sequence on every rank (forward all-gather,
    backward reduce-scatter, for input to tensor-parallel work)."""
    return _GatherFromSequence.apply(x, group, seq_dim)


def sequence_parallel_parameters(module, group):
    """Marks module's parameters as used inside a sequence-parallel region (a LayerNorm applied to
    each rank's part of the sequence): each rank's gradient covers only its tokens, so a hook sums
    it over the group as it is computed, and every rank holds the same replicated parameter."""
    for p in module.parameters():
        _sum_gradient_over(p, group)
    return module


def _sum_gradient_over(param, group):
    if not getattr(param, "sequence_parallel", False):
        param.sequence_parallel = True
        param.register_hook(lambda grad: _all_reduce(grad, group))


def _shard(full, dim, group):
    size = full.shape[dim] // group.size
    piece = full.narrow(dim, group.rank * size, size).detach().clone()
    param = torch.nn.Parameter(piece)
    param.tensor_parallel, param.partition_dim = True, dim
    param.partition_offset, param.full_shape = group.rank * size, tuple(full.shape)
    return param


def split_of(param):
    """Where a parameter's slice sits in its full tensor, for checkpoints that move between
    tensor-parallel sizes (include/zeal/checkpoint/checkpoint.h); None for a whole parameter."""
    if not getattr(param, "tensor_parallel", False):
        return None
    return {"dim": param.partition_dim, "offset": param.partition_offset, "full_shape": list(param.full_shape)}


class _Layer(torch.nn.Module):
    tensor_parallel_layer = True  # zeal.initialize finds the tensor group through it


def _check_divides(what, n, group):
    if n % group.size:
        raise ValueError(f"{what} ({n}) must be a multiple of the tensor-parallel size ({group.size})")


class ColumnParallelLinear(_Layer):
    """y = x W^T + b with W's rows (the output features) split over the group. gather_output:
    all-gather y (else each rank keeps its slice, for a RowParallelLinear to take).
    sequence_parallel: x is this rank's part of the sequence (dim seq_dim), all-gathered here."""

    def __init__(self, in_features, out_features, bias=True, gather_output=True, group=None,
                 sequence_parallel=False, seq_dim=1):
        super().__init__()
        self.group = group or _zeal.world()
        _check_divides("ColumnParallelLinear out_features", out_features, self.group)
        full = torch.nn.Linear(in_features, out_features, bias=bias)
        self.weight = _shard(full.weight, 0, self.group)
        self.bias = _shard(full.bias, 0, self.group) if bias else None
        self.gather_output = gather_output
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim

    def forward(self, x):
        if self.sequence_parallel:
            x = _GatherFromSequence.apply(x, self.group, self.seq_dim)
        else:
            x = _Copy.apply(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        return _Gather.apply(y, self.group) if self.gather_output else y

    @classmethod
    def from_full(cls, linear, group, gather_output=True, sequence_parallel=False, seq_dim=1):
        """This rank's slice of an existing torch.nn.Linear (the same on every rank of the group)."""
        layer = cls.__new__(cls)
        _Layer.__init__(layer)
        layer.group, layer.gather_output = group, gather_output
        layer.sequence_parallel, layer.seq_dim = sequence_parallel, seq_dim
        _check_divides("ColumnParallelLinear out_features", linear.out_features, group)
        layer.weight = _shard(linear.weight, 0, group)
        layer.bias = _shard(linear.bias, 0, group) if linear.bias is not None else None
        return layer


class RowParallelLinear(_Layer):
    """y = x W^T + b with W's columns (the input features) split over the group; the partial
    products are all-reduced, then the (replicated) bias is added. input_is_parallel: x is already
    this rank's slice (a ColumnParallelLinear's output without gathering). sequence_parallel: the
    partial products are reduce-scattered instead, each rank keeping its part of the sequence (dim
    seq_dim), and the bias's gradient is summed over the group."""

    def __init__(self, in_features, out_features, bias=True, input_is_parallel=False, group=None,
                 sequence_parallel=False, seq_dim=1):
        super().__init__()
        self.group = group or _zeal.world()
        _check_divides("RowParallelLinear in_features", in_features, self.group)
        full = torch.nn.Linear(in_features, out_features, bias=bias)
        self.weight = _shard(full.weight, 1, self.group)
        self.bias = torch.nn.Parameter(full.bias.detach().clone()) if bias else None
        self.input_is_parallel = input_is_parallel
        self._sequence(sequence_parallel, seq_dim)

    def _sequence(self, sequence_parallel, seq_dim):
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        if sequence_parallel and self.bias is not None:
            _sum_gradient_over(self.bias, self.group)

    def forward(self, x):
        if not self.input_is_parallel:
            x = _Split.apply(x, self.group)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = _ReduceScatterToSequence.apply(y, self.group, self.seq_dim)
        else:
            y = _Reduce.apply(y, self.group)
        return y + self.bias if self.bias is not None else y

    @classmethod
    def from_full(cls, linear, group, input_is_parallel=False, sequence_parallel=False, seq_dim=1):
        """This rank's slice of an existing torch.nn.Linear (the same on every rank of the group)."""
        layer = cls.__new__(cls)
        _Layer.__init__(layer)
        layer.group, layer.input_is_parallel = group, input_is_parallel
        _check_divides("RowParallelLinear in_features", linear.in_features, group)
        layer.weight = _shard(linear.weight, 1, group)
        layer.bias = torch.nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        layer._sequence(sequence_parallel, seq_dim)
        return layer


class VocabParallelEmbedding(_Layer):
    """An embedding whose rows (the vocabulary) are split over the group: each rank looks up the
    ids in its range, zeros the rest, and the results are all-reduced (sequence_parallel:
    reduce-scattered along seq_dim, entering a sequence-parallel region)."""

    def __init__(self, num_embeddings, embedding_dim, group=None, sequence_parallel=False, seq_dim=1):
        super().__init__()
        self.group = group or _zeal.world()
        self.sequence_parallel, self.seq_dim = sequence_parallel, seq_dim
        _check_divides("VocabParallelEmbedding num_embeddings", num_embeddings, self.group)
        full = torch.nn.Embedding(num_embeddings, embedding_dim)
        self.weight = _shard(full.weight, 0, self.group)
        self.vocab_start = self.group.rank * self.weight.shape[0]
        self.vocab_end = self.vocab_start + self.weight.shape[0]

    @classmethod
    def from_full(cls, embedding, group, sequence_parallel=False, seq_dim=1):
        """This rank's rows of an existing torch.nn.Embedding (the same on every rank of the group)."""
        layer = cls.__new__(cls)
        _Layer.__init__(layer)
        layer.group = group
        layer.sequence_parallel, layer.seq_dim = sequence_parallel, seq_dim
        _check_divides("VocabParallelEmbedding num_embeddings", embedding.num_embeddings, group)
        layer.weight = _shard(embedding.weight, 0, group)
        layer.vocab_start = group.rank * layer.weight.shape[0]
        layer.vocab_end = layer.vocab_start + layer.weight.shape[0]
        return layer

    def forward(self, ids):
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:  # the sum, each rank keeping its part of the sequence
            return _ReduceScatterToSequence.apply(out, self.group, self.seq_dim)
        return _Reduce.apply(out, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group):
        logits = logits.float()
        top = logits.max(dim=-1).values
        group.all_reduce(top, "max").wait()
        shifted = logits - top.unsqueeze(-1)
        width = logits.shape[-1]
        start = group.rank * width
        outside = (target < start) | (target >= start + width)
        local = (target - start).masked_fill(outside, 0)
        picked = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0).contiguous()
        group.all_reduce(picked, "sum").wait()
        exp = shifted.exp()
        total = exp.sum(dim=-1).contiguous()
        group.all_reduce(total, "sum").wait()
        ctx.save_for_backward(exp.div_(total.unsqueeze(-1)), local, outside)
        return total.log() - picked

    @staticmethod
    def backward(ctx, grad):
        softmax, local, outside = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, local.unsqueeze(-1), -(~outside).unsqueeze(-1).to(g.dtype))
        return g * grad.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits, target, group=None):
    """Per-token cross-entropy of logits whose last dim (the vocabulary) is split over the group
    (a ColumnParallelLinear without gather_output), without gathering them."""
    return _VocabParallelCrossEntropy.apply(logits, target, group or _zeal.world())
