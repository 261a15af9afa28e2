"""Losses over a sequence split across a sequence group.

Note [Sequence loss scale]: the engine averages a dense gradient over every batch axis it is
replicated on, sequence and ring included (Note [Parameter placement]: the divisor is data x ring x
sequence at every ZeRO stage). So a rank's backward must seed its own tokens with P / N, N the
non-ignored tokens of the whole sequence and P the ranks sharing it: the mean over the P ranks then
gives each token 1 / N, the gradient of the full sequence's mean loss. Every loss here returns that
mean (the same value on every rank of the group, the number to log) with that backward, whatever
the split, the padding and the ignored tokens; DeepSpeed's all-gather recipe (ALST's tutorial:
sum(loss_r * tokens_r) / sum(tokens_r) through a differentiable all-gather) seeds the same.
DeepSpeed's vocab_sequence_parallel_cross_entropy returns per-token losses whose backward seeds
1 / N (right for DeepSpeed's ZeRO 0-2, which sum over the sequence ranks, P times too small at its
ZeRO-3); here its backward is scaled by P, so it is right at every stage (docs/compatibility.md)."""
import torch
import torch.nn.functional as F

from .. import _zeal


class _SequenceMean(torch.autograd.Function):
    """(sum, count) of this rank's tokens -> the group's sum / count; backward seeds P / count."""

    @staticmethod
    def forward(ctx, local_sum, local_count, group):
        both = torch.stack([local_sum.detach().to(torch.float64), local_count.to(torch.float64)])
        group.all_reduce(both).wait()
        total = both[1].clamp_min(1.0)
        ctx.scale = group.size / total.item()
        return (both[0] / total).to(local_sum.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None, None


def sequence_mean(local_sum, local_count, group):
    """The mean over a sequence group of a per-token quantity: `local_sum` (a scalar tensor in the
    graph) over `local_count` tokens on this rank. Same value on every rank; backward per Note
    [Sequence loss scale]."""
    if not torch.is_tensor(local_count):
        local_count = torch.tensor(float(local_count))
    return _SequenceMean.apply(local_sum, local_count.detach(), group)


def sequence_parallel_cross_entropy(logits, labels, group, ignore_index=-100):
    """Cross-entropy of this rank's positions (`logits` [..., V], `labels` [...], already shifted:
    labels[i] is the token after position i, as UlyssesSPDataLoaderAdapter's shift_labels), averaged
    over the non-ignored tokens of the whole sequence held by `group`."""
    flat = logits.reshape(-1, logits.shape[-1])
    target = labels.reshape(-1).to(flat.device)
    if flat.shape[0] != target.shape[0]:
        raise _zeal.ConfigError(f"sequence_parallel_cross_entropy: {flat.shape[0]} positions of logits, "
                                f"{target.shape[0]} labels")
    local = F.cross_entropy(flat.float(), target, ignore_index=ignore_index, reduction="sum")
    return sequence_mean(local, (target != ignore_index).sum(), group)


class _VocabSequenceParallelCrossEntropy(torch.autograd.Function):
    """DeepSpeed's: logits [s/P, b, V] and targets [s/P, b] -> per-token losses [s, b] of the whole
    sequence (rank order), the same on every rank. Ignored targets (-100) lose 0 and get no gradient."""

    @staticmethod
    def forward(ctx, vocab_seq_parallel_logits, target, sp_group):
        logits = vocab_seq_parallel_logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        valid = target != -100
        safe = target.masked_fill(~valid, 0)
        loss = -log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * valid
        p = sp_group.size
        full = torch.empty((p * loss.numel(),), dtype=loss.dtype)
        sp_group.all_gather(full, loss.contiguous().reshape(-1)).wait()
        ctx.save_for_backward(log_probs, safe, valid)
        ctx.group, ctx.dtype = sp_group, logits.dtype
        return full.view(p * loss.shape[0], *loss.shape[1:]).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        log_probs, safe, valid = ctx.saved_tensors
        n = safe.shape[0]
        rank, p = ctx.group.rank, ctx.group.size
        mine = grad_output[rank * n:(rank + 1) * n].float() * valid
        grad = log_probs.exp()
        grad.scatter_add_(-1, safe.unsqueeze(-1), -torch.ones_like(grad[..., :1]))
        grad = grad * mine.unsqueeze(-1) * p  # Note [Sequence loss scale]
        return grad.to(ctx.dtype), None, None


def vocab_sequence_parallel_cross_entropy(vocab_parallel_logits, target, sp_group=None):
    """DeepSpeed's vocab_sequence_parallel_cross_entropy (deepspeed.sequence.cross_entropy)."""
    if sp_group is None:
        from ..utils import groups

        sp_group = groups._get_sequence_parallel_group()
    return _VocabSequenceParallelCrossEntropy.apply(vocab_parallel_logits, target, sp_group)
