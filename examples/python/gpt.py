"""A small GPT-style causal language model (character level) and the text it trains on."""
import math
import pydoc
import sys

import torch
import torch.nn.functional as F
from torch import nn


def _causal(q, k, v):
    """[b, s, heads, d] each, the whole sequence: causal attention (torch's SDPA on [b, heads, s, d])."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return y.transpose(1, 2)


class Block(nn.Module):
    def __init__(self, width, heads, moe=0, ep=1, seq_group=None):
        super().__init__()
        self.heads = heads
        self.attention = None
        if seq_group is not None:  # Ulysses: this rank holds 1/S of the sequence (docs/long_sequences.md)
            from zeal.sequence.layer import DistributedAttention

            self.attention = DistributedAttention(_causal, seq_group)
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.l_aux = self.exp_counts = None
        if moe:  # the MLP becomes `moe` top-2 experts over `ep` expert-parallel ranks (docs/moe.md)
            from zeal.moe.layer import MoE

            self.moe = MoE(width, self.mlp, num_experts=moe, ep_size=ep, k=2, capacity_factor=1.25, min_capacity=4)
            del self.mlp

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads) for z in self.qkv(self.ln1(x)).split(c, dim=2))
        y = self.attention(q, k, v, 0) if self.attention is not None else _causal(q, k, v)
        x = x + self.proj(y.reshape(b, t, c))
        if hasattr(self, "moe"):
            y, self.l_aux, self.exp_counts = self.moe(self.ln2(x))
            return x + y
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """moe > 0: every block's MLP is an MoE layer of that many experts (top-2, `ep` expert-parallel
    ranks); the loss adds aux_weight x the layers' load-balancing losses. seq_group: the sequence is
    split over this group (Ulysses): forward takes this rank's contiguous 1/S of each sequence, and
    the loss is the mean over the whole sequence (zeal.sequence.cross_entropy)."""

    def __init__(self, vocab, block=128, width=256, layers=4, heads=4, moe=0, ep=1, aux_weight=0.01, seq_group=None):
        super().__init__()
        self.aux_weight = aux_weight
        self.seq_group = seq_group
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(block, width)
        self.blocks = nn.Sequential(*[Block(width, heads, moe, ep, seq_group) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * layers) if name.endswith("proj.weight") else 1.0))
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        first = 0 if self.seq_group is None else self.seq_group.rank * t  # global positions of this shard
        x = self.tok(idx) + self.pos(torch.arange(first, first + t, device=idx.device))
        logits = self.head(self.ln(self.blocks(x)))
        if targets is None:
            return logits
        if self.seq_group is not None:
            from zeal.sequence.cross_entropy import sequence_parallel_cross_entropy

            loss = sequence_parallel_cross_entropy(logits, targets, self.seq_group)
        else:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        aux = [b.l_aux for b in self.blocks if b.l_aux is not None]
        return loss + self.aux_weight * sum(aux) if aux else loss

    def moe_stats(self):
        """(the mean load-balancing loss, tokens per expert summed over the layers) of the last
        forward; None without MoE layers."""
        blocks = [b for b in self.blocks if b.l_aux is not None]
        if not blocks:
            return None
        return (sum(b.l_aux.item() for b in blocks) / len(blocks),
                sum(b.exp_counts.to(torch.int64) for b in blocks).tolist())


class TensorParallelBlock(nn.Module):
    """A Block cut over a tensor group (zeal.tensor_parallel): each rank holds heads / t of the
    attention heads (their q, k, v rows and proj columns) and 4 width / t of the MLP; one
    all-reduce after attention and one after the MLP, forward and backward. sequence_parallel: x is
    this rank's part of the sequence; the LayerNorms and residual adds work on it, and the
    all-reduces become all-gathers before q, k, v and the MLP and reduce-scatters after."""

    def __init__(self, block, group, sequence_parallel=False):
        super().__init__()
        from zeal import tensor_parallel as tp

        if block.heads % group.size:
            raise ValueError(f"{block.heads} heads cannot be split over a tensor group of {group.size}")
        self.group, self.heads = group, block.heads // group.size
        self.sequence_parallel = sequence_parallel
        self.ln1, self.ln2 = block.ln1, block.ln2
        sp = {"sequence_parallel": sequence_parallel}
        if sequence_parallel:
            tp.sequence_parallel_parameters(self.ln1, group)
            tp.sequence_parallel_parameters(self.ln2, group)
        width = block.qkv.in_features
        qkv = []
        for part in range(3):  # q, k and v separately, each split by heads
            full = nn.Linear(width, width)
            with torch.no_grad():
                full.weight.copy_(block.qkv.weight[part * width:(part + 1) * width])
                full.bias.copy_(block.qkv.bias[part * width:(part + 1) * width])
            qkv.append(tp.ColumnParallelLinear.from_full(full, group, gather_output=False))
        self.q, self.k, self.v = qkv
        self.proj = tp.RowParallelLinear.from_full(block.proj, group, input_is_parallel=True, **sp)
        self.up = tp.ColumnParallelLinear.from_full(block.mlp[0], group, gather_output=False, **sp)
        self.down = tp.RowParallelLinear.from_full(block.mlp[2], group, input_is_parallel=True, **sp)

    def forward(self, x):
        from zeal import tensor_parallel as tp

        if self.sequence_parallel:  # the whole sequence for attention; gradients reduce-scattered
            h = tp.gather_from_sequence_region(self.ln1(x), self.group)
        else:
            h = tp.copy_to_tensor_region(self.ln1(x), self.group)  # one gradient all-reduce for q, k, v
        b, t, _ = h.shape
        q, k, v = (F.linear(h, m.weight, m.bias) for m in (self.q, self.k, self.v))
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TensorParallelGPT(nn.Module):
    """The demo GPT cut over a tensor group: a vocabulary-parallel embedding and head (the logits
    never gathered: vocabulary-parallel cross-entropy), TensorParallelBlocks. Built from a full GPT
    (the same on every rank of the group, e.g. the same seed), so it computes what that GPT does.
    sequence_parallel: between the tensor-parallel layers each rank keeps its part of the sequence
    (Megatron-LM's sequence parallelism); the sequence length must divide by the group size."""

    def __init__(self, gpt, group, sequence_parallel=False):
        super().__init__()
        from zeal import tensor_parallel as tp

        self.group, self.sequence_parallel = group, sequence_parallel
        sp = {"sequence_parallel": sequence_parallel}
        self.tok = tp.VocabParallelEmbedding.from_full(gpt.tok, group, **sp)
        self.pos = gpt.pos
        self.blocks = nn.Sequential(*[TensorParallelBlock(b, group, sequence_parallel) for b in gpt.blocks])
        self.ln = gpt.ln
        self.head = tp.ColumnParallelLinear.from_full(gpt.head, group, gather_output=False, **sp)
        if sequence_parallel:
            tp.sequence_parallel_parameters(self.pos, group)
            tp.sequence_parallel_parameters(self.ln, group)

    def forward(self, idx, targets=None):
        from zeal import tensor_parallel as tp

        t = idx.shape[1]
        first, count = 0, t
        if self.sequence_parallel:  # this rank's positions
            count = t // self.group.size
            first = self.group.rank * count
        x = self.tok(idx) + self.pos(torch.arange(first, first + count, device=idx.device))
        logits = self.head(self.ln(self.blocks(x)))
        if targets is None:  # the whole vocabulary's logits on every rank (sampling)
            return tp.gather_from_tensor_region(logits, self.group)
        return tp.vocab_parallel_cross_entropy(logits, targets, self.group).mean()


def corpus_text(min_chars=300_000):
    """English text generated from the documentation of the Python standard library on this
    machine: real prose and code comments, no download. Deterministic for a Python version."""
    parts, seen = [], set()
    total = 0
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}:
            continue
        try:
            module = __import__(name)
        except Exception:  # noqa: BLE001 - some modules do not import on every platform
            continue
        docs = [pydoc.getdoc(module)]
        for attr in sorted(vars(module)):
            obj = getattr(module, attr, None)
            if not attr.startswith("_") and (isinstance(obj, type) or callable(obj)):
                docs.append(pydoc.getdoc(obj))
        for doc in docs:
            if len(doc) >= 200 and doc not in seen:
                seen.add(doc)
                parts.append(doc.strip() + "\n\n")
                total += len(parts[-1])
        if total >= min_chars:
            break
    text = "".join(parts)
    return "".join(c for c in text if c.isascii())


class CharDataset(torch.utils.data.Dataset):
    """Windows of `block` + 1 characters at a fixed stride; input and shifted target."""

    def __init__(self, text, block, stride=None):
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        self.block = block
        self.stride = stride or block // 2

    def __len__(self):
        return (len(self.data) - self.block - 1) // self.stride

    def __getitem__(self, i):
        chunk = self.data[i * self.stride: i * self.stride + self.block + 1]
        return chunk[:-1], chunk[1:]
